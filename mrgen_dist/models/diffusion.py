"""Conditional diffusion in pixel space with classifier-free guidance on the scanner (family `diffusion`).

Why pixel space: the acquisition noise and texture that carry much of a scanner's signature are what latent
autoencoders smooth away (reported for brain latent diffusion, arXiv 2507.18830); a pixel-space denoiser models
them directly.

Training: a slice x in [0, 1] is mapped to x0 = 2 x - 1, a timestep t ~ U{0 .. T-1} and eps ~ N(0, I) give
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (a_t: alpha_bar of the schedule in mrgen_dist/runtime/diffusion.py,
the one the sampler uses), and the UNet (mrgen_dist/models/parts/unet.py) is fitted by the mean squared error
to v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (`prediction: v`, why: runtime/diffusion.py) or to eps. With
probability `label_dropout` the scanner is replaced by the null label (id = number of scanners), so one
network is both the conditional and the unconditional model that guidance combines. Every random number
of a step (eps, t, the label drop) comes from the loop's `step.noise` (size[0] * size[1] + 2 numbers per
image: eps on the padded map, cropped to the slice, and two numbers turned into uniforms), so a resumed run
makes the same steps as an uninterrupted one.

EMA: after every optimizer step the `ema` copy of the UNet moves toward the weights,
ema <- d ema + (1 - d) w with d = min(ema_decay, (1 + n) / (10 + n)) after n updates (the warm-up keeps a
short run's average from being mostly its initialisation). The copy is a submodule whose parameters do not
require grad, and the update count a buffer: both are in the model's state_dict, so checkpoints, resume and
model.safetensors carry them. The export and the preview use the EMA weights. The EMA is kept in the weights'
dtype: train with bf16 autocast over float32 weights (DDP); under DeepSpeed bf16 the weights, and so the EMA,
are bf16, whose resolution (2**-8) is coarser than a 0.999-decay update.

With `block_means` f > 1 the model draws the slices' f x f block means (runtime/block_grid.py: the slice
edge-padded, centred; 109 x 91 at f = 2 on 218 x 182), the coarse stage of a cascade (Ho et al. 2021) whose
refiner (models/refiner.py, `condition_block` f) draws the detail: its UNet, x_T and the exported graph work on
that grid, and the runtime hands each draw over with every block repeated f x f, so that `mrgen-sample` and
`mrgen-fid` see slices of the store's shape.

With `level_condition` the slice's axial level (parts/level.py) is a condition beside the scanner, added to
the UNet's embedding; guidance drops the scanner, never the level, so that it steers the scanner at the level
asked for.

Export: the EMA UNet as the `mrgen-denoiser` graph (x, t, scanner[, level]) -> prediction, with the sampler's settings
(`sampler`: DDIM, DPM-Solver++(2M) or ancestral DDIM, `sample_steps`, `guidance`, the schedule) in the file's
`mrgen.sampler`; `mrgen-sample` runs the guided loop around it with numpy and onnxruntime (runtime/diffusion.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mrgen_dist.models.base import PREVIEW_COLUMNS, DenoiserGraph, Family, ModelConfig, ModelSpace, Step
from mrgen_dist.models.parts.adversarial import uniform_from_normal
from mrgen_dist.models.parts.blocks import BlockMeans
from mrgen_dist.models.parts.networks import multiply_accumulates
from mrgen_dist.models.parts.unet import ConditionalUNet
from mrgen_dist.runtime.block_grid import block_means, grid_shape
from mrgen_dist.runtime.diffusion import (
    PREDICTIONS,
    SCHEDULES,
    SOLVERS,
    VARIANCES,
    SamplerSettings,
    alphas_cumprod,
    sample,
    sample_timesteps,
    to_slices,
)
from mrgen_dist.scanners import Vocabulary

#: Updates after which the EMA's warm-up decay (1 + n) / (10 + n) reaches 0.9.
EMA_WARMUP = 10


@dataclass
class DiffusionConfig(ModelConfig):
    family: str = "diffusion"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # UNet channels per level
    size: list[int] = field(default_factory=lambda: [224, 192])  # the slices centre-padded to it in the UNet
    patch: int = 1  # pixels folded into channels per side before the UNet's first level (parts/unet.py)
    blocks: int = 1  # residual blocks per level
    attention: int = 1  # how many of the lowest levels have self-attention (0: none)
    schedule: str = "cosine"  # cosine | linear
    prediction: str = "v"  # v | eps
    timesteps: int = 1000  # T
    label_dropout: float = 0.15  # probability of the null label in training (classifier-free guidance)
    ema_decay: float = 0.999
    sampler: str = "ddim"  # the exported sampler: ddim | dpmpp2m (DPM-Solver++(2M)) | ancestral (runtime/diffusion.py)
    sample_steps: int = 50  # its steps
    spacing: str = "trailing"  # of its timesteps: trailing | quadratic (dense at low noise; runtime/diffusion.py)
    guidance: float = 3.0  # classifier-free guidance scale w of the exported sampler (1: conditional only)
    # the ancestral sampler's step variance: posterior | calibrated (plus the network's own error of x0, measured
    # on training slices at export: runtime/diffusion.py)
    variance: str = "posterior"
    level_condition: bool = False  # the slice's axial level is a condition too (parts/level.py); never dropped
    # the model draws the slices' block_means x block_means block means, a cascade's coarse stage (module doc);
    # model.size then holds that grid (e.g. [112, 96] for 109 x 91). 1: the slices themselves.
    block_means: int = 1

    def validate(self) -> None:
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"model.widths must be a non-empty list of numbers >= 1, got {self.widths}")
        if self.patch < 1:
            raise ValueError(f"model.patch must be >= 1, got {self.patch}")
        multiple = self.patch * 2 ** (len(self.widths) - 1)
        if len(self.size) != 2 or any(s % multiple or s < 1 for s in self.size):
            raise ValueError(f"model.size {self.size} must be two sizes divisible by {multiple}: model.patch "
                             f"{self.patch} divides them, then the UNet halves them {len(self.widths) - 1} times "
                             "(model.widths)")
        if self.blocks < 1:
            raise ValueError(f"model.blocks must be >= 1, got {self.blocks}")
        if self.block_means < 1:
            raise ValueError(f"model.block_means must be >= 1, got {self.block_means}")
        if not 0 <= self.attention <= len(self.widths):
            raise ValueError(f"model.attention must be in 0 .. {len(self.widths)} (levels), got {self.attention}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"model.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.timesteps < 2:
            raise ValueError(f"model.timesteps must be >= 2, got {self.timesteps}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"model.label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"model.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.sampler not in SOLVERS:
            raise ValueError(f"model.sampler must be one of {', '.join(SOLVERS)}, got {self.sampler!r}")
        if not 1 <= self.sample_steps <= self.timesteps:
            raise ValueError(f"model.sample_steps must be in 1 .. model.timesteps ({self.timesteps}), got "
                             f"{self.sample_steps}")
        try:
            sample_timesteps(self.timesteps, self.sample_steps, self.spacing)
        except ValueError as e:
            raise ValueError(f"model.spacing: {e}") from None
        if self.variance not in VARIANCES:
            raise ValueError(f"model.variance must be one of {', '.join(VARIANCES)}, got {self.variance!r}")
        if self.variance == "calibrated" and self.sampler != "ancestral":
            raise ValueError(f"model.variance=calibrated is the ancestral sampler's step variance; model.sampler is "
                             f"{self.sampler!r}: set model.sampler=ancestral or model.variance=posterior")
        if self.variance == "calibrated" and self.level_condition:
            raise ValueError("model.variance=calibrated measures the network's error without the slice level: not "
                             "with model.level_condition")
        if self.guidance < 0:
            raise ValueError(f"model.guidance must be >= 0, got {self.guidance}")
        if self.guidance != 1 and self.label_dropout == 0:
            raise ValueError("model.guidance other than 1 needs model.label_dropout > 0: guidance combines the "
                             "unconditional model, which only the dropped labels train")

    def validate_shape(self, image_shape: tuple[int, int]) -> None:
        drawn = grid_shape(image_shape, self.block_means)
        if self.size[0] < drawn[0] or self.size[1] < drawn[1]:
            what = "the store's slices" if self.block_means == 1 else \
                f"the {self.block_means} x {self.block_means} block means of the store's slices"
            raise ValueError(f"model.size {self.size} is smaller than {what} {list(drawn)}: the UNet works on "
                             "them centre-padded to it, never cropped")

    def settings(self, n_scanners: int, clip: bool = True) -> SamplerSettings:
        """The exported sampler's settings (`clip`: x0 clipped to the model space [-1, 1] at every step)."""
        return SamplerSettings(self.sample_steps, float(self.guidance), self.prediction, self.schedule,
                               self.timesteps, n_scanners, self.sampler, self.spacing, clip, self.variance)


def sampler_title(settings: SamplerSettings) -> str:
    """How a preview was sampled, for its title; a calibrated variance not measured yet (the export measures
    it) is drawn as the posterior one, and the title says so."""
    solver = {"ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)", "ancestral": "ancestral"}[settings.name]
    variance = ", posterior variance until export calibrates it" if settings.variance == "calibrated" \
        and not settings.x0_error else ""
    return f"{solver} {settings.steps} steps, guidance {settings.guidance:g}{variance}"


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the EMA's update after `updates` earlier ones: `decay`, less during the warm-up."""
    return min(decay, (1 + updates) / (EMA_WARMUP + updates))


class Diffusion(nn.Module):
    """The UNet that trains (`net`), its EMA copy (`ema`, no gradients) and the schedule (a buffer of the
    run's weights, float32 alpha_bar); `forward` is the training network's prediction. `drawn_shape` is what
    the UNet draws: the slices' shape, or that of their block means (`block_means`, the operator)."""

    def __init__(self, config: DiffusionConfig, n_scanners: int, image_shape: tuple[int, int]) -> None:
        super().__init__()
        self.n_scanners, self.image_shape = n_scanners, tuple(image_shape)
        self.drawn_shape = grid_shape(self.image_shape, config.block_means)
        self.block_means = BlockMeans(self.image_shape, config.block_means)
        self.net = self.build_net(config, n_scanners, self.drawn_shape)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.register_buffer("alphas_cumprod", torch.from_numpy(
            alphas_cumprod(config.schedule, config.timesteps)).float())
        self.register_buffer("ema_updates", torch.zeros(()))  # float32: exact up to 2**24 updates
        self.settings = config.settings(n_scanners)
        self.ema_target = config.ema_decay

    def build_net(self, config: DiffusionConfig, n_scanners: int, image_shape: tuple[int, int]) -> ConditionalUNet:
        """The UNet that trains (labels: the scanners and the null label)."""
        return ConditionalUNet(image_shape, n_scanners + 1, config.widths, config.blocks, config.attention,
                               tuple(config.size), config.patch, config.level_condition)

    @property
    def null_label(self) -> int:
        return self.n_scanners

    def forward(self, x: torch.Tensor, t: torch.Tensor, scanner: torch.Tensor, level: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.net(x, t, scanner, level)

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- d ema + (1 - d) net, d = ema_decay(ema_decay, updates so far)."""
        d = ema_decay(self.ema_target, int(self.ema_updates.item()))
        for e, p in zip(self.ema.parameters(), self.net.parameters(), strict=True):
            e.lerp_(p.detach().to(e.dtype), 1 - d)
        for e, b in zip(self.ema.buffers(), self.net.buffers(), strict=True):
            e.copy_(b)
        self.ema_updates += 1


class Denoiser(DenoiserGraph):
    """The EMA UNet under the `mrgen-denoiser` contract, computed in its own dtype, float32 out; x is of the
    model's `drawn_shape` (the slices', or their block means'), which the file's `mrgen.sampler` `block_means`
    says (absent: 1)."""

    def __init__(self, model: Diffusion) -> None:
        super().__init__()
        self.unet = model.ema
        self.timesteps = model.settings.timesteps
        self.use_sampler(model.settings)
        self.image_shape, self.drawn_shape, self.factor = model.image_shape, model.drawn_shape, model.block_means.factor
        self.latent = self.drawn_shape[0] * self.drawn_shape[1]
        self.level_condition = model.ema.level_condition

    def forward(self, x: torch.Tensor, t: torch.Tensor, scanner: torch.Tensor, level: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.unet(x, t, scanner, level).float()

    def example_inputs(self, batch: int, rng: np.random.Generator, n_scanners: int, image_shape: tuple[int, int]
                       ) -> dict[str, np.ndarray]:
        """The contract's inputs (DenoiserGraph) with x of the drawn shape."""
        return super().example_inputs(batch, rng, n_scanners, self.drawn_shape)

    def sampler_metadata(self) -> dict:
        return {**self.settings, "block_means": self.factor} if self.factor > 1 else dict(self.settings)

    def model_space(self, images: np.ndarray) -> ModelSpace:
        """The slices' block means (the slices at factor 1) mapped to [-1, 1], and the graph as the denoise; no
        low-pass level (the loop draws the whole image)."""
        return ModelSpace((2 * block_means(images, self.factor) - 1)[:, None], graph_denoise(self), None)


def graph_denoise(graph: nn.Module) -> Callable[..., np.ndarray]:
    """A denoiser graph as the runtime's `Denoise`: numpy in, float32 numpy out, on the graph's device."""
    device = next(graph.parameters()).device

    def denoise(x: np.ndarray, t: np.ndarray, s: np.ndarray, *condition: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            inputs = (torch.from_numpy(a).to(device) for a in (x, t, s, *condition))
            return graph(*inputs).float().cpu().numpy()

    return denoise


def draw_slices(graph: Denoiser, x_t: np.ndarray, scanner: np.ndarray, levels: np.ndarray | None = None
                ) -> np.ndarray:
    """Slices (B, H, W) in [0, 1] of the store's shape drawn by the runtime's sampling loop around `graph` from
    x_T (B, 1, h, w) of its drawn shape, for labels `scanner` (B,): block means handed over with each block
    repeated, as the runtime hands them over (runtime/diffusion.py DiffusionDraw)."""
    return to_slices(sample(graph_denoise(graph), x_t, scanner, graph.sampler_settings, levels), graph.image_shape,
                     graph.factor)


def split_noise(noise: torch.Tensor, size: tuple[int, int], image_shape: tuple[int, int], timesteps: int,
                dropout: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loop's noise (B, size[0] * size[1] + 2) -> eps (B, 1, H, W) (the top left of the map), t int64 (B,)
    uniform over 0 .. T-1, and whether each label is dropped (B,) bool, with probability `dropout`."""
    n = size[0] * size[1]
    eps = noise[:, :n].float().reshape(-1, 1, *size)[:, :, : image_shape[0], : image_shape[1]]
    u = uniform_from_normal(noise[:, n : n + 2].float())
    t = (u[:, 0] * timesteps).long().clamp(0, timesteps - 1)
    return eps, t, u[:, 1] < dropout


def targets(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and the network's target (v or eps), float32, for alpha_bar `a` (B,)."""
    sa, sb = a.sqrt()[:, None, None, None], (1 - a).sqrt()[:, None, None, None]
    x_t = sa * x0 + sb * eps
    return x_t, (sa * eps - sb * x0) if prediction == "v" else eps


class DiffusionFamily(Family):
    name = "diffusion"
    title = "diffusion"
    Config = DiffusionConfig
    kind = "diffusion"
    loss_names = ("loss",)

    def build(self, config: DiffusionConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]) -> Diffusion:
        return Diffusion(config, len(vocabulary), image_shape)

    def noise_dim(self, config: DiffusionConfig) -> int:
        """eps on a map of `size` (cropped to the slice: noise_dim knows only the config), then one number for
        t and one for the label drop: the loop draws all of a step's randomness."""
        return config.size[0] * config.size[1] + 2

    def optimizers(self, model: Diffusion, make: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
                   ) -> dict[str, torch.optim.Optimizer]:
        return {"model": make(model.net.parameters())}

    def losses(self, step: Step) -> dict[str, torch.Tensor]:
        config: DiffusionConfig = step.config
        model: Diffusion = step.accelerator.unwrap_model(step.model)
        eps, t, drop = split_noise(step.noise, tuple(config.size), model.drawn_shape, config.timesteps,
                                   config.label_dropout)
        x0 = 2 * model.block_means(step.images.float()[:, None]) - 1
        x_t, target = targets(x0, eps, model.alphas_cumprod.float()[t], config.prediction)
        scanner = torch.where(drop, torch.full_like(step.scanner, model.null_label), step.scanner)
        with step.autocast():
            out = step.model(x_t.to(step.images.dtype), t.float(), scanner, *step.condition_level())
        return {"loss": F.mse_loss(out.float(), target)}

    def train_step(self, step: Step) -> dict[str, torch.Tensor]:
        losses = super().train_step(step)
        if step.accelerator.sync_gradients:
            step.accelerator.unwrap_model(step.model).update_ema()
        return losses

    def export_graph(self, model: Diffusion) -> Denoiser:
        return Denoiser(model)

    @torch.no_grad()
    def preview(self, model: Diffusion, images: torch.Tensor, scanner: torch.Tensor, vocabulary: Vocabulary,
                level: torch.Tensor | None = None) -> tuple[list[tuple[str, np.ndarray]], str]:
        """Samples of each scanner from the same x_T in every row (at `level`'s first level, for a
        level-conditioned model): the EMA UNet in the runtime's sampling loop (`draw_slices`)."""
        graph = Denoiser(model).eval()
        settings = model.settings
        x_t = np.random.default_rng(1234).standard_normal((PREVIEW_COLUMNS, 1, *model.drawn_shape), dtype=np.float32)
        levels = np.full(PREVIEW_COLUMNS, int(level[0]), np.int64) if graph.level_condition else None
        rows = [(name, draw_slices(graph, x_t, np.full(PREVIEW_COLUMNS, sid, np.int64), levels))
                for sid, name in enumerate(vocabulary.names)]
        return rows, f"samples (same x_T in every row; {sampler_title(settings)})"

    def flops_per_image(self, model: Diffusion) -> int:
        """6 x the UNet's multiply-accumulates of one forward (forward + backward), convolutions and linear
        layers (attention's products not counted)."""
        x = torch.zeros(1, 1, *model.drawn_shape)
        label = torch.zeros(1, dtype=torch.long)
        level = (label,) if model.net.level_condition else ()
        return 6 * multiply_accumulates(model.net, x, torch.zeros(1), label, *level)


FAMILY = DiffusionFamily()
