"""A translator distilled from a trained atlas cVAE (family `distilled`).

Why: the adversarial translators fail the conditioning target on what benchmarks/translation_bounds.py
measured a translator must do. To be read as its target a slice from *Unspecified* must be deblurred under
noise, and a slice to *Magnetom TrioTim* must lose most of its noise while keeping its edges; and to meet the
cycle target it must carry its own noise draw to the target's level, deterministically (a perfect translator
that draws fresh noise does not come back to the slice). The StarGAN's discriminator never asked for either.
The atlas cVAE (mrgen_dist/models/atlas.py) models exactly these traits: an anatomy decoded from z, and each
scanner's tone curve, point-spread function and Rician noise sigma.
It can show one anatomy on two scanners with the *same* noise draw, |acquire_s(a) + sigma_s (n1 + i n2)| and
|acquire_t(a) + sigma_t (n1 + i n2)|: a paired example of what a translation from s to t should do, which the
real data (no subject scanned twice) cannot give.

Training: per slice x of scanner s of the batch, the teacher's posterior z ~ q(z | x, s) (or a prior draw,
`anatomy: prior`) is decoded to an anatomy a, a source s' and a target t are drawn uniformly over every
scanner (t = s' too: translating to the source's own scanner must change nothing), both images are drawn with
one noise draw (n1, n2), and the student G is fitted by |G(x_s', t) - x_t|, mean absolute error, on random
`crop` x `crop` windows (`renders` pairs per slice). The student is a small residual network of dilated 3x3
convolutions (receptive field 2 (1 + sum of dilations) + 1 pixels), each feature map modulated by the target
(FiLM: a per-target scale and shift per layer), with no normalisation: a convolution without batch or instance
statistics computes the same on a crop as on the whole slice. With `identify` a `SourceHead` reads the input's
scanner s' from the whole slice (trained on the batch's real slices) and each layer also gets a scale and shift
per (s', t): in training the pairs' true s' is given, translating the head's reading. The teacher is frozen and
is not part of the run's weights: a trained run exports and translates without it.

Two options address the detail that an L1 fit averages away on a sharp, quiet scanner: `detail_weight`, an
error on the log local energy of the finest detail (`detail_energy`), and `context`, the layers' scales and
shifts also from a pool of the first layer's maps over the head (`DilatedTranslator`).

`carry_noise` (on in the comparison config) takes the denoising out of the student: the student translates the
slice's non-local means x^ (mrgen_dist/models/parts/nonlocal_means.py, weighed by the source's sigma as the source
head reads it), and the rest, x - x^, the slice's own noise draw, is added back times sigma_t / sigma_s, the
teacher's Rician sigmas (a buffer of the run's weights). Carried deterministically, the round trip comes back
to the same draw.

What each option did on the comparison cohort, the runs, and the commands that reproduce them:
docs/results/translation.md.

The exported graph is the translator, contract `mrgen-translator` (export/README.md), as the StarGAN's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mrgen_dist.artifacts import RunRecord
from mrgen_dist.models.base import Family, ModelConfig, Step
from mrgen_dist.models.parts.adversarial import uniform_from_normal
from mrgen_dist.models.parts.networks import multiply_accumulates
from mrgen_dist.models.parts.noise import rician_draw
from mrgen_dist.models.parts.nonlocal_means import nonlocal_means
from mrgen_dist.models.parts.windows import random_windows
from mrgen_dist.models.stargan import TranslatorGraph, translation_preview
from mrgen_dist.scanners import Vocabulary

ANATOMIES = ("posterior", "prior")
#: Families whose trained model renders one anatomy on any scanner (anatomy, acquire, sigma).
TEACHERS = ("atlas", "atlasgan")
#: The cells (pixels) over which `detail_energy` is averaged, and a floor of that energy (below the noise of
#: the least noisy scanner, sigma 0.014 on the comparison cohort: 1e-4 in squared intensity).
DETAIL_CELL, DETAIL_FLOOR = 8, 1e-5
#: Pixels above this intensity are the head, over which the student's context is pooled.
HEAD = 0.1
#: The slope of the student's leaky ReLUs.
LEAK = 0.2
#: Feature maps of the source head's layers (the first at full resolution, the others each halving it).
HEAD_WIDTHS = (16, 32, 64, 64)
#: Added to the standard deviations of the source head's maps before their log (a map constant over the image).
HEAD_EPS = 1e-6
#: Weight of the source head's cross-entropy. Its gradients reach the head only, on which Adam does not see the
#: scale; the weight keeps them from dominating the global norm that optim.grad_clip clips (cross-entropy is
#: ~1, the L1 ~0.01).
SOURCE_WEIGHT = 0.01


@dataclass
class DistilledConfig(ModelConfig):
    family: str = "distilled"
    teacher: str = ""  # a finished mrgen-train run of an atlas family (its folder), trained on the same store
    width: int = 32  # feature maps of the student
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 4, 2, 1])  # of its residual 3x3 layers
    context: bool = False  # the layers' scales and shifts also from the mean of the first maps over the head
    crop: int = 96  # side of the training windows; 0: whole slices
    renders: int = 1  # pairs the teacher renders of each slice's anatomy per step
    anatomy: str = "posterior"  # posterior: z ~ q(z | slice); prior: z ~ N(0, I), the slice unused
    detail_weight: float = 0.0  # of `detail`: the log local high-frequency energy of translation vs target
    identify: bool = False  # a head reads the input's scanner; the layers' scales and shifts are per (source, target)
    carry_noise: bool = False  # translate the non-local means of the input; carry its own noise by sigma_t / sigma_s

    def validate(self) -> None:
        if not self.teacher:
            raise ValueError("model.teacher must name a trained atlas run folder (mrgen-train with model.family: "
                             "atlas), the model the translator is distilled from")
        if self.width < 1 or not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"model.width must be >= 1 and model.dilations a non-empty list of numbers >= 1, got "
                             f"{self.width} and {self.dilations}")
        if self.crop < 0 or self.renders < 1:
            raise ValueError(f"model.crop must be >= 0 and model.renders >= 1, got {self.crop} and {self.renders}")
        if self.detail_weight < 0:
            raise ValueError(f"model.detail_weight must be >= 0, got {self.detail_weight}")
        if self.anatomy not in ANATOMIES:
            raise ValueError(f"model.anatomy must be one of {', '.join(ANATOMIES)}, got {self.anatomy!r}")
        if self.carry_noise and not self.identify:
            raise ValueError("model.carry_noise needs model.identify: the input's noise level is its source "
                             "scanner's, which the source head reads")

    def teacher_record(self) -> RunRecord:
        """The teacher run's record; a ValueError naming model.teacher when it is no finished atlas run."""
        path = Path(self.teacher) / RunRecord.NAME
        if not path.is_file() or not (path.parent / "model.safetensors").is_file():
            raise ValueError(f"model.teacher {self.teacher}: no config.json and model.safetensors there (a finished "
                             "mrgen-train run)")
        record = RunRecord.read(path)
        if record.family not in TEACHERS:
            raise ValueError(f"model.teacher {self.teacher} is a {record.family} run; the translator is distilled "
                             f"from one of the families {', '.join(TEACHERS)}")
        if record.config.get("model", {}).get("acquisition", "fixed") != "fixed":
            raise ValueError(f"model.teacher {self.teacher} has a learned acquisition; the translator is distilled "
                             "from a teacher with Rician noise (model.acquisition: fixed)")
        return record

    def validate_shape(self, image_shape: tuple[int, int]) -> None:
        teacher = self.teacher_record()
        if tuple(teacher.image_shape) != tuple(image_shape):
            raise ValueError(f"model.teacher {self.teacher} makes slices of {list(teacher.image_shape)}, the store "
                             f"holds {list(image_shape)}")
        if self.crop > min(image_shape):
            raise ValueError(f"model.crop {self.crop} is larger than the slices {list(image_shape)}")

    def validate_data(self, vocabulary: Vocabulary, trained: list[str]) -> None:
        teacher = self.teacher_record()
        if list(teacher.vocabulary) != list(vocabulary.names):
            raise ValueError(f"model.teacher {self.teacher} was trained on the scanners {teacher.vocabulary}, the "
                             f"store has {vocabulary.names}")
        self.require_every_scanner(vocabulary, trained)


class SourceHead(nn.Module):
    """image (B, 1, H, W) -> logits of its scanner (B, scanners): strided convolutions whose maps are summarised
    over the whole image by their mean and log standard deviation (texture statistics: the noise in the air,
    the tone and the sharpness of tissue all tell the scanner), read by a linear map. The log puts a scanner
    twice as noisy at a fixed distance whatever the level: measured on the comparison cohort, trained alone
    on the train split (batch 8, Adam 1e-3), the head read every test slice's scanner right (1.00 on each)
    from step 750 to 1,500; with the standard deviation itself, or with it standardised by a batch norm, the
    test accuracy of a scanner swung between 0 and 1 from one evaluation to the next. Trained on whole slices
    of the store, as it reads them when translating."""

    def __init__(self, n_scanners: int) -> None:
        super().__init__()
        widths = (1, *HEAD_WIDTHS)
        self.layers = nn.ModuleList(nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1)
                                    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)))
        self.out = nn.Linear(2 * widths[-1], n_scanners)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = image
        for conv in self.layers:
            h = F.leaky_relu(conv(h), LEAK)
        h = h.float().flatten(2)
        statistics = torch.cat([h.mean(dim=2), h.std(dim=2).add(HEAD_EPS).log()], dim=1)
        return self.out(statistics.to(self.out.weight.dtype))


class DilatedTranslator(nn.Module):
    """(image (B, 1, H, W), target scanner (B,)) -> image: x + a residual of dilated 3x3 convolutions, each
    layer's maps scaled and shifted per target (FiLM, starting at the identity), clamped to [0, 1]. The residual
    starts at zero, so the untrained translator is the identity.

    The convolutions see 49 pixels with the default dilations, too few to tell the source's tone curve and
    noise level apart, and the contract gives the target only. Two ways to give them the whole image:
    `context`, the mean of the first layer's maps over the head (pixels above HEAD) through a linear map to the
    scales and shifts, starting at zero; `identify`, a `SourceHead` that reads the input's scanner, whose
    probabilities weigh a further scale and shift per (source, target) pair, also starting at zero. In training
    the pairs' true source is given (`source`, one-hot), so that the translation learns each pair's mapping
    while the head learns to name the scanner of real slices; translating, its probabilities stand in for it."""

    def __init__(self, n_scanners: int, width: int, dilations: list[int], context: bool = False,
                 identify: bool = False, carry_noise: bool = False) -> None:
        super().__init__()
        self.n_scanners = n_scanners
        if carry_noise:  # each scanner's noise sigma, the teacher's (set when it is loaded); 1: nothing carried
            self.register_buffer("noise_sigma", torch.ones(n_scanners))
        self.carry_noise = carry_noise
        self.first = nn.Conv2d(1, width, 3, padding=1)
        self.layers = nn.ModuleList(nn.Conv2d(width, width, 3, padding=d, dilation=d) for d in dilations)
        self.gain = nn.Parameter(torch.zeros(len(dilations) + 1, n_scanners, width))
        self.shift = nn.Parameter(torch.zeros(len(dilations) + 1, n_scanners, width))
        self.context = nn.Linear(width, 2 * (len(dilations) + 1) * width) if context else None
        if self.context is not None:
            nn.init.zeros_(self.context.weight)
            nn.init.zeros_(self.context.bias)
        self.source_head = SourceHead(n_scanners) if identify else None
        if identify:  # (layers, source, target, width)
            self.pair_gain = nn.Parameter(torch.zeros(len(dilations) + 1, n_scanners, n_scanners, width))
            self.pair_shift = nn.Parameter(torch.zeros(len(dilations) + 1, n_scanners, n_scanners, width))
        self.last = nn.Conv2d(width, 1, 3, padding=1)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def film(self, image: torch.Tensor, h: torch.Tensor, scanner: torch.Tensor, source: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each layer's scale and shift for each image, (layers, B, width) each; `source`: the probabilities of
        each image's source scanner (B, scanners), with `identify`."""
        gain, shift = self.gain[:, scanner], self.shift[:, scanner]
        if self.context is not None:
            head = (image > HEAD).to(h.dtype)
            pooled = (h * head).sum(dim=(2, 3)) / head.sum(dim=(2, 3)).clamp(min=1)
            extra = self.context(pooled).view(len(h), 2, *gain.shape[::2]).permute(1, 2, 0, 3)
            gain, shift = gain + extra[0], shift + extra[1]
        if self.source_head is not None:
            weights = source.to(self.pair_gain.dtype)  # float16 in an fp16 export
            gain = gain + torch.einsum("bs,lsbw->lbw", weights, self.pair_gain[:, :, scanner])
            shift = shift + torch.einsum("bs,lsbw->lbw", weights, self.pair_shift[:, :, scanner])
        return 1 + gain.to(h.dtype), shift.to(h.dtype)

    def forward(self, image: torch.Tensor, scanner: torch.Tensor, source: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The translation; with `identify`, `source` (B, scanners) are the source's probabilities, by default
        the head's reading of `image`. With `carry_noise` the convolutions translate the image's non-local
        means, and the rest, its own noise draw, is added back times sigma_target / sigma_source."""
        if self.source_head is not None and source is None:
            source = torch.softmax(self.source_head(image).float(), dim=1)
        anatomy = image
        if self.carry_noise:
            sigma = source.float() @ self.noise_sigma.float()
            anatomy = nonlocal_means(image, sigma).to(image.dtype)
        h = self.first(anatomy)
        gain, shift = self.film(anatomy, h, scanner, source)
        h = F.leaky_relu(h * gain[0, :, :, None, None] + shift[0, :, :, None, None], LEAK)
        for i, conv in enumerate(self.layers, 1):
            h = h + F.leaky_relu(conv(h) * gain[i, :, :, None, None] + shift[i, :, :, None, None], LEAK)
        translated = anatomy + self.last(h)
        if self.carry_noise:
            carried = (self.noise_sigma.float()[scanner] / sigma)[:, None, None, None]
            translated = translated + (carried * (image.float() - anatomy.float())).to(translated.dtype)
        return translated.clamp(0, 1)


class StudentFit(NamedTuple):
    """What the student gives in training: the pairs' translations, and its source head's logits on the batch's
    real slices (None without `identify`)."""

    translated: torch.Tensor
    source_logits: torch.Tensor | None


class DistilledTranslator(nn.Module):
    """The student (`generator`, the run's only weights) and the way to its frozen teacher, loaded on first use:
    the teacher is not a submodule, so it is neither trained, nor checkpointed, nor needed after training."""

    def __init__(self, config: DistilledConfig, n_scanners: int, image_shape: tuple[int, int]) -> None:
        super().__init__()
        self.generator = DilatedTranslator(n_scanners, config.width, config.dilations, config.context,
                                           config.identify, config.carry_noise)
        self.teacher_dir = config.teacher
        self.image_shape = tuple(image_shape)
        self.window = (config.crop, config.crop) if config.crop else self.image_shape  # of the training pairs
        self.renders = config.renders
        self._teacher: list[nn.Module] = []
        self.load_run: Callable[[str], tuple] | None = None  # runs.load_trained, set by DistilledFamily.connect

    def forward(self, image: torch.Tensor, scanner: torch.Tensor, source: torch.Tensor | None = None,
                real: torch.Tensor | None = None) -> torch.Tensor | StudentFit:
        """The translation of `image` to `scanner`. In training, `source` (B,) are the true source scanners
        and `real` (N, 1, H, W) the batch's slices, and it is a `StudentFit`: in one forward, so that DDP sees
        every parameter the loss uses."""
        if source is None:
            return self.generator(image, scanner)
        head = self.generator.source_head
        if head is None:
            return StudentFit(self.generator(image, scanner), None)
        onehot = F.one_hot(source, self.generator.n_scanners).float()
        return StudentFit(self.generator(image, scanner, onehot), head(real))

    def teacher(self, device: torch.device) -> nn.Module:
        """The teacher's atlas cVAE on `device`, frozen, in eval mode."""
        if not self._teacher:
            if self.load_run is None:
                raise RuntimeError("the distilled translator has no run loader: connect it (Family.connect) first")
            model = self.load_run(self.teacher_dir)[1]
            vae = getattr(model, "generator", model)  # the atlas cVAE-GAN's generator is the atlas cVAE
            self._teacher.append(vae.requires_grad_(False).eval())
            if self.generator.carry_noise:
                with torch.no_grad():
                    self.generator.noise_sigma.copy_(teacher_sigma(vae))
        return self._teacher[0].to(device)


def teacher_sigma(teacher: nn.Module) -> torch.Tensor:
    """Each scanner's Rician noise sigma of an atlas teacher, float32 (scanners,)."""
    scanners = torch.arange(teacher.n_scanners, device=teacher.atlas.device)
    return teacher.sigma(scanners).float().flatten(1)[:, 0]


class Pairs(NamedTuple):
    """Training pairs: one anatomy drawn on two scanners with one noise draw, (N, 1, h, w) images."""

    source_image: torch.Tensor
    source: torch.Tensor  # int64 (N,)
    target: torch.Tensor  # int64 (N,)
    target_image: torch.Tensor


@torch.no_grad()
def render_pairs(teacher: nn.Module, config: DistilledConfig, images: torch.Tensor, scanner: torch.Tensor,
                 g: torch.Generator) -> Pairs:
    """`config.renders` pairs per slice of `images` (B, H, W), windowed to `config.crop`, drawn with `g`."""
    device, k = images.device, teacher.n_scanners
    if config.anatomy == "posterior":
        mean, logvar = teacher.encode(images.float(), scanner)
        mean, logvar = mean.repeat_interleave(config.renders, 0), logvar.repeat_interleave(config.renders, 0)
        z = mean + torch.randn(mean.shape, generator=g, device=device) * torch.exp(0.5 * logvar)
    else:
        z = torch.randn(len(images) * config.renders, teacher.latent, generator=g, device=device)
    anatomy = teacher.anatomy(z.float())
    n = len(anatomy)
    source = torch.randint(k, (n,), generator=g, device=device)
    target = torch.randint(k, (n,), generator=g, device=device)
    real, imaginary = (torch.randn(anatomy.shape, generator=g, device=device) for _ in range(2))
    sigma = teacher_sigma(teacher).to(device)
    x_source, x_target = (rician_draw(teacher.acquire(anatomy, on).clamp(0, 1).float(),
                                      sigma[on][:, None, None, None], real, imaginary) for on in (source, target))
    if config.crop:
        x_source, x_target = random_windows((x_source, x_target), config.crop, g)
    return Pairs(x_source, source, target, x_target)


def detail_energy(images: torch.Tensor) -> torch.Tensor:
    """log of the local energy of each image's finest detail (the image less its 3 x 3 mean), in 8 x 8 cells:
    what an L1 fit under uncertainty averages away (the mean of many plausible edges is a smooth one)."""
    detail = images - F.avg_pool2d(images, 3, 1, 1, count_include_pad=False)
    return torch.log(F.avg_pool2d(detail.square(), DETAIL_CELL) + DETAIL_FLOOR)


class DistilledFamily(Family):
    name = "distilled"
    title = "distilled translator"
    Config = DistilledConfig
    kind = "translator"
    loss_names = ("loss", "l1", "detail", "source")

    def build(self, config: DistilledConfig, vocabulary: Vocabulary, image_shape: tuple[int, int]
              ) -> DistilledTranslator:
        return DistilledTranslator(config, len(vocabulary), image_shape)

    def connect(self, model: DistilledTranslator, load_run: Callable[[str], tuple]) -> None:
        model.load_run = load_run

    def noise_dim(self, config: DistilledConfig) -> int:
        return 1  # the first slice's number seeds the step's draws (z, scanners, noise, windows)

    def optimizers(self, model: DistilledTranslator, make: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
                   ) -> dict[str, torch.optim.Optimizer]:
        return {"model": make(model.generator.parameters())}

    def losses(self, step: Step) -> dict[str, torch.Tensor]:
        model: DistilledTranslator = step.accelerator.unwrap_model(step.model)
        device = step.images.device
        # one generator for the batch's draws, seeded by the loop's noise: a resumed run draws the same pairs
        seed = int(uniform_from_normal(step.noise[0, 0].float()).item() * 2**31)
        g = torch.Generator(device=device).manual_seed(seed)
        pairs = render_pairs(model.teacher(device), step.config, step.images, step.scanner, g)
        with step.autocast():
            fit = step.model(pairs.source_image.to(step.images.dtype), pairs.target, pairs.source,
                             step.images[:, None])
        translated = fit.translated.float()
        losses = {"l1": (translated - pairs.target_image).abs().mean()}
        if step.config.detail_weight > 0:
            losses["detail"] = (detail_energy(translated) - detail_energy(pairs.target_image)).abs().mean()
        if fit.source_logits is not None:
            losses["source"] = F.cross_entropy(fit.source_logits.float(), step.scanner)
        losses["loss"] = (losses["l1"] + step.config.detail_weight * losses.get("detail", 0)
                          + SOURCE_WEIGHT * losses.get("source", 0))
        return {name: losses[name] for name in self.reported_losses(step.config)}

    def reported_losses(self, config: DistilledConfig) -> tuple[str, ...]:
        if config.detail_weight == 0 and not config.identify:
            return ("loss",)
        optional = {"detail": config.detail_weight > 0, "source": config.identify}
        return tuple(name for name in self.loss_names if optional.get(name, True))

    def export_graph(self, model: DistilledTranslator) -> TranslatorGraph:
        return TranslatorGraph(model.generator, list(range(model.generator.n_scanners)))

    @torch.no_grad()
    def preview(self, model: DistilledTranslator, images: torch.Tensor, scanner: torch.Tensor, vocabulary: Vocabulary,
                level: torch.Tensor | None = None) -> tuple[list[tuple[str, np.ndarray]], str]:
        return translation_preview(self.export_graph(model), images, scanner, vocabulary)

    def flops_per_image(self, model: DistilledTranslator) -> int:
        """Training FLOPs per slice of the batch: forward + backward (x3) of the student on each of its renders,
        given the true source as in training, and of its source head on the whole slice (the teacher's renders,
        under no_grad, are not counted)."""
        generator = model.generator
        x, s = torch.zeros(1, 1, *model.window), torch.zeros(1, dtype=torch.long)
        source = F.one_hot(s, generator.n_scanners).float()
        student = model.renders * multiply_accumulates(generator, x, s, source)
        head = generator.source_head
        read = multiply_accumulates(head, torch.zeros(1, 1, *model.image_shape)) if head is not None else 0
        return 6 * (student + read)


FAMILY = DistilledFamily()
