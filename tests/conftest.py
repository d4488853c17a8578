"""Shared fixtures: a small real cohort of NIfTI files and the store converted from it; the two test tiers.

`make test-fast` (`pytest --fast`) runs the unit tier: no subprocess (spawning one fails the test), no fixture
that writes a cohort or trains a run. Every other test is in the integration tier, marked `integration` here
when it uses such a fixture, is marked `slow`, or is marked `integration` by hand; `make test` runs both.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mrgen_dist.data.convert import ConvertOptions, convert
from mrgen_dist.data.demo import write_cohort
from mrgen_dist.data.inputs import discover_directory
from mrgen_dist.scanners import Vocabulary

SUBJECTS_PER_SCANNER = 3
#: Fixtures that write a cohort, convert it or train: a test that uses one is an integration test.
HEAVY_FIXTURES = {"cohort_dir", "store_dir", "trained_run", "atlas_run", "translator_run", "translator_onnx"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true", help="the unit tier only: no subprocess, no cohort, no training")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    fast = config.getoption("--fast")
    for item in items:
        heavy = HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))
        if heavy or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)
        if fast and item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.skip(reason="integration tier (make test)"))


@pytest.fixture(autouse=True)
def _no_subprocess_in_the_fast_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In `--fast`, spawning a process fails the test: a test that needs one belongs to the integration tier."""
    if not request.config.getoption("--fast"):
        return
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError("a unit test spawned a process: mark it pytest.mark.integration")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic volumes (3 per scanner) on the FSL grid, IXI/SALD file names."""
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, subjects_per_scanner=SUBJECTS_PER_SCANNER, seed=7, workers=2)
    return out


@pytest.fixture(scope="session")
def store_dir(cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cohort as a store of 3 shards (5 + 5 + 2 volumes), split by subject."""
    out = tmp_path_factory.mktemp("store") / "store"
    convert(discover_directory(cohort_dir), Vocabulary.method(), out, ConvertOptions(shard_volumes=5, test_fraction=0.34))
    return out


@pytest.fixture(scope="session")
def trained_run(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cVAE trained for 30 steps on the store: model.safetensors + config.json."""
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("trained") / "run"
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "mrgen_dist.commands.train", "--config", str(repo / "hpc/configs/tiny.yaml"),
         f"data.store={store_dir}", f"train.out={out}", "train.max_steps=30", "train.sample_every=100"],
        capture_output=True, text=True, timeout=300, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def atlas_run(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny atlas cVAE trained for 30 steps on the store: the teacher of the distilled translators."""
    from tests.launch import TINY_ATLAS, run, train_cmd

    out = tmp_path_factory.mktemp("atlas") / "run"
    done = run(train_cmd(store_dir, out, "train.max_steps=30", "train.sample_every=100", config=TINY_ATLAS))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def translator_run(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StarGAN translator trained for 30 steps on the store."""
    from tests.launch import TINY_TRANSLATORS, run, train_cmd

    out = tmp_path_factory.mktemp("translator") / "run"
    done = run(train_cmd(store_dir, out, "train.epochs=1", "train.max_steps=30", config=TINY_TRANSLATORS["stargan"]))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def translator_onnx(translator_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`translator_run` exported (fp32, the mrgen-translator contract)."""
    from mrgen_dist.export.exporter import export_onnx

    return export_onnx(translator_run, "fp32", tmp_path_factory.mktemp("translator-onnx") / "translator.onnx").path
