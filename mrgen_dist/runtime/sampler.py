"""`Sampler`: synthetic slices from an exported decoder or denoiser with onnxruntime. No torch.

    from mrgen_dist.runtime.sampler import Sampler
    images = Sampler("export/decoder.onnx").sample("Intera", n=100, seed=0)   # float32 (100, 218, 182)

Latents are drawn for all n images before batching, from a generator seeded by (seed, scanner id): the images do
not depend on the batch size, and each scanner has its own stream.

An int8 file carries a few prior draws with their float32 reference images (metadata `mrgen.parity`): on first
use in a process, `Sampler` runs them on this machine and refuses the file (SampleError) when the error exceeds
the tolerance of the export check, since integer kernels differ between CPUs. Its other weight layouts
(`mrgen.variants`: the u8s8 file beside it, whose kernels are exact and about twice as fast with VNNI and
saturate without) are checked the same way, and the fastest layout that passes runs (`Sampler.layout`; those
that passed: `Sampler.exact_layouts`).

A generator trained with the slice's axial level as a condition (`model.level_condition`; its graph has a
`level` input) is asked for a level with `level=k`, one of the axial indices it was trained on (the file's
`mrgen.slice_params` `axial_indices`); without one, image i gets the i-th of those levels in turn, so that n
images cover them as evenly as the store does (what the FID and the comparison sample).

A `mrgen-denoiser` file (a diffusion model) is served through the same API: its latent is the initial noise
x_T (H * W numbers per image, drawn the same way), which the guided DDIM run of runtime/diffusion.py, with the
steps and guidance scale of the file's `mrgen.sampler`, maps to a slice. A denoiser of block means
(`mrgen.sampler` `block_means`) draws on their grid and hands its slices over with each block repeated. A
`mrgen-refiner` file is served the same way around the coarse generator file it names (runtime/refine.py), a
decoder or such a denoiser: its latent is that generator's latent (z, or its x_T) followed by x_T.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mrgen_dist.artifacts import ArtifactError, ModelMetadata
from mrgen_dist.runtime.diffusion import DiffusionDraw, SamplerSettings
from mrgen_dist.runtime.noise import NoiseTexture, add_noise
from mrgen_dist.runtime.parity import decode_draws
from mrgen_dist.runtime.refine import COARSE_SLICES, RefinedDraw
from mrgen_dist.runtime.session import (
    LEVEL_INPUT,
    SampleError,
    check_finite,
    check_graph,
    cpu_description,
    device_of,
    level_feed,
    open_session,
)
from mrgen_dist.scanners import UnknownScannerError, Vocabulary

#: The parity error measured per (file, size, mtime, provider) in this process: each file is checked once.
_PARITY_ERRORS: dict[tuple[str, int, int, str], float] = {}
#: The weight layout chosen per (int8 file, size, mtime, provider) in this process, the file that holds it, and
#: the layouts that passed the file's parity draws.
_LAYOUTS: dict[tuple[str, int, int, str], tuple[str, Path, tuple[str, ...]]] = {}
#: Draws per timing run when the layouts of an int8 file are compared.
LAYOUT_TIMING_BATCH = 64
#: Timed runs per layout; the fastest counts.
LAYOUT_TIMING_RUNS = 3
#: The most images a denoiser or refiner file draws at once, whatever batch is asked: its UNet runs on whole
#: slices, twice with guidance, so its memory grows with the batch (200 images of the comparison's refiner
#: took 23 GB and were killed on a 24 GB machine); images do not depend on the batch.
DIFFUSION_BATCH = 32


class Sampler:
    """`inaccurate`: what to do with an int8 file whose stored parity draws fail on this machine: "error"
    (a SampleError) or "warn"."""

    def __init__(self, model_path: str | os.PathLike, device: str = "auto", threads: int = 0,
                 inaccurate: str = "error") -> None:
        path = self.path = Path(model_path)
        if inaccurate not in ("error", "warn"):
            raise SampleError(f"inaccurate must be 'error' or 'warn', got {inaccurate!r}")
        self.session, self.provider = open_session(path, device, threads)
        self.threads = threads
        self.device = device_of(self.provider)
        self.metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, str(path),
                                                 contract=(ModelMetadata.DECODER, ModelMetadata.DENOISER,
                                                           ModelMetadata.REFINER))
        self.vocabulary = Vocabulary.from_names(self.metadata.scanners)
        self.latent = self.metadata.latent
        self.image_shape = tuple(self.metadata.image_shape)
        self.diffusion: DiffusionDraw | None = None  # the sampling loop of a denoiser or refiner file
        self.noise_texture: NoiseTexture | None = None  # the per-scanner shape of "chi" noise
        if self.metadata.noise == ModelMetadata.CHI_NOISE:
            try:
                self.noise_texture = NoiseTexture.from_dict(self.metadata.noise_texture, len(self.vocabulary), str(path))
            except ValueError as e:
                raise ArtifactError(str(e)) from None
        if self.metadata.contract in (ModelMetadata.DENOISER, ModelMetadata.REFINER):
            try:
                settings = SamplerSettings.from_metadata(self.metadata.sampler, str(path))
            except ValueError as e:
                raise ArtifactError(str(e)) from None
            if self.metadata.contract == ModelMetadata.REFINER:
                if "scale" not in self.metadata.sampler:
                    raise ArtifactError(f"{path}: metadata mrgen.sampler lacks scale (the refiner's fine band scale)")
                mode = self.metadata.sampler.get("coarse_slice", "mean")  # absent in older files
                if mode not in COARSE_SLICES:
                    raise ArtifactError(f"{path}: metadata mrgen.sampler coarse_slice must be one of {COARSE_SLICES}, "
                                        f"got {mode!r}")
                self.diffusion = RefinedDraw(self.session, path, self.image_shape, settings,
                                             self._coarse_sampler(path, device, threads, mode != "mean"),
                                             float(self.metadata.sampler["scale"]), mode)
                self.latent = self.diffusion.latent
            else:
                block_means = self.metadata.sampler.get("block_means", 1)  # absent: the slices themselves
                if not isinstance(block_means, int) or block_means < 1:
                    raise ArtifactError(f"{path}: metadata mrgen.sampler block_means must be an integer >= 1, got "
                                        f"{block_means!r}")
                self.diffusion = DiffusionDraw(self.session, path, self.image_shape, settings, block_means)
                self.latent = self.diffusion.latent
        self.levels = self._trained_levels(path)
        self._check_graph(path)
        self.parity_error = self._check_parity(path, inaccurate)
        self.layout = "u8u8" if self.metadata.precision == "int8" else self.metadata.precision
        self.exact_layouts: tuple[str, ...] = (self.layout,)
        # another layout runs only where the file's own draws show it exact here: without draws, never
        if self.metadata.variants and self.metadata.parity.get("draws") and self.provider == "CPUExecutionProvider":
            self._pick_layout(path)

    def _coarse_sampler(self, path: Path, device: str, threads: int, noise: bool) -> Sampler:
        """The Sampler of a refiner file's coarse generator (`mrgen.coarse`, a decoder or a denoiser), checked to
        be the file exported with it, to make slices of this file's scanners and shape without a slice level, and
        to have learned noise where `noise` asks for it."""
        record = self.metadata.coarse
        file = path.parent / str(record.get("file", ""))
        if not record.get("file") or not file.is_file():
            raise ArtifactError(f"{path}: its coarse generator {file} is missing; export the refiner again "
                                "(mrgen-export onnx writes it beside the refiner's file)")
        if hashlib.sha256(file.read_bytes()).hexdigest() != record.get("sha256"):
            raise ArtifactError(f"{path}: {file} is not the coarse generator exported with it; export it again")
        coarse = Sampler(file, device, threads)
        if isinstance(coarse.diffusion, RefinedDraw) or coarse.levels is not None \
                or list(coarse.vocabulary.names) != list(self.vocabulary.names) or coarse.image_shape != self.image_shape:
            raise ArtifactError(f"{path}: its coarse generator {file} is not a decoder or denoiser of its scanners and "
                                "slices without a slice level")
        if noise and not coarse.has_noise:
            raise ArtifactError(f"{path}: it refines its coarse generator's learned noise, but {file} has none; "
                                "export the refiner again")
        return coarse

    def _trained_levels(self, path: Path) -> np.ndarray | None:
        """The axial indices a level-conditioned generator (a graph with a `level` input) was trained on; None
        for a generator without that condition."""
        if "level" not in {i.name for i in self.session.get_inputs()}:
            return None
        levels = self.metadata.slice_params.get("axial_indices")
        if not levels:
            raise ArtifactError(f"{path}: its graph takes a slice level but mrgen.slice_params records no "
                                "axial_indices to ask for; export it again")
        return np.asarray(levels, dtype=np.int64)

    def _check_graph(self, path: Path) -> None:
        """The inputs and output of the mrgen-decoder contract, with the metadata's latent and image shape (or
        those of the mrgen-denoiser contract), and the `level` input of a level-conditioned generator."""
        if self.diffusion is not None:
            check_graph(self.diffusion.session, path, *self.diffusion.expected_graph(self.levels is not None))
            return
        level = ", level int64 [batch]" if self.levels is not None else ""
        contract = f"{ModelMetadata.DECODER} graph (inputs z float32 [batch, {self.latent}], scanner int64 " \
                   f"[batch]{level}; output image float32 [batch, 1, {', '.join(map(str, self.image_shape))}])"
        expected = {"z": ("tensor(float)", [None, self.latent]), "scanner": ("tensor(int64)", [None]),
                    "image": ("tensor(float)", [None, 1, *self.image_shape])}
        if self.levels is not None:
            expected["level"] = LEVEL_INPUT
        if self.has_noise:
            contract = contract[:-1] + f" and sigma float32 [batch, 1, {', '.join(map(str, self.image_shape))}])"
            expected["sigma"] = expected["image"]
        check_graph(self.session, path, contract, expected, ("z", "scanner", "level"))

    def level_inputs(self, n: int, level: int | None) -> np.ndarray | None:
        """The axial index of each of n images: `level` for all, or the trained levels in turn; None for a
        generator without the level condition (which refuses a `level`)."""
        if self.levels is None:
            if level is not None:
                raise SampleError(f"{self.path}: this model was not trained with the slice level as a condition "
                                  "(model.level_condition); sample it without a level")
            return None
        if level is None:
            return self.levels[np.arange(n) % len(self.levels)]
        if level not in self.levels:
            raise SampleError(f"{self.path}: level {level} is not one this model was trained on (axial indices "
                              f"{self.levels[0]}..{self.levels[-1]} of the MNI grid)")
        return np.full(n, level, dtype=np.int64)

    def _check_parity(self, path: Path, inaccurate: str) -> float | None:
        """Max |this machine's output - float32 reference| on the draws stored in an int8 file (None for other
        precisions); once per file per process."""
        if self.metadata.precision != "int8" or self.diffusion is not None:
            return None
        parity = self.metadata.parity
        if not parity.get("draws"):
            warnings.warn(f"{path}: int8 file without parity draws (exported before mrgen-dist recorded them): its "
                          "accuracy on this CPU is not checked; export it again", stacklevel=3)
            return None
        key = self._file_key(path)
        if key not in _PARITY_ERRORS:
            _PARITY_ERRORS[key] = self._draws_error(self.session, path)
        error, tolerance = _PARITY_ERRORS[key], float(parity.get("tolerance", 1 / 255))
        if not error <= tolerance:
            message = (
                f"{path}: this int8 model is inaccurate on this machine ({cpu_description()}, {self.provider}): max "
                f"|onnxruntime - float32 reference| = {error:.2e} on the {len(parity['draws']['scanner'])} draws stored "
                f"in the file, over the tolerance {tolerance:.1e} (measured {parity.get('max_error', float('nan')):.2e} "
                f"at export on {parity.get('cpu', 'an unrecorded CPU')}); sample from a float export instead: "
                "mrgen-export onnx --model RUN --precision fp16")
            if inaccurate == "error":
                raise SampleError(message)
            warnings.warn(message, stacklevel=3)
        return error

    def _file_key(self, path: Path) -> tuple[str, int, int, str]:
        """What the per-process caches of int8 checks are keyed by: the file as it is now, and the provider."""
        stat = path.stat()
        return str(path.resolve()), stat.st_size, stat.st_mtime_ns, self.provider

    def _draws_error(self, session: ort.InferenceSession, path: Path) -> float:
        """Max |`session`'s images - float32 reference| on the parity draws stored in the int8 file `path`."""
        z, scanner, reference = decode_draws(self.metadata.parity["draws"], self.latent, self.image_shape, str(path))
        (got,) = session.run(["image"], {"z": z, "scanner": scanner})
        return float(np.abs(got - reference).max())

    def _pick_layout(self, path: Path) -> None:
        """Run the fastest weight layout of this int8 file that passes its parity draws on this machine (a
        variant whose file is missing or not the one recorded is skipped, with a warning)."""
        key = self._file_key(path)
        chosen = None
        if key not in _LAYOUTS:
            tolerance = float(self.metadata.parity.get("tolerance", 1 / 255))
            timing = {"z": np.random.default_rng(0).standard_normal((LAYOUT_TIMING_BATCH, self.latent), np.float32),
                      "scanner": np.arange(LAYOUT_TIMING_BATCH, dtype=np.int64) % len(self.vocabulary)}
            candidates = [(self.layout, path, self.session)]
            for variant in self.metadata.variants:
                file = path.parent / str(variant.get("file", ""))
                if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != variant.get("sha256"):
                    warnings.warn(f"{path}: its {variant.get('layout')} layout {file} is missing or not the file "
                                  "exported with it; running the uint8 x uint8 layout", stacklevel=3)
                    continue
                session, _ = open_session(file, "cpu", self.threads)
                if self._draws_error(session, file) <= tolerance:
                    candidates.append((str(variant.get("layout")), file, session))

            def seconds(session: ort.InferenceSession) -> float:
                session.run(["image"], timing)  # warm-up
                best = math.inf
                for _ in range(LAYOUT_TIMING_RUNS):  # the best of a few: one run on a busy machine can mislead
                    t0 = time.perf_counter()
                    session.run(["image"], timing)
                    best = min(best, time.perf_counter() - t0)
                return best

            # exact layouts run the same integer sums, so the choice among them is speed alone
            layout, file, chosen = min(candidates, key=lambda c: seconds(c[2])) if len(candidates) > 1 else candidates[0]
            _LAYOUTS[key] = (layout, file, tuple(c[0] for c in candidates))
        layout, file, self.exact_layouts = _LAYOUTS[key]
        if file != path:
            self.session = chosen or open_session(file, "cpu", self.threads)[0]
        self.layout = layout

    def scanner_id(self, name: str) -> int:
        return self.vocabulary.index(self.resolve(name)[0])

    def resolve(self, selection: str) -> list[str]:
        """`"all"` or one scanner name -> the names, checked against this model's vocabulary."""
        try:
            return self.vocabulary.resolve(selection)
        except UnknownScannerError as e:
            raise SampleError(f"this model: {e}") from None

    @property
    def has_noise(self) -> bool:
        """Whether the model has a learned observation noise (the graph's `sigma` output) to sample from."""
        return self.metadata.noise in ModelMetadata.NOISE_KINDS

    def decode(self, z: np.ndarray, scanner: np.ndarray, level: np.ndarray | None = None) -> np.ndarray:
        """The images (B, 1, H, W) of latents `z` (B, latent) and scanner ids (B,) (and axial indices `level`
        (B,), for a level-conditioned generator): the decoder's mean image, in one batch, or the sampling run
        from the latent of a denoiser or refiner, DIFFUSION_BATCH images at a time."""
        scanner = np.asarray(scanner, dtype=np.int64)
        if self.diffusion is None:
            return self._decoder_outputs(z, scanner, level, False, "decode", 0)[0]
        return np.concatenate([
            self.diffusion.images(z[start : start + DIFFUSION_BATCH], scanner[start : start + DIFFUSION_BATCH],
                                  "decode", start, None if level is None else level[start : start + DIFFUSION_BATCH])
            for start in range(0, len(z), DIFFUSION_BATCH)])[:, None]

    def decode_with_sigma(self, z: np.ndarray, scanner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The mean images (B, 1, H, W) of latents `z` and scanner ids, and the standard deviation of the learned
        noise around them (the graph's `sigma`), in one batch."""
        if self.diffusion is not None or not self.has_noise:
            raise SampleError(f"{self.path}: only a decoder with learned observation noise has a sigma output")
        image, sigma = self._decoder_outputs(z, np.asarray(scanner, dtype=np.int64), None, True, "coarse draw", 0)
        return image, sigma

    def _decoder_outputs(self, z: np.ndarray, scanner: np.ndarray, level: np.ndarray | None, sigma: bool, what: str,
                         offset: int) -> list[np.ndarray]:
        """A decoder graph's `image` (and with `sigma` its `sigma`) of one batch, checked finite (`what` and the
        batch's `offset` name a failing batch)."""
        names = ["image", "sigma"] if sigma else ["image"]
        outputs = self.session.run(names, {"z": z, "scanner": scanner, **level_feed(level)})
        check_finite(outputs, names, self.path, what, offset)
        return outputs

    def latents(self, scanner: str, n: int, seed: int) -> np.ndarray:
        if n <= 0:
            raise SampleError(f"n must be positive, got {n}")
        rng = np.random.default_rng([seed, self.scanner_id(scanner)])
        return rng.standard_normal((n, self.latent), dtype=np.float32)

    def sample(self, scanner: str, n: int, seed: int = 0, batch_size: int = 256, noise: bool = False,
               level: int | None = None) -> np.ndarray:
        """float32 (n, H, W) in [0, 1], the same for any batch size: the decoder's mean image, or with `noise`
        a draw from the model's learned observation noise around it (clipped to [0, 1]; Gaussian or Rician, as
        the file's `mrgen.noise` says), from streams of its own seeded by (seed, scanner id, component), so
        that the latents are those of the mean images. `level`: the axial index asked of a level-conditioned
        generator (`level_inputs`). A denoiser or refiner draws at most DIFFUSION_BATCH images at once."""
        if noise and not self.has_noise:
            raise SampleError(f"{self.path}: this model has no learned observation noise to sample (it was trained "
                              "without model.observation_noise); sample its mean, without --noise")
        levels = self.level_inputs(n, level)
        z = self.latents(scanner, n, seed)
        sid = self.scanner_id(scanner)

        def levels_of(start: int, stop: int) -> np.ndarray | None:
            return None if levels is None else levels[start:stop]

        if self.diffusion is not None:
            out = np.empty((n, *self.image_shape), dtype=np.float32)
            batch = min(batch_size, DIFFUSION_BATCH)
            for start in range(0, n, batch):
                chunk = z[start : start + batch]
                out[start : start + len(chunk)] = self.diffusion.images(
                    chunk, np.full(len(chunk), sid, dtype=np.int64), f"{scanner} draw", start,
                    levels_of(start, start + len(chunk)))
            return out
        # one stream per noise component, so that a draw does not depend on the batch size
        rngs = [np.random.default_rng([seed, sid, part]) for part in (1, 2, 3)] if noise else None
        out = np.empty((n, *self.image_shape), dtype=np.float32)
        for start in range(0, n, batch_size):
            chunk = z[start : start + batch_size]
            labels = np.full(len(chunk), sid, dtype=np.int64)
            outputs = self._decoder_outputs(chunk, labels, levels_of(start, start + len(chunk)), rngs is not None,
                                            f"{scanner} draw", start)
            images = outputs[0] if rngs is None else add_noise(*outputs, self.metadata.noise, rngs, labels,
                                                               self.noise_texture)
            out[start : start + len(chunk)] = images[:, 0]
        return out

    def sample_on_device(self, scanner: str, n: int, seed: int = 0, level: int | None = None) -> ort.OrtValue:
        """On CUDA: the images as an OrtValue that stays in GPU memory (IOBinding), for a GPU consumer such as
        the FID stage; on the CPU the same call returns a CPU OrtValue. A denoiser's images are made on the
        host (the DDIM loop is numpy) and returned as a CPU OrtValue (n, 1, H, W)."""
        if self.diffusion is not None:
            images = self.sample(scanner, n, seed, level=level)
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(images[:, None]))
        levels = self.level_inputs(n, level)
        z = self.latents(scanner, n, seed)
        labels = np.full(n, self.scanner_id(scanner), dtype=np.int64)
        binding = self.session.io_binding()
        binding.bind_cpu_input("z", z)
        binding.bind_cpu_input("scanner", labels)
        for name, values in level_feed(levels).items():
            binding.bind_cpu_input(name, values)
        binding.bind_output("image", "cuda" if self.device == "cuda" else "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]
