"""The atlas cVAE (mrgen_dist/models/atlas.py): the Rician noise model, the acquisition (tone curve,
point-spread function) and the anatomy, trained, exported and sampled with its noise by the shared commands."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrgen_dist.config import load_config
from mrgen_dist.eval.diagnostics import decode_means
from mrgen_dist.eval.features import FidError
from mrgen_dist.export.exporter import export_onnx
from mrgen_dist.models import get_family
from mrgen_dist.models.atlas import FAMILY, PARAM_SCALE, _filter_axis, rician_mean, rician_nll, scanner_share
from mrgen_dist.models.base import PlainAccelerator, Step
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.scanners import Vocabulary
from tests.launch import REPO, TINY_ATLAS, launch, run, train_cmd, two_cpu_processes

SHAPE = (218, 182)


def _model(**fields):
    torch.manual_seed(0)
    config = FAMILY.Config(hidden=[16], latent=4, templates=2, **fields)
    config.validate()
    return config, FAMILY.build(config, Vocabulary.method(), SHAPE)


def _set_psf_sigma(model, sigma: list[list[float]]) -> None:
    with torch.no_grad():
        model.psf_param.copy_(torch.tensor(sigma).log() / PARAM_SCALE)


@pytest.mark.parametrize("clean", [0.0, 0.01, 0.04, 0.3])
def test_rician_mean_matches_the_mean_magnitude_of_draws(clean: float) -> None:
    sigma = 0.02
    rng = np.random.default_rng(0)
    draws = np.hypot(clean + sigma * rng.standard_normal(1_000_000), sigma * rng.standard_normal(1_000_000))
    got = float(rician_mean(torch.tensor(clean, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)))
    assert got == pytest.approx(draws.mean(), rel=2e-3)
    if clean == 0.0:
        assert got == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=1e-12)  # the Rayleigh mean


def test_rician_likelihood_recovers_the_noise_sigma() -> None:
    """The fit that sets each scanner's sigma: the NLL over sigma is smallest at the true sigma, on the
    background (clean 0: Rayleigh) and on tissue alike."""
    rng = np.random.default_rng(1)
    true = 0.03
    for clean in (0.0, 0.5):
        observed = torch.from_numpy(np.hypot(clean + true * rng.standard_normal(200_000),
                                             true * rng.standard_normal(200_000)))
        grid = torch.linspace(0.02, 0.04, 201, dtype=torch.float64)
        nll = torch.stack([rician_nll(observed, torch.full_like(observed, clean), s).mean() for s in grid])
        assert float(grid[nll.argmin()]) == pytest.approx(true, rel=0.01)


def test_scanner_share_is_the_variance_the_scanner_explains() -> None:
    scanner = torch.tensor([0, 0, 1, 1, 2, 2])
    # dimension 0: the scanner explains all of it; dimension 1: none (the same values in every scanner);
    # dimension 2: a small spread, all of it the scanner's, counts as much as dimension 0
    mean = torch.tensor([[1.0, 1, 0.1], [1, -1, 0.1], [2, 1, 0.2], [2, -1, 0.2], [3, 1, 0.3], [3, -1, 0.3]])
    assert float(scanner_share(mean, scanner)) == pytest.approx(2.0, rel=1e-3)
    same = torch.tensor([[0.3, -2.0], [1.7, 5.0]]).repeat(3, 1)  # every scanner: the same two means
    assert float(scanner_share(same, scanner)) == pytest.approx(0.0, abs=1e-6)


def test_filter_axis_is_a_convolution_with_each_images_own_kernel() -> None:
    torch.manual_seed(0)
    images, weights = torch.rand(3, 1, 20, 17), torch.rand(3, 5)
    for dim, shape, pad in ((2, (5, 1), (2, 0)), (3, (1, 5), (0, 2))):
        want = torch.cat([F.conv2d(images[i : i + 1], weights[i].view(1, 1, *shape), padding=pad) for i in range(3)])
        torch.testing.assert_close(_filter_axis(images, weights, dim), want)


def test_the_encoder_sees_the_slices_with_their_tone_curve_undone() -> None:
    _, model = _model()
    with torch.no_grad():
        model.tone.normal_(0, 0.1)  # four different monotone curves
    anatomy, scanner = torch.rand(4, 1, *SHAPE), torch.arange(4)
    model.psf_param.data.fill_(math.log(0.01) / PARAM_SCALE)  # no blur: the tone curve alone
    toned = model.acquire(anatomy, scanner, fitted=True)
    assert (toned - anatomy).abs().mean() > 0.02
    torch.testing.assert_close(model.untone(toned[:, 0], scanner), anatomy[:, 0], atol=1e-5, rtol=0)


def test_the_acquisition_starts_near_the_identity() -> None:
    _, model = _model()
    smooth = F.avg_pool2d(torch.rand(4, 1, *SHAPE), 9, stride=1, padding=4)  # no pixel-scale detail to blur
    acquired = model.acquire(smooth, torch.arange(4), fitted=True)
    assert (acquired - smooth).abs().max() < 0.01  # the tone curve is the identity, the PSF nearly a delta


def test_sampling_applies_each_scanners_blur_beyond_the_sharpest() -> None:
    """The fitted PSF holds the decoder's own blur, shared by every scanner; the sampling graph takes it out:
    per axis the sharpest scanner gets a delta, the others the rest of their variance."""
    _, model = _model()
    _set_psf_sigma(model, [[1.0, 2.0], [1.5, 1.2], [2.5, 3.0], [1.2, 1.0]])
    own = model.psf_sigma()
    torch.testing.assert_close(model.psf_sigma(fitted=True), torch.tensor([[1.0, 2.0], [1.5, 1.2], [2.5, 3.0], [1.2, 1.0]]))
    want = torch.tensor([[0.1, math.sqrt(3.0)], [math.sqrt(1.25), math.sqrt(0.44)], [math.sqrt(5.25), math.sqrt(8.0)],
                         [math.sqrt(0.44), 0.1]])  # 0.1: the delta's floor, MIN_PSF_VARIANCE
    torch.testing.assert_close(own, want)
    anatomy = torch.rand(1, 1, *SHAPE)
    # scanner 0 is the sharpest along rows, scanner 3 along columns: filtering by the other axis alone
    toned = model.acquire(anatomy, torch.tensor([3]))
    rows_only = model.acquire(anatomy, torch.tensor([0]))
    assert (toned - anatomy).abs().mean() > 0.01 and (rows_only - anatomy).abs().mean() > 0.01
    _set_psf_sigma(model, [[1.0, 1.0]] * 4)  # same blur everywhere: sampling draws the atlas unblurred
    torch.testing.assert_close(model.acquire(anatomy, torch.tensor([2])), anatomy, atol=1e-6, rtol=0)


def test_the_label_only_reaches_the_acquisition() -> None:
    """Two scanners with the same tone curve and PSF give the same image: the anatomy does not see the label."""
    _, model = _model()
    with torch.no_grad():
        model.tone[1] = model.tone[2]
        model.psf_param[1] = model.psf_param[2]
        model.tone[0] += 0.05  # another contrast
    graph = FAMILY.export_graph(model).eval()
    z = torch.randn(3, 4)
    same = graph(z, torch.full((3,), 1)), graph(z, torch.full((3,), 2))
    torch.testing.assert_close(*same, rtol=0, atol=0)
    assert (graph(z, torch.zeros(3, dtype=torch.long)) - same[0]).abs().max() > 1e-3
    assert model.decoder_body[0].in_features == 4  # z only


def test_one_step_trains_every_part_and_fits_the_background_noise() -> None:
    config, model = _model()
    with torch.no_grad():
        model.atlas[:, : 218 * 40] = 0.0  # the top rows are background, where sigma is fitted
    images = torch.rand(4, *SHAPE) * 0.3
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    step = Step(PlainAccelerator(), config, model, {"model": optimizer}, images, torch.arange(4), torch.randn(4, 4))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for _ in range(3):
        losses = FAMILY.train_step(step)
    assert set(losses) == {"loss", "reconstruction", "kl", "scanner_share", "noise"}
    assert all(v.isfinite() for v in losses.values())
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged, unchanged


@pytest.mark.parametrize("override, field", [
    ("model.psf=4", "model.psf"), ("model.warp_grid=[12]", "model.warp_grid"), ("model.bias_grid=[1,5]", "model.bias_grid"),
    ("model.prior=scanner", "model.prior"), ("model.observation_noise=scanner", "model.observation_noise"),
    ("model.max_shift=0", "model.max_shift"), ("model.encoder_input=whitened", "model.encoder_input"),
    ("model.scanner_penalty=-1", "model.scanner_penalty"),
])
def test_bad_settings_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(REPO / "hpc/configs/compare/atlas.yaml", ["data.store=/s", override]).model.validate()


def test_a_grid_finer_than_the_slices_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model\.warp_grid"):
        FAMILY.Config(warp_grid=[300, 10]).validate_shape(SHAPE)


def test_trained_exported_and_sampled_with_rician_noise(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    done = run(train_cmd(store_dir, out, "train.batch_size=8", "train.epochs=1", config=TINY_ATLAS))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "atlas cVAE" in done.stdout + done.stderr and (out / "samples_001.png").is_file()
    assert get_family("atlas") is FAMILY

    # fp16 passes the parity gate too: the warp runs in float32 whatever the networks' dtype
    assert export_onnx(out, "fp16", tmp_path / "atlas16.onnx").max_error < 2e-3
    sampler = Sampler(export_onnx(out, "fp32", tmp_path / "atlas.onnx").path, device="cpu")
    assert sampler.metadata.family == "atlas" and sampler.metadata.noise == "rician" and sampler.has_noise
    clean = sampler.sample("Unspecified", 6, seed=2)
    noisy = sampler.sample("Unspecified", 6, seed=2, noise=True)
    # one stream per component: the same draws for any batch size
    np.testing.assert_array_equal(noisy, sampler.sample("Unspecified", 6, seed=2, batch_size=4, noise=True))
    sigma = sampler.session.run(["sigma"], {"z": sampler.latents("Unspecified", 1, 2),
                                            "scanner": np.full(1, sampler.scanner_id("Unspecified"))})[0]
    sigma = float(sigma.flat[0])
    # Rician draws around the noise-free image: E y^2 = clean^2 + 2 sigma^2, E y = the Rician mean (above clean)
    assert 0.05 < sigma < 0.2 and clean.max() < 0.6  # so that the [0, 1] clip leaves the draws alone
    assert (np.square(noisy) - np.square(clean)).mean() == pytest.approx(2 * sigma**2, rel=0.02)
    expected = rician_mean(torch.from_numpy(clean).double(), torch.tensor(sigma, dtype=torch.float64))
    assert noisy.mean() == pytest.approx(float(expected.mean()), rel=0.01) and noisy.mean() > clean.mean() + 0.01


def test_diagnose_draws_the_models_noise_onto_reconstructions_when_asked() -> None:
    _, model = _model()
    z, scanner = np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32), np.arange(3)
    clean = decode_means(FAMILY, model, z, scanner, torch.device("cpu"))
    noisy = decode_means(FAMILY, model, z, scanner, torch.device("cpu"), noise=True)
    np.testing.assert_array_equal(noisy, decode_means(FAMILY, model, z, scanner, torch.device("cpu"), noise=True))
    sigma = float(model.sigma(torch.tensor([0]))[0, 0, 0, 0].detach())
    assert clean.max() < 0.6 and (np.square(noisy) - np.square(clean)).mean() == pytest.approx(2 * sigma**2, rel=0.03)
    cvae = get_family("cvae")
    plain = cvae.build(cvae.Config(hidden=[8], latent=4), Vocabulary.method(), SHAPE)
    with pytest.raises(FidError, match="no learned observation noise"):
        decode_means(cvae, plain, z, scanner, torch.device("cpu"), noise=True)


@pytest.mark.slow
def test_every_part_is_used_in_forward_under_two_process_ddp(store_dir: Path, tmp_path: Path) -> None:
    """DDP refuses a step whose forward leaves a parameter unused: the acquisition, the noise fit and the
    scanner penalty all run inside forward and the loss."""
    done = launch(store_dir, tmp_path / "ddp", two_cpu_processes(), "train.max_steps=4", config=TINY_ATLAS,
                  ACCELERATE_USE_CPU="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scanner_share" in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0]
