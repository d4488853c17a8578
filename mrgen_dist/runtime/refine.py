"""Sampling an exported refiner (contract `mrgen-refiner`, models/refiner.py) around its coarse generator. No
torch.

The latent of an image is the coarse generator's latent followed by x_T (H * W numbers). The coarse generator
is a `Sampler` of the file beside the refiner's: an `mrgen-decoder`, whose latent is z, or the `mrgen-denoiser`
of a cascade's coarse stage, whose latent is its own x_T and whose block means it hands over repeated per block.
It makes its slice; the refiner's graph makes that slice's low-pass `base` and the prediction for the scaled
fine band; the sampling loop of runtime/diffusion.py (the file's `mrgen.sampler`) draws the fine band r from
x_T; and the slice is clip(base + scale r, 0, 1).

The coarse slice (`mrgen.sampler` `coarse_slice`, the refiner's `model.coarse_slice`; COARSE_SLICES) is the
generator's slice, for a decoder its mean slice ("mean"), a draw of its learned noise around it ("draw"), or
that draw's mean, pixel by pixel ("expected"). The refiner learnt the fine band under the low-pass of real
slices, which carry their noise floor: in air that condition is the floor's mean, not the zero of a noise-free
mean slice, from which the final clip at 0 cuts part of the drawn noise away. A draw gives the floor but also
carries the coarse noise's texture into the low-pass; its mean gives the floor without it.
"""

from __future__ import annotations

import numpy as np

from mrgen_dist.runtime.diffusion import Denoise, DiffusionDraw, noise_streams, sample
from mrgen_dist.runtime.noise import NoiseTexture, add_noise, expected_draw
from mrgen_dist.runtime.session import check_finite


def coarse_draw(image: np.ndarray, sigma: np.ndarray, kind: str, scanner: np.ndarray, texture: NoiseTexture | None,
                z: np.ndarray) -> np.ndarray:
    """A draw of the coarse generator's learned noise of `kind` around its mean slices `image` (B, 1, H, W),
    image i's from a stream seeded by its coarse latent z[i] (`noise_streams`), so that a refined slice is a
    function of its latent alone, whatever the batch."""
    return np.concatenate([add_noise(image[i : i + 1], sigma[i : i + 1], kind, [stream] * 3, scanner[i : i + 1],
                                     texture)
                           for i, stream in enumerate(noise_streams(z))])


#: What a refiner refines (module doc): the coarse decoder's mean slice, a draw of its noise, or the draw's mean.
COARSE_SLICES = ("mean", "draw", "expected")


def coarse_slice(mode: str, image: np.ndarray, sigma: np.ndarray | None, kind: str, scanner: np.ndarray,
                 texture: NoiseTexture | None, z: np.ndarray) -> np.ndarray:
    """The slices a refiner refines, of `mode` (COARSE_SLICES), from the coarse decoder's mean slices `image`
    (B, 1, H, W), its noise's `sigma` (None for "mean") and `kind`, and the images' labels and coarse latents."""
    if mode == "mean":
        return image
    if mode == "draw":
        return coarse_draw(image, sigma, kind, scanner, texture, z)
    return expected_draw(image, sigma, kind, scanner, texture)


class RefinedDraw(DiffusionDraw):
    """What `Sampler` does with a `mrgen-refiner` file; `coarse` is the Sampler of its coarse generator file and
    `scale` the fine band's scale (the file's `mrgen.sampler` `scale`); `mode` is the coarse slice refined
    (COARSE_SLICES)."""

    def __init__(self, session, path, image_shape, settings, coarse, scale: float, mode: str) -> None:
        super().__init__(session, path, image_shape, settings)
        self.coarse, self.scale, self.mode = coarse, scale, mode

    @property
    def latent(self) -> int:
        return self.coarse.latent + self.image_shape[0] * self.image_shape[1]

    def expected_graph(self, level_condition: bool) -> tuple[str, dict[str, tuple[str, list]], tuple[str, ...]]:
        """The contract's description, inputs and outputs (for `session.check_graph`)."""
        shape = [None, 1, *self.image_shape]
        size = ", ".join(map(str, self.image_shape))
        text = (f"mrgen-refiner graph (inputs x float32 [batch, 1, {size}], t float32 [batch], scanner int64 [batch], "
                f"coarse float32 [batch, 1, {size}]; outputs out and base float32 of x's shape)")
        expected = {"x": ("tensor(float)", shape), "t": ("tensor(float)", [None]), "scanner": ("tensor(int64)", [None]),
                    "coarse": ("tensor(float)", shape), "out": ("tensor(float)", shape), "base": ("tensor(float)", shape)}
        return text, expected, ("x", "t", "scanner", "coarse")

    def refine(self, coarse: np.ndarray, what: str, offset: int) -> tuple[Denoise, list[np.ndarray]]:
        """The denoiser of the fine band over the coarse slices (B, 1, H, W) (repeated for a guided 2B batch),
        and a list that holds their low-pass (B, 1, H, W) once it has run (every run of the graph makes it)."""
        base: list[np.ndarray] = []

        def run(x: np.ndarray, t: np.ndarray, scanner: np.ndarray) -> np.ndarray:
            feed = np.concatenate([coarse] * (len(x) // len(coarse)))
            out, low = self.session.run(["out", "base"], {"x": x, "t": t, "scanner": scanner, "coarse": feed})
            check_finite([out, low], ["out", "base"], self.path, what, offset)
            base[:] = [low[: len(coarse)]]
            return out

        return run, base

    def images(self, z: np.ndarray, scanner: np.ndarray, what: str = "draw", offset: int = 0,
               level: np.ndarray | None = None) -> np.ndarray:
        """Slices (B, H, W) in [0, 1] of the latents `z` (B, coarse latent + H * W) and labels `scanner` (B,)."""
        if level is not None:
            raise ValueError("a refiner takes no slice level")
        z_coarse = np.ascontiguousarray(z[:, : self.coarse.latent], dtype=np.float32)
        image, sigma = (self.coarse.decode(z_coarse, scanner), None) if self.mode == "mean" else \
            self.coarse.decode_with_sigma(z_coarse, scanner)
        coarse = coarse_slice(self.mode, image, sigma, self.coarse.metadata.noise, scanner, self.coarse.noise_texture,
                              z_coarse)
        x = np.ascontiguousarray(z[:, self.coarse.latent :], dtype=np.float32).reshape(len(z), 1, *self.image_shape)
        return self.refined(coarse, x, scanner, what, offset)

    def refined(self, coarse: np.ndarray, x: np.ndarray, scanner: np.ndarray, what: str = "draw", offset: int = 0
                ) -> np.ndarray:
        """Slices (B, H, W) in [0, 1]: the coarse slices' (B, 1, H, W) low-pass plus the fine band drawn from x_T
        `x` (B, 1, H, W) for the labels `scanner` (B,)."""
        denoise, base = self.refine(coarse, what, offset)
        fine = sample(denoise, x, scanner, self.settings, low_pass=lambda: base[0])
        return np.clip(base[0] + np.float32(self.scale) * fine, 0, 1)[:, 0]
