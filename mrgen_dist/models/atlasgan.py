"""Atlas cVAE-GAN (family `atlasgan`): the atlas cVAE (mrgen_dist.models.atlas) trained with its own objective
plus the cVAE-GAN's adversarial terms (mrgen_dist.models.cvaegan): a PatchGAN discriminator with an auxiliary
scanner head judges real slices against prior draws decoded for the batch's scanners *with their scanner's
Rician noise*, |x + sigma (n1 + i n2)| (the slices `mrgen-sample --noise` makes), and the generator is asked
to fool its real/fake score and to have its scanner head read the asked scanner.

Why a second hybrid: the convolutional cVAE-GAN's small generator never got the pixel-scale texture right
(its reconstructions of real slices were read as the blurry scanner whatever their own), while the atlas
decoder gets it right by construction (sharp warped atlas, each scanner's point-spread function and noise).
What the atlas cVAE lacks is what an adversary gives: its anatomy is a warped, biased mean, so its samples sit
far from real slices in Inception space (low precision and recall). Here the discriminator sees the whole
sample and pushes the anatomy and the acquisition toward the real slices. `adversarial_parts: anatomy` leaves
the acquisition to the reconstruction. What it measured at each weight, seed and setting, with the commands:
docs/results/adversarial.md.

The reconstruction uses the fitted point-spread functions, as in the atlas cVAE; the prior draws use the
sampling ones (`AtlasVAE.psf_sigma`), since those are what is exported. With the fixed acquisition the noise
sigma stays fitted by the background's Rician likelihood alone (detached in the draws): the adversary shapes
the image, not the noise level. With the learned one (`acquisition: learned`) the prior draws take the
scanner's chi noise (`AtlasVAE.observe`), and the adversary trains its level map, noise floor and kernel beside
the texture fit (unless `adversarial_parts: anatomy`): the texture fit sees only the background, and the
adversary the whole slice. The export, the z-probe and the noisy preview are the atlas cVAE's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mrgen_dist.models.atlas import FAMILY as ATLAS
from mrgen_dist.models.atlas import AtlasConfig, AtlasOutput, AtlasVAE, atlas_objective
from mrgen_dist.models.base import Family, Step
from mrgen_dist.models.cvae import Decoder
from mrgen_dist.models.dcgan import DCGANFamily
from mrgen_dist.models.parts.adversarial import TwoPlayerConfig
from mrgen_dist.models.parts.networks import ConvDiscriminator, DiscriminatorOutput, centre_crop, multiply_accumulates
from mrgen_dist.scanners import Vocabulary

ADVERSARIAL_PARTS = ("anatomy", "all")


@dataclass
class AtlasGANConfig(AtlasConfig, TwoPlayerConfig):
    family: str = "atlasgan"
    head: str = "auxiliary"
    adversarial_weight: float = 3.0  # of the non-saturating loss of the prior draws, against the per-image ELBO
    scanner_weight: float = 3.0  # of the auxiliary head's cross-entropy of the prior draws
    # what the adversarial and scanner terms train: anatomy (the acquisition stays fitted by the reconstruction
    # alone) | all (the acquisition's tone curves and point-spread functions too)
    adversarial_parts: str = "all"

    def validate(self) -> None:
        AtlasConfig.validate(self)
        TwoPlayerConfig.validate(self)
        if self.head != "auxiliary":
            raise ValueError(f"model.head must be auxiliary for the atlasgan family (its scanner term is the "
                             f"auxiliary head's cross-entropy), got {self.head!r}")
        if self.n_critic != 1:
            raise ValueError(f"model.n_critic must be 1 for the atlasgan family (its generator step is also its "
                             f"VAE step), got {self.n_critic}")
        if self.adversarial_parts not in ADVERSARIAL_PARTS:
            raise ValueError(f"model.adversarial_parts must be one of {', '.join(ADVERSARIAL_PARTS)}, got "
                             f"{self.adversarial_parts!r}")
        if self.adversarial_weight < 0:
            raise ValueError(f"model.adversarial_weight must be >= 0, got {self.adversarial_weight}")

    def validate_shape(self, image_shape: tuple[int, int]) -> None:
        AtlasConfig.validate_shape(self, image_shape)
        TwoPlayerConfig.validate_shape(self, image_shape)


class AtlasGANPlayers(nn.Module):
    """The atlas cVAE as the generator (its encoder, anatomy and acquisition) and a patch discriminator."""

    def __init__(self, config: AtlasGANConfig, n_scanners: int, image_shape: tuple[int, int]) -> None:
        super().__init__()
        self.generator = AtlasVAE(tuple(image_shape), n_scanners, config.hidden, config.latent, True, config)
        self.discriminator = ConvDiscriminator(n_scanners, config.discriminator, tuple(config.size), config.head,
                                               True, config.spectral_norm)


class AtlasGANFamily(DCGANFamily):
    name = "atlasgan"
    title = "atlas cVAE-GAN"
    Config = AtlasGANConfig
    patch = True
    player_losses = ("generator", "discriminator", "reconstruction", "kl", "noise", "adversary", "scanner_share")

    def build(self, config: AtlasGANConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]) -> AtlasGANPlayers:
        return AtlasGANPlayers(config, len(vocabulary), image_shape)

    def noise_dim(self, config: AtlasGANConfig) -> int:
        """The atlas cVAE's step noise (`ATLAS.noise_dim`), the prior draw, then the prior draw's observation
        noise: with the fixed acquisition its real and imaginary parts as two maps of the networks' `size`
        (cropped to the slice; noise_dim knows only the config), with the learned one a number that seeds its
        white fields (`AtlasVAE.white_from`). The loop draws all of a step's randomness, so that a resumed run
        draws what an uninterrupted one does."""
        observation = 1 if config.acquisition == "learned" else 2 * config.size[0] * config.size[1]
        return ATLAS.noise_dim(config) + config.latent + observation

    def generate(self, players: AtlasGANPlayers, step: Step) -> dict[str, torch.Tensor]:
        vae, config = players.generator, step.config
        own = ATLAS.noise_dim(config)
        out: AtlasOutput = vae(step.images, step.scanner, step.noise[:, :own])
        frozen = config.adversarial_parts == "anatomy"
        prior = step.noise[:, own : own + config.latent].to(out.mean.dtype)
        clean = vae.decode(prior, step.scanner, frozen=frozen).float()
        rest = step.noise[:, own + config.latent :]
        if vae.learned:
            white = vae.white_from(rest[:, 0])
        else:
            white = centre_crop(rest.view(-1, 2, *config.size), vae.image_shape)
        # the adversary trains the learned noise texture unless it trains the anatomy only, and never the fixed
        # acquisition's sigma, which stays the background's Rician fit (module doc)
        fake = vae.observe(clean, step.scanner, white, frozen=frozen or not vae.learned)
        return {"fake": fake.to(out.mean.dtype), "out": out}

    def generator_loss(self, players: AtlasGANPlayers, step: Step, made: dict, fake: DiscriminatorOutput
                       ) -> dict[str, torch.Tensor]:
        config: AtlasGANConfig = step.config
        terms = atlas_objective(config, made["out"], step.images, step.scanner)
        loss = (terms["loss"] + config.adversarial_weight * self.adversarial_loss(fake)
                + config.scanner_weight * F.cross_entropy(fake.scanner_logits.float(), step.scanner))
        return {"generator": loss, **{k: v for k, v in terms.items() if k != "loss"}}

    def reported_losses(self, config: AtlasGANConfig) -> tuple[str, ...]:
        """The players' terms and accuracies, with the atlas cVAE's terms that this config has."""
        atlas = ATLAS.reported_losses(config)
        return tuple(n for n in self.loss_names if n in atlas or n not in ATLAS.loss_names)

    def export_graph(self, model: AtlasGANPlayers) -> Decoder:
        return ATLAS.export_graph(model.generator)

    def encode_mean(self, model: AtlasGANPlayers, images: torch.Tensor, scanner: torch.Tensor,
                    level: torch.Tensor | None = None) -> torch.Tensor:
        return ATLAS.encode_mean(model.generator, images, scanner)

    def preview(self, model: AtlasGANPlayers, images: torch.Tensor, scanner: torch.Tensor, vocabulary: Vocabulary,
                level: torch.Tensor | None = None) -> tuple[list[tuple[str, np.ndarray]], str]:
        return ATLAS.preview(model.generator, images, scanner, vocabulary)

    def flops_per_image(self, model: AtlasGANPlayers) -> int:
        """The atlas cVAE's count, its decoder once more (the prior draw), and the discriminator three times
        (adversarial.py), forward and backward."""
        vae = model.generator
        d = multiply_accumulates(model.discriminator, torch.zeros(1, 1, *vae.image_shape),
                                 torch.zeros(1, dtype=torch.long))
        return ATLAS.flops_per_image(vae) + Family.flops_per_image(self, vae.decoder_body) + 6 * 3 * d


FAMILY = AtlasGANFamily()
