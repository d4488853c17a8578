"""What the adversarial families share (not a family itself): their config, the two-player module, and the
two-player training step on the loop's guarantees.

A step is one discriminator (critic) update on the batch's real slices and slices generated for the batch's
scanners, then, on every `n_critic`-th micro-step of the run (`Step.index`, so a resumed run alternates as an
uninterrupted one), one generator update against the updated discriminator. The slices are generated once,
with their graph, and shown to the discriminator detached for its update. Each player has its own optimizer
(`generator`, `discriminator`), both in the loop's checkpoint.

Several processes: gradients are averaged over ranks by `average_gradients`, one all-reduce per player per
update, not by DistributedDataParallel, whose reducer expects one forward and one backward per step over
parameters that all take part: a GAN step runs two backward passes over different players, and the gradient
penalty of WGAN-GP differentiates a gradient (double backward), which DDP does not support (StyleGAN2-ADA
syncs its gradients the same way). Every rank starts from the same seed, so the players stay identical on
all ranks. Mixed precision comes from the loop's autocast; fp16 loss scaling from `accelerator.backward`.

Reported per step (and per epoch, train and test): the players' losses, the discriminator's accuracy on real
and generated slices (a slice counts as judged real when its score is above the family's threshold), and the
scanner head's accuracy on real slices and on generated ones (whether the head reads the asked scanner: a
live estimate of the conditioning rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mrgen_dist.models.base import Family, ModelConfig, SamplingGraph, Step
from mrgen_dist.models.parts import networks
from mrgen_dist.models.parts.networks import (
    HEADS,
    ConvDiscriminator,
    ConvGenerator,
    DiscriminatorOutput,
    multiply_accumulates,
)
from mrgen_dist.scanners import Vocabulary

ACCURACIES = ("real_accuracy", "fake_accuracy", "scanner_accuracy_real", "scanner_accuracy_fake")


@dataclass
class TwoPlayerConfig(ModelConfig):
    """What every two-player family configures: the discriminator and how the players take turns."""

    discriminator: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # widths, finest first
    size: list[int] = field(default_factory=lambda: [224, 192])  # the networks' grid: slices are centre-padded to it
    head: str = "projection"  # projection | auxiliary: the discriminator's scanner head
    # auxiliary head: weight of the scanner cross-entropy of generated slices in the generator's loss (the head
    # itself learns the scanner from real slices, weight 1)
    scanner_weight: float = 1.0
    n_critic: int = 1  # discriminator updates per generator update
    spectral_norm: bool = True  # spectral normalisation of the discriminator's weights

    def validate(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"model.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.n_critic < 1:
            raise ValueError(f"model.n_critic must be >= 1, got {self.n_critic}")
        if self.scanner_weight < 0:
            raise ValueError(f"model.scanner_weight must be >= 0, got {self.scanner_weight}")
        if len(self.size) != 2 or any(s < 1 for s in self.size):
            raise ValueError(f"model.size must be [height, width], got {self.size}")
        self._check_widths("discriminator", self.discriminator, 1, len(self.discriminator))

    def _check_widths(self, key: str, widths: list[int], least: int, halvings: int) -> None:
        """`model.<key>` lists at least `least` widths >= 1, and `size` survives `halvings` exact halvings."""
        if len(widths) < least or any(w < 1 for w in widths):
            raise ValueError(f"model.{key} must list at least {least} layer widths >= 1, got {widths}")
        if any(s % 2**halvings for s in self.size):
            raise ValueError(f"model.size {self.size} must be divisible by {2**halvings}: model.{key} halves "
                             f"it {halvings} times")

    def validate_shape(self, image_shape: tuple[int, int]) -> None:
        if self.size[0] < image_shape[0] or self.size[1] < image_shape[1]:
            raise ValueError(f"model.size {self.size} is smaller than the store's slices {list(image_shape)}: "
                             "the networks work on slices centre-padded to it, never cropped")


@dataclass
class AdversarialConfig(TwoPlayerConfig):
    family: str = "dcgan"
    latent: int = 128
    generator: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16, 8])  # widths, coarsest first
    noise_map: bool = False  # z also carries a per-pixel noise map for the generator's last block (networks.py)

    def validate(self) -> None:
        super().validate()
        if self.latent < 1:
            raise ValueError(f"model.latent must be >= 1, got {self.latent}")
        self._check_widths("generator", self.generator, 2, len(self.generator) - 1)


class Players(nn.Module):
    """The generator and the discriminator of one model (the exported graph is the generator alone)."""

    def __init__(self, config: AdversarialConfig, n_scanners: int, image_shape: tuple[int, int],
                 patch: bool = False) -> None:
        super().__init__()
        size = tuple(config.size)
        self.generator = ConvGenerator(config.latent, n_scanners, config.generator, size, image_shape,
                                       config.noise_map)
        self.discriminator = ConvDiscriminator(n_scanners, config.discriminator, size, config.head, patch,
                                               config.spectral_norm)


class GeneratorGraph(SamplingGraph):
    """(z ~ N(0, I) float32, scanner int64) -> image float32 in [0, 1], computed in the generator's dtype."""

    def __init__(self, generator: ConvGenerator) -> None:
        super().__init__()
        self.generator = generator
        self.latent = generator.latent

    def forward(self, z: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        return self.generator(z.to(next(self.generator.parameters()).dtype), scanner).float()


def z_width(config: AdversarialConfig) -> int:
    """The width of the generator's z (networks.z_width), from the config alone."""
    return networks.z_width(config.latent, tuple(config.size), config.noise_map)


def average_gradients(parameters: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients of `parameters` over the ranks, in one all-reduce of one flat buffer."""
    if world_size == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def uniform_from_normal(noise: torch.Tensor) -> torch.Tensor:
    """U(0, 1) numbers from N(0, 1) ones (the normal CDF): the loop draws only normal noise."""
    return 0.5 * (1 + torch.erf(noise / math.sqrt(2)))


class Judged(NamedTuple):
    """The discriminator's outputs on a batch's real slices and on the slices generated for it."""

    real: DiscriminatorOutput
    fake: DiscriminatorOutput


class AdversarialFamily(Family):
    """A two-player family; subclasses give the players' objectives (`discriminator_loss`, `generator_loss`)."""

    Config = AdversarialConfig
    accumulates = False
    patch = False  # a PatchGAN discriminator
    player_losses: tuple[str, ...] = ("generator", "discriminator")
    accuracy_names: tuple[str, ...] = ACCURACIES

    @property
    def loss_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return (*self.player_losses, *self.accuracy_names)

    # -- what subclasses define ---------------------------------------------------------------------------
    def discriminator_loss(self, players: Players, step: Step, judged: Judged, fake: torch.Tensor
                           ) -> dict[str, torch.Tensor]:
        """`discriminator` (its objective) and any terms of it to report."""
        raise NotImplementedError

    def adversarial_loss(self, fake: DiscriminatorOutput) -> torch.Tensor:
        """The generator's adversarial loss, given the discriminator's output on its slices."""
        raise NotImplementedError

    def asked(self, step: Step) -> torch.Tensor:
        """The scanner each generated slice of the step is made for (and judged as): the batch's own here."""
        return step.scanner

    def threshold(self, judged: Judged) -> torch.Tensor | float:
        """The score above which the discriminator judges a slice real (for its accuracy)."""
        return 0.0

    # -- shared -------------------------------------------------------------------------------------------
    def build(self, config: AdversarialConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]) -> nn.Module:
        return Players(config, len(vocabulary), image_shape, self.patch)

    def noise_dim(self, config: AdversarialConfig) -> int:
        return z_width(config)

    def optimizers(self, model: nn.Module, make) -> dict[str, torch.optim.Optimizer]:
        return {"generator": make(self.generator_parameters(model)), "discriminator": make(model.discriminator.parameters())}

    def generator_parameters(self, players: nn.Module) -> list[nn.Parameter]:
        return list(players.generator.parameters())

    def export_graph(self, model: Players) -> GeneratorGraph:
        return GeneratorGraph(model.generator)

    def generate(self, players: Players, step: Step) -> dict[str, torch.Tensor]:
        """The slices the generator makes for the step (`fake`, for the batch's scanners), and anything else
        its loss needs; under autocast."""
        return {"fake": players.generator(step.noise[:, : players.generator.latent], step.scanner)}

    def generator_loss(self, players: Players, step: Step, made: dict[str, torch.Tensor], fake: DiscriminatorOutput
                       ) -> dict[str, torch.Tensor]:
        """`generator` (its objective): the adversarial loss plus, with an auxiliary head, the scanner
        cross-entropy of its slices (the head must read the asked scanner)."""
        loss = self.adversarial_loss(fake)
        if step.config.head == "auxiliary":
            loss = loss + step.config.scanner_weight * F.cross_entropy(fake.scanner_logits.float(), self.asked(step))
        return {"generator": loss}

    def scanner_loss(self, step: Step, real: DiscriminatorOutput) -> torch.Tensor:
        """The auxiliary head learns the scanner from real slices only (a head that also learned it from
        generated slices could be satisfied by the generator's mistakes)."""
        if step.config.head != "auxiliary":
            return real.score.new_zeros((), dtype=torch.float32)
        return F.cross_entropy(real.scanner_logits.float(), step.scanner)

    def judge(self, players: Players, step: Step, fake: torch.Tensor) -> Judged:
        d = players.discriminator
        return Judged(d(step.images.unsqueeze(1).to(fake.dtype), step.scanner), d(fake, self.asked(step)))

    def accuracies(self, step: Step, judged: Judged) -> dict[str, torch.Tensor]:
        t = self.threshold(judged)
        with torch.no_grad():
            rates = {
                "real_accuracy": (judged.real.score.float() > t).float().mean(),
                "fake_accuracy": (judged.fake.score.float() <= t).float().mean(),
                "scanner_accuracy_real": (judged.real.scanner_logits.argmax(1) == step.scanner).float().mean(),
                "scanner_accuracy_fake": (judged.fake.scanner_logits.argmax(1) == self.asked(step)).float().mean(),
            }
        return {k: rates[k] for k in self.accuracy_names}

    def losses(self, step: Step) -> dict[str, torch.Tensor]:
        """Every reported term on the step's batch, no update (the test split's numbers)."""
        players = step.accelerator.unwrap_model(step.model)
        with step.autocast():
            made = self.generate(players, step)
            judged = self.judge(players, step, made["fake"])
        terms = self.discriminator_loss(players, step, judged, made["fake"])
        terms |= self.generator_loss(players, step, made, judged.fake)
        return {k: v.detach().float() for k, v in (terms | self.accuracies(step, judged)).items()}

    def train_step(self, step: Step) -> dict[str, torch.Tensor]:
        acc = step.accelerator
        players = acc.unwrap_model(step.model)
        generator_turn = (step.index + 1) % step.config.n_critic == 0
        # the discriminator: real slices against generated ones (detached)
        with torch.enable_grad() if generator_turn else torch.no_grad(), step.autocast():
            made = self.generate(players, step)
        with step.autocast():
            judged = self.judge(players, step, made["fake"].detach())
        terms = self.discriminator_loss(players, step, judged, made["fake"].detach())
        reported = {**terms, **self.accuracies(step, judged)}
        self._update(step, "discriminator", terms["discriminator"], list(players.discriminator.parameters()))
        # the generator, against the updated discriminator; the discriminator's weights need no gradient here
        players.discriminator.requires_grad_(False)
        try:
            if generator_turn:
                with step.autocast():
                    fake = players.discriminator(made["fake"], self.asked(step))
                g_terms = self.generator_loss(players, step, made, fake)
                self._update(step, "generator", g_terms["generator"], self.generator_parameters(players))
            else:  # reported from the discriminator's view of this step's slices, which it just scored
                g_terms = self.generator_loss(players, step, made, judged.fake)
        finally:
            players.discriminator.requires_grad_(True)
        return {k: v.detach().float() for k, v in (reported | g_terms).items()}

    def _update(self, step: Step, player: str, loss: torch.Tensor, parameters: list[nn.Parameter]) -> None:
        acc, optimizer = step.accelerator, step.optimizers[player]
        acc.backward(loss)
        average_gradients(parameters, acc.num_processes)
        if step.grad_clip > 0:
            acc.unscale_gradients(optimizer=optimizer)  # this player's only: the other's scale state stays
            torch.nn.utils.clip_grad_norm_(parameters, step.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def flops_per_image(self, model: Players) -> int:
        """Training FLOPs per image, approximately: 2 per multiply-accumulate, forward + backward (x3) of the
        generator once and of the discriminator three times (real and generated slices for its update, the
        generated ones again for the generator's)."""
        image_shape = model.generator.image_shape
        z, s = torch.zeros(1, model.generator.latent), torch.zeros(1, dtype=torch.long)
        g = multiply_accumulates(model.generator, z, s)
        d = multiply_accumulates(model.discriminator, torch.zeros(1, 1, *image_shape), s)
        return 6 * (g + 3 * d)
