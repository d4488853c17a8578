"""The mean of a learned-noise draw (runtime/noise.py, `expected_draw`): the exact Rician mean from its
density, and the means of many draws of `add_noise` for each noise kind, a correlation kernel included."""

from __future__ import annotations

import numpy as np
import pytest

from mrgen_dist.artifacts import ModelMetadata
from mrgen_dist.runtime.noise import EXPECTED_RANGE, NoiseTexture, add_noise, expected_draw


def _rician_mean(m: float, sigma: float) -> float:
    """The mean of |m + sigma (n1 + i n2)| by integrating the Rice density on a fine grid."""
    x = np.linspace(0, m + 12 * sigma, 400_001)
    density = x / sigma**2 * np.exp(-((x - m) ** 2) / (2 * sigma**2)) * np.i0(x * m / sigma**2) * np.exp(-x * m / sigma**2)
    return float(np.trapezoid(x * density, x) / np.trapezoid(density, x))


def test_rician_mean_is_the_exact_one_in_air_and_in_tissue() -> None:
    """In air the floor's mean sigma sqrt(pi / 2), not 0; in tissue about sqrt(m^2 + sigma^2); within 2e-3
    sigma everywhere (the quadrature's error is largest at the floor)."""
    sigma = 0.02
    means = np.array([0.0, 0.005, 0.01, 0.02, 0.04, 0.1, 0.5, EXPECTED_RANGE * sigma * 1.5], np.float32)
    image = means[None, None, None, :]
    got = expected_draw(image, np.full_like(image, sigma), ModelMetadata.RICIAN_NOISE)[0, 0, 0]
    assert got[0] == pytest.approx(sigma * np.sqrt(np.pi / 2), abs=2e-3 * sigma)
    # far above the floor (m > 10 sigma, where the density's Bessel factor overflows), sqrt(m^2 + sigma^2) is
    # within (sigma / m)^3 sigma of the mean
    want = [_rician_mean(float(m), sigma) if m < 10 * sigma else min(1.0, float(np.hypot(m, sigma))) for m in means]
    np.testing.assert_allclose(got, want, atol=2e-3 * sigma)


@pytest.mark.parametrize("kind", ModelMetadata.NOISE_KINDS)
def test_it_is_the_mean_of_many_draws(kind: str) -> None:
    """Each pixel column's 4,000 draws (two scanners: d = 0 and d = 3, each with a 3 x 3 kernel) average to it,
    within four standard errors."""
    sigma, rows = 0.04, 4000
    levels = np.linspace(-0.05, 0.5, 24, dtype=np.float32)
    image = np.broadcast_to(levels, (2, 1, rows, len(levels))).copy()
    sigmas = np.full_like(image, sigma)
    kernel = np.outer([1, 2, 1], [1, 2, 1]).astype(float)
    texture = NoiseTexture([0.0, 3.0], [(kernel / np.linalg.norm(kernel)).tolist()] * 2)
    scanner = np.array([0, 1])
    want = expected_draw(image[:, :, :1], sigmas[:, :, :1], kind, scanner, texture)[:, 0, 0]
    draws = add_noise(image, sigmas, kind, [np.random.default_rng(k) for k in range(3)], scanner, texture)[:, 0]
    # correlated neighbours: the standard error of a column mean is up to 2x the independent one
    error = 2 * draws.std(axis=1) / np.sqrt(rows)
    assert (np.abs(draws.mean(axis=1) - want) < 4 * error + 1e-6).all()
    if kind != ModelMetadata.GAUSSIAN_NOISE:  # the floor: above the mean image in air
        assert (want[:, levels <= 0] > sigma).all()
