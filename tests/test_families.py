"""Every registered family builds, trains a step, exports and is run by the torch-free runtime, through the
shared commands (called in this process): a family that joins FAMILIES is covered here with no new test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mrgen_dist.commands.export import main as export_main
from mrgen_dist.commands.train import main as train_main
from mrgen_dist.models import FAMILIES
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.runtime.translator import Translator
from tests.launch import REPO, TINY

pytestmark = pytest.mark.integration

ASSETS = REPO / "tests" / "assets"
#: Families whose test-sized config is the cVAE's, with the family switched; every other family has its own
#: `tests/assets/tiny_<name>.yaml` (a new family adds that file and nothing here).
SHARED = {"cvae": [], "vae": ["model.family=vae"], "gmvae": ["model.family=gmvae"]}


def tiny_config(name: str) -> tuple[Path, list[str]]:
    return (TINY, SHARED[name]) if name in SHARED else (ASSETS / f"tiny_{name}.yaml", [])


def test_every_family_has_a_test_config() -> None:
    assert [name for name in FAMILIES if not tiny_config(name)[0].is_file()] == []


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_trains_exports_and_runs_through_the_shared_commands(
        name: str, store_dir: Path, atlas_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    config, overrides = tiny_config(name)
    if name == "distilled":
        overrides = [*overrides, f"model.teacher={atlas_run}"]
    if name == "refiner":
        overrides = [*overrides, f"model.coarse={atlas_run}"]
    run = tmp_path / "run"
    assert train_main(["--config", str(config), f"data.store={store_dir}", f"train.out={run}", "train.max_steps=1",
                       "train.epochs=1", "train.sample_every=100", *overrides]) == 0
    family = FAMILIES[name]
    onnx_file = tmp_path / f"{family.kind}.onnx"
    assert export_main(["onnx", "--model", str(run), "--out", str(onnx_file)]) == 0
    if family.kind == "translator":
        translator = Translator(onnx_file, device="cpu")
        images = translator.translate(np.full((2, *translator.image_shape), 0.5, np.float32), translator.targets[0])
    else:  # a decoder, a diffusion denoiser or a refiner: all sampled by Sampler
        sampler = Sampler(onnx_file, device="cpu")
        images = sampler.sample(sampler.vocabulary.names[0], n=2, seed=0)
    assert images.shape[0] == 2 and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
