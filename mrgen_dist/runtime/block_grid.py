"""A slice seen at a coarser grid: its f x f block means, brought back to the slice's grid by cubic interpolation
or by repeating each block. No torch.

What a cascade's low-resolution stage gives its refiner: a diffusion model of the slices' block means (the
`diffusion` family with `model.block_means` f: 109 x 91 at f = 2 on 218 x 182 slices, 55 x 46 at f = 4) hands
over its draws repeated per block (`repeat_blocks`, what the runtime makes of them), and a refiner with
`model.condition_block` f sees real slices in training through exactly the operator that keeps of such a slice
its block means (models/parts/blocks.py), so it is conditioned alike in training and sampling. Any slice of
the full grid whose f x f blocks are constant (a low-resolution image repeated f times per side) passes through
as its cubic upsampling.

Both steps are linear and act on rows and columns apart, so the operator is two matrices, A_rows (H x H) and
A_columns (W x W), with out = A_rows x A_columns^T: two matrix products in an exported graph, the same numbers
in torch and onnxruntime. The slice is edge-padded (centred) to a multiple of f before the block means; the
cubic interpolation is Keys' (a = -0.5) at the blocks' centres, edges clamped, so the interpolation of a
constant slice is that constant.
"""

from __future__ import annotations

import numpy as np

#: Keys' cubic convolution parameter (-0.5: third-order accurate; Keys 1981).
KEYS_A = -0.5


def block_grid(n: int, factor: int) -> tuple[int, int]:
    """(blocks, front padding) of an axis of n pixels cut into blocks of `factor`, centre-padded by edge values."""
    blocks = -(-n // factor)
    return blocks, (blocks * factor - n) // 2


def block_mean_matrix(n: int, factor: int) -> np.ndarray:
    """(blocks, n): the mean of each block of `factor` pixels, the axis edge-padded (centred) to a multiple."""
    blocks, front = block_grid(n, factor)
    matrix = np.zeros((blocks, n))
    for b in range(blocks):
        for p in range(b * factor - front, (b + 1) * factor - front):
            matrix[b, min(max(p, 0), n - 1)] += 1.0 / factor
    return matrix


def block_means(images: np.ndarray, factor: int) -> np.ndarray:
    """Slices (..., H, W) -> their `factor` x `factor` block means (..., h, w), float32, the slices edge-padded
    (centred) to a multiple of `factor`: what a cascade's coarse stage draws, in the slices' own scale."""
    rows, columns = (block_mean_matrix(n, factor) for n in images.shape[-2:])
    return (rows @ np.asarray(images, dtype=np.float64) @ columns.T).astype(np.float32)


def repeat_blocks(low: np.ndarray, shape: tuple[int, int], factor: int) -> np.ndarray:
    """Block values (..., h, w) -> (..., H, W) of `shape`: each repeated `factor` x `factor`, cropped where the
    edge padding centred the grid. A cascade's hand-over: its block means are `low` exactly. At factor 1,
    `low` itself."""
    if factor == 1:
        return low
    (_, top), (_, left) = (block_grid(n, factor) for n in shape)
    full = low.repeat(factor, axis=-2).repeat(factor, axis=-1)
    return full[..., top : top + shape[0], left : left + shape[1]]


def keys_weight(d: np.ndarray, a: float = KEYS_A) -> np.ndarray:
    """Keys' cubic convolution kernel at distances d (in samples)."""
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def cubic_upsampling_matrix(n: int, factor: int) -> np.ndarray:
    """(n, blocks): the cubic interpolation of the block values at each pixel of the axis, the blocks at their
    centres, the block indices clamped at the edges."""
    blocks, front = block_grid(n, factor)
    matrix = np.zeros((n, blocks))
    for p in range(n):
        position = (p + front + 0.5) / factor - 0.5  # in block units, block b's centre at b
        left = int(np.floor(position))
        for b in range(left - 1, left + 3):
            matrix[p, min(max(b, 0), blocks - 1)] += keys_weight(np.asarray(position - b))
    return matrix


def coarse_grid_matrix(n: int, factor: int) -> np.ndarray:
    """(n, n): block means of `factor` then cubic interpolation back, along one axis (identity for factor 1)."""
    if factor == 1:
        return np.eye(n)
    return cubic_upsampling_matrix(n, factor) @ block_mean_matrix(n, factor)



def grid_shape(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    """The shape of a slice's `factor` x `factor` block means (`shape` itself at factor 1)."""
    return block_grid(shape[0], factor)[0], block_grid(shape[1], factor)[0]
