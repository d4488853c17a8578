"""The observation noise of a decoder, drawn with numpy: the one implementation the runtime samples with
(the torch version in `models/parts/noise.py` is tested equal to it).

Three kinds (ModelMetadata.NOISE_KINDS): additive Gaussian; the Rician magnitude of one complex channel; and
"chi", the magnitude of a multi-channel receive chain, whose per-scanner shape (`NoiseTexture`) the file's
metadata carries:

    |image + sigma (c1 + i c2)|^2 + sigma^2 max(0, d + sqrt(2 d) c3)   under a square root,

where c1, c2, c3 are white Gaussian fields correlated by the scanner's kernel (unit energy, so each keeps unit
variance: interpolation and k-space filtering correlate MR noise between neighbouring pixels) and d >= 0 is
the scanner's extra degrees of freedom: the root-sum-of-squares of L coils adds, where the image is dark, the
noise power of 2L - 2 more Gaussian channels (a non-central chi distribution; Constantinides et al., MRM 1997),
here drawn by its first two moments. d = 0 and a one-tap kernel is the Rician draw.

`expected_draw` is the mean of a draw, pixel by pixel: the noise floor's level where a draw is taken away.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

from mrgen_dist.artifacts import ModelMetadata

#: The mean of a unit-sigma draw is tabulated for image / sigma in [0, EXPECTED_RANGE], every EXPECTED_STEP
#: (linear interpolation: at most about 1e-3 sigma off); beyond it, its asymptote (`_unit_mean`).
EXPECTED_RANGE, EXPECTED_STEP = 32.0, 1 / 16
#: Gauss-Hermite nodes per Gaussian component of a magnitude's mean: about 1e-3 off next to the exact Rician
#: mean at the floor (r = 0), where the magnitude has its cone, and less above.
EXPECTED_NODES = 40


@dataclass(frozen=True)
class NoiseTexture:
    """The per-scanner shape of "chi" noise (metadata `mrgen.noise_texture`), in vocabulary order: `dof`, the
    extra degrees of freedom d of each scanner's noise floor, and `kernel`, each scanner's k x k correlation
    kernel (odd k, unit energy)."""

    dof: list[float]
    kernel: list[list[list[float]]]

    def to_dict(self) -> dict:
        return {"dof": [float(d) for d in self.dof], "kernel": np.asarray(self.kernel, dtype=float).tolist()}

    @classmethod
    def from_dict(cls, record: dict, n_scanners: int, source: str) -> NoiseTexture:
        """The texture of `record`, checked: one non-negative dof and one odd square kernel per scanner."""
        try:
            dof = [float(d) for d in record["dof"]]
            kernel = np.asarray(record["kernel"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{source}: metadata mrgen.noise_texture must hold `dof` and `kernel` per scanner, "
                             f"got {str(record)[:80]!r}") from None
        shape_ok = kernel.ndim == 3 and kernel.shape[1] == kernel.shape[2] and kernel.shape[1] % 2 == 1
        if len(dof) != n_scanners or not shape_ok or len(kernel) != n_scanners:
            raise ValueError(f"{source}: mrgen.noise_texture must have {n_scanners} dof and {n_scanners} odd square "
                             f"kernels, got {len(dof)} and shape {list(kernel.shape)}")
        if not all(math.isfinite(d) and d >= 0 for d in dof) or not np.isfinite(kernel).all():
            raise ValueError(f"{source}: mrgen.noise_texture has a negative or non-finite value")
        return cls(dof, kernel.tolist())

    @property
    def taps(self) -> int:
        return len(self.kernel[0])


def white_shape(image_shape: tuple[int, ...], taps: int) -> tuple[int, ...]:
    """The white field (..., H + taps - 1, W + taps - 1) that a kernel of `taps` filters to an (..., H, W) one
    without a border: the correlated noise is the same at the edge as in the middle."""
    return (*image_shape[:-2], image_shape[-2] + taps - 1, image_shape[-1] + taps - 1)


def correlate(white: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Each white field (B, 1, H + k - 1, W + k - 1) cross-correlated with its own kernel (B, k, k), valid
    part (B, 1, H, W): a sum of k^2 shifted copies, as torch's conv2d computes it."""
    k = kernel.shape[-1]
    h, w = white.shape[-2] - k + 1, white.shape[-1] - k + 1
    out = np.zeros((*white.shape[:-2], h, w), dtype=np.float32)
    for i in range(k):
        for j in range(k):
            out += kernel[:, i, j, None, None, None].astype(np.float32) * white[..., i : i + h, j : j + w]
    return out


def add_noise(image: np.ndarray, sigma: np.ndarray, kind: str, rngs: Sequence[np.random.Generator],
              scanner: np.ndarray | None = None, texture: NoiseTexture | None = None) -> np.ndarray:
    """A draw of learned noise of `kind` around `image` (B, 1, H, W), clipped to [0, 1]: image + sigma n1
    (Gaussian), |image + sigma (n1 + i n2)| (Rician), or the chi draw of the module doc with each image's
    `scanner`'s `texture`; component j from `rngs[j]` (one, two or three streams)."""
    if kind == ModelMetadata.CHI_NOISE:
        if texture is None or scanner is None:
            raise ValueError("chi noise needs the scanner of each image and the model's noise texture")
        kernel = np.asarray(texture.kernel, dtype=np.float32)[scanner]
        dof = np.asarray(texture.dof, dtype=np.float32)[scanner][:, None, None, None]
        c1, c2, c3 = (correlate(rng.standard_normal(white_shape(image.shape, texture.taps), dtype=np.float32), kernel)
                      for rng in rngs[:3])
        power = (image + sigma * c1) ** 2 + (sigma * c2) ** 2 + sigma**2 * np.maximum(0, dof + np.sqrt(2 * dof) * c3)
        return np.clip(np.sqrt(power), 0.0, 1.0)
    noisy = image + sigma * rngs[0].standard_normal(image.shape, dtype=np.float32)
    if kind == ModelMetadata.RICIAN_NOISE:
        noisy = np.hypot(noisy, sigma * rngs[1].standard_normal(image.shape, dtype=np.float32))
    return np.clip(noisy, 0.0, 1.0)


@functools.lru_cache(maxsize=64)
def _unit_mean(kind: str, dof: float) -> tuple[np.ndarray, np.ndarray]:
    """(r, g(r)): the mean g of a draw of unit sigma around r on the table's grid, lower clip included.
    Gaussian: E max(0, r + c) = r Phi(r) + phi(r), for r of either sign. Magnitude (Rician, chi), even in r:
    E sqrt((r + c1)^2 + c2^2 + max(0, d + sqrt(2 d) c3)) for r >= 0, by Gauss-Hermite quadrature."""
    r = np.arange(0.0, EXPECTED_RANGE + EXPECTED_STEP / 2, EXPECTED_STEP)
    if kind == ModelMetadata.GAUSSIAN_NOISE:
        r = np.concatenate([-r[:0:-1], r])
        phi = np.exp(-(r**2) / 2) / math.sqrt(2 * math.pi)
        big_phi = np.array([0.5 * (1 + math.erf(x / math.sqrt(2))) for x in r])
        return r, r * big_phi + phi
    c, w = hermegauss(EXPECTED_NODES)
    w = w / w.sum()
    extra, w3 = (np.zeros(1), np.ones(1)) if dof == 0 else hermegauss(EXPECTED_NODES)
    extra = np.maximum(0.0, dof + math.sqrt(2 * dof) * extra)
    w3 = w3 / w3.sum()
    square = c[None, None, :] ** 2 + extra[None, :, None]  # c2^2 + the extra channels' power, (1, k3, k)
    g = np.empty_like(r)
    for i, x in enumerate(r):
        power = (x + c)[:, None, None] ** 2 + square  # (k1, k3, k2)
        g[i] = np.einsum("i,j,k,ijk->", w, w3, w, np.sqrt(power))
    return r, g


def expected_draw(image: np.ndarray, sigma: np.ndarray, kind: str, scanner: np.ndarray | None = None,
                  texture: NoiseTexture | None = None) -> np.ndarray:
    """The mean of `add_noise`'s draws of `kind` around `image` (B, 1, H, W) with standard deviation `sigma`,
    pixel by pixel: sigma g(image / sigma, d) (`_unit_mean`), d each image's `scanner`'s extra degrees of
    freedom for chi noise. A kernel correlates pixels but leaves each one's distribution, so it does not enter.
    The clip at 1 is applied to the mean (the mean of the clipped draw is lower where a pixel's draws cross 1)."""
    if kind == ModelMetadata.CHI_NOISE:
        if texture is None or scanner is None:
            raise ValueError("chi noise needs the scanner of each image and the model's noise texture")
        dofs = np.asarray(texture.dof, dtype=np.float64)[np.asarray(scanner)]
    else:
        dofs = np.zeros(len(image))
    sigma = np.maximum(np.asarray(sigma, dtype=np.float64), 1e-12)
    gaussian = kind == ModelMetadata.GAUSSIAN_NOISE
    r = image.astype(np.float64) / sigma
    out = np.empty(image.shape, dtype=np.float32)
    for i, dof in enumerate(dofs):
        grid, g = _unit_mean(kind, float(dof))
        # beyond the table, the asymptotes: max(r, 0) for a Gaussian; sqrt(r^2 + 1 + d) for a magnitude
        x = r[i] if gaussian else np.abs(r[i])
        far = np.maximum(x, 0) if gaussian else np.sqrt(x**2 + 1 + dof)
        unit = np.where(np.abs(x) > EXPECTED_RANGE, far, np.interp(x, grid, g))
        out[i] = np.minimum(sigma[i] * unit, 1.0)
    return out
