"""The atlas cVAE's learned acquisition (`model.acquisition: learned`): the "chi" noise draw (numpy runtime and
torch twin), the fit by simulated moments that sets it, the gain field, and the exported file's noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mrgen_dist.config import load_config
from mrgen_dist.eval.diagnostics import decode_means
from mrgen_dist.export.exporter import export_onnx
from mrgen_dist.models.atlas import FAMILY, AtlasOutput, texture_fit
from mrgen_dist.models.base import PlainAccelerator, Step
from mrgen_dist.models.parts.noise import chi_draw
from mrgen_dist.runs import load_model
from mrgen_dist.runtime.noise import NoiseTexture, add_noise, white_shape
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.scanners import Vocabulary
from tests.launch import REPO, TINY_ATLAS, run, train_cmd

SMALL = (64, 56)
#: A correlation kernel of unit energy that spreads each pixel's noise to its row and column neighbours.
KERNEL = np.array([[0.0, 0.3, 0.0], [0.3, 1.0, 0.3], [0.0, 0.3, 0.0]]) / np.sqrt(1.36)


def _model(shape: tuple[int, int] = SMALL, **fields):
    torch.manual_seed(0)
    config = FAMILY.Config(hidden=[16], latent=4, templates=2, acquisition="learned", warp_grid=[4, 4],
                           bias_grid=[3, 3], **fields)
    config.validate()
    config.validate_shape(shape)
    return config, FAMILY.build(config, Vocabulary.method(), shape)


def _texture(dof: float = 6.0) -> NoiseTexture:
    return NoiseTexture([dof] * 4, [KERNEL.tolist()] * 4)


def test_the_torch_draw_is_the_runtimes_draw() -> None:
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 0.5, (4, 1, *SMALL)).astype(np.float32)
    sigma = rng.uniform(0.01, 0.05, (4, 1, *SMALL)).astype(np.float32)
    texture = NoiseTexture([0.0, 1.5, 6.0, 14.0], [KERNEL.tolist()] * 4)
    scanner = np.array([3, 2, 1, 0])
    drawn = add_noise(clean, sigma, "chi", [np.random.default_rng(k) for k in (1, 2, 3)], scanner, texture)
    white = torch.from_numpy(np.concatenate(
        [np.random.default_rng(k).standard_normal(white_shape(clean.shape, 3), dtype=np.float32) for k in (1, 2, 3)], 1))
    torch_drawn = chi_draw(torch.from_numpy(clean), torch.from_numpy(sigma), torch.tensor(texture.dof)[scanner],
                           torch.tensor(texture.kernel)[scanner], white)
    np.testing.assert_allclose(torch_drawn.numpy(), drawn, atol=2e-6, rtol=0)


def test_no_extra_freedom_and_one_tap_is_the_rician_draw() -> None:
    clean = np.random.default_rng(0).uniform(0, 0.5, (3, 1, *SMALL)).astype(np.float32)
    sigma = np.full_like(clean, 0.03)
    rician = add_noise(clean, sigma, "rician", [np.random.default_rng(k) for k in (1, 2)])
    chi = add_noise(clean, sigma, "chi", [np.random.default_rng(k) for k in (1, 2, 3)], np.zeros(3, dtype=int),
                    NoiseTexture([0.0] * 4, [[[1.0]]] * 4))
    np.testing.assert_allclose(chi, rician, atol=1e-7, rtol=0)


def test_the_background_of_a_chi_draw_has_the_power_and_correlation_of_its_texture() -> None:
    """On air (clean 0) E m^2 = sigma^2 (2 + d), and neighbouring pixels correlate as the kernel says."""
    sigma, dof = 0.02, 6.0
    clean = np.zeros((8, 1, 128, 128), dtype=np.float32)
    m = add_noise(clean, np.full_like(clean, sigma), "chi", [np.random.default_rng(k) for k in (1, 2, 3)],
                  np.zeros(8, dtype=int), _texture(dof))
    assert float(np.mean(m**2)) == pytest.approx(sigma**2 * (2 + dof), rel=0.01)
    c = m - m.mean()
    neighbour = float(np.mean(c[..., 1:] * c[..., :-1]) / np.mean(c**2))
    diagonal = float(np.mean(c[..., 1:, 1:] * c[..., :-1, :-1]) / np.mean(c**2))
    assert neighbour > 0.2 and diagonal > 0.05 and neighbour > 2 * diagonal  # the kernel's cross shape


def test_the_moment_fit_recovers_a_known_noise() -> None:
    """The texture fit alone, from its start (white noise, d = 2/3), finds the sigma, the noise floor's degrees
    of freedom and the correlation kernel of background drawn with a known texture (4 images of air a step)."""
    config, model = _model()
    sigma, dof = 0.02, 6.0
    noise_params = [model.noise_param, model.noise_map, model.noise_dof, model.noise_kernel]
    optimizer = torch.optim.Adam(noise_params, 3e-3)
    scanner = torch.zeros(4, dtype=torch.long)
    clean = torch.zeros(4, 1, *SMALL)
    rng = [np.random.default_rng(k) for k in (1, 2, 3)]
    for _ in range(300):
        real = add_noise(clean.numpy(), np.full(clean.shape, sigma, np.float32), "chi", rng, scanner.numpy(), _texture(dof))
        draw = model.observe(clean, scanner, torch.randn(model.white_shape(4)))
        out = AtlasOutput(clean, clean, model.sigma(scanner), draw, model.map_roughness(), torch.zeros(4, 4),
                          torch.zeros(4, 4), None)
        loss = texture_fit(out, torch.from_numpy(real))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        fitted_power = float(model.sigma(scanner[:1]).square().mean() * (2 + model.noise_dofs()[0]))
        kernel = model.noise_kernels()[0].numpy()
    assert fitted_power == pytest.approx(sigma**2 * (2 + dof), rel=0.05)
    assert float(model.noise_dofs()[0]) == pytest.approx(dof, rel=0.15)  # from 2/3 at the start
    np.testing.assert_allclose(kernel, KERNEL, atol=0.08)


def test_every_learned_part_trains() -> None:
    config, model = _model()
    with torch.no_grad():
        model.atlas[:, : SMALL[1] * 16] = 0.0  # the top rows are background, where the noise is fitted
    images = torch.rand(4, *SMALL) * 0.3
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    noise = torch.randn(4, FAMILY.noise_dim(config))
    step = Step(PlainAccelerator(), config, model, {"model": optimizer}, images, torch.arange(4), noise)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for _ in range(3):
        losses = FAMILY.train_step(step)
    assert all(v.isfinite() for v in losses.values())
    assert not [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    # the loop's noise decides the draw: the same step's losses again from the same numbers
    with torch.no_grad():
        a, b = (FAMILY.losses(step) for _ in range(2))
    assert a["noise"] == b["noise"]


def test_the_gain_field_is_each_scanners_and_undone_for_the_encoder() -> None:
    _, model = _model()
    with torch.no_grad():
        model.gain[1] = 0.05  # scanner 1 brighter everywhere
    anatomy = torch.full((2, 1, *SMALL), 0.4)
    scanner = torch.tensor([0, 1])
    with torch.no_grad():
        out = model.acquire(anatomy, scanner)
        untoned = model.untone(out[:, 0], scanner).numpy()
    assert float(out[1].mean() / out[0].mean()) == pytest.approx(float(np.exp(np.tanh(0.5) * 0.5)), rel=1e-3)
    np.testing.assert_allclose(untoned[1], untoned[0], atol=1e-5)


def test_diagnose_and_the_sampler_draw_the_same_kind_of_noise(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "learned"
    done = run(train_cmd(store_dir, out, "train.batch_size=8", "train.epochs=1", "model.acquisition=learned",
                         config=TINY_ATLAS))
    assert done.returncode == 0, done.stderr[-3000:]
    sampler = Sampler(export_onnx(out, "fp32", tmp_path / "learned.onnx").path, device="cpu")
    assert sampler.metadata.noise == "chi" and sampler.noise_texture is not None
    assert len(sampler.noise_texture.dof) == 4 and sampler.noise_texture.taps == 3
    noisy = sampler.sample("Intera", 5, seed=1, noise=True)
    np.testing.assert_array_equal(noisy, sampler.sample("Intera", 5, seed=1, batch_size=2, noise=True))
    clean = sampler.sample("Intera", 5, seed=1)
    assert noisy.mean() > clean.mean() and np.isfinite(noisy).all()
    # diagnose draws the same noise around the same images (streams of its own)
    model, cpu = load_model(out), torch.device("cpu")
    z = sampler.latents("Intera", 5, 1)
    scanner = np.full(5, sampler.scanner_id("Intera"))
    means = decode_means(FAMILY, model, z, scanner, cpu)
    np.testing.assert_allclose(means, clean, atol=1e-4)
    drawn = decode_means(FAMILY, model, z, scanner, cpu, noise=True)
    assert abs(float(drawn.mean() - noisy.mean())) < 0.01 and abs(float(drawn.std() - noisy.std())) < 0.01


@pytest.mark.parametrize("override, field", [
    ("model.acquisition=physical", "model.acquisition"), ("model.noise_taps=2", "model.noise_taps"),
    ("model.gain_grid=[1,5]", "model.gain_grid"), ("model.noise_grid=[4]", "model.noise_grid"),
])
def test_bad_settings_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(REPO / "hpc/configs/compare/atlas.yaml", ["data.store=/s", override]).model.validate()


def test_a_shifted_atlas_keeps_its_edge_and_the_map_interpolates_over_the_head() -> None:
    _, model = _model()
    with torch.no_grad():
        model.atlas.fill_(0.2)
        model.to_warp.bias.fill_(1.0)  # every control point shifted by tanh(1) x max_shift pixels
        anatomy = model.anatomy(torch.zeros(1, 4))
    assert float(anatomy.min()) == pytest.approx(0.2, abs=1e-5)  # no frame of zeros where the atlas moved away
    with torch.no_grad():
        model.noise_map.zero_()
        flat = float(model.map_roughness())
        model.noise_map[0, 7] = 0.1  # one interior control point raised
    assert flat == 0.0 and float(model.map_roughness()) > 0
