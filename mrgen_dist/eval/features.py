"""Features of the real test slices, computed once and cached: Inception features per scanner (keyed by the
store's sha256, the extractor's weights and the scanner, so a changed store or other weights never reuse them)
and the real sets' MS-SSIM. Every evaluation that compares with the real slices reads them from here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mrgen_dist.atomic import atomic_path, atomic_write
from mrgen_dist.cli import UserError
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.inception import InceptionFeatures
from mrgen_dist.scanners import slug

#: Random pairs of the MS-SSIM diversity, and their seed (the same for real and generated sets).
MS_SSIM_PAIRS = 200


MS_SSIM_SEED = 0


class FidError(UserError):
    """mrgen-fid cannot do what was asked: the model does not fit the store, too few slices, no results."""


def cache_dir(out: Path) -> Path:
    """Where real features and real MS-SSIM values are cached: $MRGEN_FID_CACHE when set (one cache shared by
    the evaluations of many models on one store, as in hpc/slurm/compare.sh; the keys name the store and the
    weights), else OUT/cache."""
    return Path(os.environ["MRGEN_FID_CACHE"]) if os.environ.get("MRGEN_FID_CACHE") else out / "cache"


def real_features(
    store: SliceStore, scanner: str, side: str, extractor: InceptionFeatures, cache: Path,
    images: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """Features of one scanner's real slices of `side`, and whether they came from the cache; the cache key
    names the store (sha256), the extractor (weights hash), the side and the scanner. `images`: those slices,
    when the caller has loaded them already."""
    path = cache / f"real-{store.sha256[:16]}-{extractor.identity}-{side}-{slug(scanner)}.npy"
    if path.is_file():
        return np.load(path), True
    features = extractor(store.load_split(side, scanner).images if images is None else images)
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, features)
    return features, False


def real_ms_ssim(store: SliceStore, scanner: str, images: np.ndarray, cache: Path) -> float:
    """MS-SSIM diversity of one scanner's real test slices (`images`), cached under the store's sha256."""
    from mrgen_dist.eval.quality import ms_ssim_diversity

    path = cache / f"real-{store.sha256[:16]}-msssim-{MS_SSIM_PAIRS}-{MS_SSIM_SEED}-test-{slug(scanner)}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["ms_ssim"])
    value = ms_ssim_diversity(images, pairs=MS_SSIM_PAIRS, seed=MS_SSIM_SEED)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"ms_ssim": value, "pairs": MS_SSIM_PAIRS, "seed": MS_SSIM_SEED}))
    return value
