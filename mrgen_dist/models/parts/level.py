"""The slice's axial level as a condition (`model.level_condition`): the index k of the slice on the MNI152
1 mm grid (0 .. 181, the store's `slice_index`) -> LEVEL_FEATURES smooth numbers a network takes beside the
scanner.

Why smooth features and not a one-hot per level: neighbouring levels show nearly the same anatomy, so a code in
which they are close lets a network share what it learns between them; with up to 182 levels and a few
subjects per scanner, each level alone holds few slices. The code is u = k / 181 mapped to [-1, 1] and the
sines and cosines of pi 2^j u for j < OCTAVES: the finest octave resolves about 181 / 2^OCTAVES = 6 levels,
finer than the anatomy changes between neighbouring 1 mm slices at the resolution these models generate.
"""

from __future__ import annotations

import math

import torch

#: Axial levels of the MNI152 1 mm grid (mrgen_dist.data.volume.MNI_SHAPE[2]; a test keeps them equal).
AXIAL_LEVELS = 182
OCTAVES = 5
LEVEL_FEATURES = 1 + 2 * OCTAVES


def level_features(level: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Axial indices `level` int64 (B,) -> features (B, LEVEL_FEATURES) in [-1, 1], in `dtype`."""
    u = level.to(torch.float32) / (AXIAL_LEVELS - 1)
    angles = math.pi * u[:, None] * (2.0 ** torch.arange(OCTAVES, device=level.device, dtype=torch.float32))
    return torch.cat([2 * u[:, None] - 1, angles.sin(), angles.cos()], dim=1).to(dtype)
