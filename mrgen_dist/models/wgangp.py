"""Conditional WGAN-GP (family `wgangp`): the DCGAN's networks with the discriminator as a critic, trained on
the Wasserstein loss with a gradient penalty (Gulrajani et al. 2017): the critic's gradient norm is pulled to 1
at random points between real and generated slices (weight `gradient_penalty`, lambda = 10), with `n_critic`
critic updates per generator update (5). The penalty is computed in float32 whatever the mixed precision: a
gradient of a gradient in bf16 or fp16 is too coarse to hold the norm near 1.

Reported beside the players' losses: `wasserstein`, the critic's estimate of the distance (mean score of real
minus generated slices), and `gradient_penalty`. The critic's accuracies threshold its scores at the midpoint
of the two means (a critic's scores have no fixed zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mrgen_dist.models.base import Step
from mrgen_dist.models.parts.adversarial import (
    AdversarialConfig,
    AdversarialFamily,
    Judged,
    Players,
    uniform_from_normal,
    z_width,
)
from mrgen_dist.models.parts.networks import ConvDiscriminator, DiscriminatorOutput


@dataclass
class WGANGPConfig(AdversarialConfig):
    family: str = "wgangp"
    n_critic: int = 5
    spectral_norm: bool = False  # the gradient penalty constrains the critic (Gulrajani et al.)
    gradient_penalty: float = 10.0

    def validate(self) -> None:
        super().validate()
        if self.gradient_penalty < 0:
            raise ValueError(f"model.gradient_penalty must be >= 0, got {self.gradient_penalty}")


def gradient_penalty(critic: ConvDiscriminator, real: torch.Tensor, fake: torch.Tensor, scanner: torch.Tensor,
                     mix: torch.Tensor) -> torch.Tensor:
    """E[(||grad_x critic(x)|| - 1)^2] at x = mix * real + (1 - mix) * fake (mix (B,) in [0, 1]), in float32
    with autocast off; differentiable (create_graph) so that the critic learns from it."""
    with torch.autocast(real.device.type, enabled=False), torch.enable_grad():
        m = mix.float().view(-1, 1, 1, 1)
        x = (m * real.float() + (1 - m) * fake.float()).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x, scanner).score.sum(), x, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


class WGANGPFamily(AdversarialFamily):
    name = "wgangp"
    title = "conditional WGAN-GP"
    Config = WGANGPConfig
    player_losses = ("generator", "discriminator", "wasserstein", "gradient_penalty")

    def noise_dim(self, config: WGANGPConfig) -> int:
        return z_width(config) + 1  # the last number places the penalty's point between real and generated

    def discriminator_loss(self, players: Players, step: Step, judged: Judged, fake: torch.Tensor
                           ) -> dict[str, torch.Tensor]:
        distance = judged.real.score.float().mean() - judged.fake.score.float().mean()
        penalty = gradient_penalty(players.discriminator, step.images.unsqueeze(1), fake, step.scanner,
                                   uniform_from_normal(step.noise[:, -1]))
        loss = -distance + step.config.gradient_penalty * penalty + self.scanner_loss(step, judged.real)
        return {"discriminator": loss, "wasserstein": distance, "gradient_penalty": penalty}

    def adversarial_loss(self, fake: DiscriminatorOutput) -> torch.Tensor:
        return -fake.score.float().mean()

    def threshold(self, judged: Judged) -> torch.Tensor:
        return (judged.real.score.float().mean() + judged.fake.score.float().mean()) / 2


FAMILY = WGANGPFamily()
