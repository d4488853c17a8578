"""The observation noise of a decoder, drawn in torch (differentiable) during training; the twin of the
runtime's numpy draw (`mrgen_dist/runtime/noise.py`), tested equal to it."""

from __future__ import annotations

import torch


def rician_draw(clean: torch.Tensor, sigma: torch.Tensor, real: torch.Tensor, imaginary: torch.Tensor
                ) -> torch.Tensor:
    """|clean + sigma (real + i imaginary)| clipped to [0, 1], as runtime.noise.add_noise draws it, differentiable in
    `clean` (a floor of 1e-12 under the root keeps its gradient finite where the magnitude is 0)."""
    magnitude = ((clean + sigma * real).square() + (sigma * imaginary).square() + 1e-12).sqrt()
    return magnitude.clamp(max=1.0)
