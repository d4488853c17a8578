"""The observation noise of a decoder, drawn in torch (differentiable) during training; the twin of the
runtime's numpy draw (`mrgen_dist/runtime/noise.py`), tested equal to it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rician_draw(clean: torch.Tensor, sigma: torch.Tensor, real: torch.Tensor, imaginary: torch.Tensor
                ) -> torch.Tensor:
    """|clean + sigma (real + i imaginary)| clipped to [0, 1], as runtime.noise.add_noise draws it, differentiable in
    `clean` (a floor of 1e-12 under the root keeps its gradient finite where the magnitude is 0)."""
    magnitude = ((clean + sigma * real).square() + (sigma * imaginary).square() + 1e-12).sqrt()
    return magnitude.clamp(max=1.0)


def correlate(white: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each image's white fields (B, C, H + k - 1, W + k - 1) cross-correlated with its kernel (B, k, k), valid
    part (B, C, H, W), as runtime.noise.correlate (one grouped convolution)."""
    b, c, hp, wp = white.shape
    k = kernel.shape[-1]
    weight = kernel.to(white.dtype).repeat_interleave(c, dim=0)[:, None]
    return F.conv2d(white.reshape(1, b * c, hp, wp), weight, groups=b * c).view(b, c, hp - k + 1, wp - k + 1)


def chi_draw(clean: torch.Tensor, sigma: torch.Tensor, dof: torch.Tensor, kernel: torch.Tensor,
             white: torch.Tensor) -> torch.Tensor:
    """The "chi" draw of runtime.noise.add_noise around `clean` (B, 1, H, W): `sigma` (B, 1, H, W), each
    image's extra degrees of freedom `dof` (B,) and correlation kernel (B, k, k), from the white fields
    `white` (B, 3, H + k - 1, W + k - 1); differentiable in every argument, clipped to [0, 1]."""
    c1, c2, c3 = correlate(white, kernel).split(1, dim=1)
    d = dof.view(-1, 1, 1, 1)
    floor = (d + (2 * d).clamp(min=1e-12).sqrt() * c3).clamp(min=0)
    power = (clean + sigma * c1).square() + (sigma * c2).square() + sigma.square() * floor
    return (power + 1e-12).sqrt().clamp(max=1.0)
