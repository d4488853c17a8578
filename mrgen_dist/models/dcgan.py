"""Conditional DCGAN (family `dcgan`): the convolutional generator and discriminator of
mrgen_dist.models.parts.networks, trained with the non-saturating GAN loss (Goodfellow et al. 2014; Radford et al.
2016), conditioned on the scanner through the generator's scanner norms and the discriminator's scanner head
(`model.head`: projection or auxiliary classifier). The exported graph is the generator: (z, scanner) -> slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mrgen_dist.models.base import Step
from mrgen_dist.models.parts.adversarial import AdversarialConfig, AdversarialFamily, Judged, Players
from mrgen_dist.models.parts.networks import DiscriminatorOutput


@dataclass
class DCGANConfig(AdversarialConfig):
    family: str = "dcgan"


class DCGANFamily(AdversarialFamily):
    name = "dcgan"
    title = "conditional DCGAN"
    Config = DCGANConfig

    def discriminator_loss(self, players: Players, step: Step, judged: Judged, fake: torch.Tensor
                           ) -> dict[str, torch.Tensor]:
        loss = F.softplus(-judged.real.score.float()).mean() + F.softplus(judged.fake.score.float()).mean()
        return {"discriminator": loss + self.scanner_loss(step, judged.real)}

    def adversarial_loss(self, fake: DiscriminatorOutput) -> torch.Tensor:
        return F.softplus(-fake.score.float()).mean()  # non-saturating: -log D(G(z))


FAMILY = DCGANFamily()
