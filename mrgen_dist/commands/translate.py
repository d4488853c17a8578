"""`mrgen-translate`: real slices as another scanner would show them, from an exported translator. No torch.

    mrgen-translate export/translator.onnx sub-01_T1w.nii.gz --to "Magnetom TrioTim" --out sub-01-trio.nii.gz
    mrgen-translate export/translator.onnx runs/store --split test --from Intera --to Unspecified --out test.h5
    mrgen-translate export/translator.onnx slices/ --to Intera --out translated/      # PNGs + grid.png

    from mrgen_dist.runtime.translator import Translator
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
import sys
import time
from pathlib import Path

from mrgen_dist.cli import run
from mrgen_dist.commands.options import positive
from mrgen_dist.runtime.outputs import check_output
from mrgen_dist.runtime.translator import (
    BATCH,
    Translator,
    input_kind,
    read_pngs,
    read_store,
    read_volume,
    write_translations,
)
from mrgen_dist.runtime.writers import check_writable, output_kind

PROG = "mrgen-translate"


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
        written = write_translations(args.out, slices, translated, translator, args.to)
        print(f"{len(translated)} slices translated to {args.to} on {translator.device} in {seconds:.2f} s -> "
              f"{args.out} ({len(written)} file{'s' if len(written) != 1 else ''})")

    return run(PROG, translate)


if __name__ == "__main__":
    sys.exit(main())
