"""The ancestral sampler's calibrated variance (runtime/diffusion.py `variance: calibrated`), on Gaussian data,
where the exact denoiser and its error of x0 are known in closed form."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mrgen_dist.runtime.diffusion import (
    SamplerSettings,
    alphas_cumprod,
    ancestral_step,
    error_table,
    sample,
    sample_timesteps,
    x0_carry,
    x0_errors,
)
from tests.models.test_diffusion import gaussian_data_denoiser

#: The refiner config's sampler: 20 ancestral steps, quadratic spacing, cosine schedule, one scanner.
SETTINGS = SamplerSettings(20, 1.0, "v", "cosine", 1000, 1, "ancestral", "quadratic", False)


def exact_x0_error(std: float, settings: SamplerSettings) -> np.ndarray:
    """Var[x0 | x_t] for x0 ~ N(0, std^2) at each step: the exact denoiser's mean squared error of x0."""
    a = alphas_cumprod(settings.schedule, settings.timesteps)[sample_timesteps(settings.timesteps, settings.steps,
                                                                                settings.spacing)]
    return std**2 * (1 - a) / (a * std**2 + 1 - a)


def test_x0_errors_measure_the_denoisers_error_of_x0() -> None:
    std, rng = 0.05, np.random.default_rng(0)
    denoise = gaussian_data_denoiser(0.0, std, alphas_cumprod("cosine", 1000))
    x0 = (std * rng.standard_normal((64, 1, 16, 16))).astype(np.float32)
    errors = x0_errors(denoise, x0, np.zeros(64, np.int64), SETTINGS, rng)
    assert errors.shape == (64, SETTINGS.steps)
    np.testing.assert_allclose(errors.mean(axis=0), exact_x0_error(std, SETTINGS), rtol=0.05)


@pytest.mark.parametrize("std", [0.05, 0.3])
def test_the_calibrated_variance_keeps_the_datas_spread_where_the_posterior_one_loses_it(std: float) -> None:
    """A quiet texture (std 0.05, the refiner's band in a quiet site's air) comes out at three quarters of its
    spread from 20 posterior-variance steps even with the exact denoiser; with the measured error added, within
    4 % (what is left is the last step's mean)."""
    rng = np.random.default_rng(1)
    denoise = gaussian_data_denoiser(0.0, std, alphas_cumprod("cosine", 1000))
    x0 = (std * rng.standard_normal((64, 1, 16, 16))).astype(np.float32)
    labels = np.zeros(64, np.int64)
    table = error_table(x0_errors(denoise, x0, labels, SETTINGS, rng), labels, 1)
    calibrated = dataclasses.replace(SETTINGS, variance="calibrated", x0_error=table)
    x_t = rng.standard_normal((64, 1, 16, 16)).astype(np.float32)
    posterior = sample(denoise, x_t, labels, SETTINGS).std() / std
    drawn = sample(denoise, x_t, labels, calibrated).std() / std
    assert posterior < (0.8 if std < 0.1 else 0.9)
    assert abs(drawn - 1) < 0.04


def test_the_step_adds_the_carried_error_to_the_posterior_variance() -> None:
    x, out, noise = np.float32([[0.5]]), np.float32([[0.2]]), np.float32([[-1.0]])
    a, a_prev, error = 0.36, 0.64, 0.01
    s2 = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    plain, _ = ancestral_step(x, out, a, a_prev, "v", noise)
    added, _ = ancestral_step(x, out, a, a_prev, "v", noise, x0_error=error)
    carry = np.sqrt(a_prev) - np.sqrt(1 - a_prev - s2) * np.sqrt(a / (1 - a))
    assert x0_carry(a, a_prev) == pytest.approx(carry)
    np.testing.assert_allclose(added - plain, [[-(np.sqrt(s2 + carry**2 * error) - np.sqrt(s2))]], rtol=1e-5)


def test_each_image_draws_with_its_scanners_row() -> None:
    """Two scanners whose rows differ: an image's draw depends on its own row only, whatever the batch holds."""
    settings = dataclasses.replace(SETTINGS, null_label=2, guidance=1.0, variance="calibrated",
                                   x0_error=((0.0,) * 20, (0.05,) * 20))
    denoise = gaussian_data_denoiser(0.0, 0.05, alphas_cumprod("cosine", 1000))
    x_t = np.random.default_rng(2).standard_normal((2, 1, 8, 8)).astype(np.float32)
    together = sample(denoise, x_t, np.array([0, 1]), settings)
    alone = [sample(denoise, x_t[i : i + 1], np.array([i]), settings) for i in range(2)]
    np.testing.assert_array_equal(together, np.concatenate(alone))
    plain = sample(denoise, x_t[:1], np.array([0]), SETTINGS)
    np.testing.assert_array_equal(alone[0], plain)  # a zero row is the posterior variance
    assert together[1].std() > together[0].std()


def test_the_table_is_per_scanner_and_needs_every_scanner() -> None:
    errors = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert error_table(errors, np.array([0, 1, 0]), 2) == ((3.0, 4.0), (3.0, 4.0))
    with pytest.raises(ValueError, match=r"every scanner; none of \[2\]"):
        error_table(errors, np.array([0, 1, 0]), 3)


def test_the_files_table_is_read_and_checked() -> None:
    table = tuple((0.01,) * 20 for _ in range(4))
    settings = dataclasses.replace(SETTINGS, null_label=4, variance="calibrated", x0_error=table)
    assert SamplerSettings.from_metadata(settings.to_metadata()) == settings
    assert "x0_error" not in SETTINGS.to_metadata() and SETTINGS.to_metadata()["variance"] == "posterior"
    short = {**settings.to_metadata(), "x0_error": [[0.01] * 19] * 4}
    with pytest.raises(ValueError, match=r"4 rows \(scanners\) of 20 errors >= 0 \(steps\); got 'ancestral' and a "
                                         r"table of shape \(4, 19\)"):
        SamplerSettings.from_metadata(short)
    with pytest.raises(ValueError, match="needs the ancestral sampler"):
        SamplerSettings.from_metadata({**settings.to_metadata(), "name": "ddim"})
    with pytest.raises(ValueError, match="variance 'exact' is not one"):
        SamplerSettings.from_metadata({**SETTINGS.to_metadata(), "variance": "exact"})
