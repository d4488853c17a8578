"""The unconditional VAE (family `vae`): the thesis's first baseline, the cVAE without the label.

Same networks, losses and training as `cvae`, with the scanner left out of encoder and decoder; the exported
graph keeps the (z, scanner) contract and ignores the scanner. Comparing it with the cVAE measures what the
label adds: its samples are recognised as the asked scanner only at chance.
"""

from __future__ import annotations

from dataclasses import dataclass

from mrgen_dist.models.cvae import CVAEConfig, CVAEFamily


@dataclass
class VAEConfig(CVAEConfig):
    family: str = "vae"

    def validate(self) -> None:
        super().validate()
        if self.prior != "standard":
            raise ValueError("model.prior: an unconditional VAE with a prior per scanner is the gmvae family")
        if self.adversary > 0:
            raise ValueError("model.adversary: the unconditional VAE's decoder has no label to take the scanner from")


class VAEFamily(CVAEFamily):
    name = "vae"
    title = "VAE (unconditional)"
    Config = VAEConfig
    conditional = False


FAMILY = VAEFamily()
