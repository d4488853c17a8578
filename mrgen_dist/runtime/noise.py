"""The observation noise of a decoder, drawn with numpy: the one implementation the runtime samples with
(the torch version in `models/parts/noise.py` is tested equal to it)."""

from __future__ import annotations

import numpy as np

from mrgen_dist.artifacts import ModelMetadata


def add_noise(image: np.ndarray, sigma: np.ndarray, kind: str, real: np.random.Generator,
              imaginary: np.random.Generator) -> np.ndarray:
    """A draw of learned noise of `kind` (ModelMetadata.NOISE_KINDS) around `image`, clipped to [0, 1]:
    image + sigma n1 (Gaussian), or |image + sigma (n1 + i n2)| (Rician), n1 from `real`, n2 from `imaginary`."""
    noisy = image + sigma * real.standard_normal(image.shape, dtype=np.float32)
    if kind == ModelMetadata.RICIAN_NOISE:
        noisy = np.hypot(noisy, sigma * imaginary.standard_normal(image.shape, dtype=np.float32))
    return np.clip(noisy, 0.0, 1.0)
