"""The cVAE family: the network, its losses, its sampling graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrgen_dist.models.cvae import CVAE, FAMILY, VAEOutput, log_cosh, vae_loss


def test_log_cosh_matches_float64_reference_and_is_stable() -> None:
    x = torch.linspace(-30, 30, 20001, dtype=torch.float32)
    reference = np.log(np.cosh(x.double().numpy()))
    np.testing.assert_allclose(log_cosh(x).double().numpy(), reference, rtol=1e-6, atol=1e-6)
    big = torch.tensor([-1e4, 1e4, 3e38], requires_grad=True)
    value = log_cosh(big)
    assert torch.isfinite(value).all()
    assert value[0].item() == pytest.approx(1e4 - np.log(2.0))
    assert torch.cosh(torch.tensor(1e4)).isinf()  # the naive form overflows here
    value.sum().backward()
    np.testing.assert_allclose(big.grad.numpy(), [-1.0, 1.0, 1.0])
    small = torch.tensor([0.3, -2.0], requires_grad=True)
    log_cosh(small).sum().backward()
    np.testing.assert_allclose(small.grad.numpy(), np.tanh([0.3, -2.0]), rtol=1e-6)


def test_cvae_shapes_and_conditioning() -> None:
    torch.manual_seed(0)
    model = CVAE((218, 182), n_scanners=3, hidden=[64, 32], latent=8)
    x = torch.rand(5, 218, 182)
    s = torch.tensor([0, 1, 2, 1, 0])
    recon, mean, logvar, *_ = model(x, s, torch.randn(5, 8))
    assert recon.shape == (5, 1, 218, 182) and mean.shape == logvar.shape == (5, 8)
    assert 0 <= recon.min() and recon.max() <= 1
    z = torch.randn(2, 8)
    a = model.decode(z, torch.tensor([0, 0]))
    b = model.decode(z, torch.tensor([2, 2]))
    assert not torch.allclose(a, b)  # the label changes the decoded image
    assert model.encoder[0].in_features == 218 * 182 + 3
    assert model.to_pixels.out_features == 218 * 182
    # 6 FLOPs per multiply-accumulate of every Linear
    macs = (218 * 182 + 3) * 64 + 64 * 32 + 2 * 32 * 8 + (8 + 3) * 32 + 32 * 64 + 64 * 218 * 182
    assert FAMILY.flops_per_image(model) == 6 * macs


def test_thesis_size_and_loss_reduction() -> None:
    model = CVAE((218, 182), n_scanners=4, hidden=[1024, 512], latent=256)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(82.7e6, rel=0.01)
    target = torch.zeros(4, 1, 6, 5)
    recon = torch.full((4, 1, 6, 5), 0.5)
    mean, logvar = torch.zeros(4, 3), torch.zeros(4, 3)

    def outputs(mean: torch.Tensor) -> VAEOutput:
        return VAEOutput(recon, mean, logvar, torch.zeros(4, 3), torch.zeros(4, 3), sigma=None, probe_logits=None)

    terms = vae_loss(outputs(mean), target, "logcosh", kl_weight=1.0)
    assert terms["reconstruction"].item() == pytest.approx(30 * np.log(np.cosh(0.5)), rel=1e-6)  # sum pixels, mean batch
    assert terms["kl"].item() == 0.0
    mse = vae_loss(outputs(mean + 1), target, "mse", kl_weight=0.5)
    assert mse["reconstruction"].item() == pytest.approx(30 * 0.25)
    assert mse["kl"].item() == pytest.approx(3 * 0.5)
    assert mse["loss"].item() == pytest.approx(7.5 + 0.75)


def test_export_graph_is_the_decoder_in_its_own_dtype() -> None:
    torch.manual_seed(0)
    model = CVAE((218, 182), n_scanners=4, hidden=[16], latent=8).eval()
    graph = FAMILY.export_graph(model)
    z, s = torch.randn(3, 8), torch.tensor([0, 3, 1])
    assert graph.latent == 8
    torch.testing.assert_close(graph(z, s), model.decode(z, s), rtol=0, atol=0)
    half = FAMILY.export_graph(model.to(torch.bfloat16))(z, s)
    assert half.dtype == torch.float32 and (half - graph(z, s)).abs().max() < 0.05
