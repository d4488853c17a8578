"""The block-grid operators of runtime/block_grid.py as torch modules of constant matrices: `BlockMeans`, what
a diffusion model with `model.block_means` draws of a slice, and `CoarseGrid`, what a refiner with
`model.condition_block` sees of it. Both act on rows and columns apart (two matrix products), so they export
as two MatMuls and give the same numbers in torch and onnxruntime; their matrices are rebuilt from the config,
so neither checkpointed nor trained."""

from __future__ import annotations

import numpy as np
import torch

from mrgen_dist.runtime.block_grid import block_mean_matrix, coarse_grid_matrix


class _Separable(torch.nn.Module):
    """images (B, C, H, W) -> rows @ images @ columns^T, the identity where `factor` is 1."""

    def __init__(self, rows: np.ndarray, columns: np.ndarray, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.register_buffer("rows", torch.from_numpy(rows).float(), persistent=False)
        self.register_buffer("columns", torch.from_numpy(columns).float(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.factor == 1:
            return images
        return self.rows.to(images.dtype) @ images @ self.columns.to(images.dtype).T


class CoarseGrid(_Separable):
    """images (B, C, H, W) -> the same seen at the grid of `factor` x `factor` blocks: their block means,
    cubically interpolated back (runtime/block_grid.py `coarse_grid_matrix`)."""

    def __init__(self, image_shape: tuple[int, int], factor: int) -> None:
        super().__init__(*(coarse_grid_matrix(n, factor) for n in image_shape), factor)


class BlockMeans(_Separable):
    """images (B, C, H, W) -> their `factor` x `factor` block means (B, C, h, w), the slices edge-padded
    (centred) to a multiple of `factor` (runtime/block_grid.py `block_mean_matrix`)."""

    def __init__(self, image_shape: tuple[int, int], factor: int) -> None:
        super().__init__(*(block_mean_matrix(n, factor) for n in image_shape), factor)
