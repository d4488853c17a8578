"""The atlas cVAE (family `atlas`): the cVAE's encoder with a decoder split into anatomy and acquisition.

Why: every fully connected decoder here has a blurry mean image: its last layer mixes a few hundred basis
images, and anatomy that moves by millimetres between subjects averages out. Blur is what the conditioning
classifier reads as *Unspecified*, so the reconstructions of real slices by those decoders are recognised as
their scanner only about half the time (docs/results/generation.md), and no prior can lift samples above that
ceiling. Slices registered to MNI differ between subjects mostly by small residual deformations and a smooth
intensity bias, and scanners differ by contrast, resolution and noise (docs/method.md's scanner traits). The
decoder follows those lines, so that its images stay sharp and the label has a physical job:

* **anatomy(z)**, the same for every scanner: a learned atlas, a base image plus `templates` learned basis
  images mixed by z (for the change between the slice levels), warped by a smooth displacement field from z
  (a coarse `warp_grid`, upsampled bilinearly, at most `max_shift` pixels) and multiplied by a smooth bias
  field from z (`bias_grid`, within exp(+-BIAS_RANGE)). A deformable template as in Dalca et al., "Learning
  conditional deformable templates with convolutional networks" (NeurIPS 2019), decoded from a VAE's z.
* **acquisition(scanner)**: a monotone tone curve per scanner (`tone_knots` linear pieces: contrast), a
  point-spread function per scanner (a Gaussian with a learned width along rows and columns, over `psf`
  taps: resolution; sampling applies the part beyond the sharpest scanner's, see `AtlasVAE.psf_sigma`), and
  Rician noise with a learned sigma per scanner (the noise of a magnitude image).

Training: log-cosh between the slice and the expected magnitude of the noisy image, E|x + sigma (n1 + i n2)|
(the Rician mean, with sigma held fixed), + KL, as the thesis cVAE. Each scanner's sigma is fitted by the
Rician likelihood of the slice where the model's noise-free image x is below BACKGROUND: the air around the
head, where MR noise is classically measured (Sijbers et al., "Estimation of the noise in magnitude MR
images", MRI 1998). x is detached there, so the image model trains as without the noise fit.

Keeping the scanner out of z: the anatomy decoder has no use for the scanner, but an encoder that sees it in
every slice still writes it into z. Two parts keep it out: the encoder sees the slices with their scanner's
tone curve undone (`encoder_input`), and `scanner_penalty` x `scanner_share`, the share of the batch variance
of the posterior means that the scanner explains, summed over z's dimensions. What each part did to the
z-probe, the weights and alternatives measured and not kept, and the commands that reproduce them:
docs/results/generation.md ("The atlas cVAE: keeping the scanner out of z").

The exported graph gives the noise-free image and sigma (`mrgen.noise` = rician): samples of the scanner's
look are `mrgen-sample --noise` (and `mrgen-fid --noise`), which draw |x + sigma (n1 + i n2)|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mrgen_dist.artifacts import ModelMetadata
from mrgen_dist.models.base import Step
from mrgen_dist.models.cvae import (
    CVAE,
    CVAEConfig,
    CVAEFamily,
    _mlp,
    kl_divergence,
    reconstruction_loss,
    reverse_gradient,
)
from mrgen_dist.runtime.noise import add_noise
from mrgen_dist.scanners import Vocabulary

ENCODER_INPUTS = ("untoned", "raw")
#: Noise-free intensities below this are background, where each scanner's noise sigma is fitted.
BACKGROUND = 0.05
#: The bias field multiplies the anatomy by at most exp(+-BIAS_RANGE).
BIAS_RANGE = 0.5
#: The acquisition parameters hold value / PARAM_SCALE (see AtlasVAE.build_decoder).
PARAM_SCALE = 10.0
#: The point-spread functions start as Gaussians of this sigma in pixels: nearly no blur (1.7 % to each neighbour).
PSF_SIGMA_INIT = 0.35
#: A point-spread variance (pixels^2) below which the function is a delta (weight e^-50 on the neighbours).
MIN_PSF_VARIANCE = 0.01
#: Added to each dimension's variance in scanner_share: a dimension of z whose means spread by less than 1e-3
#: (a collapsed one, which the decoder does not read) counts less, rather than pulling the encoder by 1 / its
#: variance. Measured on the comparison cohort (weight 10): with 1e-12, the z-probe read 0.47 rather than 0.31.
SHARE_EPS = 1e-6
#: The atlas starts as a flat grey image of this intensity (gradients reach every pixel through the tone curve).
ATLAS_INIT = 0.25


@dataclass
class AtlasConfig(CVAEConfig):
    family: str = "atlas"
    observation_noise: str = "rician"
    templates: int = 8  # learned basis images mixed by z on top of the base atlas
    warp_grid: list[int] = field(default_factory=lambda: [12, 10])  # control points of the displacement field
    max_shift: float = 10.0  # largest displacement in pixels
    bias_grid: list[int] = field(default_factory=lambda: [6, 5])  # control points of the bias field
    psf: int = 11  # taps of each scanner's point-spread function along an axis (odd)
    tone_knots: int = 16  # linear pieces of each scanner's tone curve
    encoder_input: str = "untoned"  # untoned: the slices with their scanner's tone curve undone | raw
    scanner_penalty: float = 10.0  # weight of scanner_share, the batch variance of z's means the scanner explains

    PRIORS: ClassVar[tuple[str, ...]] = ("standard",)
    OBSERVATION_NOISE: ClassVar[tuple[str, ...]] = ("rician",)

    def validate(self) -> None:
        super().validate()
        for key, grid in (("warp_grid", self.warp_grid), ("bias_grid", self.bias_grid)):
            if len(grid) != 2 or min(grid) < 2:
                raise ValueError(f"model.{key} must be two sizes >= 2 (rows, columns), got {grid}")
        if self.encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"model.encoder_input must be one of {', '.join(ENCODER_INPUTS)}, got {self.encoder_input!r}")
        if self.scanner_penalty < 0:
            raise ValueError(f"model.scanner_penalty must be >= 0, got {self.scanner_penalty}")
        if self.psf < 1 or self.psf % 2 == 0:
            raise ValueError(f"model.psf must be an odd number of taps >= 1, got {self.psf}")
        if self.templates < 0 or self.tone_knots < 1 or self.max_shift <= 0:
            raise ValueError("model.templates must be >= 0, model.tone_knots >= 1 and model.max_shift > 0, got "
                             f"{self.templates}, {self.tone_knots} and {self.max_shift}")

    def validate_shape(self, image_shape: tuple[int, int]) -> None:
        for key, grid in (("warp_grid", self.warp_grid), ("bias_grid", self.bias_grid)):
            if any(g > n for g, n in zip(grid, image_shape, strict=True)):
                raise ValueError(f"model.{key} {grid} is finer than the slices {list(image_shape)}")


def _filter_axis(images: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """Each image (B, 1, H, W) filtered along `dim` (2: rows, 3: columns) with its own odd-sized kernel
    `weights` (B, k), zero-padded: a sum of k shifted copies, which on the CPU is several times faster than a
    convolution with one input channel, and keeps the batch dynamic in the exported graph."""
    k, n = weights.shape[1], images.shape[dim]
    pad = (0, 0, k // 2, k // 2) if dim == 2 else (k // 2, k // 2)
    padded = F.pad(images, pad)
    return sum(weights[:, i, None, None, None] * padded.narrow(dim, i, n) for i in range(k))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, taps: int) -> torch.Tensor:
    """Each image (B, 1, H, W) blurred by a separable Gaussian of its own sigma (B, 2) along rows and columns,
    over `taps` (odd) taps normalised to sum 1."""
    offsets = torch.arange(taps, device=sigma.device, dtype=torch.float32) - taps // 2
    rows, columns = torch.softmax(-0.5 * (offsets / sigma.float()[..., None]).square(), dim=-1).to(images.dtype).unbind(1)
    return _filter_axis(_filter_axis(images, rows, dim=2), columns, dim=3)


def rician_mean(clean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E|clean + sigma (n1 + i n2)| for n1, n2 ~ N(0, 1): sigma sqrt(pi / 2) L_1/2(-clean^2 / (2 sigma^2)),
    written with the exponentially scaled Bessel functions so that it holds at any signal-to-noise ratio
    (sigma sqrt(pi / 2) on the background, `clean` where clean >> sigma)."""
    u = (clean / sigma).square() / 4
    return sigma * math.sqrt(math.pi / 2) * ((1 + 2 * u) * torch.special.i0e(u) + 2 * u * torch.special.i1e(u))


def rician_nll(observed: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """-log p(observed | clean, sigma) of the Rician distribution, per pixel, without the term -log(observed)
    that does not depend on clean or sigma."""
    var = sigma.square()
    return (var.log() + (observed - clean).square() / (2 * var)
            - torch.log(torch.special.i0e(observed * clean / var)))


class AtlasOutput(NamedTuple):
    expected: torch.Tensor  # (B, 1, H, W): the Rician mean of the noisy image (sigma detached), for the loss
    clean: torch.Tensor  # (B, 1, H, W): the noise-free image
    sigma: torch.Tensor  # (B, 1, H, W): the scanner's noise sigma
    mean: torch.Tensor  # posterior mean and log-variance (B, latent)
    logvar: torch.Tensor
    probe_logits: torch.Tensor | None  # the scanner probe on the reversed-gradient mean, with adversary > 0


class AtlasVAE(CVAE):
    """The cVAE's encoder (and probe) with the anatomy + acquisition decoder of the module doc."""

    def build_decoder(self, config: AtlasConfig, n_labels: int) -> None:
        h, w = self.image_shape
        self.warp_grid, self.bias_grid = tuple(config.warp_grid), tuple(config.bias_grid)
        self.max_shift = config.max_shift
        self.decoder_body = _mlp([self.latent, *config.hidden[::-1]])  # anatomy: no label
        width = config.hidden[0]
        self.to_mix = nn.Linear(width, config.templates) if config.templates else None
        self.to_warp = nn.Linear(width, 2 * self.warp_grid[0] * self.warp_grid[1])
        self.to_bias = nn.Linear(width, self.bias_grid[0] * self.bias_grid[1])
        for head in (self.to_warp, self.to_bias):  # start from the unwarped, unbiased atlas
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.atlas = nn.Parameter(torch.full((1, h * w), ATLAS_INIT))
        self.basis = nn.Parameter(torch.zeros(config.templates, h * w))
        # The acquisition's parameters are few and global: they hold their value / PARAM_SCALE, so that with
        # Adam (steps of about lr in parameter units) they move as fast as a short run needs (cvae.py's noise).
        # tone curve: slopes softplus(PARAM_SCALE * tone), initially 1 (the identity on [0, 1])
        self.tone = nn.Parameter(torch.full((self.n_scanners, config.tone_knots), math.log(math.e - 1) / PARAM_SCALE))
        # point-spread function: a Gaussian per scanner and axis (rows, columns), initially sigma PSF_SIGMA_INIT
        self.psf_param = nn.Parameter(torch.full((self.n_scanners, 2), math.log(PSF_SIGMA_INIT) / PARAM_SCALE))
        self.psf_taps = config.psf
        self.untoned_input = config.encoder_input == "untoned"

    @property
    def noise_kind(self) -> str:
        return ModelMetadata.RICIAN_NOISE

    def anatomy(self, z: torch.Tensor) -> torch.Tensor:
        """The scanner-free image (B, 1, H, W), float32: the mixed atlas, warped, times the bias field. The
        networks run in the model's dtype, the image in float32: in float16 the sampling grid's coordinates
        are off by up to a tenth of a pixel, which moves sharp edges by a few grey levels (measured: 0.03)."""
        h, w = self.image_shape
        body = self.decoder_body(z)
        template = self.atlas.float()
        if self.to_mix is None:
            template = template.expand(z.shape[0], -1)
        else:
            template = template + self.to_mix(body).float() @ self.basis.float()
        shift = torch.tanh(self.to_warp(body).float()).view(-1, 2, *self.warp_grid) * self.max_shift
        shift = F.interpolate(shift, size=(h, w), mode="bilinear", align_corners=True)
        # pixels to grid_sample's [-1, 1] coordinates (x first)
        scale = torch.tensor([2 / (w - 1), 2 / (h - 1)], dtype=torch.float32, device=shift.device)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=shift.device),
                                torch.linspace(-1, 1, w, device=shift.device), indexing="ij")
        grid = torch.stack([xs, ys], dim=-1)[None] + shift.permute(0, 2, 3, 1) * scale
        warped = F.grid_sample(template.view(-1, 1, h, w), grid, mode="bilinear", padding_mode="zeros",
                               align_corners=True)
        bias = torch.tanh(self.to_bias(body).float()).view(-1, 1, *self.bias_grid) * BIAS_RANGE
        return warped * torch.exp(F.interpolate(bias, size=(h, w), mode="bilinear", align_corners=True))

    def acquire(self, anatomy: torch.Tensor, scanner: torch.Tensor, fitted: bool = False, frozen: bool = False
                ) -> torch.Tensor:
        """The noise-free image of `anatomy` on each image's scanner: tone curve, then point-spread function
        (the fitted one, or the scanner's own: see `psf_sigma`); `frozen`: no gradient reaches their parameters."""
        knots = self.tone.shape[1]
        slopes, starts = self.tone_curve(scanner, anatomy.dtype, frozen)
        position = anatomy.clamp(0, 1).flatten(1) * knots
        piece = position.detach().floor().clamp(max=knots - 1).long()
        toned = (starts.gather(1, piece) + (position - piece) / knots * slopes.gather(1, piece)).view_as(anatomy)
        return gaussian_blur(toned, self.psf_sigma(fitted, frozen)[scanner], self.psf_taps)

    def tone_curve(self, scanner: torch.Tensor, dtype: torch.dtype, frozen: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's tone curve: the slopes of its pieces and its value at each piece's start, (B, knots)."""
        tone = self.tone.detach() if frozen else self.tone
        slopes = F.softplus(PARAM_SCALE * tone[scanner]).to(dtype)
        return slopes, F.pad(torch.cumsum(slopes, dim=1)[:, :-1], (1, 0)) / slopes.shape[1]

    def untone(self, images: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        """`images` (B, H, W) with their scanner's tone curve undone (the curve held fixed), in [0, 1]."""
        slopes, starts = (t.detach() for t in self.tone_curve(scanner, images.dtype))
        knots = slopes.shape[1]
        values = images.flatten(1)
        piece = torch.searchsorted(starts[:, 1:].contiguous(), values.contiguous(), right=True)
        position = piece + (values - starts.gather(1, piece)) * knots / slopes.gather(1, piece)
        return (position / knots).clamp(0, 1).view_as(images)

    def encode(self, images: torch.Tensor, scanner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cVAE's encoder, on the slices with their scanner's tone curve undone (`encoder_input: untoned`):
        contrast is the largest difference between scanners in the pixels, and an encoder that sees it in
        every slice writes the scanner into z although the anatomy decoder has no use for it (measured on the
        comparison cohort with raw input: a linear probe read the scanner from z at 0.94)."""
        if self.untoned_input:
            images = self.untone(images, scanner)
        return super().encode(images, scanner)

    def psf_sigma(self, fitted: bool = False, frozen: bool = False) -> torch.Tensor:
        """Each scanner's Gaussian point-spread sigma in pixels along rows and columns, (scanners, 2).

        The fitted sigma is all the blur between the atlas and a scanner's slices: the scanner's resolution
        plus the decoder's own error (an anatomy that is not quite in place is best fitted blurred), which is
        the same for every scanner. Training fits it; sampling applies the scanner's own part, the fitted
        variance less the smallest scanner's (per axis), so the sharpest scanner is drawn as sharp as the atlas
        and every other one with its blur relative to it. Measured on the comparison cohort: every scanner's
        fitted sigma was 1-2 pixels, Magnetom TrioTim's (sharp, no blur) included."""
        psf = self.psf_param.detach() if frozen else self.psf_param
        variance = torch.exp(2 * PARAM_SCALE * psf.float())
        if not fitted:
            variance = (variance - variance.min(dim=0).values).clamp(min=MIN_PSF_VARIANCE)
        return variance.sqrt()

    def decode(self, z: torch.Tensor, scanner: torch.Tensor, fitted: bool = False, frozen: bool = False
               ) -> torch.Tensor:
        """The noise-free image of the sampling graph (or, `fitted`, the training's); `frozen`: see `acquire`."""
        return self.acquire(self.anatomy(z), scanner, fitted, frozen).clamp(0, 1)

    def forward(self, images: torch.Tensor, scanner: torch.Tensor, noise: torch.Tensor) -> AtlasOutput:
        mean, logvar = self.encode(images, scanner)
        z = mean + noise.to(mean.dtype) * torch.exp(0.5 * logvar)
        clean = self.decode(z, scanner, fitted=True)
        sigma = self.sigma(scanner)
        return AtlasOutput(
            expected=rician_mean(clean.float(), sigma.detach().float()), clean=clean, sigma=sigma, mean=mean,
            logvar=logvar,
            probe_logits=self.probe(reverse_gradient(mean, self.adversary)) if self.adversary > 0 else None,
        )


def scanner_share(mean: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
    """The share of the batch variance of the posterior means (B, latent) that the scanner explains (between-
    scanner variance / variance, eta^2), summed over z's dimensions: 0 when every scanner's mean is the same.
    Each dimension counts by its share, as for the standardised z-probe, down to a spread of about 1e-3."""
    centred = mean.float() - mean.float().mean(dim=0)
    variance = centred.square().mean(dim=0) + SHARE_EPS
    onehot = F.one_hot(scanner).float()  # scanners absent from the batch count 0
    counts = onehot.sum(dim=0)
    group_means = onehot.T @ centred / counts.clamp(min=1)[:, None]
    between = (counts[:, None] * group_means.square()).sum(dim=0) / len(mean)
    return (between / variance).sum()


def noise_fit(out: AtlasOutput, images: torch.Tensor) -> torch.Tensor:
    """The Rician NLL of the background pixels (noise-free image below BACKGROUND, detached) under each
    image's sigma, per pixel; 0 where no pixel is background."""
    clean = out.clean.detach().float()
    observed = images.view_as(clean).float()
    background = (clean < BACKGROUND).float()
    nll = rician_nll(observed, clean, out.sigma.float())
    return (nll * background).sum() / background.sum().clamp(min=1.0)


def atlas_objective(config: AtlasConfig, out: AtlasOutput, images: torch.Tensor, scanner: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """The atlas cVAE's objective `loss` (per-image negative ELBO + noise fit + the probe's cross-entropy +
    scanner_penalty x scanner_share) and its terms, of which `adversary` and `scanner_share` are present only
    when configured."""
    reconstruction = reconstruction_loss(out.expected, images, config.loss).mean()
    zeros = torch.zeros_like(out.mean, dtype=torch.float32)
    kl = kl_divergence(out.mean.float(), out.logvar.float(), zeros, zeros).mean()
    losses = {"reconstruction": reconstruction, "kl": kl, "noise": noise_fit(out, images)}
    losses["loss"] = reconstruction + config.kl_weight * kl + losses["noise"]
    if out.probe_logits is not None:
        losses["adversary"] = F.cross_entropy(out.probe_logits.float(), scanner)
        losses["loss"] = losses["loss"] + losses["adversary"]
    if config.scanner_penalty > 0:
        losses["scanner_share"] = scanner_share(out.mean, scanner)
        losses["loss"] = losses["loss"] + config.scanner_penalty * losses["scanner_share"]
    return losses


class AtlasFamily(CVAEFamily):
    name = "atlas"
    title = "atlas cVAE"
    Config = AtlasConfig
    loss_names = ("loss", "reconstruction", "kl", "adversary", "scanner_share", "noise")

    def build(self, config: AtlasConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]) -> AtlasVAE:
        return AtlasVAE(tuple(image_shape), len(vocabulary), config.hidden, config.latent, True, config)

    def reported_losses(self, config: AtlasConfig) -> tuple[str, ...]:
        optional = {"adversary": config.adversary > 0, "scanner_share": config.scanner_penalty > 0}
        return tuple(name for name in self.loss_names if optional.get(name, True))

    def losses(self, step: Step) -> dict[str, torch.Tensor]:
        with step.autocast():
            out: AtlasOutput = step.model(step.images, step.scanner, step.noise)
        losses = atlas_objective(step.config, out, step.images, step.scanner)
        return {name: losses[name] for name in self.reported_losses(step.config)}

    @torch.no_grad()
    def preview(self, model: AtlasVAE, images: torch.Tensor, scanner: torch.Tensor, vocabulary: Vocabulary
                ) -> tuple[list[tuple[str, np.ndarray]], str]:
        """The samples of every family's figure, drawn with their scanner's Rician noise (as mrgen-sample
        --noise draws them) from a fixed stream."""
        rows, _ = super().preview(model, images, scanner, vocabulary)
        rng = np.random.default_rng(1234)
        sigma = model.sigma(torch.arange(len(vocabulary), device=images.device))[:, 0, 0, 0].float().cpu().numpy()
        noisy = [(name, add_noise(clean, s, ModelMetadata.RICIAN_NOISE, rng, rng))
                 for (name, clean), s in zip(rows, sigma, strict=True)]
        return noisy, "samples with their scanner's Rician noise (same z in every row)"

    def flops_per_image(self, model: AtlasVAE) -> int:
        """The Linear layers, plus the separable point-spread filter over the slice."""
        h, w = model.image_shape
        return super().flops_per_image(model) + 6 * 2 * model.psf_taps * h * w  # rows and columns


FAMILY = AtlasFamily()
