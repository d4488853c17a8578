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
    level_bins,
    posterior_variance,
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
    sums, pixels = x0_errors(denoise, x0, np.zeros(64, np.int64), SETTINGS, rng)
    assert sums.shape == (64, SETTINGS.steps, 1) and np.all(pixels == 16 * 16)
    np.testing.assert_allclose(sums.sum(axis=0)[:, 0] / pixels.sum(), exact_x0_error(std, SETTINGS), rtol=0.05)


@pytest.mark.parametrize("std", [0.05, 0.3])
def test_the_calibrated_variance_keeps_the_datas_spread_where_the_posterior_one_loses_it(std: float) -> None:
    """A quiet texture (std 0.05, the refiner's band in a quiet site's air) comes out at three quarters of its
    spread from 20 posterior-variance steps even with the exact denoiser; with the measured error added, within
    4 % (what is left is the last step's mean)."""
    rng = np.random.default_rng(1)
    denoise = gaussian_data_denoiser(0.0, std, alphas_cumprod("cosine", 1000))
    x0 = (std * rng.standard_normal((64, 1, 16, 16))).astype(np.float32)
    labels = np.zeros(64, np.int64)
    table = error_table(*x0_errors(denoise, x0, labels, SETTINGS, rng), labels, 1)
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
    assert posterior_variance(a, a_prev) == pytest.approx(s2) and x0_carry(a, a_prev, s2) == pytest.approx(carry)
    np.testing.assert_allclose(added - plain, [[-(np.sqrt(s2 + carry**2 * error) - np.sqrt(s2))]], rtol=1e-5)


def test_each_image_draws_with_its_scanners_row() -> None:
    """Two scanners whose rows differ: an image's draw depends on its own row only, whatever the batch holds."""
    settings = dataclasses.replace(SETTINGS, null_label=2, guidance=1.0, variance="calibrated",
                                   x0_error=(((0.0,),) * 20, ((0.05,),) * 20))
    denoise = gaussian_data_denoiser(0.0, 0.05, alphas_cumprod("cosine", 1000))
    x_t = np.random.default_rng(2).standard_normal((2, 1, 8, 8)).astype(np.float32)
    together = sample(denoise, x_t, np.array([0, 1]), settings)
    alone = [sample(denoise, x_t[i : i + 1], np.array([i]), settings) for i in range(2)]
    np.testing.assert_array_equal(together, np.concatenate(alone))
    plain = sample(denoise, x_t[:1], np.array([0]), SETTINGS)
    np.testing.assert_array_equal(alone[0], plain)  # a zero row is the posterior variance
    assert together[1].std() > together[0].std()


def test_the_table_is_per_scanner_and_bin_and_needs_every_scanner() -> None:
    """Sums of three images (one step, two bins) -> means per scanner and bin; scanner 1's slices never reach
    bin 1, which takes its mean over the whole slice."""
    sums = np.array([[[1.0, 8.0]], [[6.0, 0.0]], [[3.0, 4.0]]])
    pixels = np.array([[1.0, 2.0], [2.0, 0.0], [1.0, 2.0]])
    assert error_table(sums, pixels, np.array([0, 1, 0]), 2) == (((2.0, 3.0),), ((3.0, 3.0),))
    with pytest.raises(ValueError, match=r"every scanner; none of \[2\]"):
        error_table(sums, pixels, np.array([0, 1, 0]), 3)


def test_a_table_binned_by_the_low_pass_draws_each_regions_own_spread() -> None:
    """Quiet air (std 0.05, low-pass 0) beside loud tissue (std 0.3, low-pass 0.5), as a refiner's fine band
    lies over its coarse slice. Even the exact denoiser's error differs by a factor of 36 at the first step: one
    error for the whole slice draws the air 8 % too loud and the tissue 5 % too faint; the table binned by the
    low-pass level draws each within 4 % of its own spread."""
    rng = np.random.default_rng(3)
    std = np.concatenate([np.full((1, 1, 16, 8), 0.05), np.full((1, 1, 16, 8), 0.3)], axis=3)
    low_pass = np.broadcast_to(np.where(std < 0.1, 0.0, 0.5), (64, 1, 16, 16))
    denoise = gaussian_data_denoiser(0.0, std, alphas_cumprod("cosine", 1000))
    x0 = (std * rng.standard_normal((64, 1, 16, 16))).astype(np.float32)
    labels = np.zeros(64, np.int64)
    whole = error_table(*x0_errors(denoise, x0, labels, SETTINGS, rng), labels, 1)
    bins = level_bins(low_pass, (0.25,))
    binned = error_table(*x0_errors(denoise, x0, labels, SETTINGS, rng, bins, 2), labels, 1)
    assert np.asarray(binned).shape == (1, 20, 2) and binned[0][0][0] < binned[0][0][1] / 30  # at t = T - 1
    x_t = rng.standard_normal((64, 1, 16, 16)).astype(np.float32)

    def spreads(table, levels: tuple[float, ...]) -> np.ndarray:
        """The drawn spread of air and of tissue, each over its own."""
        settings = dataclasses.replace(SETTINGS, variance="calibrated", x0_error=table, x0_error_levels=levels)
        drawn = sample(denoise, x_t, labels, settings, low_pass=lambda: low_pass)
        return np.array([drawn[..., :8].std() / 0.05, drawn[..., 8:].std() / 0.3])

    air, tissue = spreads(whole, ())
    assert air > 1.08 and tissue < 0.96
    np.testing.assert_allclose(spreads(binned, (0.25,)), 1, atol=0.04)
    with pytest.raises(ValueError, match="needs the images' low_pass"):
        sample(denoise, x_t, labels, dataclasses.replace(SETTINGS, variance="calibrated", x0_error=binned,
                                                         x0_error_levels=(0.25,)))


def test_the_files_table_is_read_and_checked() -> None:
    table = tuple(((0.01, 0.02),) * 20 for _ in range(4))
    settings = dataclasses.replace(SETTINGS, null_label=4, variance="calibrated", x0_error=table,
                                   x0_error_levels=(0.1,))
    assert SamplerSettings.from_metadata(settings.to_metadata()) == settings
    assert "x0_error" not in SETTINGS.to_metadata() and SETTINGS.to_metadata()["variance"] == "posterior"
    one_bin = {**settings.to_metadata(), "x0_error": [[0.01] * 20] * 4, "x0_error_levels": []}  # before the bins
    assert SamplerSettings.from_metadata(one_bin).x0_error == tuple(((0.01,),) * 20 for _ in range(4))
    short = {**settings.to_metadata(), "x0_error": [[[0.01, 0.02]] * 19] * 4}
    with pytest.raises(ValueError, match=r"4 rows \(scanners\) of 20 steps of 2 errors >= 0 \(bins of the increasing "
                                         r"x0_error_levels\); got 'ancestral', a table of shape \(4, 19, 2\) and "
                                         r"levels \[0.1\]"):
        SamplerSettings.from_metadata(short)
    with pytest.raises(ValueError, match=r"a table of shape \(4, 20, 3\) and levels \[0.2, 0.1\]"):
        SamplerSettings.from_metadata({**settings.to_metadata(), "x0_error": [[[0.01] * 3] * 20] * 4,
                                       "x0_error_levels": [0.2, 0.1]})
    with pytest.raises(ValueError, match="needs the ancestral sampler"):
        SamplerSettings.from_metadata({**settings.to_metadata(), "name": "ddim"})
    with pytest.raises(ValueError, match="variance 'exact' is not one"):
        SamplerSettings.from_metadata({**SETTINGS.to_metadata(), "variance": "exact"})
