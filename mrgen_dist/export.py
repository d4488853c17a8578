"""`mrgen-export onnx`: a trained generator as a self-describing ONNX file, checked before it is written.

    mrgen-export onnx --model RUN_DIR [--precision fp32|fp16|int8] [--out export/decoder.onnx]

Any model family works: the run's config.json names the family, which rebuilds the model and gives its
sampling graph (mrgen_dist/models/). The graph of the `mrgen-decoder` contract: inputs `z` float32
[batch, latent] and `scanner` int64 [batch] (the one-hot is made inside the graph); output `image` float32
[batch, 1, 218, 182] in [0, 1]. fp16 keeps float32 inputs and outputs and computes in half precision; int8 is
onnxruntime's dynamic quantization of the fp32 graph (int8 weights, activations quantized per batch). The
contract, including the metadata keys, is in export/README.md.

Nothing reaches the output path unless the file passes `onnx.checker` and matches the float32 torch decoder
in onnxruntime at batch 1, 7 and 64 within the precision's tolerance.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mrgen_dist import __version__
from mrgen_dist.artifacts import ModelMetadata, RunRecord
from mrgen_dist.atomic import atomic_path
from mrgen_dist.cli import UserError, run
from mrgen_dist.config import model_config
from mrgen_dist.models import get_family
from mrgen_dist.models.base import Family, SamplingGraph
from mrgen_dist.scanners import Vocabulary

PRECISIONS = ("fp32", "fp16", "int8")
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "int8": 1 / 255}  # max |onnxruntime - torch fp32| on [0, 1] pixels
CHECK_BATCHES = (1, 7, 64)


class ExportError(UserError):
    """The export failed a check; nothing was written."""


def load_trained(run_dir: str | Path) -> tuple[Family, nn.Module, RunRecord]:
    """The family, trained model (eval mode) and record of a run folder (model.safetensors + config.json)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    record_path, weights = run_dir / RunRecord.NAME, run_dir / "model.safetensors"
    if not record_path.is_file() or not weights.is_file():
        raise ExportError(f"{run_dir} has no config.json and model.safetensors (a finished mrgen-train run)")
    record = RunRecord.read(record_path)
    family = get_family(record.family)
    model = family.build(model_config(record.model), Vocabulary.from_names(record.vocabulary), tuple(record.image_shape))
    model.load_state_dict(load_file(weights))
    return family, model.eval(), record


@dataclass
class ExportReport:
    path: Path
    precision: str
    bytes: int
    max_error: float
    tolerance: float
    seconds: float

    def line(self) -> str:
        return (f"{self.path}: {self.precision}, {self.bytes / 2**20:.1f} MiB, max |onnxruntime - torch fp32| "
                f"{self.max_error:.2e} (limit {self.tolerance:.1e}) at batch {'/'.join(map(str, CHECK_BATCHES))}, "
                f"{self.seconds:.1f} s")


def metadata(record: RunRecord, latent: int, precision: str) -> ModelMetadata:
    """What the exported file says about itself (its `metadata_props`; export/README.md documents each key)."""
    return ModelMetadata(
        format=f"{ModelMetadata.DECODER}/{ModelMetadata.VERSION}",
        scanners=record.vocabulary,
        latent=latent,
        image_shape=record.image_shape,
        intensity=record.intensity,
        precision=precision,
        store_sha256=record.store_sha256,
        config=record.config,
        package_version=__version__,
        family=record.family,
    )


def _torch_export(graph: SamplingGraph, latent: int, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        graph,
        (torch.zeros(2, latent), torch.zeros(2, dtype=torch.long)),
        input_names=["z", "scanner"],
        output_names=["image"],
        dynamic_shapes={"z": {0: batch}, "scanner": {0: batch}},
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    program.save(str(path))


def _check(path: Path, reference: SamplingGraph, latent: int, n_scanners: int, tolerance: float) -> float:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    rng = np.random.default_rng(0)
    for batch in CHECK_BATCHES:
        z = rng.standard_normal((batch, latent), dtype=np.float32)
        scanner = np.arange(batch, dtype=np.int64) % n_scanners
        (got,) = session.run(["image"], {"z": z, "scanner": scanner})
        with torch.no_grad():
            want = reference(torch.from_numpy(z), torch.from_numpy(scanner)).numpy()
        if got.shape != want.shape or got.dtype != np.float32:
            raise ExportError(f"batch {batch}: output {got.shape} {got.dtype}, expected {want.shape} float32")
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst <= tolerance:
        raise ExportError(f"parity check failed: max |onnxruntime - torch fp32| = {worst:.3e} > {tolerance:.1e}")
    return worst


def export_decoder(run_dir: str | Path, precision: str = "fp32", out: str | Path = "export/decoder.onnx") -> ExportReport:
    """Export, check, then move into place; raises ExportError leaving `out` untouched."""
    import onnx

    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    t0 = time.perf_counter()
    family, model, record = load_trained(run_dir)
    if family.contract != ModelMetadata.DECODER:
        raise ExportError(f"model family {family.name!r} has the {family.contract} contract; this exporter writes "
                          f"the {ModelMetadata.DECODER} contract")
    reference = family.sampling_graph(copy.deepcopy(model)).eval()
    latent = reference.latent
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # intermediate graphs in a scratch folder; the final file through atomic_path, renamed once it passed
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as scratch, atomic_path(out) as final:
        fp_path = Path(scratch) / "decoder.onnx"
        graph = family.sampling_graph(model.to(torch.float16 if precision == "fp16" else torch.float32)).eval()
        _torch_export(graph, latent, fp_path)
        path = fp_path
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # the exporter records the (out, in) shapes of Gemm weights as value_info; the quantizer transposes
            # those weights for MatMulInteger and keeps the stale shapes, which fails shape inference
            plain = onnx.load(str(fp_path))
            del plain.graph.value_info[:]
            onnx.save(plain, str(fp_path))
            path = Path(scratch) / "decoder.int8.onnx"
            quantize_dynamic(str(fp_path), str(path), weight_type=QuantType.QInt8, per_channel=True)
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, metadata(record, latent, precision).to_props())
        onnx.save(proto, str(final))
        worst = _check(final, reference, latent, len(record.vocabulary), TOLERANCE[precision])
    return ExportReport(out, precision, out.stat().st_size, worst, TOLERANCE[precision], time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mrgen-export", description="Export a trained model.")
    sub = ap.add_subparsers(dest="format", required=True)
    p = sub.add_parser("onnx", help="the decoder as ONNX, for onnxruntime sampling (see export/README.md)")
    p.add_argument("--model", required=True, type=Path, help="run folder of mrgen-train (model.safetensors, config.json)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--out", type=Path, default=Path("export/decoder.onnx"))
    args = ap.parse_args(argv)
    return run("mrgen-export", lambda: print(export_decoder(args.model, args.precision, args.out).line()))


if __name__ == "__main__":
    sys.exit(main())
