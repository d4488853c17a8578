"""Non-local means (mrgen_dist/models/nonlocal_means.py), the denoiser of the distilled translator's
`carry_noise`: it takes noise out of real slices and keeps their edges."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mrgen_dist.data.store import SliceStore
from mrgen_dist.models.parts.nonlocal_means import nonlocal_means


def test_it_takes_most_of_the_noise_out_of_a_slice(store_dir: Path) -> None:
    slices = SliceStore(store_dir).load_split("test").images[:4].float()[:, None]
    clean = F.avg_pool2d(slices, 3, 1, 1, count_include_pad=False)  # the store's slices carry their own noise
    g = torch.Generator().manual_seed(0)
    head = clean > 0.1
    for sigma in (0.02, 0.04):
        noisy = clean + sigma * torch.randn(clean.shape, generator=g)
        denoised = nonlocal_means(noisy, torch.full((4,), sigma))
        error = (denoised - clean)[head].square().mean().sqrt()
        # measured on the comparison cohort's slices: 0.60 and 0.45 of the noise
        assert error < 0.7 * sigma, (sigma, error)


def test_it_keeps_an_edge_and_a_flat_image() -> None:
    g = torch.Generator().manual_seed(0)
    step = torch.zeros(1, 1, 40, 40)
    step[..., 20:] = 0.6
    noisy = step + 0.02 * torch.randn(step.shape, generator=g)
    denoised = nonlocal_means(noisy, torch.tensor([0.02]))
    assert (denoised - step).abs().mean() < 0.3 * (noisy - step).abs().mean()  # measured: 0.21
    torch.testing.assert_close(denoised[0, 0, :, [19, 20]], step[0, 0, :, [19, 20]], atol=0.06, rtol=0)
    flat = torch.full((2, 1, 16, 24), 0.3)
    torch.testing.assert_close(nonlocal_means(flat, torch.tensor([0.01, 0.05])), flat)
    # the noise level decides how much is averaged: a sigma far below the noise leaves it nearly as it is
    assert (nonlocal_means(noisy, torch.tensor([1e-4])) - noisy).abs().mean() < 0.1 * (denoised - noisy).abs().mean()
