"""Convolutional networks shared by the adversarial families (not a family itself).

* `ConvGenerator`: (z, scanner) -> image. A linear layer maps [z, one-hot scanner] to a small feature grid,
  blocks of nearest-neighbour doubling and a 3x3 convolution grow it to `size` (rather than DCGAN's 4x4
  transposed convolutions, whose uneven overlap printed a checkerboard on the coarse grid here), and a 3x3
  convolution with a sigmoid makes the image, which is centre-cropped to the slice. With `noise_map`, z also
  carries one N(0, 1) number per pixel of `size`, added to the last block's features with a learned scale per
  scanner and channel (StyleGAN's noise inputs, made part of z so that the exported graph stays a function of
  (z, scanner)): acquisition noise, which tells scanners apart, is i.i.d. per pixel and hard to grow from a
  128-number code by convolutions. Activations are LeakyReLU (0.2): with ReLU, a run here ended its first epoch
  on a constant grey image. Generating a power-of-two multiple and cropping keeps every upsampling an exact
  doubling: 218 x 182 is generated as 224 x 192 (7 x 6 doubled five times) and 3 rows and 5 columns are cut from
  each side. Every block normalises with a *scanner-conditional* group norm (a learned scale and shift per
  scanner and channel, as the conditional batch norm of BigGAN, but per image: its statistics do not depend on
  the batch or on the other ranks), so the label reaches every scale of the image, where contrast, noise and
  sharpness live.
* `ConvDiscriminator`: image -> features by 4x4 stride-2 convolutions with LeakyReLU (no batch norm, which
  Gulrajani et al. advise against in a critic whose gradient is penalised per image), optionally with spectral
  normalisation of every weight (Miyato et al. 2018: without it, the discriminator of a GAN loss wins within an
  epoch here and the generator collapses to a checkerboard), then a real/fake score, either one per image
  (global sum pooling) or one per patch (`patch=True`, a PatchGAN map), and a scanner head: `projection` (Miyato
  & Koyama 2018: the score gains <embed(scanner), pooled features>; its scanner logits are the score each
  scanner would give) or `auxiliary` (AC-GAN: a classifier on the pooled features). Before the score, the
  features gain the minibatch standard deviation (Karras et al. 2018, who used it with WGAN-GP), one number per
  batch: a generator that makes the same slice for every z is seen at once (without it, samples after five
  epochs here did not depend on z).
* `ConvEncoder`: image + scanner -> mean and log-variance of z, for the cVAE-GAN.
* `ConvTranslator`: (image, target scanner) -> image, for the translation families: an encoder of stride-2
  convolutions, residual blocks at the coarsest scale, and a decoder of nearest-neighbour doublings that adds
  the encoder's features of each scale back (U-Net-like skips: the anatomy's edges need not pass through the
  bottleneck). Every norm is a scanner norm of the *target* scanner. The output is the input plus a learned
  change, clipped to [0, 1], and that change starts at exactly zero: an untrained translator is the identity,
  so training starts from the anatomy and learns only what differs between scanners (contrast, noise,
  sharpness), which is what the cycle and identity losses ask of it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("projection", "auxiliary")
GROUPS = 4  # group-norm groups (or fewer, for narrower layers)


def centre_crop(images: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The central `shape` of (B, C, H, W) images."""
    top, left = (images.shape[-2] - shape[0]) // 2, (images.shape[-1] - shape[1]) // 2
    return images[..., top : top + shape[0], left : left + shape[1]]


def centre_pad(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) images zero-padded (the background's value) to `size`, the inverse of `centre_crop`."""
    dh, dw = size[0] - images.shape[-2], size[1] - images.shape[-1]
    return F.pad(images, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


def z_width(latent: int, size: tuple[int, int], noise_map: bool) -> int:
    """The width of a generator's z: the latent code, then, with a noise map, one number per pixel of `size`."""
    return latent + (size[0] * size[1] if noise_map else 0)


class ScannerNorm(nn.Module):
    """Group norm without its own affine, then a scale and shift chosen by the scanner (1 and 0 at start)."""

    def __init__(self, channels: int, n_scanners: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(GROUPS, channels), channels, affine=False)
        self.scale = nn.Parameter(torch.ones(n_scanners, channels))
        self.shift = nn.Parameter(torch.zeros(n_scanners, channels))

    def forward(self, x: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale[scanner, :, None, None] + self.shift[scanner, :, None, None]


class ConvGenerator(nn.Module):
    def __init__(self, latent: int, n_scanners: int, channels: list[int], size: tuple[int, int],
                 image_shape: tuple[int, int], noise_map: bool = False) -> None:
        super().__init__()
        self.code, self.n_scanners, self.image_shape, self.size = latent, n_scanners, tuple(image_shape), tuple(size)
        self.latent = z_width(latent, size, noise_map)
        if noise_map:
            self.noise_scale = nn.Parameter(torch.zeros(n_scanners, channels[-1]))  # no noise at start
        doublings = len(channels) - 1
        self.start = (size[0] >> doublings, size[1] >> doublings)
        self.project = nn.Linear(latent + n_scanners, channels[0] * self.start[0] * self.start[1])
        self.first_norm = ScannerNorm(channels[0], n_scanners)
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
            for c_in, c_out in zip(channels[:-1], channels[1:], strict=True))
        self.norms = nn.ModuleList(ScannerNorm(c, n_scanners) for c in channels[1:])
        self.to_image = nn.Conv2d(channels[-1], 1, 3, padding=1)

    def silent(self, code: torch.Tensor) -> torch.Tensor:
        """The z of latent codes (B, code) with a noise map of zeros (z itself without a noise map)."""
        return F.pad(code, (0, self.latent - code.shape[1]))

    def forward(self, z: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        """(B, latent), int64 (B,) -> (B, 1, *image_shape) in [0, 1]."""
        label = F.one_hot(scanner, self.n_scanners).to(z.dtype)
        # unflatten, not view(len(z), ...): len(z) would fix the exported graph's batch size
        x = self.project(torch.cat([z[:, : self.code], label], dim=1)).unflatten(1, (-1, *self.start))
        x = F.leaky_relu(self.first_norm(x, scanner), 0.2)
        for i, (up, norm) in enumerate(zip(self.ups, self.norms, strict=True)):
            x = up(x)
            if i == len(self.ups) - 1 and hasattr(self, "noise_scale"):
                noise = z[:, self.code :].unflatten(1, (1, *self.size))
                x = x + self.noise_scale[scanner][:, :, None, None] * noise
            x = F.leaky_relu(norm(x, scanner), 0.2)
        return centre_crop(torch.sigmoid(self.to_image(x)), self.image_shape)


class DiscriminatorOutput(NamedTuple):
    score: torch.Tensor  # real/fake score of the asked scanner: (B,) or, for a patch discriminator, (B, patches)
    scanner_logits: torch.Tensor  # (B, n_scanners): the scanner head's reading of each image


def _identity(layer: nn.Module) -> nn.Module:
    return layer


def _features(channels: list[int], in_channels: int, normalise=_identity) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in zip([in_channels, *channels[:-1]], channels, strict=True):
        layers += [normalise(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


def minibatch_std(features: torch.Tensor) -> torch.Tensor:
    """The standard deviation over the batch of each feature, averaged: a scalar (0 for a batch of one)."""
    if len(features) < 2:
        return features.new_zeros(())
    return features.float().std(dim=0).mean().to(features.dtype)


class ConvDiscriminator(nn.Module):
    def __init__(self, n_scanners: int, channels: list[int], size: tuple[int, int], head: str,
                 patch: bool = False, spectral_norm: bool = False) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"model.head must be one of {', '.join(HEADS)}, got {head!r}")
        self.size, self.head, self.patch = tuple(size), head, patch
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else _identity
        self.features = _features(channels, 1, sn)
        width = channels[-1]
        self.score = sn(nn.Conv2d(width + 1, 1, 3, padding=1) if patch else nn.Linear(width + 1, 1))
        if head == "projection":
            self.embed = sn(nn.Embedding(n_scanners, width))
        else:
            self.classify = sn(nn.Linear(width, n_scanners))

    def forward(self, images: torch.Tensor, scanner: torch.Tensor) -> DiscriminatorOutput:
        """Images (B, 1, H, W) of the slice's shape, the scanner each is shown as -> scores and scanner logits."""
        h = self.features(centre_pad(images, self.size))
        pooled = h.sum(dim=(2, 3))
        spread = minibatch_std(h)
        if self.patch:
            score = self.score(torch.cat([h, spread.view(1, 1, 1, 1).expand(len(h), 1, *h.shape[2:])], 1)).flatten(1)
        else:
            score = self.score(torch.cat([pooled, spread.view(1, 1).expand(len(h), 1)], 1))[:, 0]
        if self.head == "auxiliary":
            return DiscriminatorOutput(score, self.classify(pooled))
        # projection: the score of scanner k adds <embed_k, pooled>; the head's logits are those k-scores
        logits = pooled @ self.embed.weight.T
        projected = logits.gather(1, scanner[:, None])
        score = score + (projected if self.patch else projected[:, 0])
        return DiscriminatorOutput(score, logits)


class ConvEncoder(nn.Module):
    """(images, scanner) -> (mean, logvar) of z: the discriminator's feature stack, pooled, with the one-hot
    scanner appended before the last linear layers."""

    def __init__(self, latent: int, n_scanners: int, channels: list[int], size: tuple[int, int]) -> None:
        super().__init__()
        self.size, self.n_scanners = tuple(size), n_scanners
        self.features = _features(channels, 1)
        self.to_mean = nn.Linear(channels[-1] + n_scanners, latent)
        self.to_logvar = nn.Linear(channels[-1] + n_scanners, latent)

    def forward(self, images: torch.Tensor, scanner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.features(centre_pad(images, self.size)).mean(dim=(2, 3))
        h = torch.cat([pooled, F.one_hot(scanner, self.n_scanners).to(pooled.dtype)], dim=1)
        # log-variance softly bounded to (-10, 10): unbounded, it overflowed exp() after ~500 steps at lr 1e-3
        return self.to_mean(h), 10 * torch.tanh(self.to_logvar(h) / 10)


class ResidualBlock(nn.Module):
    """x + (conv, scanner norm, LeakyReLU, conv, scanner norm)(x): the translator's bottleneck blocks."""

    def __init__(self, channels: int, n_scanners: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = ScannerNorm(channels, n_scanners)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = ScannerNorm(channels, n_scanners)

    def forward(self, x: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.norm1(self.conv1(x), scanner), 0.2)
        return x + self.norm2(self.conv2(h), scanner)


class ConvTranslator(nn.Module):
    """(images (B, 1, H, W) in [0, 1], target scanner int64 (B,)) -> images of the same shape in [0, 1].

    `channels` are the widths of the scales, finest first (each next one at half the resolution), `blocks` the
    residual blocks at the coarsest; slices are centre-padded to `size` and the result cropped back."""

    def __init__(self, n_scanners: int, channels: list[int], blocks: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.n_scanners, self.size = n_scanners, tuple(size)
        self.stem = nn.Conv2d(1, channels[0], 3, padding=1, bias=False)
        self.stem_norm = ScannerNorm(channels[0], n_scanners)
        self.downs = nn.ModuleList(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False)
                                   for c_in, c_out in zip(channels[:-1], channels[1:], strict=True))
        self.down_norms = nn.ModuleList(ScannerNorm(c, n_scanners) for c in channels[1:])
        self.blocks = nn.ModuleList(ResidualBlock(channels[-1], n_scanners) for _ in range(blocks))
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
            for c_in, c_out in zip(channels[:0:-1], channels[-2::-1], strict=True))
        self.up_norms = nn.ModuleList(ScannerNorm(c, n_scanners) for c in channels[-2::-1])
        self.to_change = nn.Conv2d(channels[0], 1, 3, padding=1)
        nn.init.zeros_(self.to_change.weight)  # the identity at start
        nn.init.zeros_(self.to_change.bias)

    def forward(self, images: torch.Tensor, scanner: torch.Tensor) -> torch.Tensor:
        x = centre_pad(images, self.size)
        h = F.leaky_relu(self.stem_norm(self.stem(x), scanner), 0.2)
        skips = [h]
        for down, norm in zip(self.downs, self.down_norms, strict=True):
            h = F.leaky_relu(norm(down(h), scanner), 0.2)
            skips.append(h)
        for block in self.blocks:
            h = block(h, scanner)
        for up, norm, skip in zip(self.ups, self.up_norms, skips[-2::-1], strict=True):
            h = F.leaky_relu(norm(up(h) + skip, scanner), 0.2)
        return centre_crop((x + self.to_change(h)).clamp(0.0, 1.0), tuple(images.shape[-2:]))


def multiply_accumulates(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of `module` on `inputs` (batch 1), over its convolutions and
    linear layers; run in eval mode, so that counting leaves no trace (spectral norm's power iteration)."""
    total = 0

    def count(layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Linear):
            total += layer.in_features * layer.out_features
        else:
            total += out[0].numel() * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] // layer.groups

    device = next(module.parameters()).device
    inputs = tuple(x.to(device) for x in inputs)
    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    training = module.training
    try:
        with torch.no_grad():
            module.eval()(*inputs)
    finally:
        module.train(training)
        for h in hooks:
            h.remove()
    return total
