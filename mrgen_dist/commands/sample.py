"""`mrgen-sample`: draw synthetic slices from an exported decoder with onnxruntime. No torch.

    mrgen-sample export/decoder.onnx --scanner Intera --n 1000 --seed 0 --out samples/        # PNGs + grid.png
    mrgen-sample export/decoder.onnx --scanner all --n 500 --out samples.h5                  # one HDF5 file
    mrgen-sample export/decoder.onnx --scanner "Magnetom TrioTim" --n 64 --out stack.nii.gz  # NIfTI stack
    mrgen-sample export/decoder.onnx --scanner Intera --n 16 --level 60 --out low/  # a level-conditioned model

    from mrgen_dist.runtime.sampler import Sampler
    images = Sampler("export/decoder.onnx").sample("Intera", n=100, seed=0)   # float32 (100, 218, 182)

This module imports numpy and onnxruntime only (h5py or nibabel only when writing those formats), so sampling
runs where torch is not installed. A model trained with `model.level_condition` is asked for an axial level
with `--level K` (an index on the MNI grid it was trained on); without it the images go through its trained
levels in turn. Latents are drawn for all n images before batching, from a generator
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
import sys
from pathlib import Path

from mrgen_dist.cli import run
from mrgen_dist.commands.options import non_negative_int, positive
from mrgen_dist.runtime.outputs import check_output
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.runtime.writers import check_writable, output_kind, write_samples

PROG = "mrgen-sample"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="decoder (or diffusion denoiser) exported by `mrgen-export onnx`")
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
    ap.add_argument("--level", type=non_negative_int, default=None,
                    help="axial index k on the MNI grid, for a model trained with model.level_condition (default: "
                    "its trained levels in turn)")
    args = ap.parse_args(argv)

    def sample() -> None:
        check_output(args.out, PROG, args.overwrite, inputs=[args.model])
        sampler = Sampler(args.model, args.device)
        names = sampler.resolve(args.scanner)
        levels = sampler.level_inputs(args.n, args.level)
        output_kind(args.out, len(names))
        check_writable(args.out)  # before the sampling, which can take long
        print(f"sampling on {sampler.device} ({sampler.provider})", file=sys.stderr)
        images = {name: sampler.sample(name, args.n, args.seed, args.batch_size, args.noise, args.level)
                  for name in names}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        written = write_samples(args.out, images, sampler, args.seed, levels)
        print(f"{sum(len(v) for v in images.values())} SYNTHETIC images ({', '.join(names)}) -> {args.out}"
              f" ({len(written)} file{'s' if len(written) != 1 else ''})")

    return run(PROG, sample)


if __name__ == "__main__":
    sys.exit(main())
