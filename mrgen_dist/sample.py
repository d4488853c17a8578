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
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mrgen_dist.artifacts import ModelMetadata
from mrgen_dist.atomic import atomic_path
from mrgen_dist.cli import UserError, positive, run
from mrgen_dist.scanners import UnknownScannerError, Vocabulary

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class SampleError(UserError):
    """A request that cannot be served; the message says why."""


class Sampler:
    def __init__(self, model_path: str | os.PathLike, device: str = "auto", threads: int = 0) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise SampleError(f"{path}: no such model file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # onnxruntime's provider errors are checked below, not printed
        wanted = self._providers(device)
        self.session = ort.InferenceSession(str(path), options, providers=wanted)
        used = self.session.get_providers()
        if device in ("cuda", "tensorrt") and used[0] != wanted[0]:
            raise SampleError(
                f"onnxruntime could not start {wanted[0]} (it fell back to {used[0]}): the CUDA/cuDNN libraries "
                "that onnxruntime-gpu needs are missing or do not match it, or no GPU is visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
            )
        self.device = "cuda" if used[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self.provider = used[0]
        self.metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, str(path))
        self.vocabulary = Vocabulary.from_names(self.metadata.scanners)
        self.latent = self.metadata.latent
        self.image_shape = tuple(self.metadata.image_shape)

    @staticmethod
    def _providers(device: str) -> list[str]:
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

    def scanner_id(self, name: str) -> int:
        return self.vocabulary.index(self.resolve(name)[0])

    def resolve(self, selection: str) -> list[str]:
        """`"all"` or one scanner name -> the names, checked against this model's vocabulary."""
        try:
            return self.vocabulary.resolve(selection)
        except UnknownScannerError as e:
            raise SampleError(f"this model: {e}") from None

    def latents(self, scanner: str, n: int, seed: int) -> np.ndarray:
        if n <= 0:
            raise SampleError(f"n must be positive, got {n}")
        rng = np.random.default_rng([seed, self.scanner_id(scanner)])
        return rng.standard_normal((n, self.latent), dtype=np.float32)

    def sample(self, scanner: str, n: int, seed: int = 0, batch_size: int = 256) -> np.ndarray:
        """float32 (n, H, W) in [0, 1], the same for any batch size."""
        z = self.latents(scanner, n, seed)
        sid = self.scanner_id(scanner)
        out = np.empty((n, *self.image_shape), dtype=np.float32)
        for start in range(0, n, batch_size):
            chunk = z[start : start + batch_size]
            labels = np.full(len(chunk), sid, dtype=np.int64)
            (images,) = self.session.run(["image"], {"z": chunk, "scanner": labels})
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


def _write_h5(path: Path, images: dict[str, np.ndarray], sampler: Sampler, seed: int) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for name, stack in images.items():
            ds = f.create_dataset(name, data=stack, chunks=(1, *stack.shape[1:]))
            ds.attrs["seed"] = seed
        f.attrs.update(sampler.metadata.to_props())
        f.attrs["synthetic"] = "generated by an mrgen-dist decoder"


def _write_nifti(path: Path, images: dict[str, np.ndarray]) -> None:
    import nibabel as nib

    (stack,) = images.values()
    # slices along the third axis, in the store's display orientation (rows anterior->posterior)
    img = nib.Nifti1Image(np.ascontiguousarray(stack.transpose(2, 1, 0)[:, ::-1, :]), np.diag([-1.0, 1, 1, 1]))
    img.header["descrip"] = b"mrgen-dist SYNTHETIC samples"
    nib.save(img, path)


def _write_pngs(folder: Path, images: dict[str, np.ndarray]) -> list[Path]:
    written = [folder / "grid.png"]
    written[0].write_bytes(_png_bytes(_grid(images)))
    for name, stack in images.items():
        sub = folder / name.replace(" ", "_")
        sub.mkdir()
        for i, image in enumerate(stack):
            written.append(sub / f"{i:05d}.png")
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


def write_output(out: Path, images: dict[str, np.ndarray], sampler: Sampler, seed: int) -> list[Path]:
    """Write atomically: a file through `atomic_path`; a PNG folder built beside `out` and renamed into place."""
    kind = output_kind(out, len(images))
    if out.is_dir():
        shutil.rmtree(out)
    if kind != "png":
        with atomic_path(out) as tmp:
            _write_h5(tmp, images, sampler, seed) if kind == "h5" else _write_nifti(tmp, images)
        return [out]
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        written = _write_pngs(tmp, images)
        if out.exists():
            out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / p.relative_to(tmp) for p in written]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mrgen-sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="decoder exported by `mrgen-export onnx`")
    ap.add_argument("--scanner", required=True, help="scanner name (from the model's metadata) or 'all'")
    ap.add_argument("--n", type=int, required=True, help="images per scanner (> 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="folder (PNGs), .h5/.hdf5 file, or .nii/.nii.gz stack")
    ap.add_argument("--batch-size", type=positive(), default=256, help="images per onnxruntime call (> 0)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "tensorrt", "cpu"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)

    def sample() -> None:
        if args.out.exists() and not args.overwrite:
            raise SampleError(f"{args.out} exists; pass --overwrite to replace it")
        if args.n <= 0:
            raise SampleError(f"--n must be positive, got {args.n}")
        sampler = Sampler(args.model, args.device)
        names = sampler.resolve(args.scanner)
        output_kind(args.out, len(names))
        print(f"sampling on {sampler.device} ({sampler.provider})", file=sys.stderr)
        images = {name: sampler.sample(name, args.n, args.seed, args.batch_size) for name in names}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        written = write_output(args.out, images, sampler, args.seed)
        print(f"{sum(len(v) for v in images.values())} SYNTHETIC images ({', '.join(names)}) -> {args.out}"
              f" ({len(written)} file{'s' if len(written) != 1 else ''})")

    return run("mrgen-sample", sample)


if __name__ == "__main__":
    sys.exit(main())
