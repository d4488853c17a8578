"""`mrgen-translate`: real slices as another scanner would show them, from an exported translator. No torch.

    mrgen-translate export/translator.onnx sub-01_T1w.nii.gz --to "Magnetom TrioTim" --out sub-01-trio.nii.gz
    mrgen-translate export/translator.onnx runs/store --split test --from Intera --to Unspecified --out test.h5
    mrgen-translate export/translator.onnx slices/ --to Intera --out translated/      # PNGs + grid.png

    from mrgen_dist.translate import Translator
    out = Translator("export/translator.onnx").translate(images, "Intera")   # float32 (n, 218, 182) in [0, 1]

The model is a translator exported by `mrgen-export onnx` (contract `mrgen-translator`, export/README.md).
INPUT is one of:

* a NIfTI volume on the MNI152 1 mm grid (182 x 218 x 182): its central axial slices, cut and scaled to [0, 1]
  by the rule of the store the model was trained on (the file's `mrgen.slice_params`), as `mrgen-convert`
  does. A volume on another grid is refused: put it on the grid with `mrgen-convert DIR --resample --out STORE`
  and translate the store;
* a slice store (a folder with manifest.json): the slices of `--split` (default test), of the source scanner
  `--from` if given; its scanners must be the model's;
* PNG files, or a folder of them: greyscale (colour is averaged, alpha dropped), 8 or 16 bits, scaled to
  [0, 1] by the bit depth.

OUT is a NIfTI stack of the translations (.nii / .nii.gz, slices along the third axis as `mrgen-sample`
writes them), an HDF5 file (.h5 / .hdf5: datasets `input`, `translated` and, for a store, `scanner`, the
source ids; the model's metadata as attributes), or a folder: `grid.png` (inputs above, their translations
below) and one PNG per slice in `input/` and `translated/`. An unknown scanner, an input of another shape
than the model's slices or a volume on another grid is refused before anything is written.

This module imports numpy and onnxruntime (nibabel for NIfTI, h5py for stores and HDF5 output).
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrgen_dist.artifacts import ModelMetadata
from mrgen_dist.cli import UserError, positive, run
from mrgen_dist.outputs import check_output, folder_output, h5_bytes, write_file
from mrgen_dist.sample import (
    SampleError,
    _write_nifti,
    _write_pngs,
    check_finite,
    check_graph,
    check_writable,
    device_of,
    open_session,
    output_kind,
)
from mrgen_dist.scanners import UnknownScannerError, Vocabulary

PROG = "mrgen-translate"
BATCH = 16  # slices per onnxruntime call: the 10 slices of a volume go in one


class TranslateError(UserError):
    """A request that cannot be served; the message says why. Nothing was written."""


class Translator:
    """An exported translator: `translate(images, target)` -> the images as the target scanner shows them."""

    def __init__(self, model_path: str | os.PathLike, device: str = "auto", threads: int = 0) -> None:
        path = self.path = Path(model_path)
        try:
            self.session, self.provider = open_session(path, device, threads)
        except SampleError as e:
            raise TranslateError(str(e)) from None
        self.device = device_of(self.provider)
        self.metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, str(path),
                                                 contract=ModelMetadata.TRANSLATOR)
        self.vocabulary = Vocabulary.from_names(self.metadata.scanners)
        self.image_shape = tuple(self.metadata.image_shape)
        self.targets = list(self.metadata.targets) or list(self.vocabulary.names)
        shape = [None, 1, *self.image_shape]
        contract = (f"{ModelMetadata.TRANSLATOR} graph (inputs image float32 {shape}, scanner int64 [batch]; "
                    f"output translated float32 {shape})")
        try:
            check_graph(self.session, path, contract, {"image": ("tensor(float)", shape),
                        "scanner": ("tensor(int64)", [None]), "translated": ("tensor(float)", shape)},
                        ("image", "scanner"))
        except SampleError as e:
            raise TranslateError(str(e)) from None

    def target_id(self, name: str) -> int:
        """The id of a scanner this model translates to; a TranslateError naming the ones it knows."""
        try:
            sid = self.vocabulary.index(name)
        except UnknownScannerError as e:
            raise TranslateError(f"this model: {e}") from None
        if name not in self.targets:
            raise TranslateError(f"this model translates to {' and '.join(self.targets)} only, not {name!r}")
        return sid

    def check_shape(self, images: np.ndarray, source: str) -> None:
        if images.ndim != 3 or tuple(images.shape[1:]) != self.image_shape:
            got = "x".join(map(str, images.shape[1:])) if images.ndim == 3 else f"shape {images.shape}"
            raise TranslateError(f"{source}: slices are {got}; this model translates "
                                 f"{'x'.join(map(str, self.image_shape))} slices")

    def translate_ids(self, images: np.ndarray, target: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
        """float32 (n, H, W) in [0, 1], each image to its own target id (int64 (n,))."""
        images = np.asarray(images, dtype=np.float32)
        self.check_shape(images, "input")
        out = np.empty_like(images)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size, None]
            (result,) = self.session.run(["translated"], {"image": chunk,
                                                          "scanner": target[start : start + batch_size]})
            try:
                check_finite([result], ["translated"], self.path, "slice", start)
            except SampleError as e:
                raise TranslateError(str(e)) from None
            out[start : start + len(chunk)] = result[:, 0]
        return out

    def translate(self, images: np.ndarray, target: str, batch_size: int = BATCH) -> np.ndarray:
        """float32 (n, H, W) in [0, 1]: every image to the scanner `target`."""
        ids = np.full(len(images), self.target_id(target), dtype=np.int64)
        return self.translate_ids(images, ids, batch_size)


# -- inputs -------------------------------------------------------------------------------------------------------


@dataclass
class Slices:
    """What INPUT gave: the slices, their source scanner ids when known, and a name per slice."""

    images: np.ndarray  # float32 (n, H, W) in [0, 1]
    names: list[str]
    scanner: np.ndarray | None = None  # int64 (n,), the source scanners (a store)


def input_kind(path: Path) -> str:
    if path.name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if (path / "manifest.json").is_file():
        return "store"
    if path.suffix.lower() == ".png" or path.is_dir():
        return "png"
    raise TranslateError(f"{path}: not a NIfTI volume (.nii/.nii.gz), a slice store (a folder with manifest.json), "
                         "PNG files or a folder of PNGs")


def read_volume(path: Path, translator: Translator) -> Slices:
    """The central slices of a volume on the MNI grid, by the model's slice rule."""
    from mrgen_dist.data.volume import SliceParams, VolumeRejected, central_slices, load_volume

    if not translator.metadata.slice_params:
        raise TranslateError(f"{translator.path} does not record how its store cut slices (exported before "
                             "mrgen.slice_params existed); export it again, or translate a store made by mrgen-convert")
    try:
        params = SliceParams.from_record(translator.metadata.slice_params)
        images = central_slices(load_volume(path), params)
    except VolumeRejected as e:
        hint = ("; put it on the grid with `mrgen-convert DIR --resample --out STORE` and translate the store"
                if "not on the MNI152" in str(e) else "")
        raise TranslateError(f"{path}: {str(e).removesuffix('; use --resample')}{hint}") from None
    return Slices(images, [f"k{k:03d}" for k in params.slice_indices()])


def read_store(path: Path, translator: Translator, split: str, source: str | None) -> Slices:
    from mrgen_dist.data.store import SliceStore

    store = SliceStore(path)
    if list(store.vocabulary.names) != list(translator.vocabulary.names):
        raise TranslateError(f"{path}: its scanners {list(store.vocabulary.names)} are not the model's "
                             f"{list(translator.vocabulary.names)}")
    try:
        data = store.read_split(split, source)
    except UnknownScannerError as e:
        raise TranslateError(f"--from: {e}") from None
    if len(data) == 0:
        raise TranslateError(f"{path}: no {split} slices" + (f" of {source}" if source else ""))
    names = [f"{subject}_k{k:03d}" for subject, k in zip(data.subject, data.slice_index, strict=True)]
    return Slices(data.images.astype(np.float32), names, data.scanner)


def read_pngs(path: Path) -> Slices:
    files = sorted(path.glob("*.png")) if path.is_dir() else [path]
    if not files:
        raise TranslateError(f"{path}: no .png files")
    images = [read_png(f) for f in files]
    if len({i.shape for i in images}) > 1:
        first = next(f for f, i in zip(files, images, strict=True) if i.shape != images[0].shape)
        raise TranslateError(f"{path}: the PNGs differ in size ({files[0].name} is {images[0].shape[1]}x"
                             f"{images[0].shape[0]}, {first.name} is not)")
    return Slices(np.stack(images), [f.stem for f in files])


def read_png(path: Path) -> np.ndarray:
    """A PNG as float32 (H, W) in [0, 1]: grey, grey + alpha, RGB or RGBA, 8 or 16 bits, not interlaced."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TranslateError(f"{path}: cannot read ({e.strerror})") from None
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise TranslateError(f"{path}: not a PNG file")
    chunks, pos = {}, 8
    try:
        while pos < len(data):
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            chunks.setdefault(kind, []).append(data[pos + 8 : pos + 8 + length])
            pos += 12 + length
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
        raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    except (struct.error, KeyError, zlib.error) as e:
        raise TranslateError(f"{path}: corrupt PNG ({type(e).__name__})") from None
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if channels is None or depth not in (8, 16) or interlace:
        raise TranslateError(f"{path}: unsupported PNG (colour type {colour}, {depth} bits, interlace {interlace}); "
                             "use 8- or 16-bit greyscale or RGB, not interlaced")
    step = channels * depth // 8
    if len(raw) != height * (width * step + 1):
        raise TranslateError(f"{path}: corrupt PNG (its header says {width}x{height}, {depth}-bit, {channels} "
                             f"channel(s): {height * (width * step + 1)} bytes of rows; its data holds {len(raw)})")
    rows = _unfilter(np.frombuffer(raw, dtype=np.uint8).reshape(height, width * step + 1), step)
    pixels = rows.view(">u2") if depth == 16 else rows
    pixels = pixels.reshape(height, width, channels).astype(np.float32) / (2**depth - 1)
    colours = pixels[..., : 3 if channels >= 3 else 1]  # alpha dropped
    return colours.mean(axis=2)


def _unfilter(rows: np.ndarray, step: int) -> np.ndarray:
    """Undo PNG's per-row filters (None, Sub, Up, Average, Paeth) of `rows` (filter byte first); `step` is
    the bytes per pixel."""
    out = np.zeros((rows.shape[0], rows.shape[1] - 1), dtype=np.uint8)
    previous = np.zeros(out.shape[1], dtype=np.int64)
    for r, row in enumerate(rows):
        kind, line = int(row[0]), row[1:].astype(np.int64)
        if kind == 0:
            current = line
        elif kind == 1:  # Sub: a running sum along the row, per byte of the pixel
            current = np.empty_like(line)
            for j in range(step):
                current[j::step] = np.cumsum(line[j::step])
        elif kind == 2:  # Up
            current = line + previous
        elif kind in (3, 4):  # Average, Paeth: each byte depends on the one decoded before it
            current = line.copy()
            for i in range(len(line)):
                left = current[i - step] % 256 if i >= step else 0
                up, corner = previous[i], previous[i - step] if i >= step else 0
                if kind == 3:
                    current[i] += (left + up) // 2
                else:
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    current[i] += left if pa <= pb and pa <= pc else up if pb <= pc else corner
        else:
            raise TranslateError(f"corrupt PNG: unknown row filter {kind}")
        previous = current % 256
        out[r] = previous
    return out


# -- outputs ------------------------------------------------------------------------------------------------------


def _fill_h5(f, slices: Slices, translated: np.ndarray, translator: Translator, target: str) -> None:
    import h5py

    f.create_dataset("input", data=slices.images, chunks=(1, *slices.images.shape[1:]))
    f.create_dataset("translated", data=translated, chunks=(1, *translated.shape[1:]))
    f.create_dataset("name", data=slices.names, dtype=h5py.string_dtype("utf-8"))
    if slices.scanner is not None:
        f.create_dataset("scanner", data=slices.scanner)
    f.attrs.update(translator.metadata.to_props())
    f.attrs["target"] = target
    f.attrs["synthetic"] = "real slices translated by an mrgen-dist translator"


def write(out: Path, slices: Slices, translated: np.ndarray, translator: Translator, target: str) -> list[Path]:
    """Write atomically (outputs.py); the paths written."""
    kind = output_kind(out, 1)
    if kind == "png":
        with folder_output(out, PROG) as tmp:
            written = _write_pngs(tmp, {"input": slices.images, "translated": translated}, slices.names)
        return [out / p.relative_to(tmp) for p in written]
    if kind == "nifti":
        write_file(out, lambda tmp: _write_nifti(tmp, {target: translated}, f"{PROG}: translation to {target}"))
    else:
        image = h5_bytes(lambda f: _fill_h5(f, slices, translated, translator, target), PROG)
        write_file(out, lambda tmp: tmp.write_bytes(image))
    return [out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="translator exported by `mrgen-export onnx`")
    ap.add_argument("input", type=Path, help="NIfTI volume on the MNI grid, slice store, PNG file or folder of PNGs")
    ap.add_argument("--to", required=True, help="the target scanner (from the model's metadata)")
    ap.add_argument("--out", type=Path, required=True, help=".nii/.nii.gz stack, .h5/.hdf5 file, or a folder (PNGs)")
    ap.add_argument("--split", choices=("train", "test", "all"), default="test", help="of a store INPUT")
    ap.add_argument("--from", dest="source", help="of a store INPUT: the slices of this scanner only")
    ap.add_argument("--batch-size", type=positive(), default=BATCH, help="slices per onnxruntime call (> 0)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "tensorrt", "cpu"))
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier output of mrgen-translate")
    args = ap.parse_args(argv)

    def translate() -> None:
        check_output(args.out, PROG, args.overwrite, inputs=[args.input, args.model])
        translator = Translator(args.model, args.device)
        translator.target_id(args.to)
        output_kind(args.out, 1)
        check_writable(args.out)
        kind = input_kind(args.input)
        slices = (read_volume(args.input, translator) if kind == "nifti"
                  else read_store(args.input, translator, args.split, args.source) if kind == "store"
                  else read_pngs(args.input))
        translator.check_shape(slices.images, str(args.input))
        t0 = time.perf_counter()
        translated = translator.translate(slices.images, args.to, args.batch_size)
        seconds = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        written = write(args.out, slices, translated, translator, args.to)
        print(f"{len(translated)} slices translated to {args.to} on {translator.device} in {seconds:.2f} s -> "
              f"{args.out} ({len(written)} file{'s' if len(written) != 1 else ''})")

    return run(PROG, translate)


if __name__ == "__main__":
    sys.exit(main())
