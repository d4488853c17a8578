"""Sampling an exported refiner (contract `mrgen-refiner`, models/refiner.py) around its coarse generator. No
torch.

The latent of an image is the coarse generator's z followed by x_T (H * W numbers): the coarse decoder (a
`Sampler` of the `mrgen-decoder` file beside the refiner's) makes its slice, the refiner's graph its low-pass
`base` and the prediction for the scaled fine band, the sampling loop of runtime/diffusion.py (the file's
`mrgen.sampler`) draws the fine band r from x_T, and the slice is clip(base + scale r, 0, 1).

The coarse slice is the decoder's mean slice, or, where the file says so (`mrgen.sampler` `coarse_noise`, the
refiner's `model.coarse_noise`), a draw of its learned noise around it: the refiner learnt the fine band under
the low-pass of real slices, which carry their noise floor, so in air its condition is the floor's mean, not
the zero of a noise-free mean slice, from which the final clip at 0 cuts part of the drawn noise away.
"""

from __future__ import annotations

import numpy as np

from mrgen_dist.runtime.diffusion import Denoise, DiffusionDraw, noise_streams, sample
from mrgen_dist.runtime.noise import NoiseTexture, add_noise
from mrgen_dist.runtime.session import check_finite


def coarse_draw(image: np.ndarray, sigma: np.ndarray, kind: str, scanner: np.ndarray, texture: NoiseTexture | None,
                z: np.ndarray) -> np.ndarray:
    """A draw of the coarse generator's learned noise of `kind` around its mean slices `image` (B, 1, H, W),
    image i's from a stream seeded by its coarse latent z[i] (`noise_streams`), so that a refined slice is a
    function of its latent alone, whatever the batch."""
    return np.concatenate([add_noise(image[i : i + 1], sigma[i : i + 1], kind, [stream] * 3, scanner[i : i + 1],
                                     texture)
                           for i, stream in enumerate(noise_streams(z))])


class RefinedDraw(DiffusionDraw):
    """What `Sampler` does with a `mrgen-refiner` file; `coarse` is the Sampler of its coarse decoder file and
    `scale` the fine band's scale (the file's `mrgen.sampler` `scale`); with `coarse_noise`, the refined slice
    is the coarse decoder's draw with its learned noise, else its mean slice."""

    def __init__(self, session, path, image_shape, settings, coarse, scale: float, coarse_noise: bool) -> None:
        super().__init__(session, path, image_shape, settings)
        self.coarse, self.scale, self.coarse_noise = coarse, scale, coarse_noise

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
        and a list that holds their low-pass once it has run."""
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
        if self.coarse_noise:
            image, sigma = self.coarse.decode_with_sigma(z_coarse, scanner)
            coarse = coarse_draw(image, sigma, self.coarse.metadata.noise, scanner, self.coarse.noise_texture, z_coarse)
        else:
            coarse = self.coarse.decode(z_coarse, scanner)
        x = np.ascontiguousarray(z[:, self.coarse.latent :], dtype=np.float32).reshape(len(z), 1, *self.image_shape)
        denoise, base = self.refine(coarse, what, offset)
        fine = sample(denoise, x, scanner, self.settings)
        return np.clip(base[0] + np.float32(self.scale) * fine, 0, 1)[:, 0]
