"""The method's fully connected conditional VAE and its losses (family `cvae`).

Encoder: [flattened image, one-hot scanner] -> Linear+ReLU (hidden widths) -> mean and log-variance of the
latent. Decoder: [z, one-hot scanner] -> Linear+ReLU (hidden widths reversed) -> Linear -> sigmoid, reshaped
to the image. The number of scanners comes from the store's vocabulary. With `conditional=False` the label
is left out of both (the unconditional VAE of mrgen_dist.models.vae).

Loss reduction: the reconstruction term is summed over pixels and averaged over the batch; the KL term is
summed over latent dimensions and averaged over the batch; loss = reconstruction + kl_weight * KL. This is the
per-image negative ELBO (up to constants for log-cosh), so its value does not depend on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mrgen_dist.models.base import Family, ModelConfig, SamplingGraph, Step
from mrgen_dist.scanners import Vocabulary

LOSSES = ("logcosh", "mse")


@dataclass
class CVAEConfig(ModelConfig):
    family: str = "cvae"
    hidden: list[int] = field(default_factory=lambda: [1024, 512])  # encoder widths; the decoder mirrors them
    latent: int = 256
    loss: str = "logcosh"  # logcosh | mse
    kl_weight: float = 1.0

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss must be logcosh or mse, got {self.loss!r}")
        if self.latent < 1 or not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError("model.latent and model.hidden widths must be >= 1")
        if self.kl_weight < 0:
            raise ValueError(f"model.kl_weight must be >= 0, got {self.kl_weight}")


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)) computed as |x| + softplus(-2|x|) - log 2: no overflow for large |x|, exact gradient tanh(x)."""
    a = x.abs()
    return a + F.softplus(-2.0 * a) - math.log(2.0)


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    return nn.Sequential(*layers)


class CVAE(nn.Module):
    def __init__(self, image_shape: tuple[int, int], n_scanners: int, hidden: list[int], latent: int,
                 conditional: bool = True) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.n_scanners = n_scanners
        self.latent = latent
        self.conditional = conditional
        n_pixels = image_shape[0] * image_shape[1]
        n_labels = n_scanners if conditional else 0
        self.encoder = _mlp([n_pixels + n_labels, *hidden])
        self.to_mean = nn.Linear(hidden[-1], latent)
        self.to_logvar = nn.Linear(hidden[-1], latent)
        self.decoder_body = _mlp([latent + n_labels, *hidden[::-1]])
        self.to_pixels = nn.Linear(hidden[0], n_pixels)

    def with_label(self, x: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        """`x` with the one-hot scanner appended (a conditional model), or `x` itself."""
        if not self.conditional:
            return x
        return torch.cat([x, F.one_hot(scanner, self.n_scanners).to(x.dtype)], dim=1)

    def encode(self, images: torch.Tensor, scanner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(self.with_label(images.flatten(1), scanner))
        return self.to_mean(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        h = self.decoder_body(self.with_label(z, scanner))
        return torch.sigmoid(self.to_pixels(h)).view(-1, 1, *self.image_shape)

    def forward(
        self, images: torch.Tensor, scanner: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`noise` ~ N(0, I) of shape (B, latent) is passed in so that callers control its seeding."""
        mean, logvar = self.encode(images, scanner)
        z = mean + noise.to(mean.dtype) * torch.exp(0.5 * logvar)
        return self.decode(z, scanner), mean, logvar


def vae_loss(
    recon: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, kind: str, kl_weight: float
) -> dict[str, torch.Tensor]:
    """Loss terms in float32 (see the module doc for the reduction)."""
    diff = recon.float().flatten(1) - target.float().flatten(1)
    per_pixel = log_cosh(diff) if kind == "logcosh" else diff.square()
    reconstruction = per_pixel.sum(dim=1).mean()
    mean, logvar = mean.float(), logvar.float()
    kl = (-0.5 * (1 + logvar - mean.square() - logvar.exp()).sum(dim=1)).mean()
    return {"loss": reconstruction + kl_weight * kl, "reconstruction": reconstruction, "kl": kl}


class Decoder(SamplingGraph):
    """(z float32, scanner int64) -> image float32 in [0, 1], computed in the decoder's own dtype."""

    def __init__(self, model: CVAE) -> None:
        super().__init__()
        self.model = model
        self.latent = model.latent

    def forward(self, z: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        image = self.model.decode(z.to(dtype), scanner).float()
        if not self.model.conditional:
            # the label does not enter an unconditional decoder; keep `scanner` a live input of the contract
            image = image + 0 * scanner.view(-1, 1, 1, 1).to(image.dtype)
        return image


class CVAEFamily(Family):
    name = "cvae"
    title = "cVAE"
    Config = CVAEConfig
    loss_names = ("loss", "reconstruction", "kl")
    conditional = True

    def build(self, config: CVAEConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]) -> CVAE:
        return CVAE(tuple(image_shape), len(vocabulary), config.hidden, config.latent, self.conditional)

    def noise_dim(self, config: CVAEConfig) -> int:
        return config.latent

    def losses(self, step: Step) -> dict[str, torch.Tensor]:
        config: CVAEConfig = step.config
        with step.autocast():
            recon, mean, logvar = step.model(step.images, step.scanner, step.noise)
        return vae_loss(recon, step.images, mean, logvar, config.loss, config.kl_weight)

    def sampling_graph(self, model: CVAE) -> Decoder:
        return Decoder(model)


FAMILY = CVAEFamily()
