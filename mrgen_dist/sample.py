"""`mrgen-sample`: draw synthetic slices from an exported decoder with onnxruntime. No torch.

    mrgen-sample export/decoder.onnx --scanner Intera --n 1000 --seed 0 --out samples/        # PNGs + grid.png
    mrgen-sample export/decoder.onnx --scanner all --n 500 --out samples.h5                  # one HDF5 file
    mrgen-sample export/decoder.onnx --scanner "Magnetom TrioTim" --n 64 --out stack.nii.gz  # NIfTI stack

    from mrgen_dist.sample import Sampler
    images = Sampler("export/decoder.onnx").sample("Intera", n=100, seed=0)   # float32 (100, 218, 182)

This module imports numpy and onnxruntime only (h5py or nibabel only when writing those formats), so sampling
runs where torch is not installed. Latents are drawn for all n images before batching, from a generator
seeded by (seed, scanner id): the images do not depend on the batch size, and each scanner has its own stream.

`--device auto` takes CUDA when onnxruntime-gpu and a GPU are present, else the CPU, and says which; asking
for `cuda` or `tensorrt` when that provider cannot run is an error that names what is missing, never a silent
fallback to the CPU.

An int8 file carries a few prior draws with their float32 reference images (metadata `mrgen.parity`): on
first use in a process, `Sampler` runs them on this machine and refuses the file (SampleError) when the error
exceeds the tolerance of the export check, since integer kernels differ between CPUs.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import platform
import struct
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mrgen_dist.artifacts import ArtifactError, ModelMetadata
from mrgen_dist.cli import UserError, non_negative_int, positive, run
from mrgen_dist.outputs import check_output, folder_output, h5_bytes, write_file
from mrgen_dist.scanners import UnknownScannerError, Vocabulary

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


PROG = "mrgen-sample"


class SampleError(UserError):
    """A request that cannot be served; the message says why."""


#: The parity error measured per (file, size, mtime, provider) in this process: each file is checked once.
_PARITY_ERRORS: dict[tuple[str, int, int, str], float] = {}


def add_noise(image: np.ndarray, sigma: np.ndarray, kind: str, real: np.random.Generator,
              imaginary: np.random.Generator) -> np.ndarray:
    """A draw of learned noise of `kind` (ModelMetadata.NOISE_KINDS) around `image`, clipped to [0, 1]:
    image + sigma n1 (Gaussian), or |image + sigma (n1 + i n2)| (Rician), n1 from `real`, n2 from `imaginary`."""
    noisy = image + sigma * real.standard_normal(image.shape, dtype=np.float32)
    if kind == ModelMetadata.RICIAN_NOISE:
        noisy = np.hypot(noisy, sigma * imaginary.standard_normal(image.shape, dtype=np.float32))
    return np.clip(noisy, 0.0, 1.0)


class Sampler:
    """`inaccurate`: what to do with an int8 file whose stored parity draws fail on this machine: "error"
    (a SampleError) or "warn"."""

    def __init__(self, model_path: str | os.PathLike, device: str = "auto", threads: int = 0,
                 inaccurate: str = "error") -> None:
        path = self.path = Path(model_path)
        if inaccurate not in ("error", "warn"):
            raise SampleError(f"inaccurate must be 'error' or 'warn', got {inaccurate!r}")
        self.session, self.provider = open_session(path, device, threads)
        self.device = device_of(self.provider)
        self.metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, str(path))
        self.vocabulary = Vocabulary.from_names(self.metadata.scanners)
        self.latent = self.metadata.latent
        self.image_shape = tuple(self.metadata.image_shape)
        self._check_graph(path)
        self.parity_error = self._check_parity(path, inaccurate)

    def _check_graph(self, path: Path) -> None:
        """The inputs and output of the mrgen-decoder contract, with the metadata's latent and image shape."""
        contract = f"{ModelMetadata.DECODER} graph (inputs z float32 [batch, {self.latent}], scanner int64 " \
                   f"[batch]; output image float32 [batch, 1, {', '.join(map(str, self.image_shape))}])"
        expected = {"z": ("tensor(float)", [None, self.latent]), "scanner": ("tensor(int64)", [None]),
                    "image": ("tensor(float)", [None, 1, *self.image_shape])}
        if self.has_noise:
            contract = contract[:-1] + f" and sigma float32 [batch, 1, {', '.join(map(str, self.image_shape))}])"
            expected["sigma"] = expected["image"]
        check_graph(self.session, path, contract, expected, ("z", "scanner"))

    def _check_parity(self, path: Path, inaccurate: str) -> float | None:
        """Max |this machine's output - float32 reference| on the draws stored in an int8 file (None for other
        precisions); once per file per process."""
        if self.metadata.precision != "int8":
            return None
        parity = self.metadata.parity
        if not parity.get("draws"):
            warnings.warn(f"{path}: int8 file without parity draws (exported before mrgen-dist recorded them): its "
                          "accuracy on this CPU is not checked; export it again", stacklevel=3)
            return None
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, self.provider)
        if key not in _PARITY_ERRORS:
            z, scanner, reference = decode_draws(parity["draws"], self.latent, self.image_shape, str(path))
            (got,) = self.session.run(["image"], {"z": z, "scanner": scanner})
            _PARITY_ERRORS[key] = float(np.abs(got - reference).max())
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

    def latents(self, scanner: str, n: int, seed: int) -> np.ndarray:
        if n <= 0:
            raise SampleError(f"n must be positive, got {n}")
        rng = np.random.default_rng([seed, self.scanner_id(scanner)])
        return rng.standard_normal((n, self.latent), dtype=np.float32)

    def sample(self, scanner: str, n: int, seed: int = 0, batch_size: int = 256, noise: bool = False) -> np.ndarray:
        """float32 (n, H, W) in [0, 1], the same for any batch size: the decoder's mean image, or with `noise`
        a draw from the model's learned observation noise around it (clipped to [0, 1]; Gaussian or Rician, as
        the file's `mrgen.noise` says), from streams of its own seeded by (seed, scanner id, component), so
        that the latents are those of the mean images."""
        if noise and not self.has_noise:
            raise SampleError(f"{self.path}: this model has no learned observation noise to sample (it was trained "
                              "without model.observation_noise); sample its mean, without --noise")
        z = self.latents(scanner, n, seed)
        sid = self.scanner_id(scanner)
        # one stream per noise component, so that a draw does not depend on the batch size
        rngs = [np.random.default_rng([seed, sid, part]) for part in (1, 2)] if noise else None
        out = np.empty((n, *self.image_shape), dtype=np.float32)
        for start in range(0, n, batch_size):
            chunk = z[start : start + batch_size]
            labels = np.full(len(chunk), sid, dtype=np.int64)
            outputs = self.session.run(["image", "sigma"] if rngs else ["image"], {"z": chunk, "scanner": labels})
            check_finite(outputs, ["image", "sigma"], self.path, f"{scanner} draw", start)
            images = outputs[0] if rngs is None else add_noise(*outputs, self.metadata.noise, *rngs)
            out[start : start + len(chunk)] = images[:, 0]
        return out

    def sample_on_device(self, scanner: str, n: int, seed: int = 0) -> ort.OrtValue:
        """On CUDA: the images as an OrtValue that stays in GPU memory (IOBinding), for a GPU consumer such as
        the FID stage; on the CPU the same call returns a CPU OrtValue."""
        z = self.latents(scanner, n, seed)
        labels = np.full(n, self.scanner_id(scanner), dtype=np.int64)
        binding = self.session.io_binding()
        binding.bind_cpu_input("z", z)
        binding.bind_cpu_input("scanner", labels)
        binding.bind_output("image", "cuda" if self.device == "cuda" else "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]


def check_finite(outputs: list[np.ndarray], names: list[str], path: Path, what: str, offset: int) -> None:
    """A SampleError naming the model and the first non-finite output of a batch (`offset`: the batch's first
    item), so that NaN or infinite values never reach a file or a metric."""
    for name, values in zip(names, outputs, strict=False):
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            raise SampleError(f"{path}: the model's output {name!r} is not finite (first at {what} "
                              f"{offset + int(np.argmax(bad))}); the model is broken: export it again from an "
                              "intact run")


def check_graph(session: ort.InferenceSession, path: Path, contract: str, expected: dict[str, tuple[str, list]],
                inputs: tuple[str, ...]) -> None:
    """A SampleError naming the difference unless the graph has each `expected` input (names in `inputs`) and
    output with its type (e.g. "tensor(float)") and shape (None: any size)."""
    found_inputs = {i.name: i for i in session.get_inputs()}
    found_outputs = {o.name: o for o in session.get_outputs()}
    for name, (kind, shape) in expected.items():
        where = "input" if name in inputs else "output"
        found = found_inputs.get(name) if where == "input" else found_outputs.get(name)
        if found is None:
            names = ", ".join(found_inputs if where == "input" else found_outputs) or "none"
            raise SampleError(f"{path}: not an {contract}: it has no {where} {name!r} ({where}s: {names})")
        dims = list(found.shape)
        fits = len(dims) == len(shape) and all(
            want is None or not isinstance(got, int) or got == want for got, want in zip(dims, shape, strict=True))
        if found.type != kind or not fits:
            raise SampleError(f"{path}: not an {contract}: its {where} {name!r} is {found.type} {dims}")


def open_session(path: Path, device: str = "auto", threads: int = 0) -> tuple[ort.InferenceSession, str]:
    """An onnxruntime session of the model file on `device` and the provider it runs on; a SampleError naming
    what is missing when the file cannot be loaded or the asked provider cannot start (never a silent fallback)."""
    if not path.is_file():
        raise SampleError(f"{path}: no such model file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # onnxruntime's provider errors are checked below, not printed
    wanted = providers(device)
    try:
        session = ort.InferenceSession(str(path), options, providers=wanted)
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, InvalidGraph, ...)
        if "onnxruntime" not in type(e).__module__:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SampleError(f"{path}: not an ONNX model that onnxruntime can load ({type(e).__name__}: "
                          f"{first[:300]})") from None
    used = session.get_providers()
    if device in ("cuda", "tensorrt") and used[0] != wanted[0]:
        raise SampleError(
            f"onnxruntime could not start {wanted[0]} (it fell back to {used[0]}): the CUDA/cuDNN libraries "
            "that onnxruntime-gpu needs are missing or do not match it, or no GPU is visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return session, used[0]


def device_of(provider: str) -> str:
    """"cuda" or "cpu": where an onnxruntime execution provider runs."""
    return "cuda" if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"


def providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "auto":
        return PROVIDERS["cuda"] if "CUDAExecutionProvider" in available and _gpu_visible() else PROVIDERS["cpu"]
    if device not in PROVIDERS:
        raise SampleError(f"device must be auto, cuda, tensorrt or cpu, got {device!r}")
    needed = PROVIDERS[device][0]
    if needed not in available:
        raise SampleError(
            f"--device {device} needs onnxruntime's {needed}, and this onnxruntime "
            f"({ort.__version__}, providers: {', '.join(available)}) has none: install the GPU build with "
            "`pip install 'mrgen-dist[gpu]'` (onnxruntime-gpu) in place of onnxruntime"
        )
    return PROVIDERS[device]


def cpu_description() -> str:
    """This machine's CPU and the instruction sets its integer kernels depend on, e.g.
    'AMD EPYC (avx2, avx512f, avx512_vnni)'; from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model") and value.strip():
            name = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm") if f in flags]
    return f"{name} ({', '.join(isa)})" if isa else name


def encode_draws(z: np.ndarray, scanner: np.ndarray, images: np.ndarray) -> dict:
    """Parity draws as JSON-able text: z float32 and images float16 (zlib), little-endian, base64."""
    return {
        "scanner": [int(s) for s in scanner],
        "z": base64.b64encode(np.ascontiguousarray(z, dtype="<f4").tobytes()).decode(),
        "image": base64.b64encode(zlib.compress(np.ascontiguousarray(images, dtype="<f2").tobytes(), 9)).decode(),
    }


def decode_draws(draws: dict, latent: int, image_shape: tuple[int, ...], source: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z float32 [n, latent], scanner int64 [n], images float32 [n, 1, H, W]) from `encode_draws`'s text."""
    try:
        scanner = np.asarray(draws["scanner"], dtype=np.int64)
        n = len(scanner)
        z = np.frombuffer(base64.b64decode(draws["z"], validate=True), dtype="<f4").reshape(n, latent)
        raw = zlib.decompress(base64.b64decode(draws["image"], validate=True))
        images = np.frombuffer(raw, dtype="<f2").reshape(n, 1, *image_shape)
    except (KeyError, TypeError, ValueError, binascii.Error, zlib.error) as e:
        raise ArtifactError(f"{source}: metadata mrgen.parity is corrupt ({type(e).__name__}: {e})") from None
    return z.astype(np.float32), scanner, images.astype(np.float32)


def _gpu_visible() -> bool:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1") and any(
        Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl")
    )


# -- writers -------------------------------------------------------------------------------------------------


def _png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG (stdlib zlib, no imaging library). [0, 1] -> round(255 x)."""
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    h, w = pixels.shape
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _grid(images: dict[str, np.ndarray], columns: int = 8, gap: int = 4) -> np.ndarray:
    """One row per scanner, up to `columns` images each, on a white background (no labels: row order is the
    order of the `--scanner` selection, the model's label order for `all`)."""
    h, w = next(iter(images.values())).shape[1:]
    cols = min(columns, max(len(v) for v in images.values()))
    grid = np.ones((len(images) * (h + gap) - gap, cols * (w + gap) - gap), dtype=np.float32)
    for r, stack in enumerate(images.values()):
        for c, image in enumerate(stack[:cols]):
            grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = image
    return grid


def _fill_h5(f, images: dict[str, np.ndarray], sampler: Sampler, seed: int) -> None:
    for name, stack in images.items():
        ds = f.create_dataset(name, data=stack, chunks=(1, *stack.shape[1:]))
        ds.attrs["seed"] = seed
    f.attrs.update(sampler.metadata.to_props())
    f.attrs["synthetic"] = "generated by an mrgen-dist decoder"


def _write_nifti(path: Path, images: dict[str, np.ndarray], description: str) -> None:
    """`description` goes to the header's descrip (80 bytes); it starts with the command's name (outputs.py)."""
    import nibabel as nib

    (stack,) = images.values()
    # slices along the third axis, in the store's display orientation (rows anterior->posterior)
    img = nib.Nifti1Image(np.ascontiguousarray(stack.transpose(2, 1, 0)[:, ::-1, :]), np.diag([-1.0, 1, 1, 1]))
    img.header["descrip"] = description.encode()[:80]
    nib.save(img, path)


def _write_pngs(folder: Path, images: dict[str, np.ndarray], names: list[str] | None = None) -> list[Path]:
    """grid.png and one folder of PNGs per entry of `images`, named by `names` (default: by number)."""
    written = [folder / "grid.png"]
    written[0].write_bytes(_png_bytes(_grid(images)))
    for name, stack in images.items():
        sub = folder / name.replace(" ", "_")
        sub.mkdir()
        for i, image in enumerate(stack):
            written.append(sub / f"{names[i] if names else f'{i:05d}'}.png")
            written[-1].write_bytes(_png_bytes(image))
    return written


def output_kind(out: Path, n_scanners: int) -> str:
    """"h5", "nifti" or "png" for an output path; a SampleError for one that cannot hold the request."""
    suffix = ".nii.gz" if out.name.endswith(".nii.gz") else out.suffix
    kind = {".h5": "h5", ".hdf5": "h5", ".nii": "nifti", ".nii.gz": "nifti", "": "png"}.get(suffix)
    if kind is None:
        raise SampleError(f"output {out}: use a folder (PNGs), .h5/.hdf5 or .nii/.nii.gz")
    if kind == "nifti" and n_scanners != 1:
        raise SampleError("a NIfTI stack holds one scanner; give --scanner NAME or a .h5 / folder output")
    return kind


def check_writable(out: Path) -> None:
    """A SampleError unless `out` can be created: its nearest existing ancestor must be a folder in which this
    process can create a file (tried with an empty temporary file, removed at once)."""
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise SampleError(f"cannot write {out}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mrgen-sample-probe-")
    except OSError as e:
        raise SampleError(f"cannot write {out}: {folder} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def write_output(out: Path, images: dict[str, np.ndarray], sampler: Sampler, seed: int) -> list[Path]:
    """Write atomically (outputs.py); the paths written."""
    kind = output_kind(out, len(images))
    if kind == "png":
        with folder_output(out, PROG) as tmp:
            written = _write_pngs(tmp, images)
        return [out / p.relative_to(tmp) for p in written]
    if kind == "h5":
        image = h5_bytes(lambda f: _fill_h5(f, images, sampler, seed), PROG)
        write_file(out, lambda tmp: tmp.write_bytes(image))
    else:
        write_file(out, lambda tmp: _write_nifti(tmp, images, f"{PROG}: mrgen-dist SYNTHETIC samples"))
    return [out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="decoder exported by `mrgen-export onnx`")
    ap.add_argument("--scanner", required=True, help="scanner name (from the model's metadata) or 'all'")
    ap.add_argument("--n", type=positive(), required=True, help="images per scanner (> 0)")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="folder (PNGs), .h5/.hdf5 file, or .nii/.nii.gz stack")
    ap.add_argument("--batch-size", type=positive(), default=256, help="images per onnxruntime call (> 0)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "tensorrt", "cpu"))
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier output of mrgen-sample")
    ap.add_argument("--noise", action="store_true",
                    help="draw the model's learned observation noise around its mean image (the atlas family's "
                    "Rician noise, or model.observation_noise); default: the mean image")
    args = ap.parse_args(argv)

    def sample() -> None:
        check_output(args.out, PROG, args.overwrite, inputs=[args.model])
        sampler = Sampler(args.model, args.device)
        names = sampler.resolve(args.scanner)
        output_kind(args.out, len(names))
        check_writable(args.out)  # before the sampling, which can take long
        print(f"sampling on {sampler.device} ({sampler.provider})", file=sys.stderr)
        images = {name: sampler.sample(name, args.n, args.seed, args.batch_size, args.noise) for name in names}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        written = write_output(args.out, images, sampler, args.seed)
        print(f"{sum(len(v) for v in images.values())} SYNTHETIC images ({', '.join(names)}) -> {args.out}"
              f" ({len(written)} file{'s' if len(written) != 1 else ''})")

    return run(PROG, sample)


if __name__ == "__main__":
    sys.exit(main())
