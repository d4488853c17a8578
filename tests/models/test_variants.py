"""The cVAE's variants (learned observation noise, learned conditional prior, gradient-reversal probe) and the
GMVAE: their losses against reference formulas, the prior inside the exported graph, the noise output and
`--noise` sampling, and two-process DDP training with every learned part in one model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mrgen_dist.commands.sample import main as sample_main
from mrgen_dist.config import ConfigError, load_config
from mrgen_dist.export.exporter import export_onnx
from mrgen_dist.models import get_family
from mrgen_dist.models.cvae import CVAEConfig, gaussian_nll, kl_divergence, reverse_gradient
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.runtime.session import SampleError
from mrgen_dist.scanners import Vocabulary
from tests.launch import TINY, launch, two_cpu_processes

CVAE, GMVAE = get_family("cvae"), get_family("gmvae")


def _build(family, **fields):
    torch.manual_seed(0)
    config = family.Config(hidden=[16], latent=4, **fields)
    config.validate()
    return config, family.build(config, Vocabulary.method(), (218, 182))


def test_kl_to_a_learned_prior_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean, logvar, pm, pv = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(4))
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(pm, (0.5 * pv).exp())
    ).sum(1)
    torch.testing.assert_close(kl_divergence(mean, logvar, pm, pv), want)


def test_noise_loss_is_the_negative_log_likelihood_per_pixel() -> None:
    g = torch.Generator().manual_seed(1)
    residual = torch.randn(3, 1, 6, 5, generator=g) * 0.1
    sigma = torch.rand(3, 1, 6, 5, generator=g) * 0.2 + 0.01
    want = -torch.distributions.Normal(0.0, sigma).log_prob(residual).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_nll(residual, sigma), want)


def test_the_noise_model_leaves_the_mean_alone() -> None:
    """The noise NLL reaches only the noise parameters: the decoder's gradient is that of the plain cVAE."""
    from mrgen_dist.models.cvae import vae_loss

    grads = []
    for noise in ("none", "scanner"):
        config, model = _build(CVAE, observation_noise=noise)
        x, s, eps = torch.rand(2, 218, 182), torch.tensor([0, 3]), torch.randn(2, 4)
        vae_loss(model(x, s, eps), x, "logcosh", 1.0)["loss"].backward()
        grads.append(model.to_pixels.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_reverse_gradient_flips_and_scales() -> None:
    x = torch.ones(3, requires_grad=True)
    (reverse_gradient(x, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.5, -1.0, -1.5]))


def test_the_learned_prior_lives_in_the_export_graph_and_encode_mean_inverts_it() -> None:
    _, model = _build(CVAE, prior="scanner")
    with torch.no_grad():
        model.prior_mean.copy_(torch.arange(16.0).view(4, 4))
        model.prior_logvar.fill_(math.log(4.0))
    graph = CVAE.export_graph(model)
    z, s = torch.randn(2, 4), torch.tensor([1, 3])
    torch.testing.assert_close(graph(z, s), model.decode(model.prior_mean[s] + 2.0 * z, s))
    # the diagnostics' z is the sampling graph's: decoding it gives the reconstruction of the posterior mean
    x = torch.rand(2, 218, 182)
    torch.testing.assert_close(graph(CVAE.encode_mean(model, x, s), s), model.decode(model.encode(x, s)[0], s))


def test_every_variant_trains_one_step_and_reports_its_losses() -> None:
    from accelerate import Accelerator

    from mrgen_dist.models.base import Step

    acc = Accelerator(cpu=True)
    for family, fields, names in (
        (CVAE, {"observation_noise": "scanner"}, ("loss", "reconstruction", "kl", "noise")),
        (CVAE, {"observation_noise": "pixel", "loss": "mse"}, ("loss", "reconstruction", "kl", "noise")),
        (CVAE, {"prior": "scanner", "adversary": 2.0}, ("loss", "reconstruction", "kl", "adversary")),
        (GMVAE, {}, ("loss", "reconstruction", "kl")),
    ):
        config, model = _build(family, **fields)
        optimizers = family.optimizers(model, lambda p: torch.optim.Adam(p, 1e-3))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x, s = torch.rand(4, 218, 182), torch.tensor([0, 1, 2, 3])
        losses = family.train_step(Step(acc, config, model, optimizers, x, s, torch.randn(4, 4)))
        assert tuple(losses) == names == family.reported_losses(config)
        assert all(torch.isfinite(v) for v in losses.values())
        # every learned part moved: prior, noise level, probe included
        unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, before[k])]
        assert unchanged == [], (family.name, fields, unchanged)
    assert losses["kl"] > 0  # the GMVAE's components start apart (random means)


@pytest.mark.parametrize("override, field", [
    ("model.loss=l1", "model.loss"), ("model.observation_noise=voxel", "model.observation_noise"),
    ("model.prior=mixture", "model.prior"), ("model.adversary=-1", "model.adversary"),
])
def test_bad_variant_settings_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_config(TINY, ["data.store=/s", override])


def test_families_refuse_settings_that_contradict_them() -> None:
    with pytest.raises(ValueError, match="gmvae family"):
        get_family("vae").Config(prior="scanner").validate()
    with pytest.raises(ValueError, match="no label"):
        get_family("vae").Config(adversary=1.0).validate()
    with pytest.raises(ValueError, match="mixture"):
        GMVAE.Config(prior="standard").validate()
    CVAEConfig(observation_noise="scanner", prior="scanner", adversary=1.0).validate()


@pytest.mark.slow
def test_noise_model_trains_on_two_processes_exports_sigma_and_samples_noise(store_dir: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    done = launch(store_dir, out, two_cpu_processes(), "train.max_steps=6", "model.observation_noise=scanner",
                  "model.prior=scanner", "model.adversary=1.0", "--tracker", "none", ACCELERATE_USE_CPU="1")
    assert done.returncode == 0, done.stderr[-3000:]  # DDP finds every parameter used in forward
    assert "adversary" in (out / "metrics.jsonl").read_text().splitlines()[0]

    onnx_path = export_onnx(out, "fp32", tmp_path / "noise.onnx").path
    sampler = Sampler(onnx_path, device="cpu")
    assert sampler.has_noise and sampler.metadata.noise == "gaussian"
    mean = sampler.sample("Intera", 5, seed=3)
    noisy = sampler.sample("Intera", 5, seed=3, noise=True)
    assert noisy.min() >= 0 and noisy.max() <= 1 and np.abs(noisy - mean).mean() > 0.01
    # the same draws for any batch size; the latents are those of the mean images
    np.testing.assert_array_equal(noisy, sampler.sample("Intera", 5, seed=3, batch_size=2, noise=True))
    np.testing.assert_array_equal(mean, sampler.sample("Intera", 5, seed=3, batch_size=2))
    # the noise level of the draws is the learned sigma (away from the [0, 1] clip)
    sigma = sampler.session.run(["sigma"], {"z": sampler.latents("Intera", 5, 3),
                                            "scanner": np.full(5, sampler.scanner_id("Intera"))})[0][:, 0]
    inside = (mean > 0.3) & (mean < 0.7)
    residual = (noisy - mean)[inside] / sigma[inside]
    assert inside.sum() > 1000 and 0.9 < residual.std() < 1.1

    assert sample_main([str(onnx_path), "--scanner", "all", "--n", "2", "--noise", "--out", str(tmp_path / "s")]) == 0


def test_noise_on_a_mean_only_model_is_refused(trained_run: Path, tmp_path: Path) -> None:
    sampler = Sampler(export_onnx(trained_run, "fp32", tmp_path / "plain.onnx").path, device="cpu")
    assert not sampler.has_noise
    with pytest.raises(SampleError, match="no learned observation noise"):
        sampler.sample("Intera", 2, noise=True)
