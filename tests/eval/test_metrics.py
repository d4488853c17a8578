"""FID and KID on synthetic features with known answers; no network weights are loaded."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from mrgen_dist.eval.fid import FeatureStats, frechet_distance, kernel_inception_distance


def _features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((d, d)) / np.sqrt(d)  # a shared correlated structure
    return (rng.standard_normal((n, d)) @ mixing) * scale + shift


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """An independent reference: the classic pytorch-fid formula with scipy.linalg.sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_of_a_set_with_itself_is_zero() -> None:
    f = _features(600, 64, seed=0)
    stats = FeatureStats.of(f)
    assert abs(frechet_distance(stats, stats)) < 1e-6


@pytest.mark.parametrize("shift, scale", [(0.0, 1.0), (0.3, 1.0), (0.0, 1.5), (0.5, 0.7)])
def test_fid_agrees_with_scipy_reference(shift: float, scale: float) -> None:
    a, b = _features(800, 96, seed=1), _features(700, 96, seed=2, shift=shift, scale=scale)
    ours = frechet_distance(FeatureStats.of(a), FeatureStats.of(b))
    ref = _scipy_fid(a, b)
    assert ours == pytest.approx(ref, rel=1e-4, abs=1e-8)


def test_fid_grows_with_shift_and_is_symmetric() -> None:
    base = FeatureStats.of(_features(500, 32, seed=3))
    values = [frechet_distance(base, FeatureStats.of(_features(500, 32, seed=4, shift=s))) for s in (0.0, 0.5, 1.0)]
    assert values[0] < values[1] < values[2]
    other = FeatureStats.of(_features(500, 32, seed=4, shift=0.5))
    assert frechet_distance(other, base) == pytest.approx(values[1], rel=1e-9)


def test_small_sample_warning() -> None:
    with pytest.warns(UserWarning, match="20 samples for 64-d features"):
        FeatureStats.of(_features(20, 64, seed=5))


def test_kid_near_zero_for_same_distribution_and_positive_for_shift() -> None:
    a, b = _features(400, 64, seed=6), _features(400, 64, seed=7)
    same = kernel_inception_distance(a, b, subsets=50, subset_size=200)
    shifted = kernel_inception_distance(a, _features(400, 64, seed=8, shift=0.5), subsets=50, subset_size=200)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert shifted.mean > 10 * max(same.std, 1e-4) and shifted.mean > 0
    assert (same.subset_size, same.subsets) == (200, 50)
