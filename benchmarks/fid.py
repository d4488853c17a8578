"""FID matrix-square-root benchmark: the symmetric-eigendecomposition route vs scipy.linalg.sqrtm on 2048-d
statistics (the size of Inception pool features), one run; target >= 2.5x faster with FID equal to 1e-4.

The statistics come from correlated synthetic 2048-d features (n = 4096 per set, full rank). Also measured:
FID Inception images/s (218 x 182 slices -> 299 x 299, batch 50) on this machine's device.

    python benchmarks/fid.py [--dim 2048] [--n 4096]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from scipy import linalg

from mrgen_dist.eval.fid import FeatureStats, frechet_distance
from mrgen_dist.eval.inception import WeightsNotFound, load_inception


def scipy_fid(a: FeatureStats, b: FeatureStats) -> float:
    covmean = linalg.sqrtm(a.cov @ b.cov)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = a.mean - b.mean
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * np.trace(covmean))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((args.dim, args.dim)) / np.sqrt(args.dim)
    a = FeatureStats.of(np.abs(rng.standard_normal((args.n, args.dim)) @ mixing))  # ReLU-like, as pool3 features
    b = FeatureStats.of(np.abs(rng.standard_normal((args.n, args.dim)) @ mixing * 1.1 + 0.05))
    t0 = time.perf_counter()
    ours = frechet_distance(a, b)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = scipy_fid(a, b)
    t_ref = time.perf_counter() - t0
    rel = abs(ours - ref) / abs(ref)
    speed = t_ref / t_ours
    print(f"FID on {args.dim}-d statistics (n = {args.n} per set)")
    print(f"  eigh route          {t_ours:7.2f} s   FID {ours:.6f}")
    print(f"  scipy.linalg.sqrtm  {t_ref:7.2f} s   FID {ref:.6f}")
    print(f"  speed-up {speed:.2f}x (target >= 2.5x: {'met' if speed >= 2.5 else 'MISSED'}), "
          f"relative difference {rel:.1e} (target <= 1e-4: {'met' if rel <= 1e-4 else 'MISSED'})")
    try:
        extractor = load_inception()
    except WeightsNotFound as e:
        print(f"  Inception images/s skipped: {e}")
        return 0
    images = rng.uniform(0, 1, (200, 218, 182)).astype(np.float32)
    extractor(images[:50])  # warm-up
    t0 = time.perf_counter()
    extractor(images, batch_size=50)
    rate = len(images) / (time.perf_counter() - t0)
    print(f"  FID Inception ({extractor.kind}) on {extractor.device}: {rate:.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
