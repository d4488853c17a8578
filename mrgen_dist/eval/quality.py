"""Image-quality measures beyond FID for generated vs real MR slices.

FID and KID (`mrgen_dist.eval.fid`) give one number per scanner that mixes fidelity and diversity. The
measures here separate them, and add a scanner "signature" in units an MR physicist can read.

* **Precision, recall, density, coverage** (`prdc`) on Inception features. Precision is the fraction of
  generated samples inside the real manifold (each real sample's ball reaching its k-th nearest real
  neighbour), recall the fraction of real samples inside the generated manifold (Kynkäänniemi et al. 2019,
  "Improved precision and recall metric for assessing generative models"). Density counts how many real
  balls hold each generated sample (divided by k, ~1 when the two sets have the same distribution, can
  exceed 1), coverage is the fraction of real samples with a generated sample in their own ball; both are
  less sensitive to outliers than precision and recall (Naeem et al. 2020, "Reliable fidelity and diversity
  metrics for generative models"). Computed with the authors' `prdc` package.
* **MS-SSIM diversity** (`ms_ssim_diversity`): mean multi-scale SSIM (Wang, Simoncelli & Bovik 2003) over
  random pairs of distinct images of one set, as used for sample diversity by Odena, Olah & Shlens 2017
  (AC-GAN). 1 means all images are the same (mode collapse); lower means more diverse. Compare a generated
  set with the real set of the same scanner, not with an absolute threshold: registered brain slices are
  alike by construction.
* **Scanner signature** (`head_masks`, `signature`, `signature_distances`): background noise, sharpness and
  the brain-intensity distribution, measured in the same masks for real and generated slices. The noise of a
  magnitude image in air is Rayleigh distributed (Gudbjartsson & Patz 1995, "The Rician distribution of
  noisy MRI data"); we report its standard deviation, sqrt(2 - pi/2) sigma ~ 0.655 sigma of the underlying
  Gaussian noise, as measured (not converted), since real and generated are compared on the same scale.
* **Label effect** (`label_effect`): on a grid of the same latent draws decoded for every scanner, how much the
  image changes with the scanner label compared with how much it changes between draws. A decoder that
  ignores its label has a between-scanner difference of 0.

Images are float arrays (n, H, W) in [0, 1] (the store's slices, 218 x 182, registered to MNI space, so all
slices share the head position and one pair of masks fits every slice). Features are (n, d) Inception pool
features. torch, pytorch-msssim and prdc (the `fid` extra) are imported only by the functions that use them.
"""

from __future__ import annotations

import contextlib
import io
from itertools import combinations

import numpy as np
from scipy import ndimage, stats

# MS-SSIM with its standard 5 scales and 11-pixel window downsamples 4 times; pytorch-msssim requires the
# smaller side to be > (11 - 1) * 2**4 = 160 pixels whatever `weights` say, so fewer scales would not help.
MS_SSIM_MIN_SIDE = 161
MS_SSIM_CHUNK = 32  # pairs per batch: bounds memory (the SSIM maps are ~5x the images) at full speed

# head_masks: fractions of the 99th percentile of the mean real slice
BRAIN_FRACTION = 0.3  # tissue of the mean T1 slice; excludes the air and most of the dark CSF rim around the brain
AIR_FRACTION = 0.1  # the head: above the air's noise floor (Rayleigh mean ~ 1.25 sigma), includes dark CSF
AIR_MARGIN_PX = 8  # air at least this far from the head: no skull edge, partial volume or blurred rim
GRADIENT_SIGMA_PX = 1.0  # derivative-of-Gaussian scale for sharpness; see `signature`
MAX_W1_SAMPLES = 1_000_000  # brain pixels per side for the Wasserstein distance; beyond, a fixed-seed subsample
SIGNATURE_CHUNK = 64  # images per filtering batch in `signature`
#: Neighbours of precision, recall, density and coverage wherever the project scores them.
PRDC_K = 5


# -- precision, recall, density, coverage ---------------------------------------------------------------------


def prdc(real_features: np.ndarray, fake_features: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of generated features against real ones, with k neighbours.

    Precision and density say whether generated samples look real (fidelity), recall and coverage whether
    the generated set reaches all of the real variety (diversity). Identical sets give precision = recall =
    coverage = 1 and density ~1; disjoint far-apart sets give 0 for all four. Each set needs at least k + 2
    samples (prdc's neighbour search fails below that).
    """
    from prdc import compute_prdc

    real = _features(real_features, "real_features")
    fake = _features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, f in (("real", real), ("fake", fake)):
        # a k-th neighbour besides the sample itself needs k + 1 samples; prdc's argpartition asks for one more
        if len(f) < k + 2:
            raise ValueError(f"prdc with k={k} needs at least {k + 2} {name} samples, got {len(f)}")
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the sample counts; keep stdout for results
        values = compute_prdc(real, fake, nearest_k=k)
    return {key: float(values[key]) for key in ("precision", "recall", "density", "coverage")}


def _features(f: np.ndarray, name: str) -> np.ndarray:
    # float32 as prdc expects; its n x n distance matrices are the memory cost, not the features
    a = np.asarray(f, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{name} must be (n, d), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contain non-finite values")
    return a


# -- MS-SSIM diversity ----------------------------------------------------------------------------------------


def nearest_neighbour_distances(queries: np.ndarray, references: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Euclidean distance from each row of `queries` (n, d) to its nearest row of `references` (m, d), in float64
    (|q|² - 2 q·r + |r|² loses the small distances of near copies in float32)."""
    queries = _features(queries, "queries").astype(np.float64)
    references = _features(references, "references").astype(np.float64)
    squared = np.einsum("ij,ij->i", references, references)
    out = np.empty(len(queries))
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        d2 = np.einsum("ij,ij->i", q, q)[:, None] - 2 * q @ references.T + squared[None]
        out[start : start + len(q)] = np.sqrt(np.maximum(d2.min(axis=1), 0))
    return out


def memorisation_ratio(generated: np.ndarray, test: np.ndarray, train: np.ndarray) -> float:
    """Median nearest-neighbour distance of generated samples to the training set over that of held-out real
    samples to the same set (features). Near 1 or above: samples are no closer to the training slices than new
    real slices are; well below 1: the model reproduces training slices."""
    return float(np.median(nearest_neighbour_distances(generated, train))
                 / np.median(nearest_neighbour_distances(test, train)))


def ms_ssim_diversity(images: np.ndarray, pairs: int = 200, seed: int = 0) -> float:
    """Mean MS-SSIM over `pairs` random pairs of distinct images of one set: 1 = all alike, lower = more diverse.

    Pairs are drawn with replacement (a pair may repeat), the two images of a pair are always different
    indices; the same seed gives the same pairs. The standard 5-scale MS-SSIM is used (data range 1, float32
    on the CPU); images whose smaller side is below 161 pixels are refused rather than scored with fewer
    scales, because a 3-scale MS-SSIM is a different number, not comparable with the 5-scale one.
    """
    import torch
    from pytorch_msssim import ms_ssim

    x = _images(images, "images")
    if len(x) < 2:
        raise ValueError(f"MS-SSIM diversity needs at least 2 images, got {len(x)}")
    if min(x.shape[1:]) < MS_SSIM_MIN_SIDE:
        raise ValueError(f"5-scale MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} x {MS_SSIM_MIN_SIDE} "
                         f"pixels (the smaller side > 160), got {x.shape[1]} x {x.shape[2]}")
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    first, second = _distinct_pairs(len(x), pairs, seed)
    total = 0.0
    with torch.no_grad():
        for s in range(0, pairs, MS_SSIM_CHUNK):
            a = torch.from_numpy(x[first[s : s + MS_SSIM_CHUNK], None])
            b = torch.from_numpy(x[second[s : s + MS_SSIM_CHUNK], None])
            total += float(ms_ssim(a, b, data_range=1.0, size_average=False).double().sum())
    return total / pairs


def _distinct_pairs(n: int, pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i != j, each uniform over the n (n - 1) ordered pairs."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, pairs)
    second = (first + rng.integers(1, n, pairs)) % n  # a non-zero shift never lands on i itself
    return first, second


def _images(images: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"{name} must be (n, H, W), got shape {x.shape}")
    return x


# -- scanner signature ----------------------------------------------------------------------------------------


def head_masks(real_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(brain, background) boolean (H, W) masks from the mean of registered real slices.

    Brain: the largest connected region where the mean slice is at least 30 % of its 99th percentile, holes
    (ventricles) filled; on skull-on data a scalp region touching it is included. Background: air, i.e. outside
    the filled head (mean >= 10 % of the 99th percentile) by more than 8 pixels, so that neither the skull edge,
    partial volume nor a blurred rim counts as noise. Both are measured on real slices only, so that real and
    generated images are compared in the same pixels.
    """
    x = _images(real_images, "real_images")
    if len(x) == 0:
        raise ValueError("head_masks needs at least one real slice")
    mean = x.mean(axis=0)
    high = float(np.percentile(mean, 99))
    if not high > 0:
        raise ValueError("the mean real slice is empty (99th percentile <= 0): no head to find")
    brain = _largest_region(ndimage.binary_fill_holes(mean >= BRAIN_FRACTION * high))
    head = ndimage.binary_fill_holes(mean >= AIR_FRACTION * high)
    background = ndimage.distance_transform_edt(~head) > AIR_MARGIN_PX
    if not brain.any():
        raise ValueError("no brain pixels in the mean real slice")
    if not background.any():
        raise ValueError(f"no background: no air more than {AIR_MARGIN_PX} pixels from the head (the head fills "
                         "the field of view, or the images are not brain MR slices in [0, 1])")
    return brain, background


def _largest_region(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def signature(images: np.ndarray, brain: np.ndarray, background: np.ndarray) -> dict[str, float]:
    """Background noise, sharpness and mean brain intensity of a set of slices, in intensity units of [0, 1].

    * `noise`: the standard deviation of the background pixels of each image, averaged over the images (per
      image, so that a background level that varies between images is not counted as noise).
    * `sharpness`: the mean gradient magnitude inside the brain, with derivative-of-Gaussian filters of
      sigma 1 pixel (intensity per pixel). Plain differences (`np.gradient`) are dominated by noise: on 20 demo
      slices per scanner they rank the blurred but noisy "Unspecified" sharper than the sharp "Magnetom TrioTim"
      ones (0.053 vs 0.049); at 1 pixel the edges survive and the ranking is right (0.035 vs 0.042).
    * `mean_brain`: the mean intensity inside the brain.
    """
    x = _images(images, "images")
    _check_masks(x, brain, background)
    noise, sharp = [], []
    for s in range(0, len(x), SIGNATURE_CHUNK):
        chunk = x[s : s + SIGNATURE_CHUNK]
        noise.append(chunk[:, background].std(axis=1, dtype=np.float64))
        sharp.append(_gradient_magnitude(chunk)[:, brain].mean(axis=1, dtype=np.float64))
    return {
        "noise": float(np.concatenate(noise).mean()),
        "sharpness": float(np.concatenate(sharp).mean()),
        "mean_brain": float(x[:, brain].mean(dtype=np.float64)),
    }


def _gradient_magnitude(x: np.ndarray) -> np.ndarray:
    # sigma 0 along the image axis: each slice is filtered on its own
    sigma = (0.0, GRADIENT_SIGMA_PX, GRADIENT_SIGMA_PX)
    rows = ndimage.gaussian_filter(x, sigma, order=(0, 1, 0))
    cols = ndimage.gaussian_filter(x, sigma, order=(0, 0, 1))
    return np.hypot(rows, cols)


def _check_masks(x: np.ndarray, brain: np.ndarray, background: np.ndarray) -> None:
    for name, m in (("brain", brain), ("background", background)):
        if m.shape != x.shape[1:] or m.dtype != bool:
            raise ValueError(f"the {name} mask must be boolean {x.shape[1:]}, got {m.dtype} {m.shape}")
        if not m.any():
            raise ValueError(f"the {name} mask is empty")
    if len(x) == 0:
        raise ValueError("no images")


def signature_distances(
    real_images: np.ndarray, generated_images: np.ndarray, brain: np.ndarray, background: np.ndarray
) -> dict[str, float]:
    """Real vs generated signature of one scanner: Wasserstein-1 distance of the brain intensities, and the noise
    and sharpness of each side.

    `intensity_w1` is the area between the two cumulative histograms of brain-pixel intensities: the mean
    intensity change needed to turn one distribution into the other (0 for the same distribution, 0.05 =
    5 % of the intensity range). Sets with more than a million brain pixels are subsampled with a fixed seed.
    """
    real = _images(real_images, "real_images")
    generated = _images(generated_images, "generated_images")
    _check_masks(real, brain, background)
    _check_masks(generated, brain, background)
    w1 = stats.wasserstein_distance(_brain_pixels(real, brain), _brain_pixels(generated, brain))
    sig_real = signature(real, brain, background)
    sig_generated = signature(generated, brain, background)
    return {
        "intensity_w1": float(w1),
        "noise_real": sig_real["noise"],
        "noise_generated": sig_generated["noise"],
        "sharpness_real": sig_real["sharpness"],
        "sharpness_generated": sig_generated["sharpness"],
    }


def _brain_pixels(x: np.ndarray, brain: np.ndarray) -> np.ndarray:
    values = x[:, brain].ravel()
    if values.size > MAX_W1_SAMPLES:
        rng = np.random.default_rng(0)
        values = values[rng.choice(values.size, MAX_W1_SAMPLES, replace=False)]
    return values.astype(np.float64)


# -- label effect ---------------------------------------------------------------------------------------------


def label_effect(grid: np.ndarray) -> dict[str, float]:
    """How much the scanner label changes a decoded image, relative to how much the latent draw does.

    `grid` is (K scanners, m draws, H, W): draw j decoded for every scanner k. `between_scanners` is the mean
    absolute per-pixel difference between two scanners' images of the same draw (over draws and scanner pairs
    k < k'), `between_draws` between two draws of the same scanner (over scanners and draw pairs j < j'), and
    `ratio` = between_scanners / between_draws. A decoder that ignores its label gives between_scanners = 0;
    a ratio well below 1 says the label is a small touch next to the subject variation. The ratio is inf when
    the draws are identical but the scanners differ, nan when both are 0.
    """
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 4:
        raise ValueError(f"grid must be (scanners, draws, H, W), got shape {g.shape}")
    n_scanners, n_draws = g.shape[:2]
    if n_scanners < 2 or n_draws < 2:
        raise ValueError(f"label_effect needs at least 2 scanners and 2 draws, got {n_scanners} x {n_draws}")
    # one pair at a time: a broadcast over all pairs would hold K m^2 images
    scanners = np.mean([np.abs(g[a] - g[b]).mean() for a, b in combinations(range(n_scanners), 2)])
    draws = np.mean([np.abs(g[:, a] - g[:, b]).mean() for a, b in combinations(range(n_draws), 2)])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.float64(scanners) / np.float64(draws)
    return {"between_scanners": float(scanners), "between_draws": float(draws), "ratio": float(ratio)}
