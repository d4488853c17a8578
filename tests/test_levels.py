"""The slice's axial level as a condition, end to end: a store of all 182 axial slices of each volume, a cVAE
and a diffusion model trained with `model.level_condition`, exported with a `level` input, asked for a level by
the sampler and `mrgen-sample --level`, and scored by `mrgen-fid` against every real level."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mrgen_dist.config import ConfigError, load_config
from mrgen_dist.data.convert import ConvertOptions, convert
from mrgen_dist.data.inputs import discover_directory
from mrgen_dist.data.store import SliceStore
from mrgen_dist.data.volume import MNI_SHAPE, SliceParams
from mrgen_dist.eval.levels import level_following
from mrgen_dist.eval.results import LevelFollowing
from mrgen_dist.export.exporter import ExportError, export_onnx
from mrgen_dist.models.cvae import CVAE, CVAEConfig
from mrgen_dist.models.parts.level import AXIAL_LEVELS, LEVEL_FEATURES, level_features
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.runtime.session import SampleError
from mrgen_dist.scanners import Vocabulary
from tests.launch import BIN, TINY_DIFFUSION, run, train_cmd


def test_level_features_are_smooth_distinct_and_on_the_grid() -> None:
    assert AXIAL_LEVELS == MNI_SHAPE[2]
    f = level_features(torch.arange(AXIAL_LEVELS), torch.float32)
    assert f.shape == (AXIAL_LEVELS, LEVEL_FEATURES) and f.abs().max() <= 1
    step = (f[1:] - f[:-1]).norm(dim=1)  # neighbours close, every level its own code
    distance = torch.cdist(f, f) + torch.eye(AXIAL_LEVELS) * 1e9
    assert step.max() < 0.6 and distance.min() > 0.05


def test_a_level_conditioned_cvae_decodes_each_level_differently() -> None:
    model = CVAE((218, 182), 4, [16], 4, config=CVAEConfig(hidden=[16], latent=4, level_condition=True))
    z, scanner = torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)
    low, high = model.decode(z, scanner, torch.tensor([30, 30])), model.decode(z, scanner, torch.tensor([30, 150]))
    assert torch.equal(low[0], high[0]) and not torch.equal(low[1], high[1])
    assert model.encoder[0].in_features == 218 * 182 + 4 + LEVEL_FEATURES


def test_families_without_a_level_input_refuse_the_condition(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    for family, words in (("atlas", "condition on the level with family cvae or diffusion"),
                          ("dcgan", "unknown config key 'model.level_condition'")):
        config.write_text(f"data:\n  store: s\nmodel:\n  family: {family}\n  level_condition: true\n")
        with pytest.raises(ConfigError, match=words):
            load_config(config)


@pytest.fixture(scope="module")
def level_store(cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test cohort (3 subjects per scanner) with all 182 axial slices of each volume."""
    out = tmp_path_factory.mktemp("levels") / "store"
    convert(discover_directory(cohort_dir), Vocabulary.method(), out,
            ConvertOptions(params=SliceParams(slices_per_volume=AXIAL_LEVELS), shard_volumes=5, test_fraction=0.34))
    return out


@pytest.fixture(scope="module")
def level_decoder(level_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small cVAE trained with the level as a condition (8 epochs, about 20 s), exported fp32."""
    out = tmp_path_factory.mktemp("level-run")
    done = run(train_cmd(level_store, out / "run", "model.level_condition=true", "model.hidden=[64]",
                         "train.epochs=8", "train.batch_size=16", "optim.lr=3e-3", "train.sample_every=8"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "run" / "samples_008.png").is_file()  # the preview asks for the middle level
    return export_onnx(out / "run", "fp32", out / "decoder.onnx").path


def test_the_store_holds_every_axial_level(level_store: Path) -> None:
    store = SliceStore(level_store)
    assert store.manifest.params["axial_indices"] == list(range(AXIAL_LEVELS))
    index = store.index
    for subject in np.unique(index.subject):
        assert sorted(index.slice_index[index.subject == subject]) == list(range(AXIAL_LEVELS))


def test_generated_slices_follow_the_asked_level(level_decoder: Path, level_store: Path, tmp_path: Path) -> None:
    """How much of the slice is head changes tenfold from the lowest level to the widest: the generated
    slices asked for each level must follow the real test slices of that level (`mrgen-fid levels`)."""
    sampler = Sampler(level_decoder)
    assert list(sampler.levels) == list(range(AXIAL_LEVELS))
    record = level_following(SliceStore(level_store), sampler, tmp_path)
    assert record.levels[0] == 0 and record.levels[-1] == AXIAL_LEVELS - 1 and len(record.levels) == 15
    correlations = [c.correlation for c in record.curves]
    assert min(correlations) > 0.8 and np.mean(correlations) > 0.9, correlations
    for curve in record.curves:  # the level changes the generated slices as much as it changes the real ones
        assert np.std(curve.generated) > 0.5 * np.std(curve.real), curve
    assert LevelFollowing.read(tmp_path / "levels.json") == record
    assert (tmp_path / "levels.png").is_file() and (tmp_path / "levels-strip.png").is_file()
    # without a level, image i gets the i-th trained level: n images cover the levels as the store does
    assert np.array_equal(sampler.level_inputs(AXIAL_LEVELS + 2, None)[[0, 181, 182]], [0, 181, 0])


def test_sample_and_fid_take_the_level(level_decoder: Path, level_store: Path, trained_run: Path,
                                       tmp_path: Path) -> None:
    done = run([str(BIN / "mrgen-sample"), str(level_decoder), "--scanner", "all", "--n", "3", "--level", "91",
                "--out", str(tmp_path / "s.h5")])
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "s.h5") as f:
        assert all(list(f[name].attrs["level"]) == [91, 91, 91] for name in f)
    done = run([str(BIN / "mrgen-sample"), str(level_decoder), "--scanner", "Intera", "--n", "2", "--level", "91",
                "--out", str(tmp_path / "pngs")])
    assert done.returncode == 0 and (tmp_path / "pngs" / "Intera" / "00001_k091.png").is_file()
    with pytest.raises(SampleError, match="level 200 is not one this model was trained on"):
        Sampler(level_decoder).sample("Intera", 1, level=200)
    with pytest.raises(ExportError, match="--precision fp32 or fp16"):
        export_onnx(level_decoder.parent / "run", "int8", tmp_path / "d8.onnx")
    plain = export_onnx(trained_run, "fp32", tmp_path / "plain.onnx").path
    with pytest.raises(SampleError, match="not trained with the slice level as a condition"):
        Sampler(plain).sample("Intera", 1, level=91)
    done = run([str(BIN / "mrgen-fid"), "--store", str(level_store), "--model", str(level_decoder), "--scanner",
                "Intera", "--repeats", "1", "--n-generated", "8", "--no-conditioning", "--out", str(tmp_path / "fid")])
    assert done.returncode == 0, done.stderr[-2000:]
    score = json.loads((tmp_path / "fid" / "fid_Intera.json").read_text())
    assert score["n_real"] == SliceStore(level_store).manifest.split_counts["test"]["Intera"] == AXIAL_LEVELS


def test_a_diffusion_model_takes_the_level(level_store: Path, tmp_path: Path) -> None:
    done = run(train_cmd(level_store, tmp_path / "run", "model.level_condition=true", "train.epochs=1",
                         "train.max_steps=3", config=TINY_DIFFUSION))
    assert done.returncode == 0, done.stderr[-3000:]
    sampler = Sampler(export_onnx(tmp_path / "run", "fp32", tmp_path / "denoiser.onnx").path)
    low, high = (sampler.sample("Intera", 2, seed=0, level=k) for k in (40, 140))
    assert low.shape == (2, 218, 182) and not np.array_equal(low, high)  # the same x_T, another level
    assert np.array_equal(low, sampler.sample("Intera", 2, seed=0, batch_size=1, level=40))
