"""cVAE-GAN hybrid (family `cvaegan`): a conditional VAE whose decoder is the convolutional generator, trained
with the cVAE's objective (log-cosh or MSE reconstruction + KL, the per-image negative ELBO of
mrgen_dist.models.cvae) plus an adversarial loss from a PatchGAN discriminator (one real/fake score per
patch of about 32 x 32 pixels: sharpness and noise are local) and the cross-entropy of its auxiliary
scanner head (Larsen et al. 2016, with the conditioning of AC-GAN). The adversarial and scanner terms are
computed on slices decoded from prior draws z ~ N(0, I), the slices that sampling makes, so that those are
sharp and carry the asked scanner; the reconstruction term keeps the decoder anchored to the data.

Both terms are weighted against the ELBO, which is summed over the slice's ~40,000 pixels: weights of the
order of 100 balance them. `encode_mean` gives the posterior means, so the z-probe of mrgen-fid diagnose
applies as to the cVAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mrgen_dist.models.base import Step
from mrgen_dist.models.cvae import LOSSES, kl_divergence, reconstruction_loss
from mrgen_dist.models.dcgan import DCGANFamily
from mrgen_dist.models.parts.adversarial import AdversarialConfig, Players, z_width
from mrgen_dist.models.parts.networks import ConvEncoder, DiscriminatorOutput, multiply_accumulates
from mrgen_dist.scanners import Vocabulary


@dataclass
class CVAEGANConfig(AdversarialConfig):
    family: str = "cvaegan"
    head: str = "auxiliary"
    loss: str = "logcosh"  # logcosh | mse: the reconstruction term
    kl_weight: float = 1.0
    adversarial_weight: float = 100.0
    scanner_weight: float = 100.0

    def validate(self) -> None:
        super().validate()
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.n_critic != 1:
            raise ValueError(f"model.n_critic must be 1 for the cvaegan family (its generator step is also its "
                             f"VAE step), got {self.n_critic}")
        for key in ("kl_weight", "adversarial_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key} must be >= 0, got {getattr(self, key)}")


class HybridPlayers(Players):
    """The generator (the VAE's decoder), its encoder, and a patch discriminator."""

    def __init__(self, config: CVAEGANConfig, n_scanners: int, image_shape: tuple[int, int]) -> None:
        super().__init__(config, n_scanners, image_shape, patch=True)
        self.encoder = ConvEncoder(config.latent, n_scanners, config.discriminator, tuple(config.size))


class CVAEGANFamily(DCGANFamily):
    name = "cvaegan"
    title = "cVAE-GAN"
    Config = CVAEGANConfig
    patch = True
    player_losses = ("generator", "discriminator", "reconstruction", "kl")

    def build(self, config: CVAEGANConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]) -> HybridPlayers:
        return HybridPlayers(config, len(vocabulary), image_shape)

    def noise_dim(self, config: CVAEGANConfig) -> int:
        return config.latent + z_width(config)  # the posterior's reparameterisation, then the prior draw

    def generator_parameters(self, players: HybridPlayers) -> list[nn.Parameter]:
        return [*players.generator.parameters(), *players.encoder.parameters()]

    def generate(self, players: HybridPlayers, step: Step) -> dict[str, torch.Tensor]:
        latent = step.config.latent
        mean, logvar = players.encoder(step.images.unsqueeze(1), step.scanner)
        z = mean + step.noise[:, :latent].to(mean.dtype) * torch.exp(0.5 * logvar)
        # a reconstruction's noise map (with model.noise_map) is zero: the encoder infers the code alone
        return {"fake": players.generator(step.noise[:, latent:], step.scanner),
                "recon": players.generator(players.generator.silent(z), step.scanner), "mean": mean, "logvar": logvar}

    def generator_loss(self, players: HybridPlayers, step: Step, made: dict[str, torch.Tensor],
                       fake: DiscriminatorOutput) -> dict[str, torch.Tensor]:
        config: CVAEGANConfig = step.config
        reconstruction = reconstruction_loss(made["recon"], step.images, config.loss).mean()
        mean, logvar = made["mean"].float(), made["logvar"].float()
        kl = kl_divergence(mean, logvar, torch.zeros_like(mean), torch.zeros_like(logvar)).mean()
        loss = (reconstruction + config.kl_weight * kl + config.adversarial_weight * self.adversarial_loss(fake)
                + config.scanner_weight * F.cross_entropy(fake.scanner_logits.float(), step.scanner))
        return {"generator": loss, "reconstruction": reconstruction, "kl": kl}

    def flops_per_image(self, model: HybridPlayers) -> int:
        """The GAN's count (adversarial.py) plus the encoder and the generator's second pass (the
        reconstruction), forward and backward."""
        s = torch.zeros(1, dtype=torch.long)
        encoder = multiply_accumulates(model.encoder, torch.zeros(1, 1, *model.generator.image_shape), s)
        generator = multiply_accumulates(model.generator, torch.zeros(1, model.generator.latent), s)
        return super().flops_per_image(model) + 6 * (encoder + generator)

    @torch.no_grad()
    def encode_mean(self, model: HybridPlayers, images: torch.Tensor, scanner: torch.Tensor,
                    level: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior means in the sampling graph's z: the code, then (with a noise map) zeros, as in training's
        reconstructions."""
        mean, _ = model.encoder(images.unsqueeze(1).to(next(model.parameters()).dtype), scanner)
        return model.generator.silent(mean.float())


FAMILY = CVAEGANFamily()
