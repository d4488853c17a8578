"""Scanner-to-scanner translation with one generator for every pair (family `stargan`; Choi et al. 2018).

The question it answers is not "what does scanner S generate" but "what would *this* subject's slice look like
on scanner S": the translator maps (image, target scanner) to an image of the same anatomy with the target's
contrast, noise and sharpness, on unpaired slices (no subject is scanned twice). A CycleGAN needs one generator
pair per scanner pair (6 for 4 scanners); here one `ConvTranslator` conditioned on the target scanner serves
them all. Its losses, per training slice x of scanner s and a target t drawn uniformly among the other scanners:

* adversarial: a PatchGAN discriminator (spectral norm, non-saturating loss as the conditional DCGAN's) judges
  G(x, t) as a slice of t. With the `projection` head (the default) its real/fake score is itself conditional
  on t, so a slice with t's contrast but the source's noise and sharpness is judged fake; with the
  `auxiliary` head (StarGAN's) the score is unconditional and a classifier, learned from real slices only,
  must read t (`scanner_weight`), which contrast alone can satisfy while the translation keeps the source's
  texture (the two heads compared: docs/results/translation.md);
* cycle: |G(G(x, t), s) - x|, mean absolute error (`cycle_weight`, 10 as in StarGAN and CycleGAN): the anatomy
  must survive the round trip;
* identity: |G(x, s) - x| (`identity_weight`, CycleGAN's identity loss): translating to the slice's own
  scanner changes nothing, so that the change a translation makes is the difference between scanners.

The exported graph is the translator, contract `mrgen-translator` (export/README.md): (image, target scanner)
-> image, used by `mrgen-translate` and evaluated by `mrgen-fid translation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mrgen_dist.models.base import PREVIEW_COLUMNS, Step, TranslationGraph
from mrgen_dist.models.dcgan import DCGANFamily
from mrgen_dist.models.parts.adversarial import TwoPlayerConfig, uniform_from_normal
from mrgen_dist.models.parts.networks import ConvDiscriminator, ConvTranslator, DiscriminatorOutput, multiply_accumulates
from mrgen_dist.scanners import Vocabulary


@dataclass
class StarGANConfig(TwoPlayerConfig):
    family: str = "stargan"
    translator: list[int] = field(default_factory=lambda: [16, 32, 64])  # widths of its scales, finest first
    blocks: int = 4  # residual blocks at the coarsest scale
    head: str = "projection"
    cycle_weight: float = 10.0
    identity_weight: float = 5.0

    def validate(self) -> None:
        super().validate()
        self._check_widths("translator", self.translator, 1, len(self.translator) - 1)
        if self.blocks < 0:
            raise ValueError(f"model.blocks must be >= 0, got {self.blocks}")
        for key in ("cycle_weight", "identity_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key} must be >= 0, got {getattr(self, key)}")

    def validate_data(self, vocabulary: Vocabulary, trained: list[str]) -> None:
        if len(trained) < 2:
            raise ValueError(f"model.family {self.family} translates between scanners: data.scanners must name at "
                             f"least two, got {trained}")
        self.require_every_scanner(vocabulary, trained, ", or use the cyclegan family for a pair")


class TranslatorPlayers(nn.Module):
    """The translator (`generator`) and the patch discriminator."""

    def __init__(self, config: StarGANConfig, n_scanners: int) -> None:
        super().__init__()
        size = tuple(config.size)
        self.generator = ConvTranslator(n_scanners, config.translator, config.blocks, size)
        self.discriminator = ConvDiscriminator(n_scanners, config.discriminator, size, config.head, True,
                                               config.spectral_norm)


class TranslatorGraph(TranslationGraph):
    """(image float32, target scanner int64) -> image float32 in [0, 1], computed in the translator's dtype."""

    def __init__(self, generator: nn.Module, targets: list[int]) -> None:
        super().__init__()
        self.generator, self.targets = generator, targets

    def forward(self, image: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        return self.generator(image.to(next(self.generator.parameters()).dtype), scanner).float()


@torch.no_grad()
def translation_preview(graph: TranslationGraph, images: torch.Tensor, scanner: torch.Tensor, vocabulary: Vocabulary
                        ) -> tuple[list[tuple[str, np.ndarray]], str]:
    """The per-epoch figure of a translator: one test slice of each scanner (columns), translated to each of
    the graph's targets (rows)."""
    first = [int(np.flatnonzero(scanner.cpu().numpy() == sid)[0]) for sid in scanner.unique().tolist()]
    x = images[first[:PREVIEW_COLUMNS]].float().unsqueeze(1)
    rows = [("input", x[:, 0].cpu().numpy())]
    for sid in graph.targets:
        target = torch.full((len(x),), sid, dtype=torch.long, device=x.device)
        rows.append((f"to {vocabulary.names[sid]}", graph(x, target)[:, 0].cpu().numpy()))
    return rows, "translations (a test slice of each scanner, to each scanner)"


class StarGANFamily(DCGANFamily):
    name = "stargan"
    title = "StarGAN translator"
    Config = StarGANConfig
    kind = "translator"
    patch = True
    player_losses = ("generator", "discriminator", "cycle", "identity")

    def build(self, config: StarGANConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]) -> nn.Module:
        return TranslatorPlayers(config, len(vocabulary))

    def noise_dim(self, config: StarGANConfig) -> int:
        return 1  # the draw of each slice's target scanner

    def targets(self, model: nn.Module) -> list[int]:
        """The scanner ids the translator translates to."""
        return list(range(model.generator.n_scanners))

    def asked(self, step: Step) -> torch.Tensor:
        """Each slice's target: uniform over the scanners other than its own (from the step's noise, so that a
        resumed run draws the same targets)."""
        k = step.accelerator.unwrap_model(step.model).generator.n_scanners
        offset = 1 + torch.clamp((uniform_from_normal(step.noise[:, 0].float()) * (k - 1)).long(), max=k - 2)
        return (step.scanner + offset) % k

    def generate(self, players: TranslatorPlayers, step: Step) -> dict[str, torch.Tensor]:
        return {"fake": players.generator(step.images.unsqueeze(1).float(), self.asked(step))}

    def generator_loss(self, players: TranslatorPlayers, step: Step, made: dict[str, torch.Tensor],
                       fake: DiscriminatorOutput) -> dict[str, torch.Tensor]:
        terms = super().generator_loss(players, step, made, fake)
        real = step.images.unsqueeze(1).float()
        with step.autocast():
            back = players.generator(made["fake"], step.scanner)
            same = players.generator(real, step.scanner)
        cycle, identity = (back.float() - real).abs().mean(), (same.float() - real).abs().mean()
        config = step.config
        generator = terms["generator"] + config.cycle_weight * cycle + config.identity_weight * identity
        return {"generator": generator, "cycle": cycle, "identity": identity}

    def export_graph(self, model: TranslatorPlayers) -> TranslatorGraph:
        return TranslatorGraph(model.generator, self.targets(model))

    @torch.no_grad()
    def preview(self, model: TranslatorPlayers, images: torch.Tensor, scanner: torch.Tensor, vocabulary: Vocabulary,
                level: torch.Tensor | None = None) -> tuple[list[tuple[str, np.ndarray]], str]:
        return translation_preview(self.export_graph(model), images, scanner, vocabulary)

    def flops_per_image(self, model: TranslatorPlayers) -> int:
        """Training FLOPs per image, approximately: forward + backward (x3) of the translator three times
        (translation, cycle, identity) and of the discriminator three times (as for the DCGAN)."""
        x, s = torch.zeros(1, 1, *model.discriminator.size), torch.zeros(1, dtype=torch.long)
        g = multiply_accumulates(model.generator, x, s)
        d = multiply_accumulates(model.discriminator, x, s)
        return 6 * (3 * g + 3 * d)


FAMILY = StarGANFamily()
