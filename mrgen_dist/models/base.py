"""The model-family interface: what the training loop, the exporter and the sampler need of a family.

A family supplies
  * `Config`: its dataclass of the `model:` section of a run config (a subclass of `ModelConfig`);
  * `build(config, vocabulary, image_shape)`: the trainable module (all of its networks);
  * `optimizers(model, make)`: named optimizers (one for a VAE; generator and discriminator for a GAN);
  * `train_step(step)`: one micro-step, returning the named losses of `reported_losses(config)` (the first is
    the one reported as the run's loss); the default does one objective with one optimizer;
  * `losses(step)`: the named losses of the step's batch (train and test);
  * `noise_dim(config)`: how many N(0, 1) numbers per image the loop draws for a step (seeded by seed, rank
    and micro-step so that a resumed run draws what an uninterrupted one draws);
  * `export_graph(model)`: the exportable module of its `contract` (export/README.md): `(z, scanner) -> image`
    for `mrgen-decoder` (a `SamplingGraph`; any learned prior lives inside it; a graph with `has_noise` also
    gives its learned observation noise, `noise_sigma(scanner)`), or `(image, target scanner) -> image` for
    `mrgen-translator` (a `TranslationGraph`), or `(x_t, t, scanner) -> prediction` for `mrgen-denoiser` (a
    `DenoiserGraph`, whose `sampler_metadata()` says how to sample it);
  * `preview(model, images, scanner, vocabulary)`: the grid of the per-epoch figure (samples, translations);
  * `encode_mean(model, images, scanner, level)`: posterior means in the sampling graph's z space, for the
    diagnostics (z-probe, reconstructions); None for a family without an encoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from mrgen_dist.artifacts import ModelMetadata
from mrgen_dist.models.parts.level import AXIAL_LEVELS
from mrgen_dist.runtime.diffusion import SamplerSettings
from mrgen_dist.scanners import Vocabulary


@dataclass
class ModelConfig:
    """The `model:` section's common part; each family subclasses it with its own fields."""

    family: str = "cvae"

    def validate(self) -> None:
        """Raise ValueError naming the field (as `model.<field>`) when a value cannot be used."""

    def validate_shape(self, image_shape: tuple[int, int]) -> None:
        """Raise ValueError naming the field when the model cannot make slices of the store's `image_shape`."""

    def validate_data(self, vocabulary: Vocabulary, trained: list[str]) -> None:
        """Raise ValueError naming the field when the model does not fit the store's `vocabulary` or the
        scanners the run trains on (`trained`: data.scanners, or every scanner)."""

    def require_every_scanner(self, vocabulary: Vocabulary, trained: list[str], alternative: str = "") -> None:
        """For a translator between all the store's scanners: a ValueError unless the run trains on every one
        (`alternative`: what else to use, appended to the message)."""
        if set(trained) != set(vocabulary.names):
            raise ValueError(f"model.family {self.family} translates between every scanner of the store; train it "
                             f"on all of them (leave data.scanners empty){alternative}")


@dataclass
class Step:
    """What a family's training step works with: the prepared model and optimizers, one micro-batch and its
    noise, and the Accelerator (for `accumulate`, `autocast`, `backward`, gradient clipping)."""

    accelerator: Any
    config: ModelConfig
    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]  # empty when evaluating
    images: torch.Tensor  # (B, H, W) in [0, 1]
    scanner: torch.Tensor  # int64 (B,)
    noise: torch.Tensor  # float32 (B, noise_dim)
    grad_clip: float = 0.0
    index: int = 0  # the run's micro-step number (the same after a resume): for players that take turns
    level: torch.Tensor | None = None  # int64 (B,): each slice's axial index on the MNI grid

    def condition_level(self) -> tuple[torch.Tensor, ...]:
        """The extra model input of a family conditioned on the slice's level (`model.level_condition`, which
        only the families that take it have): (level,), or () without it."""
        return (self.level,) if getattr(self.config, "level_condition", False) else ()

    def autocast(self) -> AbstractContextManager:
        return self.accelerator.autocast()


class PlainAccelerator:
    """What a family's step uses of an Accelerator, done with plain torch calls in one process: a family's
    `train_step` runs on it without Accelerate (the bare PyTorch step of benchmarks/train.py; tests)."""

    num_processes = 1
    sync_gradients = True

    def __init__(self, autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
        self.autocast = autocast  # e.g. lambda: torch.autocast("cuda", torch.bfloat16)

    def accumulate(self, model: nn.Module) -> AbstractContextManager:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters: Iterator[nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """No loss scaling here, so nothing to undo."""

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model


class ExportGraph(nn.Module):
    """What a family exports (`Family.export_graph`): a module of its kind's contract, which says the exporter's
    inputs, outputs and metadata, so that the exporter needs no knowledge of the kinds."""

    latent: int = 0  # the z size of a decoder; 0 for a translator
    level_condition: bool = False  # whether the graph takes the slices' axial levels (input `level`, int64 [B])
    has_noise: bool = False
    noise_kind: str = ""

    def example_inputs(self, batch: int, rng: np.random.Generator, n_scanners: int, image_shape: tuple[int, int]
                       ) -> dict[str, np.ndarray]:
        """Inputs of the contract, by name, for the export trace and the parity check."""
        raise NotImplementedError

    def output_names(self) -> list[str]:
        raise NotImplementedError

    def example_levels(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """{"level": axial indices over the whole grid} for a level-conditioned graph; {} otherwise."""
        if not self.level_condition:
            return {}
        return {"level": rng.integers(0, AXIAL_LEVELS, batch).astype(np.int64)}

    def target_names(self, vocabulary: list[str]) -> list[str] | None:
        """The scanners a translator translates to (metadata `mrgen.targets`); None for a decoder."""
        return None

    def noise_sigma(self, scanner: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no learned observation noise")

    def noise_texture(self) -> dict:
        """The per-scanner shape of "chi" noise (metadata `mrgen.noise_texture`, a runtime.noise.NoiseTexture);
        {} for the other kinds."""
        return {}

    def sampler_metadata(self) -> dict:
        """How a runtime samples the file (metadata `mrgen.sampler`): a denoiser's DDIM settings; {} otherwise."""
        return {}


class SamplingGraph(ExportGraph):
    """The `mrgen-decoder` contract: (z float32 [B, latent], scanner int64 [B]) -> image float32 [B, 1, H, W];
    a `level_condition` graph takes a third input, `level` int64 [B], each slice's axial index on the grid.

    A graph with `has_noise` also gives `noise_sigma(scanner)`, float32 [B, 1, H, W]: the standard deviation of
    the learned observation noise around the image (exported as the second output `sigma`), drawn as
    `noise_kind` says (ModelMetadata.NOISE_KINDS): additive Gaussian, or the Rician magnitude of a complex
    Gaussian around the image."""

    latent: int

    def example_inputs(self, batch: int, rng: np.random.Generator, n_scanners: int, image_shape: tuple[int, int]
                       ) -> dict[str, np.ndarray]:
        """Prior draws, and every scanner in turn (and levels over the grid, for a level-conditioned graph)."""
        return {"z": rng.standard_normal((batch, self.latent), dtype=np.float32),
                "scanner": np.arange(batch, dtype=np.int64) % n_scanners, **self.example_levels(batch, rng)}

    def output_names(self) -> list[str]:
        return ["image", "sigma"] if self.has_noise else ["image"]


class TranslationGraph(ExportGraph):
    """The `mrgen-translator` contract: (image float32 [B, 1, H, W] in [0, 1], scanner int64 [B], the target
    scanner of each image) -> image float32 [B, 1, H, W] in [0, 1]. `targets` are the scanner ids it can
    translate to (all of them, or a CycleGAN's pair)."""

    targets: list[int]

    def example_inputs(self, batch: int, rng: np.random.Generator, n_scanners: int, image_shape: tuple[int, int]
                       ) -> dict[str, np.ndarray]:
        """Random images, and every target in turn."""
        return {"image": rng.random((batch, 1, *image_shape), dtype=np.float32),
                "scanner": np.asarray(self.targets, dtype=np.int64)[np.arange(batch) % len(self.targets)]}

    def output_names(self) -> list[str]:
        return ["translated"]

    def target_names(self, vocabulary: list[str]) -> list[str] | None:
        return [vocabulary[i] for i in self.targets]


class ModelSpace(NamedTuple):
    """Slices as a denoiser graph draws them, for measuring its error (mrgen_dist.export.calibration)."""

    x0: np.ndarray  # (B, 1, h, w) float32: what the graph draws for the slices, in the model's space
    denoise: Callable[..., np.ndarray]  # the graph on those slices as the sampler's denoise (x, t, scanner) -> out
    low_pass: np.ndarray | None  # (B, 1, h, w): the level the sampler is given, not drawn (a refiner's), or None


class DenoiserGraph(ExportGraph):
    """The `mrgen-denoiser` contract: (x float32 [B, 1, H, W], the noisy slice in the model's space, t float32
    [B], the timestep in [0, T), scanner int64 [B], a scanner id or the null label `n_scanners`) -> out float32
    [B, 1, H, W], the network's prediction (v or eps, as `sampler_metadata()` says); a `level_condition` graph
    takes a fourth input, `level` int64 [B] (the axial index, never dropped by guidance). Its latent is x_T, H * W
    numbers; `mrgen-sample` runs the DDIM loop of mrgen_dist/runtime/diffusion.py around it."""

    timesteps: int
    settings: dict  # sampler_settings as the file's metadata
    sampler_settings: SamplerSettings

    def use_sampler(self, settings: SamplerSettings) -> None:
        """Sample the graph (its file, its previews) with `settings`: the export's calibrated variance."""
        self.sampler_settings, self.settings = settings, settings.to_metadata()

    def example_inputs(self, batch: int, rng: np.random.Generator, n_scanners: int, image_shape: tuple[int, int]
                       ) -> dict[str, np.ndarray]:
        """Noise, timesteps over [0, T), and every label in turn, the null label included (and levels over the
        grid, for a level-conditioned graph)."""
        return {"x": rng.standard_normal((batch, 1, *image_shape), dtype=np.float32),
                "t": rng.integers(0, self.timesteps, batch).astype(np.float32),
                "scanner": np.arange(batch, dtype=np.int64) % (n_scanners + 1), **self.example_levels(batch, rng)}

    def output_names(self) -> list[str]:
        return ["out"]

    def sampler_metadata(self) -> dict:
        return dict(self.settings)

    def model_space(self, images: np.ndarray) -> ModelSpace:
        """Slices (B, H, W) in [0, 1] as the graph draws them: what the sampler's variance is calibrated on."""
        raise NotImplementedError


#: The kinds of family, and the contract of the file each exports (what `mrgen-sample` / `mrgen-translate` run).
KINDS = {"decoder": ModelMetadata.DECODER, "translator": ModelMetadata.TRANSLATOR,
         "diffusion": ModelMetadata.DENOISER, "refiner": ModelMetadata.REFINER}

#: Columns of the per-epoch figure.
PREVIEW_COLUMNS = 6


class Family(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[ModelConfig]]
    loss_names: ClassVar[tuple[str, ...]]
    kind: ClassVar[str] = "decoder"  # what it exports: "decoder" ((z, scanner) -> image), "translator", "diffusion"
    # or "refiner" (KINDS)
    title: ClassVar[str] = ""  # how logs and plots name the family, e.g. "cVAE"
    accumulates: ClassVar[bool] = True  # whether train_step supports gradient accumulation (train.grad_accum > 1)

    @abstractmethod
    def build(self, config: ModelConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]) -> nn.Module: ...

    @property
    def contract(self) -> str:
        """The exported file's contract (export/README.md), from the family's kind."""
        return KINDS[self.kind]

    def connect(self, model: nn.Module, load_run: Callable[[str], tuple[Family, nn.Module, Any]]) -> None:
        """Give a built model the way to load another finished run by its folder (`runs.load_trained`: its
        family, trained model and record), for a family that learns from one (a teacher) or builds on one (the
        refiner's coarse generator); models live below the run reader, so it is handed down. Most families need
        none."""
        return None

    @abstractmethod
    def noise_dim(self, config: ModelConfig) -> int: ...

    @abstractmethod
    def losses(self, step: Step) -> dict[str, torch.Tensor]:
        """The named losses of `step`'s batch (in training and, under no_grad in eval mode, on the test split)."""

    @abstractmethod
    def export_graph(self, model: nn.Module) -> SamplingGraph | TranslationGraph | DenoiserGraph: ...

    @torch.no_grad()
    def preview(self, model: nn.Module, images: torch.Tensor, scanner: torch.Tensor, vocabulary: Vocabulary,
                level: torch.Tensor | None = None) -> tuple[list[tuple[str, np.ndarray]], str]:
        """The rows (name, images (n, H, W)) of the per-epoch figure and what it shows; here samples of
        each scanner, from the same z in every row (`images`, the test split, are for translators; `level`,
        their axial levels, whose first a level-conditioned graph is asked for)."""
        graph = self.export_graph(model)
        device = images.device
        z = torch.randn(PREVIEW_COLUMNS, graph.latent, generator=torch.Generator().manual_seed(1234)).to(device)
        levels = (level[:1].expand(PREVIEW_COLUMNS),) if graph.level_condition else ()
        rows = []
        for sid, name in enumerate(vocabulary.names):
            s = torch.full((PREVIEW_COLUMNS,), sid, dtype=torch.long, device=device)
            rows.append((name, graph(z, s, *levels)[:, 0].float().cpu().numpy()))
        return rows, "samples (same z in every row)"

    def reported_losses(self, config: ModelConfig) -> tuple[str, ...]:
        """The names `losses` and `train_step` return for this config (logged, plotted, checkpointed)."""
        return self.loss_names

    def encode_mean(self, model: nn.Module, images: torch.Tensor, scanner: torch.Tensor,
                    level: torch.Tensor | None = None) -> torch.Tensor | None:
        """Posterior means of `images` (B, H, W) at axial `level` in the z space of `export_graph`, or None
        without an encoder."""
        return None

    def refine_real(self, model: nn.Module, images: torch.Tensor, scanner: torch.Tensor, seed: int = 0
                    ) -> np.ndarray | None:
        """What the family makes of real slices (n, H, W) in a coarse generator's place, (n, H, W) in [0, 1], or
        None for a family that refines no other generator's slices (the refiner's ceiling; models/refiner.py)."""
        return None

    def optimizers(self, model: nn.Module, make: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
                   ) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers; `make(params)` builds the run's configured optimizer. Default: one for everything."""
        return {"model": make(model.parameters())}

    def train_step(self, step: Step) -> dict[str, torch.Tensor]:
        """One micro-step of one objective, `loss_names[0]`, with the one optimizer (an optimizer step when
        gradients sync). Families with several players override this."""
        acc, model = step.accelerator, step.model
        (optimizer,) = step.optimizers.values()
        with acc.accumulate(model):
            losses = self.losses(step)
            acc.backward(losses[self.loss_names[0]])
            if acc.sync_gradients and step.grad_clip > 0:
                acc.clip_grad_norm_(model.parameters(), step.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in losses.items()}

    def flops_per_image(self, model: nn.Module) -> int:
        """Training FLOPs per image for MFU: 2 per multiply-accumulate forward, x3 for forward + backward,
        counted over Linear layers (families with convolutions override it)."""
        macs = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
        return 6 * macs
