"""The thesis's CycleGAN (family `cyclegan`; Zhu et al. 2017), kept as the baseline of the translators: two
scanners A and B (`model.pair`), two unconditional translators G_AB and G_BA, and two discriminators, D_A
judging slices as A's and D_B as B's. Losses: adversarial (non-saturating, spectral-norm PatchGAN, as the
`stargan` family's, where the original used least squares), cycle |G_BA(G_AB(a)) - a| and the reverse (weight
10), and identity |G_BA(a) - a|, |G_AB(b) - b| (weight 5, half the cycle weight as in the original). There is no
scanner head: each discriminator knows one scanner only.

It learns from the slices of its two scanners (the run's `data.scanners` must be the pair) and it exports to
the same `mrgen-translator` contract as the StarGAN translator: (image, target scanner) -> image, where the
target must be A or B (`mrgen.targets` of the file). The exported graph computes both directions and keeps
the one asked for, so it costs two translators per slice; with 4 scanners, 6 such models would be needed
where one StarGAN translator serves every pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mrgen_dist.models.base import Step
from mrgen_dist.models.parts.networks import ConvDiscriminator, ConvTranslator, DiscriminatorOutput
from mrgen_dist.models.stargan import StarGANConfig, StarGANFamily
from mrgen_dist.scanners import Vocabulary


@dataclass
class CycleGANConfig(StarGANConfig):
    family: str = "cyclegan"
    pair: list[str] = field(default_factory=list)  # the two scanners it translates between
    head: str = "projection"  # of each single-scanner discriminator: a plain real/fake score
    scanner_weight: float = 0.0  # no scanner head

    def validate(self) -> None:
        super().validate()
        if len(self.pair) != 2 or self.pair[0] == self.pair[1]:
            raise ValueError(f"model.pair must name two different scanners, got {self.pair}")

    def validate_data(self, vocabulary: Vocabulary, trained: list[str]) -> None:
        unknown = [name for name in self.pair if name not in vocabulary.names]
        if unknown:
            raise ValueError(f"model.pair: {', '.join(map(repr, unknown))} not in the store's vocabulary "
                             f"({', '.join(vocabulary.names)})")
        if sorted(trained) != sorted(self.pair):
            raise ValueError(f"model.pair {self.pair}: a CycleGAN learns from its two scanners' slices only; set "
                             f"data.scanners to the pair (the run trains on {trained})")


class PairTranslator(nn.Module):
    """G_AB and G_BA behind the translator's interface: (images, target) -> G_AB where the target is B,
    G_BA elsewhere (both computed: the exported graph has no data-dependent control flow)."""

    def __init__(self, config: CycleGANConfig, ids: tuple[int, int]) -> None:
        super().__init__()
        self.ids, size = ids, tuple(config.size)
        self.to_b = ConvTranslator(1, config.translator, config.blocks, size)
        self.to_a = ConvTranslator(1, config.translator, config.blocks, size)

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        none = torch.zeros_like(target)  # the one "scanner" of each unconditional translator's norms
        to_b = (target == self.ids[1]).view(-1, 1, 1, 1)
        return torch.where(to_b, self.to_b(images, none), self.to_a(images, none))


class PairDiscriminator(nn.Module):
    """D_A and D_B: each slice is scored by the discriminator of the scanner it is shown as."""

    def __init__(self, config: CycleGANConfig, ids: tuple[int, int], n_scanners: int) -> None:
        super().__init__()
        self.ids, self.n_scanners, self.size = ids, n_scanners, tuple(config.size)
        self.of_a, self.of_b = (ConvDiscriminator(1, config.discriminator, self.size, "projection", True,
                                                  config.spectral_norm) for _ in range(2))

    def forward(self, images: torch.Tensor, scanner: torch.Tensor) -> DiscriminatorOutput:
        none = torch.zeros_like(scanner)
        is_b = (scanner == self.ids[1]).view(-1, 1)
        score = torch.where(is_b, self.of_b(images, none).score, self.of_a(images, none).score)
        # no scanner head: logits that read every slice as the scanner it is shown as
        return DiscriminatorOutput(score, torch.nn.functional.one_hot(scanner, self.n_scanners).to(score.dtype))


class CycleGANPlayers(nn.Module):
    def __init__(self, config: CycleGANConfig, vocabulary: Vocabulary) -> None:
        super().__init__()
        ids = (vocabulary.index(config.pair[0]), vocabulary.index(config.pair[1]))
        self.generator = PairTranslator(config, ids)
        self.discriminator = PairDiscriminator(config, ids, len(vocabulary))


class CycleGANFamily(StarGANFamily):
    name = "cyclegan"
    title = "CycleGAN"
    Config = CycleGANConfig
    accuracy_names = ("real_accuracy", "fake_accuracy")  # no scanner head to report on

    def build(self, config: CycleGANConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]) -> nn.Module:
        return CycleGANPlayers(config, vocabulary)

    def targets(self, model: CycleGANPlayers) -> list[int]:
        return list(model.generator.ids)

    def asked(self, step: Step) -> torch.Tensor:
        """The other scanner of the pair."""
        a, b = step.accelerator.unwrap_model(step.model).generator.ids
        return torch.where(step.scanner == a, b, a)


FAMILY = CycleGANFamily()
