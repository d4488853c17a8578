"""The method's fully connected conditional VAE and its losses.

Encoder: [flattened image, one-hot scanner] -> Linear+ReLU (hidden widths) -> mean and log-variance of the
latent. Decoder: [z, one-hot scanner] -> Linear+ReLU (hidden widths reversed) -> Linear -> sigmoid, reshaped
to the image. The number of scanners comes from the store's vocabulary.

Loss reduction: the reconstruction term is summed over pixels and averaged over the batch; the KL term is
summed over latent dimensions and averaged over the batch; loss = reconstruction + kl_weight * KL. This is the
per-image negative ELBO (up to constants for log-cosh), so its value does not depend on the batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)) computed as |x| + softplus(-2|x|) - log 2: no overflow for large |x|, exact gradient tanh(x)."""
    a = x.abs()
    return a + F.softplus(-2.0 * a) - math.log(2.0)


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    return nn.Sequential(*layers)


class CVAE(nn.Module):
    def __init__(self, image_shape: tuple[int, int], n_scanners: int, hidden: list[int], latent: int) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.n_scanners = n_scanners
        self.latent = latent
        n_pixels = image_shape[0] * image_shape[1]
        self.encoder = _mlp([n_pixels + n_scanners, *hidden])
        self.to_mean = nn.Linear(hidden[-1], latent)
        self.to_logvar = nn.Linear(hidden[-1], latent)
        self.decoder_body = _mlp([latent + n_scanners, *hidden[::-1]])
        self.to_pixels = nn.Linear(hidden[0], n_pixels)

    def one_hot(self, scanner: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(scanner, self.n_scanners).to(like.dtype)

    def encode(self, images: torch.Tensor, scanner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.flatten(1)
        h = self.encoder(torch.cat([x, self.one_hot(scanner, x)], dim=1))
        return self.to_mean(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        h = self.decoder_body(torch.cat([z, self.one_hot(scanner, z)], dim=1))
        return torch.sigmoid(self.to_pixels(h)).view(-1, 1, *self.image_shape)

    def forward(
        self, images: torch.Tensor, scanner: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`noise` ~ N(0, I) of shape (B, latent) is passed in so that callers control its seeding."""
        mean, logvar = self.encode(images, scanner)
        z = mean + noise.to(mean.dtype) * torch.exp(0.5 * logvar)
        return self.decode(z, scanner), mean, logvar

    def flops_per_image(self) -> int:
        """Training FLOPs per image: 2 per multiply-accumulate forward, x3 for forward + backward."""
        macs = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * macs


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
