"""The block-grid operators (runtime/block_grid.py, and their torch modules in models/parts/blocks.py): what a
refiner with `condition_block` sees of a slice, what a diffusion model with `block_means` draws of it, and what
that cascade's low-resolution stage hands the refiner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrgen_dist.models.parts.blocks import BlockMeans, CoarseGrid
from mrgen_dist.runtime.block_grid import (
    block_grid,
    block_mean_matrix,
    coarse_grid_matrix,
    cubic_upsampling_matrix,
    grid_shape,
    keys_weight,
    repeat_blocks,
)


def test_the_block_grid_centres_the_padding() -> None:
    assert block_grid(218, 4) == (55, 1) and block_grid(182, 4) == (46, 1) and block_grid(16, 4) == (4, 0)


def test_block_means_are_the_means_of_the_edge_padded_blocks() -> None:
    x = np.arange(10.0)  # padded to 12: [0, 0..9, 9], blocks of 4
    np.testing.assert_allclose(block_mean_matrix(10, 4) @ x, [(0 + 0 + 1 + 2) / 4, (3 + 4 + 5 + 6) / 4,
                                                              (7 + 8 + 9 + 9) / 4])


def test_keys_kernel_interpolates_and_sums_to_one() -> None:
    assert keys_weight(np.asarray(0.0)) == 1 and keys_weight(np.asarray(1.0)) == 0 == keys_weight(np.asarray(2.0))
    for shift in (0.1, 0.25, 0.5, 0.9):
        assert keys_weight(np.asarray([-1 - shift, -shift, 1 - shift, 2 - shift])).sum() == pytest.approx(1)


@pytest.mark.parametrize("n", [218, 182, 64])
def test_a_low_resolution_image_repeated_per_block_passes_as_its_cubic_upsampling(n: int) -> None:
    """The cascade's hand-over: the block means of a slice whose blocks are constant are those constants, so a
    low-resolution stage's image repeated `factor` times per side is seen as the real slice of the same block
    means is: the same condition in training and sampling."""
    low = np.random.default_rng(n).random(block_grid(n, 4)[0])
    repeated = repeat_blocks(low[None], (1, n), 4)[0]
    np.testing.assert_allclose(block_mean_matrix(n, 4) @ repeated, low, atol=1e-12)
    np.testing.assert_allclose(coarse_grid_matrix(n, 4) @ repeated, cubic_upsampling_matrix(n, 4) @ low, atol=1e-12)


def test_the_operator_keeps_constants_and_linear_ramps_inside_and_is_the_identity_at_factor_1() -> None:
    a = coarse_grid_matrix(64, 4)
    np.testing.assert_allclose(a @ np.full(64, 0.3), 0.3, atol=1e-12)
    ramp = np.arange(64.0)
    np.testing.assert_allclose((a @ ramp)[8:-8], ramp[8:-8], atol=1e-9)  # cubic interpolation is exact on ramps
    np.testing.assert_array_equal(coarse_grid_matrix(64, 1), np.eye(64))


def test_the_torch_module_is_the_two_matrices_on_rows_and_columns() -> None:
    x = torch.rand(2, 1, 218, 182, generator=torch.Generator().manual_seed(0))
    seen = CoarseGrid((218, 182), 4)(x)
    want = coarse_grid_matrix(218, 4) @ x.double().numpy() @ coarse_grid_matrix(182, 4).T
    np.testing.assert_allclose(seen.numpy(), want, atol=1e-5)
    assert CoarseGrid((218, 182), 1)(x) is x
    assert not CoarseGrid((218, 182), 4).state_dict()  # constants of the config, not weights


def test_block_means_module_draws_what_the_hand_over_gives_back() -> None:
    """A diffusion model with `block_means` 2 learns BlockMeans of the slices; the runtime repeats its draws per
    block, and a refiner with condition_block 2 sees that hand-over as it saw the real slice in training."""
    x = torch.rand(2, 1, 218, 182, generator=torch.Generator().manual_seed(1))
    means = BlockMeans((218, 182), 2)(x)
    assert means.shape == (2, 1, *grid_shape((218, 182), 2)) == (2, 1, 109, 91)
    want = block_mean_matrix(218, 2) @ x.double().numpy() @ block_mean_matrix(182, 2).T
    np.testing.assert_allclose(means.numpy(), want, atol=1e-6)
    handed = torch.from_numpy(repeat_blocks(means.numpy(), (218, 182), 2))
    seen = CoarseGrid((218, 182), 2)
    np.testing.assert_allclose(seen(handed).numpy(), seen(x).numpy(), atol=1e-5)
    assert BlockMeans((218, 182), 1)(x) is x and not BlockMeans((218, 182), 2).state_dict()
    assert grid_shape((218, 182), 4) == (55, 46) and grid_shape((218, 182), 1) == (218, 182)
