"""A cascade in the package: a diffusion run of the slices' 2 x 2 block means (`model.block_means`) as the coarse
stage of a refiner with `model.condition_block` 2, both trained through mrgen-train on the test store, exported
together and sampled by the torch-free runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mrgen_dist.artifacts import ModelMetadata
from mrgen_dist.models.refiner import RefinerConfig
from mrgen_dist.scanners import Vocabulary

SHAPE = (218, 182)
DRAWN = (109, 91)


@pytest.fixture(scope="module")
def cascade(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the base's run, the exported refiner file): a tiny diffusion model of 2 x 2 block means, one epoch, and
    a tiny refiner over its draws, two epochs, each preview drawn (the refiner's over the base's draws)."""
    from mrgen_dist.export.exporter import export_onnx
    from tests.launch import TINY_DIFFUSION, TINY_REFINER, run, train_cmd

    root = tmp_path_factory.mktemp("cascade")
    base, refiner = root / "base", root / "refiner"
    done = run(train_cmd(store_dir, base, "model.block_means=2", "model.size=[112,96]", "train.epochs=1",
                         config=TINY_DIFFUSION))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (base / "samples_001.png").is_file()
    done = run(train_cmd(store_dir, refiner, f"model.coarse={base}", "model.condition_block=2", config=TINY_REFINER))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (refiner / "samples_002.png").is_file()
    return base, export_onnx(refiner, "fp32", root / "refiner.onnx").path


@pytest.mark.integration
def test_the_base_draws_block_means_and_hands_them_over_repeated(cascade: tuple[Path, Path]) -> None:
    from mrgen_dist.runtime.sampler import Sampler

    coarse = Sampler(cascade[1].with_name("refiner.coarse.onnx"), device="cpu", threads=1)
    assert coarse.metadata.contract == ModelMetadata.DENOISER and coarse.metadata.sampler["block_means"] == 2
    assert coarse.latent == coarse.metadata.latent == DRAWN[0] * DRAWN[1] and coarse.image_shape == SHAPE
    assert coarse.metadata.parity["max_error"] <= 1e-4
    images = coarse.sample("Intera", n=2, seed=0)
    assert images.shape == (2, *SHAPE) and 0 <= images.min() <= images.max() <= 1
    # 218 x 182 is 109 x 91 blocks of 2 x 2 without padding: each block is one drawn value
    for dy in (0, 1):
        for dx in (0, 1):
            np.testing.assert_array_equal(images[:, dy::2, dx::2], images[:, ::2, ::2])
    assert np.unique(images[0]).size > 100  # a drawn image, not a constant


@pytest.mark.integration
def test_the_refiner_samples_over_the_bases_draws_by_latent(cascade: tuple[Path, Path]) -> None:
    from mrgen_dist.runtime.sampler import Sampler

    sampler = Sampler(cascade[1], device="cpu", threads=1)
    coarse = sampler.diffusion.coarse
    assert coarse.metadata.contract == ModelMetadata.DENOISER
    assert sampler.latent == DRAWN[0] * DRAWN[1] + SHAPE[0] * SHAPE[1] == sampler.metadata.latent
    images = sampler.sample("Unspecified", n=3, seed=4, batch_size=3)
    assert images.shape == (3, *SHAPE) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    np.testing.assert_array_equal(images, sampler.sample("Unspecified", n=3, seed=4, batch_size=2))
    # the refined slice is the low-pass of the base's draw for the latent's head, plus the fine band drawn from
    # its tail (x_T itself in the band's place, 0.25 x N(0, 1), would stand 0.2 from it)
    z, labels = sampler.latents("Unspecified", 3, 4), np.full(3, 2)
    run, low = sampler.diffusion.refine(coarse.decode(z[:, : coarse.latent], labels), "test", 0)
    run(np.zeros((3, 1, *SHAPE), np.float32), np.zeros(3, np.float32), labels)
    assert 0 < np.abs(images - low[0][:, 0]).mean() < 0.15


@pytest.mark.integration
def test_a_refiner_not_seeing_the_bases_grid_is_refused(cascade: tuple[Path, Path]) -> None:
    vocabulary = Vocabulary.method()
    RefinerConfig(coarse=str(cascade[0]), condition_block=2).validate_data(vocabulary, list(vocabulary.names))
    with pytest.raises(ValueError, match="draws 2 x 2 block means; set model.condition_block=2"):
        RefinerConfig(coarse=str(cascade[0])).validate_data(vocabulary, list(vocabulary.names))
    with pytest.raises(ValueError, match="model.block_means must be 1"):
        RefinerConfig(coarse=str(cascade[0]), condition_block=2, block_means=2).validate()
