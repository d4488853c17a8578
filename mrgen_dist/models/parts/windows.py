"""Random training windows cut at the same place from several tensors (the distilled translator's pairs, the
refiner's slice and condition channels)."""

from __future__ import annotations

import torch


def random_windows(images: tuple[torch.Tensor, ...], side: int, g: torch.Generator, stride: int = 1,
                   phase: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, ...]:
    """The same random `side` x `side` window of each image (B, C, H, W) of every tensor of `images`, drawn with
    `g`, at offsets stride k + phase (rows, columns)."""
    b, _, h, w = images[0].shape
    rows = (torch.randint((h - side - phase[0]) // stride + 1, (b,), generator=g, device=g.device) * stride
            + phase[0]).tolist()
    columns = (torch.randint((w - side - phase[1]) // stride + 1, (b,), generator=g, device=g.device) * stride
               + phase[1]).tolist()
    return tuple(torch.stack([x[i, :, r:r + side, c:c + side] for i, (r, c) in enumerate(zip(rows, columns, strict=True))])
                 for x in images)
