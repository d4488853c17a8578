"""A local diffusion model of the fine band over a coarse generator's slices (family `refiner`).

Why: on the physics cohort the component-swap probe (docs/results/cohorts.md) found the atlas cVAE's slices
passing for real in the background, the head's rim and the interior's coarse band, and failing in the
interior's fine band (below about 2 pixels: sulcal detail and the acquisition's noise texture), which is what
tells the two Philips sites apart. A whole-slice diffusion model (family `diffusion`) would learn that band too,
but needs 1e5 steps; the fine band given the coarse slice is local, so a small fully convolutional UNet trained
on crops learns it in minutes on a CPU. The cascade is DiffuseVAE's (Pandey et al. 2022: a VAE's slice refined
by a diffusion model conditioned on it) and SR3's (Saharia et al. 2021: diffusion of the detail below a
low-pass).

Training (no coarse model involved): each slice x is split into its Gaussian low-pass c = G_band * x (of x seen
at the grid of `condition_block`'s block means, parts/blocks.py, when a cascade's coarse stage draws those) and
the fine band r = (x - c) / scale; the conditional UNet (parts/unet.py, crop-trained, condition channels: 2 c - 1
and the pixel's coordinates on the slice, so that a position-dependent noise level can be learned) is fitted
to r's diffusion (v or eps, the `diffusion` family's targets and schedule) on random `crop` x `crop` windows,
with the scanner dropped to the null label with probability `label_dropout` for classifier-free guidance, and
an EMA copy. All of a step's random numbers come from one generator seeded by the loop's noise, so a resumed
run makes the same steps.

Sampling: the coarse run makes its slice for (z, scanner): a decoder's (`coarse_slice`: its mean slice, a draw
of its learned noise around it, or that draw's mean; runtime/refine.py), or, in a cascade, a diffusion run's
draw of block means from its own x_T, repeated per block. Its low-pass is c, and the sampler (models/diffusion.py's
settings; the ancestral one by default, runtime/diffusion.py) draws r from x_T; the slice is clip(c + scale r,
0, 1). Export: the EMA UNet with the low-pass as the `mrgen-refiner` graph (x, t, scanner, coarse) -> (out,
base = c), and the coarse run's file beside it (export/README.md); the sampler's latent is the coarse run's
(z, or its x_T) followed by x_T.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mrgen_dist.artifacts import RunRecord
from mrgen_dist.models.atlas import gaussian_blur
from mrgen_dist.models.base import PREVIEW_COLUMNS, DenoiserGraph, ModelSpace, SamplingGraph, Step
from mrgen_dist.models.diffusion import (
    Denoiser,
    Diffusion,
    DiffusionConfig,
    DiffusionFamily,
    draw_slices,
    sampler_title,
    targets,
)
from mrgen_dist.models.parts.adversarial import uniform_from_normal
from mrgen_dist.models.parts.blocks import CoarseGrid
from mrgen_dist.models.parts.networks import multiply_accumulates
from mrgen_dist.models.parts.unet import NORMS, ConditionalUNet
from mrgen_dist.models.parts.windows import random_windows
from mrgen_dist.runtime.diffusion import SamplerSettings, sample
from mrgen_dist.runtime.noise import NoiseTexture
from mrgen_dist.runtime.refine import COARSE_SLICES, coarse_slice
from mrgen_dist.scanners import Vocabulary

#: Condition channels of the UNet: the coarse low-pass and the two pixel coordinates.
CONDITION_CHANNELS = 3
#: Slices per sampling loop in `RefinerFamily.refine_real` (the runtime's DIFFUSION_BATCH at most).
REFINE_BATCH = 16


@dataclass
class RefinerConfig(DiffusionConfig):
    family: str = "refiner"
    # a finished mrgen-train run on the same store, of a decoder family or of the diffusion family (a cascade's
    # coarse stage, of the slices' block means: model.condition_block is then its model.block_means)
    coarse: str = ""
    band: float = 3.0  # sigma (pixels) of the Gaussian low-pass kept from the coarse slice; the rest is drawn
    scale: float = 0.25  # the fine band is divided by it, so that the diffusion works at about unit spread
    crop: int = 64  # side of the training windows
    widths: list[int] = field(default_factory=lambda: [32, 64])
    blocks: int = 1
    patch: int = 2
    attention: int = 0
    # the UNet's normalisation (parts/unet.py NORMS). "channel" normalises each pixel alone, so that the windows
    # it trains on and the whole slices it samples are computed alike; "group", the default of runs written
    # before the option, pools statistics over the canvas.
    norm: str = "group"
    ema_decay: float = 0.995
    sampler: str = "ancestral"
    spacing: str = "quadratic"  # of the sampler's timesteps (runtime/diffusion.py)
    sample_steps: int = 20
    guidance: float = 1.0
    # what is refined (COARSE_SLICES): the coarse run's mean slice, a draw of its learned noise, or the draw's
    # mean. Real slices carry their noise floor into the training low-pass, so in air that condition is the
    # floor's mean, which the mean slice lacks; a draw also carries the coarse noise's texture into the
    # low-pass (results/cohorts.md, "What the refiner refines"). Training does not read it.
    coarse_slice: str = "mean"
    # the refiner sees its condition at a grid of condition_block x condition_block block means, cubically
    # interpolated back (parts/blocks.py), before the low-pass: in training the real slice's, in sampling the
    # coarse slice's. A cascade's low-resolution stage makes exactly those block means, so that its refiner is
    # conditioned alike in training and sampling. 1: the slice itself (runs written before the option).
    condition_block: int = 1

    def validate(self) -> None:
        super().validate()
        if self.coarse_slice not in COARSE_SLICES:
            raise ValueError(f"model.coarse_slice must be one of {', '.join(COARSE_SLICES)}, got {self.coarse_slice!r}")
        if not self.coarse:
            raise ValueError("model.coarse must name a finished mrgen-train run of a decoder family (its folder), "
                             "trained on the same store: the generator whose slices this model refines")
        if self.band < 0 or self.scale <= 0:
            raise ValueError(f"model.band must be >= 0 and model.scale > 0, got {self.band} and {self.scale}")
        if self.attention:
            raise ValueError("model.attention must be 0: the refiner trains on crops and samples whole slices")
        if self.norm not in NORMS:
            raise ValueError(f"model.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.crop < 1 or self.crop % (self.patch * 2 ** (len(self.widths) - 1)):
            raise ValueError(f"model.crop {self.crop} must be divisible by "
                             f"{self.patch * 2 ** (len(self.widths) - 1)} (model.patch and the UNet's halvings)")
        if self.condition_block < 1:
            raise ValueError(f"model.condition_block must be >= 1, got {self.condition_block}")
        if self.block_means != 1:
            raise ValueError("model.block_means must be 1: the refiner draws whole slices (the grid its condition is "
                             "seen at is model.condition_block)")
        if self.level_condition:
            raise ValueError("model.level_condition is not supported by the refiner (its coarse slice carries the level)")

    def settings(self, n_scanners: int, clip: bool = False) -> SamplerSettings:
        """As the diffusion family's, x0 unclipped: the scaled fine band's tails reach past [-1, 1]."""
        return super().settings(n_scanners, clip)

    def validate_shape(self, image_shape: tuple[int, int]) -> None:
        if self.crop + self.patch * 2 ** len(self.widths) > min(image_shape):
            raise ValueError(f"model.crop {self.crop} does not fit in the slices {list(image_shape)}")
        coarse = self.coarse_record()
        if tuple(coarse.image_shape) != tuple(image_shape):
            raise ValueError(f"model.coarse {self.coarse} makes slices of {list(coarse.image_shape)}, the store's are "
                             f"{list(image_shape)}")

    def validate_data(self, vocabulary: Vocabulary, trained: list[str]) -> None:
        coarse = self.coarse_record()
        if list(coarse.vocabulary) != list(vocabulary.names):
            raise ValueError(f"model.coarse {self.coarse} was trained on the scanners {coarse.vocabulary}, the store "
                             f"has {list(vocabulary.names)}")
        drawn = coarse.model.get("block_means", 1)
        if drawn != 1 and drawn != self.condition_block:
            raise ValueError(f"model.coarse {self.coarse} draws {drawn} x {drawn} block means; set "
                             f"model.condition_block={drawn}, so that the refiner is trained on what it hands over")

    def coarse_record(self) -> RunRecord:
        """The coarse run's record; a ValueError naming model.coarse when it is no finished run."""
        path = Path(self.coarse) / RunRecord.NAME
        if not path.is_file() or not (Path(self.coarse) / "model.safetensors").is_file():
            raise ValueError(f"model.coarse {self.coarse}: no config.json and model.safetensors there (a finished "
                             "mrgen-train run)")
        return RunRecord.read(path)


def coarse_slices(graph: SamplingGraph | Denoiser, z: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
    """The coarse generator's slices (B, 1, H, W) of latents `z` (B, latent) and labels: a decoder's mean
    slices, or a diffusion run's draws from x_T = z, handed over as the runtime hands them (`draw_slices`)."""
    if isinstance(graph, Denoiser):
        x_t = z.float().cpu().numpy().reshape(len(z), 1, *graph.drawn_shape)
        return torch.from_numpy(draw_slices(graph, x_t, scanner.cpu().numpy()))[:, None].to(z.device)
    return graph(z, scanner)


def coordinates(shape: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(1, 2, H, W): each pixel's row and column on the slice, in [-1, 1]."""
    rows, columns = (torch.linspace(-1, 1, n, device=device) for n in shape)
    return torch.stack(torch.meshgrid(rows, columns, indexing="ij"))[None]


class Refiner(Diffusion):
    """The crop-trained UNet (`net`), its EMA copy, the schedule, the low-pass, and the way to the coarse run
    (loaded on first use; not a submodule, so neither trained nor checkpointed)."""

    def __init__(self, config: RefinerConfig, n_scanners: int, image_shape: tuple[int, int]) -> None:
        super().__init__(config, n_scanners, image_shape)
        self.band, self.scale, self.taps = config.band, config.scale, 2 * int(np.ceil(3 * config.band)) + 1
        self.crop, self.coarse_dir, self.coarse_slice = config.crop, config.coarse, config.coarse_slice
        self.seen = CoarseGrid(self.image_shape, config.condition_block)  # what of a slice the condition sees
        self._coarse: list[SamplingGraph] = []
        self.load_run: Callable[[str], tuple] | None = None  # runs.load_trained, set by RefinerFamily.connect

    def build_net(self, config: DiffusionConfig, n_scanners: int, image_shape: tuple[int, int]) -> ConditionalUNet:
        return ConditionalUNet(image_shape, n_scanners + 1, config.widths, config.blocks, 0, None, config.patch,
                               condition_channels=CONDITION_CHANNELS, crop_trained=True, pad_mode="replicate",
                               norm=config.norm)

    def lowpass(self, images: torch.Tensor) -> torch.Tensor:
        """G_band * images (B, 1, H, W), zero-padded at the border (the background is dark): of whole slices
        or windows with a margin, so of slices already seen at the condition's grid (`seen`)."""
        if self.band == 0:
            return images
        sigma = torch.full((1, 2), self.band, device=images.device)  # one kernel, broadcast over the batch
        return gaussian_blur(images, sigma, self.taps)

    def condition(self, base: torch.Tensor) -> torch.Tensor:
        """The UNet's condition channels of whole slices' low-pass `base` (B, 1, H, W): 2 base - 1 and the
        pixels' coordinates (the training step takes the same channels of its windows)."""
        grid = coordinates(tuple(base.shape[-2:]), base.device).to(base.dtype).expand(base.shape[0], -1, -1, -1)
        return torch.cat([2 * base - 1, grid], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, scanner: torch.Tensor, condition: torch.Tensor
                ) -> torch.Tensor:
        return self.net(x, t, scanner, None, condition)

    def coarse(self, device: torch.device) -> SamplingGraph | Denoiser:
        """The coarse run's graph on `device`, frozen, in eval mode: a decoder's (z, scanner) -> slice, or a
        diffusion run's denoiser (`coarse_slices` draws with either)."""
        if not self._coarse:
            if self.load_run is None:
                raise RuntimeError("the refiner has no run loader: connect it (Family.connect) first")
            family, model, _ = self.load_run(self.coarse_dir)
            if family.kind not in ("decoder", "diffusion"):
                raise ValueError(f"model.coarse {self.coarse_dir} is a {family.name} run; the refiner refines the "
                                 "slices of a decoder family's run (z, scanner) -> slice or of a diffusion run")
            graph = family.export_graph(model).requires_grad_(False).eval()
            if graph.level_condition:
                raise ValueError(f"model.coarse {self.coarse_dir} takes the slice level (model.level_condition), "
                                 "which the refiner's sampling does not give it")
            if self.coarse_slice != "mean" and not graph.has_noise:
                raise ValueError(f"model.coarse_slice={self.coarse_slice}: the coarse run {self.coarse_dir} has no "
                                 "learned noise; set model.coarse_slice=mean")
            self._coarse.append(graph)
        return self._coarse[0].to(device)


class RefinerGraph(DenoiserGraph):
    """The EMA UNet and the low-pass under the `mrgen-refiner` contract: (x float32 [B, 1, H, W], t float32 [B],
    scanner int64 [B], the null label allowed, coarse float32 [B, 1, H, W], the coarse generator's slice in
    [0, 1]) -> (out, the prediction of the scaled fine band's diffusion; base, the coarse slice's low-pass)."""

    def __init__(self, model: Refiner) -> None:
        super().__init__()
        self.unet, self.model = model.ema, model
        self.timesteps = model.settings.timesteps
        self.use_sampler(model.settings)
        coarse = model.coarse(model.alphas_cumprod.device)
        # the sampler's latent: the coarse generator's z, then x_T
        self.latent = coarse.latent + model.image_shape[0] * model.image_shape[1]
        self.scale, self.coarse_slice = model.scale, model.coarse_slice

    def forward(self, x: torch.Tensor, t: torch.Tensor, scanner: torch.Tensor, coarse: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.unet.stem.weight.dtype
        base = self.model.lowpass(self.model.seen(coarse.to(dtype)))
        return self.unet(x, t, scanner, None, self.model.condition(base)).float(), base.float()

    def example_inputs(self, batch: int, rng: np.random.Generator, n_scanners: int, image_shape: tuple[int, int]
                       ) -> dict[str, np.ndarray]:
        """The denoiser's inputs and random coarse slices in [0, 1]."""
        inputs = super().example_inputs(batch, rng, n_scanners, image_shape)
        return {**inputs, "coarse": rng.random((batch, 1, *image_shape), dtype=np.float32)}

    def output_names(self) -> list[str]:
        return ["out", "base"]

    def sampler_metadata(self) -> dict:
        return {**self.settings, "scale": self.scale, "coarse_slice": self.coarse_slice}

    def model_space(self, images: np.ndarray) -> ModelSpace:
        """The slices' scaled fine band over their own low-pass (as at training: the slice is its own coarse
        slice), the graph over them as the denoise, and that low-pass as the level."""
        device = next(self.parameters()).device
        coarse = torch.from_numpy(np.asarray(images, dtype=np.float32)[:, None]).to(device)
        denoise, base = over_coarse(self, coarse)
        return ModelSpace((coarse.cpu().numpy() - base) / np.float32(self.scale), denoise, base)


def over_coarse(graph: RefinerGraph, coarse: torch.Tensor) -> tuple[Callable[..., np.ndarray], np.ndarray]:
    """The graph over coarse slices (B, 1, H, W) as the runtime's `Denoise` (the slices repeated for a guided
    2B batch), and their low-pass (B, 1, H, W) float32."""
    with torch.no_grad():
        base = graph(torch.zeros_like(coarse), torch.zeros(len(coarse), device=coarse.device),
                     torch.zeros(len(coarse), dtype=torch.long, device=coarse.device), coarse)[1]

    def denoise(x: np.ndarray, t: np.ndarray, labels: np.ndarray) -> np.ndarray:
        inputs = (torch.from_numpy(a).to(coarse.device) for a in (x, t, labels))
        with torch.no_grad():
            return graph(*inputs, coarse.repeat(len(x) // len(coarse), 1, 1, 1))[0].cpu().numpy()

    return denoise, base.cpu().numpy()


def refined(graph: RefinerGraph, settings: SamplerSettings, scale: float, coarse: torch.Tensor,
            scanner: torch.Tensor, x_t: np.ndarray) -> np.ndarray:
    """Slices (B, H, W) refined from coarse slices (B, 1, H, W): their low-pass plus `scale` x the fine band
    that the runtime's sampling loop (`settings`) draws from x_T with the graph's UNet, clipped to [0, 1]."""
    denoise, base = over_coarse(graph, coarse)
    fine = sample(denoise, x_t, scanner.cpu().numpy(), settings, low_pass=lambda: base)
    return np.clip(base + scale * fine, 0, 1)[:, 0]


class RefinerFamily(DiffusionFamily):
    name = "refiner"
    title = "refiner"
    Config = RefinerConfig
    kind = "refiner"

    def build(self, config: RefinerConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]) -> Refiner:
        return Refiner(config, len(vocabulary), image_shape)

    def connect(self, model: Refiner, load_run: Callable[[str], tuple]) -> None:
        model.load_run = load_run
        if model.coarse_slice != "mean":  # a coarse run without learned noise is refused now, not at the preview
            with torch.random.fork_rng(devices=[]):  # loading builds a model: the run's draws stay as without
                model.coarse(torch.device("cpu"))

    def noise_dim(self, config: RefinerConfig) -> int:
        return 1  # the first slice's number seeds the step's draws (windows, t, eps, label drops)

    def losses(self, step: Step) -> dict[str, torch.Tensor]:
        config: RefinerConfig = step.config
        model: Refiner = step.accelerator.unwrap_model(step.model)
        device = step.images.device
        seed = int(uniform_from_normal(step.noise[0, 0].float()).item() * 2**31)
        g = torch.Generator(device=device).manual_seed(seed)
        x = step.images.float()[:, None]
        seen = model.seen(x)  # of the whole slice: the blocks lie where they lie at sampling
        # windows with a margin of the low-pass's half width, filtered, then the margin cut: the low-pass of a
        # window's inner part is the whole slice's, at a sixth of the cost for 64 x 64 windows. The slice is
        # zero-padded by the margin first, as the low-pass pads it when sampling, so that inner parts reach the
        # slice's border. The inner part starts where the UNet's blocks start on a whole slice (its padding's
        # offset, modulo what the downsamplings divide), so that training and sampling fold the same pixels.
        margin, multiple = model.taps // 2, model.net.multiple
        phase = tuple(offset % multiple for offset in model.net.offsets(model.image_shape))
        grid = coordinates(model.image_shape, device).expand(len(x), -1, -1, -1)
        pad = (margin, margin, margin, margin)
        x, seen, grid = random_windows((F.pad(x, pad), F.pad(seen, pad), F.pad(grid, pad, mode="replicate")),
                                       config.crop + 2 * margin, g, multiple, phase)
        base = model.lowpass(seen)
        inner = (slice(None), slice(None), slice(margin, margin + config.crop), slice(margin, margin + config.crop))
        fine = ((x - base) / config.scale)[inner]
        condition = torch.cat([2 * base - 1, grid], dim=1)[inner]
        b = len(x)
        t = torch.randint(config.timesteps, (b,), generator=g, device=device)
        eps = torch.randn(fine.shape, generator=g, device=device)
        drop = torch.rand(b, generator=g, device=device) < config.label_dropout
        x_t, target = targets(fine, eps, model.alphas_cumprod.float()[t], config.prediction)
        scanner = torch.where(drop, torch.full_like(step.scanner, model.null_label), step.scanner)
        with step.autocast():
            out = step.model(x_t.to(step.images.dtype), t.float(), scanner, condition.to(step.images.dtype))
        return {"loss": F.mse_loss(out.float(), target)}

    def export_graph(self, model: Refiner) -> RefinerGraph:
        return RefinerGraph(model)

    @torch.no_grad()
    def preview(self, model: Refiner, images: torch.Tensor, scanner: torch.Tensor, vocabulary: Vocabulary,
                level: torch.Tensor | None = None) -> tuple[list[tuple[str, np.ndarray]], str]:
        """The coarse run's slices of each scanner (same z in every row) and their refinements, from the same
        x_T: the EMA UNet in the runtime's sampling loop, over the coarse draws the runtime refines."""
        device = images.device
        decoder = model.coarse(device)
        graph = RefinerGraph(model).eval()
        g = torch.Generator().manual_seed(1234)
        z = torch.randn(PREVIEW_COLUMNS, decoder.latent, generator=g).to(device)
        x_t = torch.randn(PREVIEW_COLUMNS, 1, *model.image_shape, generator=g).numpy()
        texture = decoder.noise_texture()  # the coarse run's, for its draws; {} for other noise kinds
        texture = NoiseTexture.from_dict(texture, len(vocabulary), "the coarse run") if texture else None
        rows = []
        for sid, name in enumerate(vocabulary.names):
            s = torch.full((PREVIEW_COLUMNS,), sid, dtype=torch.long, device=device)
            mean = coarse_slices(decoder, z, s).float().cpu().numpy()
            sigma = None if graph.coarse_slice == "mean" else decoder.noise_sigma(s).float().cpu().numpy()
            coarse = torch.from_numpy(coarse_slice(graph.coarse_slice, mean, sigma, decoder.noise_kind,
                                                   s.cpu().numpy(), texture, z.float().cpu().numpy())).to(device)
            rows.append((f"{name} (coarse)", coarse[:, 0].cpu().numpy()))
            rows.append((name, refined(graph, model.settings, model.scale, coarse, s, x_t)))
        return rows, f"the coarse run's samples and their refinement ({sampler_title(model.settings)})"

    @torch.no_grad()
    def refine_real(self, model: Refiner, images: torch.Tensor, scanner: torch.Tensor, seed: int = 0) -> np.ndarray:
        """The refinements of real slices (n, H, W) with their labels: the low-pass of each real slice in the
        coarse slice's place, the fine band drawn as sampling draws it, x_T from a generator seeded `seed`.
        What the refiner makes of a perfect coarse generator: its ceiling, which `mrgen-fid diagnose` scores."""
        from tqdm import tqdm

        graph = RefinerGraph(model).eval()
        device = next(model.parameters()).device
        rng = np.random.default_rng(seed)
        out = np.empty((len(images), *model.image_shape), dtype=np.float32)
        for start in tqdm(range(0, len(images), REFINE_BATCH), desc="refine the real low-pass", unit="batch",
                          file=sys.stderr):
            coarse = torch.as_tensor(images[start : start + REFINE_BATCH]).float().to(device)[:, None]
            s = torch.as_tensor(scanner[start : start + REFINE_BATCH], dtype=torch.long).to(device)
            x_t = rng.standard_normal(coarse.shape, dtype=np.float32)
            out[start : start + len(coarse)] = refined(graph, model.settings, model.scale, coarse, s, x_t)
        return out

    def flops_per_image(self, model: Refiner) -> int:
        """6 x the UNet's multiply-accumulates of one forward on one training window."""
        side = model.crop
        x = torch.zeros(1, 1, side, side)
        label = torch.zeros(1, dtype=torch.long)
        return 6 * multiply_accumulates(model, x, torch.zeros(1), label, torch.zeros(1, CONDITION_CHANNELS, side, side))


FAMILY = RefinerFamily()
