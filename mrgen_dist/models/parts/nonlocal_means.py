"""Non-local means (Buades, Coll and Morel, CVPR 2005), written with shifts and pools so that it runs the same
in torch, on a GPU, and in an exported ONNX graph (Pad, Slice, AveragePool and Exp; no loop over pixels).

Each pixel becomes the mean of the pixels within `radius` of it, each weighed by how alike the two pixels'
(2 `patch` + 1)-square neighbourhoods are: exp(-max(d^2 - 2 sigma^2, 0) / (h sigma)^2), d^2 the mean squared
difference of the neighbourhoods, sigma the image's noise. Two neighbourhoods of one tissue differ by the noise
alone (d^2 ~ 2 sigma^2) and are averaged; across an edge they are not. The distilled translator's `carry_noise`
uses it to split a slice into its anatomy and its own noise draw (mrgen_dist/models/distilled.py).

The defaults (radius 3, patch 1, strength 1) are the cheapest of the settings under which each scanner's
non-local means, plus another scanner's noise residual times the ratio of their sigmas, still reads as the
first scanner (measured on renders of the demo cohort: docs/results/translation.md, "Carrying the slice's own
noise").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RADIUS, PATCH, STRENGTH = 3, 1, 1.0


def nonlocal_means(images: torch.Tensor, sigma: torch.Tensor, radius: int = RADIUS, patch: int = PATCH,
                   strength: float = STRENGTH) -> torch.Tensor:
    """images (B, 1, H, W), sigma (B,) the noise of each -> the denoised images, float32, (B, 1, H, W).
    Edges are reflected; H and W must exceed `radius`."""
    x = images.float()
    variance = sigma.float().square()[:, None, None, None]
    padded = F.pad(x, (radius,) * 4, mode="reflect")
    h, w = x.shape[-2:]
    total, weights = torch.zeros_like(x), torch.zeros_like(x)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            other = padded[..., dy:dy + h, dx:dx + w]
            distance = F.avg_pool2d((x - other).square(), 2 * patch + 1, 1, patch, count_include_pad=False)
            weight = torch.exp(-(distance - 2 * variance).clamp(min=0) / (strength**2 * variance))
            total = total + weight * other
            weights = weights + weight
    return total / weights
