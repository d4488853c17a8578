"""`Translator`: real slices as another scanner would show them, from an exported translator. No torch.

    from mrgen_dist.runtime.translator import Translator
    out = Translator("export/translator.onnx").translate(images, "Intera")   # float32 (n, 218, 182) in [0, 1]

The readers take what `mrgen-translate` accepts as INPUT (a NIfTI volume on the MNI152 1 mm grid, a slice store,
PNG files); `write_translations` writes its OUT.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrgen_dist.artifacts import ModelMetadata
from mrgen_dist.cli import UserError
from mrgen_dist.runtime.outputs import folder_output, h5_bytes, write_file
from mrgen_dist.runtime.png import read_png
from mrgen_dist.runtime.session import SampleError, check_finite, check_graph, device_of, open_session
from mrgen_dist.runtime.writers import _write_nifti, _write_pngs, output_kind
from mrgen_dist.scanners import UnknownScannerError, Vocabulary

BATCH = 16  # slices per onnxruntime call: the 10 slices of a volume go in one


TOOL = "mrgen-translate"  # the command whose outputs these are (runtime/outputs.py)


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


def write_translations(out: Path, slices: Slices, translated: np.ndarray, translator: Translator, target: str) -> list[Path]:
    """Write atomically (outputs.py); the paths written."""
    kind = output_kind(out, 1)
    if kind == "png":
        with folder_output(out, TOOL) as tmp:
            written = _write_pngs(tmp, {"input": slices.images, "translated": translated}, slices.names)
        return [out / p.relative_to(tmp) for p in written]
    if kind == "nifti":
        write_file(out, lambda tmp: _write_nifti(tmp, {target: translated}, f"{TOOL}: translation to {target}"))
    else:
        image = h5_bytes(lambda f: _fill_h5(f, slices, translated, translator, target), TOOL)
        write_file(out, lambda tmp: tmp.write_bytes(image))
    return [out]
