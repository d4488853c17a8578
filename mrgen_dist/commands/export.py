"""`mrgen-export onnx --model RUN --precision fp32|fp16|int8 --out FILE [model.KEY=VALUE ...]`: a trained run as an
ONNX file that the torch-free runtime samples (mrgen_dist.export.exporter); a diffusion run's sampler settings
may be set anew (the same network sampled otherwise). `mrgen-export kind --model RUN` prints what the run
exports, `decoder`, `translator` or `diffusion` (sampled like a decoder), for scripts that treat them differently
(hpc/slurm/compare.sh)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrgen_dist.cli import run
from mrgen_dist.config import ConfigError, parse_overrides
from mrgen_dist.export.exporter import PRECISIONS, export_onnx
from mrgen_dist.runs import SAMPLER_KEYS, run_family


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mrgen-export", description="Export a trained model.")
    sub = ap.add_subparsers(dest="format", required=True)
    p = sub.add_parser("onnx", help="the decoder (translator, denoiser) as ONNX, for onnxruntime (see export/README.md)")
    p.add_argument("--model", required=True, type=Path, help="run folder of mrgen-train (model.safetensors, config.json)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--out", type=Path, default=Path("export/decoder.onnx"))
    p.add_argument("--store", type=Path, default=None,
                   help="the run's slice store, where it moved since training (read for model.variance=calibrated)")
    p.add_argument("sampler", nargs="*", metavar="model.KEY=VALUE",
                   help="how a diffusion run's file samples, instead of its config's: "
                        + ", ".join(f"model.{k}" for k in SAMPLER_KEYS))
    k = sub.add_parser("kind", help="print what the run exports: decoder, translator or diffusion")
    k.add_argument("--model", required=True, type=Path, help="run folder of mrgen-train")
    args = ap.parse_args(argv)
    if args.format == "kind":
        return run("mrgen-export kind", lambda: print(run_family(args.model).kind))
    return run("mrgen-export", lambda: print(export_onnx(args.model, args.precision, args.out,
                                                         sampler_overrides(args.sampler), args.store).line()))


def sampler_overrides(items: list[str]) -> dict:
    """`model.KEY=VALUE` arguments as {KEY: value}; a ConfigError for any other section."""
    sections = parse_overrides(items)
    other = sorted(set(sections) - {"model"})
    if other:
        raise ConfigError(f"mrgen-export sets only the sampler (model.KEY=VALUE), not {other[0]}.*")
    return sections.get("model", {})


if __name__ == "__main__":
    sys.exit(main())
