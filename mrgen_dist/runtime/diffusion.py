"""Sampling an exported denoiser (contract `mrgen-denoiser`): the noise schedule, DDIM or DPM-Solver++(2M) with
classifier-free guidance, written in numpy. No torch.

The same functions define the schedule the family trains with (mrgen_dist/models/diffusion.py imports them),
so that training and sampling cannot disagree on alpha_bar(t).

* Schedule: `alphas_cumprod(schedule, timesteps)`, alpha_bar_t for t = 0 .. T-1 (float64): `cosine` (Nichol &
  Dhariwal 2021, betas clipped at 0.999) or `linear` (Ho et al. 2020: betas from 1e-4 to 0.02, rescaled for
  T other than 1000).
* Timesteps of a DDIM run of N steps: `ddim_timesteps`, "trailing" spacing (t_0 = T - 1, the step where the
  input really is N(0, I); the "leading" spacing starts N-step runs at T - T/N, on noise the model never saw
  there: Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed").
* Prediction: `v` (recommended, the default of the family) or `eps`. With v = sqrt(a) eps - sqrt(1 - a) x0 the
  target has unit variance at every t, and x0 = sqrt(a) x_t - sqrt(1 - a) v stays well-conditioned where
  alpha_bar is close to 0 (the first steps of the cosine schedule), where eps-prediction divides by sqrt(a)
  and a small error of the network becomes a large error of x0; with few sampling steps and guidance scales
  above 1, which extrapolate the network's output, that matters most.
* The DDIM update with eta = 0 (Song et al. 2021), deterministic: x0 = f(x_t, out), x0 clipped to [-1, 1]
  (the images in the model's space are 2 image - 1), eps = g(x_t, out) from the unclipped output, and
  x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, with a_prev = 1 after the last step (x_prev = x0): the
  same as diffusers' DDIMScheduler with timestep_spacing="trailing", set_alpha_to_one=True,
  clip_sample=True.
* DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: fast solver for guided sampling"; `name: dpmpp2m`): the
  same probability-flow ODE solved to second order in lambda = log(sqrt(a) / sqrt(1 - a)), reusing the
  previous step's x0, so that about half the steps of DDIM reach the same error (DDIM is its first-order
  case). With h = lambda_next - lambda and r = h_prev / h: D = (1 + 1 / 2r) x0 - (1 / 2r) x0_prev (x0 alone at
  the first step), x_next = (sigma_next / sigma) x - sqrt(a_next) (e^-h - 1) D, and the last step, to a = 1,
  returns x0 (first order, as diffusers' `lower_order_final`); x0 is clipped to [-1, 1] as in DDIM. This is
  diffusers' DPMSolverMultistepScheduler with algorithm_type="dpmsolver++", solver_order=2,
  solver_type="midpoint", trailing spacing, final sigma 0, clipped.
* Ancestral DDIM (`name: ancestral`; DDIM with eta = 1, Song et al. 2021 eq. 16: the DDPM sampler on a
  strided schedule): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s n, s^2 = (1 - a_prev) / (1 - a)
  (1 - a / a_prev), fresh n ~ N(0, I) at every step. The deterministic solvers map x_T to the mean of what the
  network predicts, which for texture the network cannot place (acquisition noise) is smoother than any real
  slice; the ancestral step draws it. Its n comes from one stream per image seeded by that image's x_T (a hash
  of its bytes), so an image is still a function of its latent, whatever the batch.
* `variance: calibrated` (ancestral only): the step's variance is s^2 + c^2 e_t, where c = sqrt(a_prev) -
  sqrt(1 - a_prev - s^2) sqrt(a / (1 - a)) is how an error of x0 carries into x_prev and e_t the network's own
  mean squared error of x0 at that step, per scanner, measured on training slices when the file is exported
  (`x0_errors`; the table is the file's `x0_error`). The posterior variance s^2 alone is exact only where x0 is
  known from x_t; where it is not (acquisition noise, which no network can place), each step loses c^2 e_t of
  variance and the drawn grain comes out fainter than the real one, for every scanner alike. With the error
  added, the step's kernel is the one that keeps the marginal of x_t (exactly so for Gaussian data): Bao et al.
  2022, "Analytic-DPM" (Theorem 1, there with the optimal network's error 1 - E||eps_hat||^2 / d) and
  "Estimating the optimal covariance with imperfect mean" (the network's measured error).
  Where each pixel's low-pass level is given, not drawn (a refiner: the coarse slice's low-pass, its graph's `base`),
  e_t is tabled per bin of that level too (`x0_error_levels`, the bins' edges): the network's error of x0 is
  several times larger on the brain's fine anatomy than on air, and a mean over the whole slice adds to the air
  of a site with a quiet floor variance that its floor never had.
* `spacing: quadratic` (Song et al. 2021, Appendix D.2) puts the steps at t_k = (T - 1) ((N - k) / N)^2, dense
  at low noise: the last step starts from a near-clean slice, so the mean it returns keeps the fine texture
  (with trailing spacing and 20 steps the last step starts at t = 49, where a noise of 0.1 hides it).
* `clip: false` leaves x0 unclipped: for a model whose space is not [-1, 1] (the refiner's scaled fine band,
  models/refiner.py), clipping would cut its texture's tails.
* Guidance: one onnxruntime call per step on the 2B batch [unconditional; conditional] (the null label is
  the last embedding, `null_label` = the number of scanners), out = u + w (c - u). w = 1 is the conditional
  model (one call on B), w = 0 the unconditional one.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrgen_dist.runtime.block_grid import grid_shape, repeat_blocks
from mrgen_dist.runtime.session import LEVEL_INPUT, check_finite, level_feed

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("v", "eps")
SOLVERS = ("ddim", "dpmpp2m", "ancestral")
SPACINGS = ("trailing", "quadratic")
VARIANCES = ("posterior", "calibrated")
#: The cosine schedule's offset s (Nichol & Dhariwal) and the largest beta it allows.
COSINE_OFFSET, MAX_BETA = 0.008, 0.999

#: out = denoise(x (B, 1, H, W) float32, t (B,) float32, scanner (B,) int64[, level (B,) int64]): the network's
#: prediction (`level`, the axial index, only for a level-conditioned denoiser).
Denoise = Callable[..., np.ndarray]


def betas(schedule: str, timesteps: int) -> np.ndarray:
    """beta_t, t = 0 .. T-1, float64."""
    if schedule == "cosine":
        s = np.arange(timesteps + 1, dtype=np.float64) / timesteps
        f = np.cos((s + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        return np.minimum(1 - f[1:] / f[:-1], MAX_BETA)
    if schedule == "linear":
        scale = 1000 / timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def alphas_cumprod(schedule: str, timesteps: int) -> np.ndarray:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), t = 0 .. T-1, float64, decreasing in (0, 1)."""
    return np.cumprod(1 - betas(schedule, timesteps))


def ddim_timesteps(timesteps: int, steps: int) -> np.ndarray:
    """The N = `steps` timesteps of a DDIM run, decreasing from T - 1 ("trailing" spacing), int64."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in 1 .. {timesteps}, got {steps}")
    return (np.round(np.arange(timesteps, 0, -timesteps / steps)).astype(np.int64) - 1)[:steps]


def sample_timesteps(timesteps: int, steps: int, spacing: str = "trailing") -> np.ndarray:
    """The N = `steps` timesteps of a sampling run, decreasing from T - 1, int64: `trailing` (ddim_timesteps) or
    `quadratic`, (T - 1) ((N - k) / N)^2 for k = 0 .. N - 1."""
    if spacing == "trailing":
        return ddim_timesteps(timesteps, steps)
    if spacing != "quadratic":
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    ts = np.round((timesteps - 1) * ((steps - np.arange(steps)) / steps) ** 2).astype(np.int64)
    if not 1 <= steps or len(np.unique(ts)) != steps:
        raise ValueError(f"quadratic spacing of {timesteps} timesteps has no {steps} distinct steps")
    return ts


def predicted_x0_eps(x: np.ndarray, out: np.ndarray, a: np.ndarray | float, prediction: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) of x_t = sqrt(a) x0 + sqrt(1 - a) eps from the network's output `out` (v or eps)."""
    sa, sb = np.sqrt(a), np.sqrt(1 - a)
    if prediction == "v":
        return sa * x - sb * out, sa * out + sb * x
    if prediction == "eps":
        return (x - sb * out) / sa, out
    raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def ddim_step(x: np.ndarray, out: np.ndarray, a: float, a_prev: float, prediction: str, clip: bool = True
              ) -> tuple[np.ndarray, np.ndarray]:
    """One DDIM step (eta = 0) from x_t (alpha_bar `a`) to x_prev (alpha_bar `a_prev`): (x_prev, x0)."""
    x0, eps = predicted_x0_eps(x.astype(np.float64), out.astype(np.float64), a, prediction)
    if clip:
        x0 = np.clip(x0, -1, 1)
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x_prev.astype(np.float32), x0.astype(np.float32)


def posterior_variance(a: float, a_prev: float) -> float:
    """s^2 of the module doc: the variance of x_prev given x_t and x0, from alpha_bar `a` to `a_prev`."""
    return (1 - a_prev) / (1 - a) * (1 - a / a_prev)


def x0_carry(a: float, a_prev: float, s2: float) -> float:
    """c of the module doc: how much of an error of x0 the ancestral step from `a` to `a_prev` (posterior
    variance `s2`) carries into x_prev (through x0 and through the eps derived from it)."""
    return math.sqrt(a_prev) - math.sqrt(max(1 - a_prev - s2, 0.0)) * math.sqrt(a / (1 - a))


def ancestral_step(x: np.ndarray, out: np.ndarray, a: float, a_prev: float, prediction: str, noise: np.ndarray,
                   clip: bool = True, x0_error: float | np.ndarray = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One ancestral DDIM step (eta = 1) from x_t (alpha_bar `a`) to x_prev (alpha_bar `a_prev`) with the fresh
    N(0, I) draw `noise` of x's shape: (x_prev, x0). `x0_error`, the network's mean squared error of x0 here
    (a number, or one per image or pixel shaped to broadcast over x), adds its carried share to the variance
    (module doc, `variance: calibrated`); 0 is the posterior variance."""
    x0, eps = predicted_x0_eps(x.astype(np.float64), out.astype(np.float64), a, prediction)
    if clip:
        x0 = np.clip(x0, -1, 1)
    s2 = posterior_variance(a, a_prev)
    spread = np.sqrt(s2 + x0_carry(a, a_prev, s2) ** 2 * np.asarray(x0_error, dtype=np.float64))
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - s2, 0.0)) * eps + spread * noise
    return x_prev.astype(np.float32), x0.astype(np.float32)


def noise_streams(x_T: np.ndarray) -> list[np.random.Generator]:
    """One generator per image of `x_T` (B, ...), seeded by a hash of that image's bytes."""
    return [np.random.default_rng(int.from_bytes(hashlib.blake2b(np.ascontiguousarray(row, np.float32).tobytes(),
                                                                 digest_size=8).digest(), "little"))
            for row in x_T]


def guide(unconditional: np.ndarray, conditional: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance: u + w (c - u)."""
    return unconditional + np.float32(scale) * (conditional - unconditional)


@dataclass(frozen=True)
class SamplerSettings:
    """How a denoiser file is sampled: the `mrgen.sampler` metadata (export/README.md)."""

    steps: int
    guidance: float
    prediction: str
    schedule: str
    timesteps: int
    null_label: int
    name: str = "ddim"
    spacing: str = "trailing"  # of the timesteps (sample_timesteps)
    clip: bool = True  # x0 clipped to [-1, 1] at every step
    variance: str = "posterior"  # of the ancestral step: posterior | calibrated (module doc)
    #: the network's mean squared error of x0 (`x0_errors`), one row per scanner, one column per step, one entry
    #: per bin of the low-pass level (`x0_error_levels`): what `variance: calibrated` adds; empty until the
    #: file's export measures it
    x0_error: tuple[tuple[tuple[float, ...], ...], ...] = ()
    #: the increasing inner edges of the low-pass level's bins (`level_bins`); () is one bin, the whole slice
    x0_error_levels: tuple[float, ...] = ()

    @classmethod
    def from_metadata(cls, values: dict, source: str = "the model") -> SamplerSettings:
        """Read and check `mrgen.sampler`; a ValueError naming the key that is missing or wrong."""
        keys = ("steps", "guidance", "prediction", "schedule", "timesteps", "null_label")
        missing = [k for k in keys if k not in values]
        if missing:
            raise ValueError(f"{source}: metadata mrgen.sampler lacks {', '.join(missing)}")
        settings = cls(int(values["steps"]), float(values["guidance"]), str(values["prediction"]),
                       str(values["schedule"]), int(values["timesteps"]), int(values["null_label"]),
                       str(values.get("name", "ddim")), str(values.get("spacing", "trailing")),
                       bool(values.get("clip", True)), str(values.get("variance", "posterior")),
                       x0_error_table(values.get("x0_error", ())),
                       tuple(float(e) for e in values.get("x0_error_levels", ())))
        if settings.variance not in VARIANCES:
            raise ValueError(f"{source}: mrgen.sampler variance {settings.variance!r} is not one this mrgen-dist runs "
                             f"({', '.join(VARIANCES)})")
        if settings.variance == "calibrated":
            table, levels = (np.asarray(v, dtype=np.float64) for v in (settings.x0_error, settings.x0_error_levels))
            bins = len(levels) + 1
            if settings.name != "ancestral" or table.shape != (settings.null_label, settings.steps, bins) \
                    or not np.all(np.isfinite(table)) or np.any(table < 0) or np.any(np.diff(levels) <= 0):
                raise ValueError(f"{source}: mrgen.sampler variance 'calibrated' needs the ancestral sampler and "
                                 f"x0_error, {settings.null_label} rows (scanners) of {settings.steps} steps of "
                                 f"{bins} errors >= 0 (bins of the increasing x0_error_levels); got "
                                 f"{settings.name!r}, a table of shape {table.shape} and levels {levels.tolist()}")
        if settings.spacing not in SPACINGS:
            raise ValueError(f"{source}: mrgen.sampler spacing {settings.spacing!r} is not one this mrgen-dist runs "
                             f"({', '.join(SPACINGS)})")
        if settings.name not in SOLVERS:
            raise ValueError(f"{source}: mrgen.sampler name {settings.name!r} is not one this mrgen-dist runs "
                             f"({', '.join(SOLVERS)})")
        if settings.prediction not in PREDICTIONS or settings.schedule not in SCHEDULES:
            raise ValueError(f"{source}: mrgen.sampler prediction {settings.prediction!r} / schedule "
                             f"{settings.schedule!r}: expected one of {PREDICTIONS} / {SCHEDULES}")
        if not 1 <= settings.steps <= settings.timesteps:
            raise ValueError(f"{source}: mrgen.sampler steps {settings.steps} not in 1 .. {settings.timesteps}")
        return settings

    def to_metadata(self) -> dict:
        return {"name": self.name, "steps": self.steps, "guidance": self.guidance, "prediction": self.prediction,
                "schedule": self.schedule, "timesteps": self.timesteps, "null_label": self.null_label,
                "spacing": self.spacing, "clip": self.clip, "variance": self.variance,
                **({"x0_error": [[list(step) for step in row] for row in self.x0_error]} if self.x0_error else {}),
                **({"x0_error_levels": list(self.x0_error_levels)} if self.x0_error_levels else {})}


def x0_error_table(values: list) -> tuple[tuple[tuple[float, ...], ...], ...]:
    """The metadata's `x0_error` as nested tuples (scanners, steps, bins); a table of one number per step (files
    exported before the bins) is one bin. Its shape is checked by `SamplerSettings.from_metadata`."""
    rows = [[step if isinstance(step, list) else [step] for step in row] for row in values]
    return tuple(tuple(tuple(float(e) for e in step) for step in row) for row in rows)


def dpmpp2m_step(x: np.ndarray, out: np.ndarray, a: float, a_next: float, prediction: str,
                 previous: tuple[np.ndarray, float] | None, clip: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """One DPM-Solver++(2M) step from x_t (alpha_bar `a`) to alpha_bar `a_next` (module doc), with `previous`
    = (x0, h) of the step before (None at the first): (x_next, x0, h)."""
    x64 = x.astype(np.float64)
    x0 = predicted_x0_eps(x64, out.astype(np.float64), a, prediction)[0]
    if clip:
        x0 = np.clip(x0, -1, 1)
    if a_next >= 1.0:  # the last step, to sigma = 0
        return x0.astype(np.float32), x0.astype(np.float32), math.inf
    h = 0.5 * (math.log(a_next / (1 - a_next)) - math.log(a / (1 - a)))
    d = x0
    if previous is not None:
        x0_prev, h_prev = previous
        half_over_r = 0.5 * h / h_prev
        d = (1 + half_over_r) * x0 - half_over_r * x0_prev
    x_next = math.sqrt((1 - a_next) / (1 - a)) * x64 - math.sqrt(a_next) * math.expm1(-h) * d
    return x_next.astype(np.float32), x0.astype(np.float32), h


def sample(denoise: Denoise, x: np.ndarray, scanner: np.ndarray, settings: SamplerSettings,
           level: np.ndarray | None = None, low_pass: Callable[[], np.ndarray] | None = None) -> np.ndarray:
    """The sampling loop (`settings.name`: DDIM, DPM-Solver++(2M) or ancestral) with guidance from x_T = `x`
    (B, 1, H, W) float32 ~ N(0, I) for the labels `scanner` (B,) (and axial `level` (B,), for a level-conditioned
    denoiser: guidance drops the scanner, never the level; `low_pass`, for a calibrated variance tabled by the
    low-pass level: () -> that level (B, 1, H, W), read once, after the loop's first network call, which may be
    what makes it): x0 in the model's space [-1, 1], float32 (B, 1, H, W)."""
    a_bar = alphas_cumprod(settings.schedule, settings.timesteps)
    ts = sample_timesteps(settings.timesteps, settings.steps, settings.spacing)
    streams = noise_streams(x) if settings.name == "ancestral" else []
    guided = guided_denoise(denoise, scanner, settings, level)
    x0_error = x0_error_lookup(settings, scanner, low_pass)
    x0, previous = x, None
    for i, t in enumerate(ts):
        a = float(a_bar[t])
        a_next = float(a_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        out = guided(x, t)
        if settings.name == "dpmpp2m":
            x, x0, h = dpmpp2m_step(x, out, a, a_next, settings.prediction, previous, settings.clip)
            previous = (x0.astype(np.float64), h)
        elif settings.name == "ancestral":
            noise = np.stack([g.standard_normal(x.shape[1:], dtype=np.float32) for g in streams])
            x, x0 = ancestral_step(x, out, a, a_next, settings.prediction, noise, settings.clip, x0_error(i))
        else:
            x, x0 = ddim_step(x, out, a, a_next, settings.prediction, settings.clip)
    return x0


def level_bins(low_pass: np.ndarray, levels: tuple[float, ...]) -> np.ndarray:
    """The bin of the calibrated variance's table (`x0_error_levels`, their inner edges) that each pixel of
    `low_pass` falls in: int of its shape, 0 below the first edge."""
    return np.digitize(low_pass, np.asarray(levels, dtype=np.float64))


def x0_error_lookup(settings: SamplerSettings, scanner: np.ndarray, low_pass: Callable[[], np.ndarray] | None = None
                    ) -> Callable[[int], np.ndarray]:
    """step -> the error of x0 the calibrated variance adds there, per image (B, 1, 1, 1) of labels `scanner`,
    or per pixel (B, 1, H, W) of a table binned by the low-pass level (`low_pass`, () -> the level (B, 1, H, W),
    is then needed; it is read at the first step looked up);
    zeros, the posterior variance, for any other setting or before the export measured the table."""
    if settings.variance != "calibrated" or not settings.x0_error:
        zeros = np.zeros((len(scanner), 1, 1, 1))
        return lambda i: zeros
    rows = np.asarray(settings.x0_error, dtype=np.float64)[scanner]  # (B, steps, bins)
    if not settings.x0_error_levels:
        return lambda i: rows[:, i, 0, None, None, None]
    if low_pass is None:
        raise ValueError("this calibrated variance is tabled by the low-pass level (x0_error_levels): the sampler "
                         "needs the images' low_pass")
    bins = functools.cache(lambda: level_bins(low_pass(), settings.x0_error_levels))

    def at(i: int) -> np.ndarray:
        pixel_bins = bins()
        return np.take_along_axis(rows[:, i], pixel_bins.reshape(len(pixel_bins), -1), axis=1).reshape(pixel_bins.shape)

    return at


def guided_denoise(denoise: Denoise, scanner: np.ndarray, settings: SamplerSettings,
                   level: np.ndarray | None = None) -> Callable[[np.ndarray, int], np.ndarray]:
    """(x, t) -> the guided output for the labels `scanner` (B,): one call on [unconditional; conditional] (2B)
    where the guidance scale is not 1, one conditional call on B where it is."""
    b, w = len(scanner), settings.guidance
    labels = scanner.astype(np.int64)
    levels = () if level is None else (np.asarray(level, dtype=np.int64),)
    if w != 1:
        labels = np.concatenate([np.full(b, settings.null_label, dtype=np.int64), labels])
        levels = tuple(np.concatenate([k, k]) for k in levels)

    def run(x: np.ndarray, t: int) -> np.ndarray:
        if w == 1:
            return denoise(x, np.full(b, t, dtype=np.float32), labels, *levels)
        out = denoise(np.concatenate([x, x]), np.full(2 * b, t, dtype=np.float32), labels, *levels)
        return guide(out[:b], out[b:], w)

    return run


def x0_errors(denoise: Denoise, x0: np.ndarray, scanner: np.ndarray, settings: SamplerSettings,
              rng: np.random.Generator, bins: np.ndarray | None = None, n_bins: int = 1
              ) -> tuple[np.ndarray, np.ndarray]:
    """The network's squared error of x0 at each of the sampler's steps on training slices x0 (B, 1, H, W) in
    the model's space with their labels `scanner` (B,), summed per image over the pixels of each bin of the
    low-pass level (`bins`, of x0's shape, from `level_bins`; None: one bin): (sums (B, steps, n_bins),
    pixels (B, n_bins)), float64. Each step noises the slices to x_t with a fresh draw of `rng` and reads x0
    back as the sampler does (guided, clipped as `settings` say). `error_table` turns them into the `x0_error`
    of `variance: calibrated`."""
    a_bar = alphas_cumprod(settings.schedule, settings.timesteps)
    guided = guided_denoise(denoise, scanner, settings)
    flat = np.zeros(x0.shape, dtype=np.int64) if bins is None else np.broadcast_to(bins, x0.shape)
    flat = flat.reshape(len(x0), -1)
    pixels = np.stack([np.bincount(row, minlength=n_bins) for row in flat]).astype(np.float64)
    sums = np.zeros((len(x0), settings.steps, n_bins))
    for i, t in enumerate(sample_timesteps(settings.timesteps, settings.steps, settings.spacing)):
        a = float(a_bar[t])
        x = (math.sqrt(a) * x0 + math.sqrt(1 - a) * rng.standard_normal(x0.shape)).astype(np.float32)
        predicted = predicted_x0_eps(x.astype(np.float64), guided(x, int(t)).astype(np.float64), a,
                                     settings.prediction)[0]
        if settings.clip:
            predicted = np.clip(predicted, -1, 1)
        squared = ((predicted - x0) ** 2).reshape(len(x0), -1)
        sums[:, i] = [np.bincount(row, weights=err, minlength=n_bins) for row, err in zip(flat, squared, strict=True)]
    return sums, pixels


def error_table(sums: np.ndarray, pixels: np.ndarray, scanner: np.ndarray, n_scanners: int
                ) -> tuple[tuple[tuple[float, ...], ...], ...]:
    """The sums and pixel counts of `x0_errors` -> the mean squared error per scanner, step and bin: the
    `x0_error` table (every scanner must have slices: the sampler draws each with its own row). A bin a
    scanner's slices do not reach takes that scanner's mean over the whole slice."""
    missing = np.flatnonzero(np.bincount(scanner, minlength=n_scanners) == 0).tolist()
    if missing:
        raise ValueError(f"calibrating the sampler's variance needs slices of every scanner; none of {missing}")
    rows = []
    for k in range(n_scanners):
        total, count = sums[scanner == k].sum(axis=0), pixels[scanner == k].sum(axis=0)  # (steps, bins), (bins,)
        whole = total.sum(axis=1, keepdims=True) / count.sum()
        rows.append(np.where(count > 0, total / np.maximum(count, 1), whole))
    return tuple(tuple(tuple(float(e) for e in step) for step in row) for row in rows)


def to_slices(x0: np.ndarray, shape: tuple[int, int], block_means: int = 1) -> np.ndarray:
    """Draws (B, 1, h, w) in the model's space [-1, 1] -> slices (B, H, W) of `shape` in [0, 1], float32. A
    draw of block means (block_means > 1) is handed over with each block repeated."""
    drawn = np.clip((x0[:, 0] + 1) / 2, 0, 1).astype(np.float32)
    return repeat_blocks(drawn, shape, block_means)


class DiffusionDraw:
    """What `Sampler` does with a `mrgen-denoiser` file: x_T ~ N(0, I) for all n images from a generator
    seeded by (seed, scanner id) (so that images do not depend on the batch size, as for a decoder), then the
    guided sampling loop (DDIM or DPM-Solver++(2M)) batch by batch. Its latent is x_T, flattened: h * w numbers
    (`mrgen.latent`) of the drawn shape, the slices' (H, W) or, for a model of their `block_means` x
    `block_means` block means (the file's `mrgen.sampler` `block_means`, a cascade's coarse stage), the blocks';
    such draws are handed over with each block repeated, cropped to the slices' shape (block_grid.py)."""

    def __init__(self, session, path: Path, image_shape: tuple[int, int], settings: SamplerSettings,
                 block_means: int = 1) -> None:
        self.session, self.path, self.image_shape, self.settings = session, path, image_shape, settings
        self.block_means, self.drawn_shape = block_means, grid_shape(image_shape, block_means)

    @property
    def latent(self) -> int:
        return self.drawn_shape[0] * self.drawn_shape[1]

    def expected_graph(self, level_condition: bool) -> tuple[str, dict[str, tuple[str, list]], tuple[str, ...]]:
        """The contract's description, inputs and output (for `session.check_graph`), with the `level` input of
        a level-conditioned denoiser."""
        shape = [None, 1, *self.drawn_shape]
        level = ", level int64 [batch]" if level_condition else ""
        text = (f"mrgen-denoiser graph (inputs x float32 [batch, 1, {', '.join(map(str, self.drawn_shape))}], "
                f"t float32 [batch], scanner int64 [batch]{level}; output out float32 of x's shape)")
        expected = {"x": ("tensor(float)", shape), "t": ("tensor(float)", [None]),
                    "scanner": ("tensor(int64)", [None]), "out": ("tensor(float)", shape)}
        if level_condition:
            expected["level"] = LEVEL_INPUT
        return text, expected, ("x", "t", "scanner", "level")

    def denoise(self, what: str, offset: int) -> Denoise:
        def run(x: np.ndarray, t: np.ndarray, scanner: np.ndarray, level: np.ndarray | None = None) -> np.ndarray:
            (out,) = self.session.run(["out"], {"x": x, "t": t, "scanner": scanner, **level_feed(level)})
            check_finite([out], ["out"], self.path, what, offset)
            return out

        return run

    def images(self, z: np.ndarray, scanner: np.ndarray, what: str = "draw", offset: int = 0,
               level: np.ndarray | None = None) -> np.ndarray:
        """Slices (B, H, W) in [0, 1] of the latents `z` (B, h * w) (x_T), labels `scanner` (B,) and, for a
        level-conditioned denoiser, axial indices `level` (B,)."""
        x = np.ascontiguousarray(z, dtype=np.float32).reshape(len(z), 1, *self.drawn_shape)
        return to_slices(sample(self.denoise(what, offset), x, scanner, self.settings, level), self.image_shape,
                         self.block_means)
