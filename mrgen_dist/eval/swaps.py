"""The component-swap probe of `mrgen-fid diagnose --swaps`: which part of a decoder's reconstructions makes the
conditioning check read them as another scanner.

The reconstruction check (eval/diagnostics.py) says how often reconstructions of real test slices are recognised
as their scanner, not why they are not. Here each real test slice gets one component of its image replaced by
its reconstruction's, and the same classifier reads the result:

* a region: the `background` (air), the head's `rim` (scalp, skull, the brain's edge) or its `interior`,
  found on the mean of the real test slices (`head_regions`), so the same pixels for every model;
* a band within that region: `all` of it, its `coarse` part (a Gaussian of BAND_SIGMA pixels: contrast,
  anatomy at the scale of gyri) or its `fine` part (the rest: noise, edges, the finest anatomy).

A component whose swap leaves the real slices recognised is one the decoder gets right for the classifier; one
whose swap makes them misread is the one to mend, and the confusion says as which scanner. Swapping whole
images back the other way is not needed: the real slices themselves are the control (`real_test_accuracy`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mrgen_dist.eval.conditioning import confusion
from mrgen_dist.eval.results import Swap

REGIONS = ("background", "rim", "interior")
BANDS = ("all", "coarse", "fine")
#: The coarse band is a Gaussian blur of this sigma in pixels (about 0.08 cycles per pixel), the fine the rest.
BAND_SIGMA = 2.0
#: The head is where the smoothed mean real slice exceeds this share of its 99th percentile.
HEAD_SHARE = 0.2
#: The interior is the head eroded by this share of the slice's smaller side (14 pixels at 182).
RIM_SHARE = 0.08


def head_regions(real: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks (H, W) of REGIONS from real slices (n, H, W): disjoint, together the whole slice."""
    mean = ndimage.gaussian_filter(real.mean(axis=0, dtype=np.float64), 2.0)
    head = mean > HEAD_SHARE * np.percentile(mean, 99)
    margin = max(1, round(RIM_SHARE * min(real.shape[1:])))
    interior = ndimage.binary_erosion(head, iterations=margin)
    return {"background": ~head, "rim": head & ~interior, "interior": interior}


def band(images: np.ndarray, name: str) -> np.ndarray:
    """The `name` band of `images` (n, H, W), float32: all, coarse (Gaussian of BAND_SIGMA) or fine (the rest)."""
    if name == "all":
        return images
    coarse = ndimage.gaussian_filter(images, (0, BAND_SIGMA, BAND_SIGMA), mode="nearest")
    return coarse if name == "coarse" else images - coarse


def band_changes(real: np.ndarray, recon: np.ndarray) -> dict[str, np.ndarray]:
    """Per band of BANDS, what replacing that band of `real` (n, H, W) by `recon`'s adds to `real`."""
    return {name: band(recon, name) - band(real, name) for name in BANDS}


def swapped(real: np.ndarray, change: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`real` (n, H, W) with a band's `change` (`band_changes`) added within `region` (H, W)."""
    return (real + np.where(region, change, 0)).astype(np.float32)


def swap_probe(real: np.ndarray, recon: np.ndarray, scanner: np.ndarray, recognise, n_scanners: int) -> list[Swap]:
    """One Swap per region and band; `recognise` maps images (n, H, W) to predicted scanner ids (the
    conditioning check's classifier on Inception features)."""
    from tqdm import tqdm

    regions, changes = head_regions(real), band_changes(real, recon)
    out = []
    combos = [(r, b) for r in REGIONS for b in BANDS]
    for region, band_name in tqdm(combos, desc="swaps", unit="swap"):
        predicted = recognise(swapped(real, changes[band_name], regions[region]))
        counts = confusion(scanner, predicted, n_scanners)
        out.append(Swap(region=region, band=band_name, pixels=int(regions[region].sum()),
                        accuracy=float(np.trace(counts) / counts.sum()), confusion=counts.tolist()))
    return out


def swap_table(swaps: list[Swap], scanners: list[str]) -> str:
    """A markdown table: one row per swap, each scanner's share of its slices still recognised as itself."""
    head = "| swapped in from the reconstruction | pixels | all | " + " | ".join(scanners) + " |"
    lines = [head, "|" + "---|" * (3 + len(scanners))]
    for s in swaps:
        own = [row[k] / max(1, sum(row)) for k, row in enumerate(s.confusion)]
        lines.append(f"| {s.region}, {s.band} | {s.pixels} | {s.accuracy:.3f} | "
                     + " | ".join(f"{v:.2f}" for v in own) + " |")
    return "\n".join(lines)
