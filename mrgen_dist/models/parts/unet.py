"""A small conditional UNet for pixel-space diffusion: (x (B, 1, H, W), t (B,), label (B,)) -> (B, 1, H, W).

The timestep goes through a sinusoidal embedding and an MLP; the label (a scanner id, or the null label
`n_labels - 1` of classifier-free guidance) through an embedding added to it, and so, with `level_condition`,
the slice's axial level (parts/level.py) through an MLP. Each level has `blocks`
residual blocks (GroupNorm, SiLU, 3x3 convolution, the embedding added per channel) at its width, then a
stride-2 convolution down (not after the last); the way up mirrors it with the skips concatenated, and
nearest-neighbour upsampling and a 3x3 convolution. The lowest `attention` levels have single-layer
self-attention (heads of 64 channels, or one head below 64) after their blocks. The input is centre-padded
(zeros) to `size`, which the downsamplings divide (218 x 182 -> 224 x 192), and the output cropped back
inside `forward`, so the graph's input and output are the slice's shape. Attention is written with matmul and
softmax, which every ONNX runtime runs.

With `condition_channels` > 0 the network also takes a conditioning image of that many channels (the refiner's
coarse slice and pixel coordinates, models/refiner.py), concatenated to x before the stem. With `size` None
(`crop_trained`) there is no fixed canvas: each input is centre-padded to the next size the downsamplings
divide, so the network trains on crops and runs on whole slices (no attention then: it would see the whole
slice only at sampling); `pad_mode` "replicate" pads that canvas with the border's own values, since windows
never hold the zeros of a padded canvas (noise and condition channels of value 0 there read as a bright,
central row and drew a frame around the slice).

`patch` > 1 folds each patch x patch block of pixels into channels before the stem (pixel unshuffle) and
unfolds the head's output the same way, as "simple diffusion" (Hoogeboom et al. 2023) does at high
resolution: the transform is invertible, so no pixel and no noise is averaged away (unlike a latent
autoencoder), while every level works on patch**2 times fewer positions.

`norm`: "group" (GroupNorm, statistics over each group's channels and the whole canvas) or "channel" (each
pixel's channels normalised alone, as ConvNeXt's LayerNorm). With GroupNorm a crop-trained network's
training windows and the whole slices it samples have different canvas statistics (air, skull, brain in
other proportions), so the same pixel's features are scaled otherwise at sampling than in training;
"channel" computes them alike (results/cohorts.md, "The refiner's drawn grain: normalisation and guidance").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mrgen_dist.models.parts.level import LEVEL_FEATURES, level_features

#: Channels per attention head (one head when a level is narrower).
HEAD_CHANNELS = 64
#: The normalisation layers a UNet can be built with (`norm`).
NORMS = ("group", "channel")


def groups_for(channels: int, most: int = 32) -> int:
    """The largest number of GroupNorm groups <= `most` that divides `channels`."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of float timesteps (B,) (Vaswani et al.; the DDPM UNet's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ChannelNorm(nn.Module):
    """Each pixel's channels normalised to zero mean and unit variance, then scaled and shifted per channel:
    LayerNorm over the channel axis of (B, C, H, W), whatever the canvas around the pixel."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels last for layer_norm, which exports as one LayerNormalization node: onnxruntime computes it
        # row by row, so an image's output does not depend on the batch it is drawn in
        h = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return h.permute(0, 3, 1, 2)


def normalisation(kind: str, channels: int) -> nn.Module:
    """The UNet's normalisation layer of `kind` (NORMS) over `channels`."""
    if kind == "group":
        return nn.GroupNorm(groups_for(channels), channels)
    if kind == "channel":
        return ChannelNorm(channels)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int, norm: str = "group") -> None:
        super().__init__()
        self.norm1 = normalisation(norm, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2 = normalisation(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (its skip)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None].to(h.dtype)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, norm: str = "group") -> None:
        super().__init__()
        self.heads = max(1, channels // HEAD_CHANNELS) if channels % HEAD_CHANNELS == 0 else 1
        self.norm = normalisation(norm, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        weights = torch.softmax(torch.einsum("bhci,bhcj->bhij", q, k) * (c // self.heads) ** -0.5, dim=-1)
        out = torch.einsum("bhij,bhcj->bhci", weights, v).reshape(b, c, h, w)
        return x + self.out(out)


class ConditionalUNet(nn.Module):
    """`widths`: channels per level (len = levels); `blocks`: residual blocks per level; `attention`: how many
    of the lowest levels have self-attention; `n_labels`: the label embedding's entries (scanners + null)."""

    def __init__(self, image_shape: tuple[int, int], n_labels: int, widths: list[int], blocks: int = 1,
                 attention: int = 1, size: tuple[int, int] | None = None, patch: int = 1,
                 level_condition: bool = False, condition_channels: int = 0, crop_trained: bool = False,
                 pad_mode: str = "constant", norm: str = "group") -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.patch = patch
        levels = len(widths)
        self.multiple = multiple = patch * 2 ** (levels - 1)
        if crop_trained and attention:
            raise ValueError("a crop-trained UNet has no attention: it would see whole slices only at sampling")
        self.pad_mode = pad_mode  # of the canvas: zeros, or for a crop-trained UNet the border's own values
        self.size = None if crop_trained else (
            tuple(size) if size else tuple(-(-n // multiple) * multiple for n in image_shape))
        if self.size and any(s % multiple or s < n for s, n in zip(self.size, self.image_shape, strict=True)):
            raise ValueError(f"UNet size {list(self.size)} must hold the slices {list(self.image_shape)} and be "
                             f"divisible by {multiple} ({levels} levels, patch {patch})")
        self.time_dim = widths[0]
        emb = 4 * widths[0]
        self.time_mlp = nn.Sequential(nn.Linear(widths[0], emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(n_labels, emb)
        if level_condition:  # the slice's axial level, added to the embedding as the timestep is
            self.level = nn.Sequential(nn.Linear(LEVEL_FEATURES, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.stem = nn.Conv2d((1 + condition_channels) * patch**2, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, c = [widths[0]], widths[0]
        for i, width in enumerate(widths):
            for _ in range(blocks):
                self.down.append(ResBlock(c, width, emb, norm))
                c = width
                skips.append(c)
            self.down_attn.append(SelfAttention(c, norm) if i >= levels - attention else nn.Identity())
            if i < levels - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1, self.mid_attn, self.mid2 = ResBlock(c, c, emb, norm), (
            SelfAttention(c, norm) if attention > 0 else nn.Identity()), ResBlock(c, c, emb, norm)
        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), width, emb, norm))
                c = width
            self.up_attn.append(SelfAttention(c, norm) if i >= levels - attention else nn.Identity())
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.blocks, self.levels = blocks, levels
        self.head_norm = normalisation(norm, c)
        self.head = nn.Conv2d(c, patch**2, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def canvas(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The padded size an input of `shape` is computed at: `size`, or for a crop-trained UNet the next
        multiple of what the downsamplings divide."""
        return self.size or tuple(-(-n // self.multiple) * self.multiple for n in shape)

    def offsets(self, shape: tuple[int, int] | None = None) -> tuple[int, int]:
        """Rows and columns of padding above and left of an input of `shape` (default: the slice; the rest goes
        below and right)."""
        (h, w), (h_out, w_out) = shape or self.image_shape, self.canvas(shape or self.image_shape)
        return (h_out - h) // 2, (w_out - w) // 2

    @property
    def level_condition(self) -> bool:
        return hasattr(self, "level")

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor, level: torch.Tensor | None = None,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """`level`: the slices' axial indices (B,), for a UNet built with `level_condition` (and only then);
        `condition` (B, condition_channels, H, W), for one built with condition channels."""
        dtype = self.stem.weight.dtype
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(dtype)) + self.label(label)
        if self.level_condition:
            emb = emb + self.level(level_features(level, dtype))
        shape = tuple(x.shape[-2:])
        top, left = self.offsets(shape)
        (h_in, w_in), (h_out, w_out) = shape, self.canvas(shape)
        h = x.to(dtype) if condition is None else torch.cat([x.to(dtype), condition.to(dtype)], dim=1)
        h = F.pad(h, (left, w_out - w_in - left, top, h_out - h_in - top), mode=self.pad_mode)
        h = self.stem(F.pixel_unshuffle(h, self.patch))
        hs = [h]
        blocks = iter(self.down)
        for i in range(self.levels):
            for _ in range(self.blocks):
                h = next(blocks)(h, emb)
                hs.append(h)
            h = self.down_attn[i](h)
            if i < self.levels - 1:
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        blocks = iter(self.up)
        for j in range(self.levels):
            for _ in range(self.blocks + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), emb)
            h = self.up_attn[j](h)
            if j < self.levels - 1:
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = F.pixel_shuffle(self.head(F.silu(self.head_norm(h))), self.patch)
        return out[:, :, top : top + h_in, left : left + w_in]
