"""The Gaussian-mixture VAE (family `gmvae`): the thesis's GMVAE with one mixture component per scanner.

Encoder and decoder do not see the label (as in the unconditional VAE); the prior is a mixture of learned
Gaussians, p(z) = sum_s pi_s N(m_s, diag exp(v_s)), one component per scanner. The scanner of a training
slice is known, so its posterior is pulled towards its own component (KL to p(z | s), the supervised form of
the mixture's ELBO, which needs no inference of the component), and sampling a scanner draws from its
component: the exported graph maps z ~ N(0, I) to m_s + exp(v_s / 2) z. The scanner reaches the image only
through where its component sits in z, so the label's effect is whatever the decoder learned there.
"""

from __future__ import annotations

from dataclasses import dataclass

from mrgen_dist.models.cvae import CVAEConfig, CVAEFamily


@dataclass
class GMVAEConfig(CVAEConfig):
    family: str = "gmvae"
    prior: str = "scanner"

    def validate(self) -> None:
        super().validate()
        if self.prior != "scanner":
            raise ValueError(f"model.prior of the gmvae family is its mixture (scanner), got {self.prior!r}")


class GMVAEFamily(CVAEFamily):
    name = "gmvae"
    title = "GMVAE (component per scanner)"
    Config = GMVAEConfig
    conditional = False


FAMILY = GMVAEFamily()
