"""The method's fully connected conditional VAE and its variants (family `cvae`).

Encoder: [flattened image, one-hot scanner] -> Linear+ReLU (hidden widths) -> mean and log-variance of the
latent. Decoder: [z, one-hot scanner] -> Linear+ReLU (hidden widths reversed) -> Linear -> sigmoid, reshaped
to the image. The number of scanners comes from the store's vocabulary. With `conditional=False` the label
is left out of both (the unconditional VAE of mrgen_dist.models.vae, and the GMVAE of models.gmvae).

The variants, chosen in the `model:` section, attack why the thesis cVAE's samples are recognised as their
scanner only at chance: its encoder writes the scanner into z, so the decoder takes the scanner's look from
z, and z ~ N(0, I) at sampling time carries a random one; and its mean image has lost the scanner's noise.

* `loss`: `logcosh` (the thesis) or `mse`.
* `observation_noise`: a learned noise model around the decoder's mean, which sampling can draw
  (`mrgen-sample --noise`; the mean stays the default): `scanner`: the variance is sigma_s^2 + e_p^2, an
  acquisition noise sigma_s per scanner (thermal noise is the same everywhere in a magnitude image) plus the
  decoder's own error e_p per pixel, shared by the scanners, and only sigma_s is sampled; `pixel`: one sigma per
  scanner and pixel, sampled as learned. It is fitted by the Gaussian negative log-likelihood of the residual
  with the mean held fixed (the residual is detached), so the mean trains as without it. Learned jointly, a
  likelihood with sigma ~ 0.01 outweighs the KL term a hundredfold: the decoder then copies noise into its
  mean and the prior's draws fall between the posteriors (measured on the comparison cohort: samples read
  as one scanner whatever was asked).
* `prior: scanner`: a learned conditional prior p(z | scanner) = N(m_s, diag exp(v_s)); the sampling graph
  maps z ~ N(0, I) to m_s + exp(v_s / 2) z, so the exported contract is unchanged.
* `adversary: w > 0`: a scanner probe on the posterior mean, trained to recognise the scanner, whose gradient
  reaches the encoder reversed and scaled by w (gradient reversal, Ganin & Lempitsky 2015): the encoder is
  pushed to keep the scanner out of z, so the decoder must take it from the label.

* `level_condition`: the slice's axial level (parts/level.py) is appended to the encoder's and the
  decoder's inputs beside the scanner, for stores of more than the central slices, so that the decoder can be
  asked for a level (the exported graph's third input, `level`).

Loss reduction: the reconstruction term is summed over pixels and averaged over the batch; the KL term is
summed over latent dimensions and averaged over the batch; loss = reconstruction + kl_weight * KL
(+ the probe's cross-entropy). This is the per-image negative ELBO (up to constants for log-cosh), so its
value does not depend on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mrgen_dist.artifacts import ModelMetadata
from mrgen_dist.models.base import Family, ModelConfig, SamplingGraph, Step
from mrgen_dist.models.parts.level import LEVEL_FEATURES, level_features
from mrgen_dist.scanners import Vocabulary

LOSSES = ("logcosh", "mse")
OBSERVATION_NOISE = ("none", "scanner", "pixel")
PRIORS = ("standard", "scanner")
#: Bounds of the learned observation noise sigma: below 1e-3 (a quarter of an 8-bit grey level) the
#: likelihood of the noise-free background would grow without limit.
LOG_SIGMA_MIN, LOG_SIGMA_INIT = math.log(1e-3), math.log(0.1)
#: The noise parameters hold log sigma / NOISE_PARAM_SCALE: with Adam, whose steps are about lr in parameter
#: units, log sigma moves NOISE_PARAM_SCALE times faster than the weights, so that it settles (0.1 -> 0.01 is a
#: change of 2.3) within a short run's first few hundred steps rather than after thousands.
NOISE_PARAM_SCALE = 10.0
PROBE_HIDDEN = 256


@dataclass
class CVAEConfig(ModelConfig):
    family: str = "cvae"
    hidden: list[int] = field(default_factory=lambda: [1024, 512])  # encoder widths; the decoder mirrors them
    latent: int = 256
    loss: str = "logcosh"  # logcosh | mse
    observation_noise: str = "none"  # none | scanner (sampled sigma per scanner + decoder error) | pixel
    prior: str = "standard"  # standard N(0, I) | scanner: learned p(z | scanner)
    adversary: float = 0.0  # weight of the reversed gradient of a scanner probe on z; 0: no probe
    kl_weight: float = 1.0
    level_condition: bool = False  # the slice's axial level is a condition of encoder and decoder (parts/level.py)

    #: the values a family of this config accepts (the atlas cVAE narrows them)
    PRIORS: ClassVar[tuple[str, ...]] = PRIORS
    OBSERVATION_NOISE: ClassVar[tuple[str, ...]] = OBSERVATION_NOISE

    def validate(self) -> None:
        for key, value, allowed in (("loss", self.loss, LOSSES), ("prior", self.prior, self.PRIORS),
                                    ("observation_noise", self.observation_noise, self.OBSERVATION_NOISE)):
            if value not in allowed:
                raise ValueError(f"model.{key} must be one of {', '.join(allowed)}, got {value!r}")
        if self.latent < 1 or not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError("model.latent and model.hidden widths must be >= 1")
        if self.kl_weight < 0:
            raise ValueError(f"model.kl_weight must be >= 0, got {self.kl_weight}")
        if self.adversary < 0:
            raise ValueError(f"model.adversary must be >= 0, got {self.adversary}")


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)) computed as |x| + softplus(-2|x|) - log 2: no overflow for large |x|, exact gradient tanh(x)."""
    a = x.abs()
    return a + F.softplus(-2.0 * a) - math.log(2.0)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by -weight."""
    return _ReverseGradient.apply(x, weight)


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    return nn.Sequential(*layers)


class CVAE(nn.Module):
    def __init__(self, image_shape: tuple[int, int], n_scanners: int, hidden: list[int], latent: int,
                 conditional: bool = True, config: CVAEConfig | None = None) -> None:
        super().__init__()
        config = config or CVAEConfig(hidden=hidden, latent=latent)
        self.image_shape = tuple(image_shape)
        self.n_scanners = n_scanners
        self.latent = latent
        self.conditional = conditional
        self.level_condition = config.level_condition
        n_pixels = image_shape[0] * image_shape[1]
        n_labels = (n_scanners if conditional else 0) + (LEVEL_FEATURES if config.level_condition else 0)
        self.encoder = _mlp([n_pixels + n_labels, *hidden])
        self.to_mean = nn.Linear(hidden[-1], latent)
        self.to_logvar = nn.Linear(hidden[-1], latent)
        self.build_decoder(config, n_labels)
        if config.prior == "scanner":
            # with the label in encoder and decoder the prior starts as N(0, I); without it (GMVAE) the
            # components must differ from the first step for the label to matter at all
            init = torch.zeros if conditional else torch.randn
            self.prior_mean = nn.Parameter(init(n_scanners, latent))
            self.prior_logvar = nn.Parameter(torch.zeros(n_scanners, latent))
        if config.observation_noise != "none":
            width = n_pixels if config.observation_noise == "pixel" else 1
            self.noise_param = nn.Parameter(torch.full((n_scanners, width), LOG_SIGMA_INIT / NOISE_PARAM_SCALE))
            if config.observation_noise == "scanner":
                self.error_param = nn.Parameter(torch.full((1, n_pixels), LOG_SIGMA_INIT / NOISE_PARAM_SCALE))
        self.adversary = config.adversary
        if config.adversary > 0:
            self.probe = nn.Sequential(nn.Linear(latent, PROBE_HIDDEN), nn.ReLU(), nn.Linear(PROBE_HIDDEN, n_scanners))

    def build_decoder(self, config: CVAEConfig, n_labels: int) -> None:
        """The networks of `decode`: Linear+ReLU (hidden widths reversed) -> Linear to the pixels."""
        self.decoder_body = _mlp([self.latent + n_labels, *config.hidden[::-1]])
        self.to_pixels = nn.Linear(config.hidden[0], self.image_shape[0] * self.image_shape[1])

    @property
    def has_prior(self) -> bool:
        return hasattr(self, "prior_mean")

    @property
    def has_noise(self) -> bool:
        return hasattr(self, "noise_param")

    @property
    def noise_kind(self) -> str:
        """How `mrgen-sample --noise` draws around the image (ModelMetadata.noise): "gaussian", or "" for none."""
        return ModelMetadata.GAUSSIAN_NOISE if self.has_noise else ""

    def noise_texture(self) -> dict:
        """The per-scanner shape of "chi" noise (runtime.noise.NoiseTexture); {} for the other kinds."""
        return {}

    def with_label(self, x: torch.Tensor, scanner: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
        """`x` with the one-hot scanner (a conditional model) and the level's features (`level_condition`)
        appended, or `x` itself."""
        parts = [x]
        if self.conditional:
            parts.append(F.one_hot(scanner, self.n_scanners).to(x.dtype))
        if self.level_condition:
            parts.append(level_features(level, x.dtype))
        return torch.cat(parts, dim=1) if len(parts) > 1 else x

    def encode(self, images: torch.Tensor, scanner: torch.Tensor, level: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(self.with_label(images.flatten(1), scanner, level))
        return self.to_mean(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor, scanner: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
        h = self.decoder_body(self.with_label(z, scanner, level))
        return torch.sigmoid(self.to_pixels(h)).view(-1, 1, *self.image_shape)

    def prior(self, scanner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(z | scanner) (zeros for the standard prior)."""
        if not self.has_prior:
            zeros = self.to_mean.bias.new_zeros(len(scanner), self.latent)
            return zeros, zeros
        return self.prior_mean[scanner], self.prior_logvar[scanner]

    def _as_image(self, log_sigma: torch.Tensor) -> torch.Tensor:
        n_pixels = self.image_shape[0] * self.image_shape[1]
        return log_sigma.clamp(min=LOG_SIGMA_MIN).exp().expand(-1, n_pixels).reshape(-1, 1, *self.image_shape)

    def sigma(self, scanner: torch.Tensor) -> torch.Tensor:
        """The noise that sampling draws, (B, 1, H, W): the scanner's acquisition noise (observation_noise
        scanner) or the whole learned sigma (pixel)."""
        return self._as_image(NOISE_PARAM_SCALE * self.noise_param[scanner])

    def likelihood_sigma(self, scanner: torch.Tensor) -> torch.Tensor:
        """The standard deviation of the Gaussian likelihood, (B, 1, H, W): with a decoder-error term,
        sqrt(sigma_s^2 + e_p^2)."""
        sigma = self.sigma(scanner)
        if not hasattr(self, "error_param"):
            return sigma
        error = self._as_image(NOISE_PARAM_SCALE * self.error_param)
        return (sigma.square() + error.square()).sqrt()

    def forward(self, images: torch.Tensor, scanner: torch.Tensor, noise: torch.Tensor,
                level: torch.Tensor | None = None) -> VAEOutput:
        """`noise` ~ N(0, I) of shape (B, latent) is passed in so that callers control its seeding; `level`,
        the slices' axial indices, for a `level_condition` model. Every learned part (prior, observation noise,
        probe) is used here, inside forward, so that DDP and DeepSpeed see all parameters of a step."""
        mean, logvar = self.encode(images, scanner, level)
        z = mean + noise.to(mean.dtype) * torch.exp(0.5 * logvar)
        prior_mean, prior_logvar = self.prior(scanner)
        return VAEOutput(
            recon=self.decode(z, scanner, level), mean=mean, logvar=logvar, prior_mean=prior_mean, prior_logvar=prior_logvar,
            sigma=self.likelihood_sigma(scanner) if self.has_noise else None,
            probe_logits=self.probe(reverse_gradient(mean, self.adversary)) if self.adversary > 0 else None,
        )


class VAEOutput(NamedTuple):
    recon: torch.Tensor  # (B, 1, H, W): the decoder's mean
    mean: torch.Tensor  # posterior mean and log-variance (B, latent)
    logvar: torch.Tensor
    prior_mean: torch.Tensor  # p(z | scanner) of each image (zeros for the standard prior)
    prior_logvar: torch.Tensor
    sigma: torch.Tensor | None  # the noise model's standard deviation (B, 1, H, W), with observation_noise
    probe_logits: torch.Tensor | None  # the scanner probe's logits on the reversed-gradient mean, with adversary > 0


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor, prior_mean: torch.Tensor, prior_logvar: torch.Tensor
                  ) -> torch.Tensor:
    """KL(N(mean, e^logvar) || N(prior_mean, e^prior_logvar)) of diagonal Gaussians, summed over dimensions."""
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mean - prior_mean).square()) / prior_logvar.exp()
                  - 1).sum(dim=1)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per image, summed over pixels, in float32: log-cosh or squared error."""
    diff = recon.float().flatten(1) - target.float().flatten(1)
    return (log_cosh(diff) if kind == "logcosh" else diff.square()).sum(dim=1)


def gaussian_nll(residual: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """-log N(residual; 0, sigma^2) per image, averaged over pixels (nats per pixel), in float32."""
    log_sigma = sigma.float().flatten(1).log()
    r = residual.float().flatten(1)
    return (0.5 * (r * torch.exp(-log_sigma)).square() + log_sigma + 0.5 * math.log(2 * math.pi)).mean(dim=1)


def vae_loss(out: VAEOutput, target: torch.Tensor, kind: str, kl_weight: float) -> dict[str, torch.Tensor]:
    """The named loss terms of a batch (see the module doc for the reduction); with a noise model, `noise` is
    the NLL of the detached residual in nats per pixel, which trains the noise parameters alone (per pixel, so
    that it shifts the reported loss by a few nats, not by a hundred thousand)."""
    reconstruction = reconstruction_loss(out.recon, target, kind).mean()
    kl = kl_divergence(out.mean.float(), out.logvar.float(), out.prior_mean.float(), out.prior_logvar.float()).mean()
    losses = {"loss": reconstruction + kl_weight * kl, "reconstruction": reconstruction, "kl": kl}
    if out.sigma is not None:
        residual = target.view_as(out.recon).float() - out.recon.detach().float()
        losses["noise"] = gaussian_nll(residual, out.sigma).mean()
        losses["loss"] = losses["loss"] + losses["noise"]
    return losses


class Decoder(SamplingGraph):
    """(z ~ N(0, I) float32, scanner int64) -> image float32 in [0, 1], computed in the decoder's own dtype; a
    learned prior's transform of z is part of it."""

    def __init__(self, model: CVAE) -> None:
        super().__init__()
        self.model = model
        self.latent = model.latent
        self.has_noise = model.has_noise
        self.noise_kind = model.noise_kind
        self.level_condition = model.level_condition

    def forward(self, z: torch.Tensor, scanner: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        z = z.to(dtype)
        if self.model.has_prior:
            prior_mean, prior_logvar = self.model.prior(scanner)
            z = prior_mean + torch.exp(0.5 * prior_logvar) * z
        image = self.model.decode(z, scanner, level).float()
        if not self.model.conditional and not self.model.has_prior:
            # the label does not enter an unconditional decoder; keep `scanner` a live input of the contract
            image = image + 0 * scanner.view(-1, 1, 1, 1).to(image.dtype)
        return image

    def noise_sigma(self, scanner: torch.Tensor) -> torch.Tensor:
        return self.model.sigma(scanner).float()

    def noise_texture(self) -> dict:
        return self.model.noise_texture()


class CVAEFamily(Family):
    name = "cvae"
    title = "cVAE"
    Config = CVAEConfig
    loss_names = ("loss", "reconstruction", "kl", "adversary", "noise")
    conditional = True

    def build(self, config: CVAEConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]) -> CVAE:
        return CVAE(tuple(image_shape), len(vocabulary), config.hidden, config.latent, self.conditional, config)

    def reported_losses(self, config: CVAEConfig) -> tuple[str, ...]:
        optional = {"adversary": config.adversary > 0, "noise": config.observation_noise != "none"}
        return tuple(name for name in self.loss_names if optional.get(name, True))

    def noise_dim(self, config: CVAEConfig) -> int:
        return config.latent

    def losses(self, step: Step) -> dict[str, torch.Tensor]:
        config: CVAEConfig = step.config
        with step.autocast():
            out = step.model(step.images, step.scanner, step.noise, *step.condition_level())
        losses = vae_loss(out, step.images, config.loss, config.kl_weight)
        if out.probe_logits is not None:
            losses["adversary"] = F.cross_entropy(out.probe_logits.float(), step.scanner)
            losses["loss"] = losses["loss"] + losses["adversary"]
        return losses

    @torch.no_grad()
    def encode_mean(self, model: CVAE, images: torch.Tensor, scanner: torch.Tensor, level: torch.Tensor | None = None
                    ) -> torch.Tensor:
        levels = (level,) if model.level_condition else ()  # the atlas cVAE's encoder takes no level
        mean, _ = model.encode(images.to(next(model.parameters()).dtype), scanner, *levels)
        prior_mean, prior_logvar = model.prior(scanner)
        return ((mean - prior_mean) * torch.exp(-0.5 * prior_logvar)).float()

    def export_graph(self, model: CVAE) -> Decoder:
        return Decoder(model)


FAMILY = CVAEFamily()
