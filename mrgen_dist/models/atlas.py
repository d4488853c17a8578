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
from mrgen_dist.models.parts.adversarial import uniform_from_normal
from mrgen_dist.models.parts.noise import chi_draw, rician_draw
from mrgen_dist.runtime.noise import NoiseTexture, white_shape
from mrgen_dist.scanners import Vocabulary

ENCODER_INPUTS = ("untoned", "raw")
ACQUISITIONS = ("fixed", "learned")
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
#: `acquisition: learned`: each scanner's gain field multiplies its image by at most exp(+-GAIN_RANGE), and its
#: noise level map the scanner's sigma by at most exp(+-NOISE_MAP_RANGE).
GAIN_RANGE = 0.5
NOISE_MAP_RANGE = 1.0
#: Each scanner's noise floor starts as this share of its background power (d = 2/3), between the Rician
#: draw (0) and many coils (-> 1), which the fit reaches in a few hundred steps from here.
FLOOR_SHARE_INIT = 0.25
#: The noise floor's share of the background power stays below this (d <= 98: about 50 coils).
MAX_FLOOR_SHARE = 0.98
#: The texture fit compares real and drawn background in cells of CELL x CELL pixels (each at least half
#: background), and the correlation of their residuals at LAGS (rows, columns).
CELL = 8
#: Weight of the noise level map's roughness (`AtlasVAE.map_roughness`) in the texture fit.
MAP_SMOOTHNESS = 0.1
LAGS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0))


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
    # fixed: tone curve, Gaussian point-spread function, white Rician noise | learned: also a smooth gain field
    # per scanner, and "chi" noise (a sigma map, a multi-coil noise floor and a correlation kernel per scanner)
    # fitted to the background's local level, spread and correlation (see the module doc)
    acquisition: str = "fixed"
    gain_grid: list[int] = field(default_factory=lambda: [6, 5])  # control points of each scanner's gain field
    noise_grid: list[int] = field(default_factory=lambda: [6, 5])  # control points of each scanner's sigma map
    noise_taps: int = 3  # side of each scanner's noise correlation kernel (odd)

    PRIORS: ClassVar[tuple[str, ...]] = ("standard",)
    OBSERVATION_NOISE: ClassVar[tuple[str, ...]] = ("rician",)

    def validate(self) -> None:
        super().validate()
        if self.level_condition:
            raise ValueError("model.level_condition: the atlas cVAE warps one template per scanner, which holds one "
                             "level; condition on the level with family cvae or diffusion")
        for key, grid in (("warp_grid", self.warp_grid), ("bias_grid", self.bias_grid), ("gain_grid", self.gain_grid),
                          ("noise_grid", self.noise_grid)):
            if len(grid) != 2 or min(grid) < 2:
                raise ValueError(f"model.{key} must be two sizes >= 2 (rows, columns), got {grid}")
        if self.acquisition not in ACQUISITIONS:
            raise ValueError(f"model.acquisition must be one of {', '.join(ACQUISITIONS)}, got {self.acquisition!r}")
        if self.noise_taps < 1 or self.noise_taps % 2 == 0:
            raise ValueError(f"model.noise_taps must be an odd number >= 1, got {self.noise_taps}")
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
        for key, grid in (("warp_grid", self.warp_grid), ("bias_grid", self.bias_grid), ("gain_grid", self.gain_grid),
                          ("noise_grid", self.noise_grid)):
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
    draw: torch.Tensor | None  # acquisition learned: a draw of the scanner's noise around `clean` (detached)
    map_roughness: torch.Tensor | None  # acquisition learned: `AtlasVAE.map_roughness`
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
        self.learned = config.acquisition == "learned"
        if self.learned:
            self.gain_grid, self.noise_grid = tuple(config.gain_grid), tuple(config.noise_grid)
            self.gain = nn.Parameter(torch.zeros(self.n_scanners, math.prod(self.gain_grid)))
            self.noise_map = nn.Parameter(torch.zeros(self.n_scanners, math.prod(self.noise_grid)))
            share = FLOOR_SHARE_INIT / MAX_FLOOR_SHARE
            self.noise_dof = nn.Parameter(torch.full((self.n_scanners,), math.log(share / (1 - share)) / PARAM_SCALE))
            delta = F.one_hot(torch.tensor(config.noise_taps**2 // 2), config.noise_taps**2).float()
            self.noise_kernel = nn.Parameter(delta.repeat(self.n_scanners, 1) / PARAM_SCALE)

    @staticmethod
    def control_points(params: torch.Tensor, grid: tuple[int, int], scale: float) -> torch.Tensor:
        """The log values (B, 1, rows, columns), within +-scale, that control points `params` (B, rows x
        columns) hold."""
        return torch.tanh(PARAM_SCALE * params.float()).view(-1, 1, *grid) * scale

    def smooth_field(self, params: torch.Tensor, grid: tuple[int, int], scale: float) -> torch.Tensor:
        """exp(+-scale) fields (B, 1, H, W) from control points `params` (B, rows x columns), upsampled
        bilinearly: a scanner's gain (receive and transmit fields) or its noise level map (coil geometry,
        parallel imaging's g-factor), smooth over the slice."""
        coarse = self.control_points(params, grid, scale)
        return torch.exp(F.interpolate(coarse, size=self.image_shape, mode="bilinear", align_corners=True))

    @property
    def noise_kind(self) -> str:
        return ModelMetadata.CHI_NOISE if self.learned else ModelMetadata.RICIAN_NOISE

    def sigma(self, scanner: torch.Tensor) -> torch.Tensor:
        """Each image's noise sigma (B, 1, H, W): its scanner's; when learned, the scanner's background power
        level sqrt(sigma^2 (2 + d) / 2) (the parameter, so that the level and the floor's share of it are fitted
        apart: as sigma and d they trade off along one valley) times its level map."""
        sigma = super().sigma(scanner)
        if self.learned:
            share = (2 / (2 + self.noise_dofs()[scanner])).sqrt().view(-1, 1, 1, 1)
            sigma = sigma * share * self.smooth_field(self.noise_map[scanner], self.noise_grid, NOISE_MAP_RANGE)
        return sigma

    def map_roughness(self) -> torch.Tensor:
        """The squared differences between neighbouring control points of every scanner's noise level map (in
        log units), mean: the background fits the map only around the head, and this keeps its points over the
        head, which no background pixel reaches, an interpolation of those around it rather than their start."""
        coarse = self.control_points(self.noise_map, self.noise_grid, NOISE_MAP_RANGE)
        return (coarse.diff(dim=2).square().mean() + coarse.diff(dim=3).square().mean()) / 2

    def noise_dofs(self) -> torch.Tensor:
        """Each scanner's extra degrees of freedom of its noise floor (scanners,), float32 (learned): d = 2 f /
        (1 - f) for the floor's share f of the background power, within [0, MAX_FLOOR_SHARE]."""
        share = torch.sigmoid(PARAM_SCALE * self.noise_dof.float()) * MAX_FLOOR_SHARE
        return 2 * share / (1 - share)

    def noise_kernels(self) -> torch.Tensor:
        """Each scanner's noise correlation kernel (scanners, k, k), of unit energy, float32 (learned)."""
        kernel = self.noise_kernel.float()
        k = self.noise_kernel_taps
        return (kernel / kernel.norm(dim=1, keepdim=True).clamp(min=1e-6)).view(-1, k, k)

    def noise_texture(self) -> dict:
        """The "chi" noise's per-scanner shape for the exported file (runtime.noise.NoiseTexture); {} when fixed."""
        if not self.learned:
            return {}
        with torch.no_grad():
            return NoiseTexture(self.noise_dofs().cpu().tolist(), self.noise_kernels().cpu().tolist()).to_dict()

    def white_shape(self, batch: int) -> tuple[int, ...]:
        """The white noise `observe` draws from: two (H, W) fields (Rician), or three fields a kernel's border
        larger (learned)."""
        if self.learned:
            return white_shape((batch, 3, *self.image_shape), self.noise_kernel_taps)
        return (batch, 2, *self.image_shape)

    def white_from(self, seeds: torch.Tensor) -> torch.Tensor:
        """White fields (`white_shape`) drawn from one N(0, 1) number per image (the loop draws all of a step's
        randomness, so that a resumed run draws what an uninterrupted one does), each its own stream."""
        shape = self.white_shape(1)[1:]
        numbers = (uniform_from_normal(seeds.detach().double().cpu()) * 2**62).long().tolist()
        fields = [torch.randn(shape, generator=torch.Generator().manual_seed(n)) for n in numbers]
        return torch.stack(fields).to(seeds.device)

    @property
    def noise_kernel_taps(self) -> int:
        return math.isqrt(self.noise_kernel.shape[1])

    def observe(self, clean: torch.Tensor, scanner: torch.Tensor, white: torch.Tensor, frozen: bool = False
                ) -> torch.Tensor:
        """A draw of each image's scanner noise around `clean` (B, 1, H, W) from white fields of `white_shape`,
        as `mrgen-sample --noise` draws it (differentiable in the noise parameters unless `frozen`)."""
        sigma = self.sigma(scanner).float()
        if not self.learned:
            real, imaginary = white.float().split(1, dim=1)
            return rician_draw(clean.float(), sigma.detach() if frozen else sigma, real, imaginary)
        dofs, kernels = self.noise_dofs()[scanner], self.noise_kernels()[scanner]
        if frozen:
            sigma, dofs, kernels = sigma.detach(), dofs.detach(), kernels.detach()
        return chi_draw(clean.float(), sigma, dofs, kernels, white.float())

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
        # learned: the atlas's own edge continues past a shifted border, where zeros would draw a frame into the
        # background whose noise the texture fit reads
        warped = F.grid_sample(template.view(-1, 1, h, w), grid, mode="bilinear",
                               padding_mode="border" if self.learned else "zeros",
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
        if self.learned:
            gain = self.gain.detach() if frozen else self.gain
            toned = toned * self.smooth_field(gain[scanner], self.gain_grid, GAIN_RANGE).to(toned.dtype)
        return gaussian_blur(toned, self.psf_sigma(fitted, frozen)[scanner], self.psf_taps)

    def tone_curve(self, scanner: torch.Tensor, dtype: torch.dtype, frozen: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's tone curve: the slopes of its pieces and its value at each piece's start, (B, knots)."""
        tone = self.tone.detach() if frozen else self.tone
        slopes = F.softplus(PARAM_SCALE * tone[scanner]).to(dtype)
        return slopes, F.pad(torch.cumsum(slopes, dim=1)[:, :-1], (1, 0)) / slopes.shape[1]

    def untone(self, images: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        """`images` (B, H, W) with their scanner's gain (learned) and tone curve undone (held fixed), in [0, 1]."""
        if self.learned:
            gain = self.smooth_field(self.gain.detach()[scanner], self.gain_grid, GAIN_RANGE)[:, 0]
            images = (images / gain.to(images.dtype)).clamp(0, 1)
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
        and every other one with its blur relative to it (docs/results/generation.md: every fitted sigma came
        out at 1-2 pixels, the sharpest scanner's included)."""
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
        """`noise`: the posterior's reparameterisation (B, latent), followed when learned by one number per image
        that seeds the noise draw the texture fit compares with the slices (`white_from`)."""
        mean, logvar = self.encode(images, scanner)
        z = mean + noise[:, : self.latent].to(mean.dtype) * torch.exp(0.5 * logvar)
        clean = self.decode(z, scanner, fitted=True)
        sigma = self.sigma(scanner)
        held = sigma.detach().float()
        draw = None
        if self.learned:
            # the expected magnitude with the noise floor's extra power added to the signal's (exact at d = 0)
            dof = self.noise_dofs().detach()[scanner].view(-1, 1, 1, 1)
            expected = rician_mean((clean.float().square() + dof * held.square()).sqrt(), held)
            draw = self.observe(clean.detach(), scanner, self.white_from(noise[:, self.latent]))
        else:
            expected = rician_mean(clean.float(), held)
        return AtlasOutput(
            expected=expected, clean=clean, sigma=sigma, draw=draw,
            map_roughness=self.map_roughness() if self.learned else None, mean=mean, logvar=logvar,
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


def _cell_moments(images: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The mean and standard deviation of `images` (B, 1, H, W) over the `mask` of each CELL x CELL cell."""
    mean = F.avg_pool2d(mask * images, CELL, ceil_mode=True) / count
    square = F.avg_pool2d(mask * images.square(), CELL, ceil_mode=True) / count
    return mean, (square - mean.square()).clamp(min=1e-10).sqrt()


def _lag_correlations(residual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The correlation of `residual` (B, 1, H, W) between background pixels LAGS apart, per image (B, lags)."""
    h, w = residual.shape[-2:]
    r = residual * mask
    energy = r.square().sum(dim=(1, 2, 3)).clamp(min=1e-12)
    out = []
    for dy, dx in LAGS:
        a = r[..., : h - dy, max(0, -dx) : w - max(0, dx)]
        b = r[..., dy:, max(0, dx) : w - max(0, -dx) if dx < 0 else w]
        out.append((a * b).sum(dim=(1, 2, 3)) / energy)
    return torch.stack(out, dim=1)


def texture_fit(out: AtlasOutput, images: torch.Tensor) -> torch.Tensor:
    """The learned acquisition's noise fit: on the background (noise-free image below BACKGROUND, detached),
    the squared log-ratios of the drawn to the real local mean and spread in every cell that is at least half
    background (the level map, the noise floor's degrees of freedom), plus the squared differences of their
    residuals' correlations at LAGS (the kernel): a fit by simulated moments, since the non-central chi of
    correlated channels has no likelihood to write per pixel. 0 where no cell is background."""
    clean = out.clean.detach().float()
    observed = images.view_as(clean).float()
    mask = (clean < BACKGROUND).float()
    count = F.avg_pool2d(mask, CELL, ceil_mode=True)
    cells = (count >= 0.5).float()
    count = count.clamp(min=1e-6)
    real_mean, real_spread = _cell_moments(observed, mask, count)
    draw_mean, draw_spread = _cell_moments(out.draw, mask, count)
    level = cells * ((draw_mean.clamp(min=1e-6).log() - real_mean.clamp(min=1e-6).log()).square()
                     + (draw_spread.log() - real_spread.log()).square())
    level = level.sum() / cells.sum().clamp(min=1.0)

    def residual(x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return x - F.interpolate(local, scale_factor=CELL, mode="nearest")[..., : x.shape[-2], : x.shape[-1]]

    texture = (_lag_correlations(residual(out.draw, draw_mean), mask)
               - _lag_correlations(residual(observed, real_mean), mask)).square().sum(dim=1).mean()
    return level + texture + MAP_SMOOTHNESS * out.map_roughness


def atlas_objective(config: AtlasConfig, out: AtlasOutput, images: torch.Tensor, scanner: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """The atlas cVAE's objective `loss` (per-image negative ELBO + noise fit + the probe's cross-entropy +
    scanner_penalty x scanner_share) and its terms, of which `adversary` and `scanner_share` are present only
    when configured."""
    reconstruction = reconstruction_loss(out.expected, images, config.loss).mean()
    zeros = torch.zeros_like(out.mean, dtype=torch.float32)
    kl = kl_divergence(out.mean.float(), out.logvar.float(), zeros, zeros).mean()
    noise = noise_fit(out, images) if out.draw is None else texture_fit(out, images)
    losses = {"reconstruction": reconstruction, "kl": kl, "noise": noise}
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

    def noise_dim(self, config: AtlasConfig) -> int:
        """The posterior's reparameterisation, then (learned acquisition) the seed of the noise draw."""
        return config.latent + (config.acquisition == "learned")

    def losses(self, step: Step) -> dict[str, torch.Tensor]:
        with step.autocast():
            out: AtlasOutput = step.model(step.images, step.scanner, step.noise)
        losses = atlas_objective(step.config, out, step.images, step.scanner)
        return {name: losses[name] for name in self.reported_losses(step.config)}

    @torch.no_grad()
    def preview(self, model: AtlasVAE, images: torch.Tensor, scanner: torch.Tensor, vocabulary: Vocabulary,
                level: torch.Tensor | None = None) -> tuple[list[tuple[str, np.ndarray]], str]:
        """The samples of every family's figure, drawn with their scanner's noise (as mrgen-sample --noise draws
        them) from a fixed stream."""
        rows, _ = super().preview(model, images, scanner, vocabulary)
        g = torch.Generator().manual_seed(1234)
        noisy = []
        for sid, (name, clean) in enumerate(rows):
            labels = torch.full((len(clean),), sid, dtype=torch.long, device=images.device)
            white = torch.randn(model.white_shape(len(clean)), generator=g).to(images.device)
            draw = model.observe(torch.from_numpy(clean)[:, None].to(images.device), labels, white)
            noisy.append((name, draw[:, 0].float().cpu().numpy()))
        kind = "chi" if model.learned else "Rician"
        return noisy, f"samples with their scanner's {kind} noise (same z in every row)"

    def flops_per_image(self, model: AtlasVAE) -> int:
        """The Linear layers, plus the separable point-spread filter over the slice."""
        h, w = model.image_shape
        return super().flops_per_image(model) + 6 * 2 * model.psf_taps * h * w  # rows and columns


FAMILY = AtlasFamily()
