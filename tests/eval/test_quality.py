"""Quality measures beyond FID on data with known answers: hand-checked features, noise images, and demo MR
slices of two scanners whose appearance is known (mrgen_dist.data.demo.APPEARANCE)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mrgen_dist.data.demo import make_volume, template_on_fsl_grid
from mrgen_dist.data.volume import SLICE_SHAPE, SliceParams, central_slices
from mrgen_dist.eval.quality import (
    AIR_MARGIN_PX,
    head_masks,
    label_effect,
    ms_ssim_diversity,
    prdc,
    signature,
    signature_distances,
)

SHARP = "Magnetom TrioTim"  # blur 0 mm, noise 0.012
BLURRY = "Unspecified"  # blur 1.6 mm, noise 0.04


@pytest.fixture(scope="module")
def slices() -> dict[str, np.ndarray]:
    """The 10 central axial slices of 2 demo volumes per scanner, scaled as the store does: (20, 218, 182)."""
    template = template_on_fsl_grid()
    out = {}
    for scanner in (SHARP, BLURRY):
        # float32 as load_volume reads a NIfTI file; make_volume gives the int16 raw values written to it
        volumes = [make_volume(template, scanner, seed).astype(np.float32) for seed in (11, 12)]
        out[scanner] = np.concatenate([central_slices(v, SliceParams()) for v in volumes])
    return out


@pytest.fixture(scope="module")
def masks(slices: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return head_masks(np.concatenate(list(slices.values())))


# -- prdc -------------------------------------------------------------------------------------------------------


def test_prdc_of_a_set_with_itself_is_perfect() -> None:
    f = np.random.default_rng(0).standard_normal((200, 16))
    values = prdc(f, f.copy(), k=5)
    assert set(values) == {"precision", "recall", "density", "coverage"}
    assert all(type(v) is float for v in values.values())
    assert (values["precision"], values["recall"], values["coverage"]) == (1.0, 1.0, 1.0)
    assert values["density"] == pytest.approx(1.0, abs=0.02)


def test_prdc_of_far_apart_sets_is_zero() -> None:
    rng = np.random.default_rng(1)
    values = prdc(rng.standard_normal((100, 8)), rng.standard_normal((80, 8)) + 100.0, k=3)
    assert values == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_small_2d_case_by_hand() -> None:
    """Reals on a line 1 apart (k = 1: every real ball has radius 1); fakes: one 0.5 above the first real and an
    outlying pair 1 apart at x = 10, which makes the fake ball of (0, 0.5) ~10 wide."""
    real = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    fake = np.array([[0.0, 0.5], [10.0, 0.0], [10.0, 1.0]])
    values = prdc(real, fake, k=1)
    # precision: (0, 0.5) lies in the ball of (0, 0), the pair in none -> 1/3
    # recall: every real lies in the ~10-wide ball of (0, 0.5) -> 1 (the outliers inflate it)
    # density: (0, 0.5) is in 1 real ball, the pair in 0 -> (1 + 0 + 0) / 3 / k = 1/3
    # coverage: only (0, 0) has a fake within its radius 1 (the next nearest is sqrt(1.25) from (1, 0)) -> 1/4
    assert values == pytest.approx({"precision": 1 / 3, "recall": 1.0, "density": 1 / 3, "coverage": 0.25})


def test_prdc_needs_k_plus_2_samples() -> None:
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="at least 7 fake samples, got 6"):
        prdc(rng.standard_normal((50, 4)), rng.standard_normal((6, 4)), k=5)
    with pytest.raises(ValueError, match="at least 5 real samples, got 3"):
        prdc(rng.standard_normal((3, 4)), rng.standard_normal((50, 4)), k=3)
    assert prdc(rng.standard_normal((7, 4)), rng.standard_normal((7, 4)), k=5)["precision"] >= 0.0  # k + 2 is enough


# -- MS-SSIM diversity ------------------------------------------------------------------------------------------


def _noise_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 176, 176), dtype=np.float32)


def test_ms_ssim_of_identical_images_is_one() -> None:
    same = np.repeat(_noise_images(1, seed=3), 4, axis=0)
    assert ms_ssim_diversity(same, pairs=8) == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_ranks_noise_below_mr_slices_below_identical(slices: dict[str, np.ndarray]) -> None:
    noise = ms_ssim_diversity(_noise_images(6, seed=4), pairs=16)
    brains = ms_ssim_diversity(slices[SHARP], pairs=16)
    assert noise < 0.1  # independent images share no structure
    assert 0.3 < brains < 0.99  # registered slices are alike, but not the same
    assert noise < brains


def test_ms_ssim_is_deterministic_for_a_seed(slices: dict[str, np.ndarray]) -> None:
    x = slices[SHARP]
    a = ms_ssim_diversity(x, pairs=8, seed=5)
    assert ms_ssim_diversity(x, pairs=8, seed=5) == a
    assert ms_ssim_diversity(x, pairs=8, seed=6) != a


def test_ms_ssim_refuses_small_images_and_single_images() -> None:
    with pytest.raises(ValueError, match="at least 161 x 161"):
        ms_ssim_diversity(np.zeros((3, 160, 200), dtype=np.float32))
    with pytest.raises(ValueError, match="at least 2 images"):
        ms_ssim_diversity(_noise_images(1, seed=7))


# -- scanner signature ------------------------------------------------------------------------------------------


def test_head_masks_on_mr_slices(masks: tuple[np.ndarray, np.ndarray]) -> None:
    brain, background = masks
    assert brain.shape == background.shape == SLICE_SHAPE and brain.dtype == background.dtype == bool
    assert brain[SLICE_SHAPE[0] // 2, SLICE_SHAPE[1] // 2]  # the centre of an MNI slice is brain
    assert brain.sum() > 0.3 * brain.size and background.sum() > 0.1 * background.size
    # the background keeps its distance from the brain: no skull edge or blurred rim counts as noise
    assert ndimage.distance_transform_edt(~brain)[background].min() > AIR_MARGIN_PX


def test_head_masks_refuse_blank_images() -> None:
    with pytest.raises(ValueError, match="empty"):
        head_masks(np.zeros((2, *SLICE_SHAPE), dtype=np.float32))
    with pytest.raises(ValueError, match="no background"):
        head_masks(np.ones((2, *SLICE_SHAPE), dtype=np.float32))


def test_signature_tells_the_two_scanners_apart(
    slices: dict[str, np.ndarray], masks: tuple[np.ndarray, np.ndarray]
) -> None:
    sharp, blurry = (signature(slices[s], *masks) for s in (SHARP, BLURRY))
    # noise sigma 0.04 vs 0.012 of the white-matter level: Unspecified is clearly noisier
    assert blurry["noise"] > 2 * sharp["noise"]
    # blur 1.6 mm vs none: TrioTim is sharper, despite Unspecified's noise adding to its gradients
    assert sharp["sharpness"] > 1.1 * blurry["sharpness"]
    # the same template and intensity rule: similar brain means
    assert sharp["mean_brain"] == pytest.approx(blurry["mean_brain"], abs=0.05)


def test_signature_distances_of_a_set_with_itself(
    slices: dict[str, np.ndarray], masks: tuple[np.ndarray, np.ndarray]
) -> None:
    x = slices[BLURRY]
    d = signature_distances(x, x.copy(), *masks)
    assert d["intensity_w1"] == 0.0
    assert d["noise_real"] == d["noise_generated"] and d["sharpness_real"] == d["sharpness_generated"]


def test_signature_distances_of_a_blurred_copy(
    slices: dict[str, np.ndarray], masks: tuple[np.ndarray, np.ndarray]
) -> None:
    x = slices[SHARP]
    blurred = ndimage.gaussian_filter(x, (0, 2, 2))  # what an over-smoothing decoder would produce
    d = signature_distances(x, blurred, *masks)
    assert d["sharpness_generated"] < 0.8 * d["sharpness_real"]
    assert d["noise_generated"] < d["noise_real"]  # blurring averages the background noise away too
    assert 0.0 < d["intensity_w1"] < 0.1


# -- label effect -----------------------------------------------------------------------------------------------


def test_label_effect_of_a_decoder_that_ignores_the_label() -> None:
    draws = np.random.default_rng(8).random((4, 16, 12))
    grid = np.broadcast_to(draws, (3, *draws.shape))  # every scanner row is the same
    effect = label_effect(grid)
    assert effect["between_scanners"] == 0.0 and effect["ratio"] == 0.0
    assert effect["between_draws"] > 0.0


def test_label_effect_with_known_offsets() -> None:
    """Image (k, j) = base + scanner offset a_k + draw offset b_j: the mean absolute differences are the mean
    |a_k - a_k'| = (0.1 + 0.3 + 0.2) / 3 and the mean |b_j - b_j'| = (0.05 + 0.2 + 0.15) / 3."""
    base = np.random.default_rng(9).random((8, 10))
    a = np.array([0.0, 0.1, 0.3])
    b = np.array([0.0, 0.05, 0.2])
    grid = base + a[:, None, None, None] + b[None, :, None, None]
    effect = label_effect(grid)
    assert effect["between_scanners"] == pytest.approx(0.2, rel=1e-12)
    assert effect["between_draws"] == pytest.approx(0.4 / 3, rel=1e-12)
    assert effect["ratio"] == pytest.approx(1.5, rel=1e-12)


def test_label_effect_needs_two_scanners_and_two_draws() -> None:
    with pytest.raises(ValueError, match="at least 2 scanners and 2 draws"):
        label_effect(np.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="at least 2 scanners and 2 draws"):
        label_effect(np.zeros((3, 1, 8, 8)))


def test_memorisation_ratio_tells_copies_from_new_samples() -> None:
    from mrgen_dist.eval.quality import memorisation_ratio, nearest_neighbour_distances

    rng = np.random.default_rng(0)
    train, test, new = (rng.standard_normal((n, 16)) for n in (200, 50, 50))
    np.testing.assert_allclose(nearest_neighbour_distances(train[:5], train), 0, atol=1e-5)
    brute = np.sqrt(((test[:, None] - train[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(nearest_neighbour_distances(test, train, chunk=7), brute, rtol=1e-5)
    assert 0.8 < memorisation_ratio(new, test, train) < 1.25  # new samples of the same distribution
    copies = train[:50] + 0.01 * rng.standard_normal((50, 16))
    assert memorisation_ratio(copies, test, train) < 0.1
