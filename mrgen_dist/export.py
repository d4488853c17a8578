"""`mrgen-export onnx`: a trained generator as a self-describing ONNX file, checked before it is written.

    mrgen-export onnx --model RUN_DIR [--precision fp32|fp16|int8] [--out export/decoder.onnx]

Any model family works: the run's config.json names the family, which rebuilds the model and gives the graph
of its contract (mrgen_dist/models/). The `mrgen-decoder` contract (the generators): inputs `z` float32
[batch, latent] and `scanner` int64 [batch] (the one-hot is made inside the graph); output `image` float32
[batch, 1, 218, 182] in [0, 1]. The `mrgen-translator` contract (the translators): inputs `image` float32
[batch, 1, 218, 182] in [0, 1] and `scanner` int64 [batch], the target scanner; output `translated` of the
image's shape. fp16 keeps float32 inputs and outputs and computes in half precision. int8 is
static QDQ quantization (`quantize_int8`): uint8 activations with ranges calibrated on draws from the prior
N(0, I) and uint8 per-channel weights rounded by GPTQ, the first layer in float. The contract, including the
metadata keys, is in export/README.md.

Nothing reaches the output path unless the file passes `onnx.checker` and matches the float32 torch graph in
onnxruntime at batch 1, 7 and 64 within the precision's tolerance (a translator is checked on random images).
The measured error goes into the file's metadata (`mrgen.parity`); an int8 file also carries a few prior draws
with their float32 reference images, which the sampler checks again on the CPU it runs on.
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
import onnx
import onnxruntime as ort
import torch
from torch import nn

from mrgen_dist import __version__
from mrgen_dist.artifacts import ModelMetadata, RunRecord
from mrgen_dist.atomic import atomic_path
from mrgen_dist.cli import UserError, run
from mrgen_dist.config import model_config
from mrgen_dist.models import get_family
from mrgen_dist.models.base import Family, SamplingGraph, TranslationGraph
from mrgen_dist.sample import SampleError, Sampler, cpu_description, encode_draws
from mrgen_dist.scanners import Vocabulary

PRECISIONS = ("fp32", "fp16", "int8")
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "int8": 1 / 255}  # max |onnxruntime - torch fp32| on [0, 1] pixels
CHECK_BATCHES = (1, 7, 64)
CALIBRATION_DRAWS = 4096  # prior draws that set the int8 activation ranges and the GPTQ statistics
PARITY_DRAWS = 4  # draws (the worst of the parity check) stored in an int8 file for the sampler's re-check


class ExportError(UserError):
    """The export failed a check; nothing was written."""


def load_trained(run_dir: str | Path) -> tuple[Family, nn.Module, RunRecord]:
    """The family, trained model (eval mode) and record of a run folder (model.safetensors + config.json);
    an ExportError naming the file when either cannot be read or they do not fit together."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    record_path, weights = run_dir / RunRecord.NAME, run_dir / "model.safetensors"
    if not record_path.is_file() or not weights.is_file():
        raise ExportError(f"{run_dir} has no config.json and model.safetensors (a finished mrgen-train run)")
    record = RunRecord.read(record_path)
    try:
        family = get_family(record.family)
    except ValueError as e:
        raise ExportError(f"{record_path}: {e}") from None
    model = family.build(model_config(record.model), Vocabulary.from_names(record.vocabulary), tuple(record.image_shape))
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{weights}: not a readable safetensors file, truncated or corrupt ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{weights}: does not hold the model that {record_path} describes ({first})") from None
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


def metadata(record: RunRecord, latent: int, precision: str, parity: dict | None = None, noise: str = "",
             contract: str = ModelMetadata.DECODER, targets: list[str] | None = None) -> ModelMetadata:
    """What the exported file says about itself (its `metadata_props`; export/README.md documents each key)."""
    return ModelMetadata(
        format=f"{contract}/{ModelMetadata.VERSION}",
        scanners=record.vocabulary,
        latent=latent,
        image_shape=record.image_shape,
        intensity=record.intensity,
        precision=precision,
        store_sha256=record.store_sha256,
        config=record.config,
        package_version=__version__,
        family=record.family,
        parity=parity or {},
        noise=noise,
        targets=targets or [],
        slice_params=record.slice_params,
    )


# -- int8: static QDQ quantization --------------------------------------------------------------------------
#
# onnxruntime's dynamic quantization (uint8 activations x int8 weights) runs on the u8s8 kernels, whose 16-bit
# intermediate sums saturate on x86-64 CPUs without VNNI (AVX2, AVX512 without VNNI): the same file that
# matched the torch decoder to 3e-3 on a VNNI CPU was off by 0.13 on an AVX2 one. Here both operands are
# uint8 (u8u8 kernels, exact int32 sums on every x86-64 and ARM CPU), activation ranges are fixed (static,
# calibrated on the prior N(0, I), so an image does not depend on the batch it is computed in), weights are
# rounded by GPTQ against the calibration activations (half the error of rounding to nearest), and the first
# layer, whose input is the latent itself and which holds a negligible share of the arithmetic, stays float.


def _quantizable(proto: onnx.ModelProto) -> list[int]:
    """Indexes (in graph order) of the Gemm nodes with a constant 2-D weight and no transposed input."""
    weights = {t.name for t in proto.graph.initializer if len(t.dims) == 2}
    out = []
    for i, node in enumerate(proto.graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and node.input[1] in weights and not attrs.get("transA", 0)
                and attrs.get("alpha", 1.0) == 1.0):
            out.append(i)
    return out


def _calibration_inputs(proto: onnx.ModelProto, names: list[str], latent: int, n_scanners: int,
                        draws: int) -> dict[str, np.ndarray]:
    """The float32 values of the tensors `names` for `draws` prior draws (z ~ N(0, I), scanners in turn)."""
    sub = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(proto)).extract_model(["z", "scanner"], names)
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    rng = np.random.default_rng(20260101)
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, draws, 256):
        batch = min(256, draws - start)
        feeds = {"z": rng.standard_normal((batch, latent), dtype=np.float32),
                 "scanner": (np.arange(start, start + batch) % n_scanners).astype(np.int64)}
        for name, value in zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted}),
                               strict=True):
            chunks[name].append(value.reshape(batch, -1))
    return {n: np.concatenate(v) for n, v in chunks.items()}


def _uint8_grid(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric uint8 (scale, zero point) covering [lo, hi] and 0."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = ((hi - lo) / 255).astype(np.float32)
    scale[scale == 0] = 1.0
    zero_point = np.clip(np.round(-lo / scale), 0, 255).astype(np.uint8)
    return scale, zero_point


def _gptq_uint8(weight: np.ndarray, inputs: np.ndarray, block: int = 64, damp: float = 0.01
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al., 2023) of `weight` (out, in) onto per-output-channel uint8 grids: the input
    channels are rounded in turn and each one's rounding error is spread over those not yet rounded, through
    the inverse of the inputs' second moments, so that `inputs @ weight.T` changes least. Returns the uint8
    weight (out, in), its scales and its zero points (out,)."""
    scale, zero_point = _uint8_grid(weight.min(1), weight.max(1))
    s, zp = torch.from_numpy(scale), torch.from_numpy(zero_point.astype(np.float32))
    x = torch.from_numpy(inputs).double()
    h = x.T @ x / len(x)
    dead = torch.diag(h) == 0  # inputs never active on the calibration draws: rounded to nearest
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    w = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float32))  # (in, out): one row per input
    q = torch.empty_like(w)
    for i1 in range(0, len(w), block):
        i2 = min(i1 + block, len(w))
        w1, u1, err = w[i1:i2].clone(), u[i1:i2, i1:i2], torch.empty(i2 - i1, w.shape[1])
        for i in range(i2 - i1):
            q[i1 + i] = torch.clamp(torch.round(w1[i] / s) + zp, 0, 255)
            err[i] = (w1[i] - (q[i1 + i] - zp) * s) / u1[i, i]
            w1[i + 1 :] -= u1[i, i + 1 :, None] * err[i]
        w[i2:] -= u[i1:i2, i2:].T @ err
    return np.ascontiguousarray(q.numpy().T.astype(np.uint8)), scale, zero_point


def quantize_int8(fp_path: Path, out_path: Path, latent: int, n_scanners: int,
                  draws: int = CALIBRATION_DRAWS) -> int:
    """Write the int8 version of the float32 graph `fp_path`; returns how many layers it quantized.

    Each quantized Gemm becomes QuantizeLinear(x) with one calibrated uint8 range, then onnxruntime's
    MatMulIntegerToFloat with the uint8 weight, one scale and zero point per output channel, and the bias."""
    from onnx import helper, numpy_helper

    proto = onnx.load(str(fp_path))
    layers = _quantizable(proto)[1:]  # the first layer stays float
    if not layers:
        raise ExportError("int8: this graph has no layer to quantize beyond its first; use fp16")
    graph = proto.graph
    inputs = _calibration_inputs(proto, [graph.node[i].input[0] for i in layers], latent, n_scanners, draws)
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    for i in reversed(layers):
        node = nodes[i]
        x, w_name, bias = node.input[0], node.input[1], node.input[2] if len(node.input) > 2 else ""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        weight = w if attrs.get("transB", 0) else w.T  # (out, in)
        x_scale, x_zero = _uint8_grid(np.array([inputs[x].min()]), np.array([inputs[x].max()]))
        seen = (np.clip(np.round(inputs[x] / x_scale) + x_zero, 0, 255) - x_zero.astype(np.float32)) * x_scale
        q, w_scale, w_zero = _gptq_uint8(weight, seen)
        if bias and attrs.get("beta", 1.0) != 1.0:
            b = numpy_helper.to_array(inits[bias]).astype(np.float32) * attrs["beta"]
            inits[bias] = numpy_helper.from_array(b, f"{bias}.beta")
            graph.initializer.append(inits[bias])
            bias = inits[bias].name
        tag = node.name or f"gemm_{i}"
        graph.initializer.remove(inits[w_name])
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(q.T), f"{w_name}.uint8"),  # (in, out)
            numpy_helper.from_array(w_scale, f"{w_name}.scale"),
            numpy_helper.from_array(w_zero, f"{w_name}.zero_point"),
            numpy_helper.from_array(x_scale.reshape(()), f"{tag}.x_scale"),
            numpy_helper.from_array(x_zero.reshape(()), f"{tag}.x_zero_point"),
        ])
        nodes[i : i + 1] = [
            helper.make_node("QuantizeLinear", [x, f"{tag}.x_scale", f"{tag}.x_zero_point"], [f"{tag}.x_uint8"],
                             name=f"{tag}.quantize"),
            helper.make_node("MatMulIntegerToFloat",
                             [f"{tag}.x_uint8", f"{w_name}.uint8", f"{tag}.x_scale", f"{w_name}.scale",
                              f"{tag}.x_zero_point", f"{w_name}.zero_point", bias],
                             list(node.output), name=f"{tag}.uint8", domain="com.microsoft"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(proto, str(out_path))
    return len(layers)


class _WithNoise(torch.nn.Module):
    """The graph with its learned observation noise as a second output, `sigma`."""

    def __init__(self, decoder: SamplingGraph) -> None:
        super().__init__()
        self.decoder = decoder  # not `graph`: torch.export's GraphModule has an attribute of that name

    def forward(self, z: torch.Tensor, scanner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder(z, scanner), self.decoder.noise_sigma(scanner)


Graph = SamplingGraph | TranslationGraph


def example_inputs(graph: Graph, batch: int, rng: np.random.Generator, n_scanners: int,
                   image_shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Inputs of the graph's contract: prior draws and every scanner in turn for a decoder, random images and
    every target in turn for a translator."""
    if isinstance(graph, TranslationGraph):
        return {"image": rng.random((batch, 1, *image_shape), dtype=np.float32),
                "scanner": np.asarray(graph.targets, dtype=np.int64)[np.arange(batch) % len(graph.targets)]}
    return {"z": rng.standard_normal((batch, graph.latent), dtype=np.float32),
            "scanner": np.arange(batch, dtype=np.int64) % n_scanners}


def output_names(graph: Graph) -> list[str]:
    if isinstance(graph, TranslationGraph):
        return ["translated"]
    return ["image", "sigma"] if graph.has_noise else ["image"]


def _torch_export(graph: Graph, inputs: dict[str, np.ndarray], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        _WithNoise(graph).eval() if getattr(graph, "has_noise", False) else graph,
        tuple(torch.from_numpy(x) for x in inputs.values()),
        input_names=list(inputs),
        output_names=output_names(graph),
        dynamic_shapes={name: {0: batch} for name in inputs},
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    program.save(str(path))


@dataclass
class Parity:
    """The outcome of the parity check: the worst error and, per checked image, its inputs, reference and
    error."""

    max_error: float
    inputs: dict[str, np.ndarray]
    reference: np.ndarray
    errors: np.ndarray

    def record(self, tolerance: float, draws: int) -> dict:
        """`mrgen.parity`; with `draws` > 0, the worst `draws` images with their prior draws and references
        (float16)."""
        parity = {"max_error": self.max_error, "tolerance": tolerance, "batches": list(CHECK_BATCHES),
                  "cpu": cpu_description(), "onnxruntime": ort.__version__}
        if draws:
            worst = np.sort(np.argsort(self.errors)[::-1][:draws])
            parity["draws"] = encode_draws(self.inputs["z"][worst], self.inputs["scanner"][worst],
                                           self.reference[worst])
        return parity


def _check(path: Path, reference: Graph, n_scanners: int, image_shape: tuple[int, int], precision: str) -> Parity:
    """onnx.checker, then onnxruntime (CPU) against the float32 torch graph at each CHECK_BATCHES size."""
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    seen: list[dict[str, np.ndarray]] = []
    wants, errors = [], []
    for batch in CHECK_BATCHES:
        inputs = example_inputs(reference, batch, rng, n_scanners, image_shape)
        outputs = session.run(None, inputs)
        got = outputs[0]
        with torch.no_grad():
            want = reference(*(torch.from_numpy(x) for x in inputs.values())).numpy()
            if getattr(reference, "has_noise", False):  # the noise level is one learned table: exact up to rounding
                sigma = reference.noise_sigma(torch.from_numpy(inputs["scanner"])).numpy()
                if len(outputs) != 2 or not np.allclose(outputs[1], sigma, rtol=TOLERANCE[precision], atol=0):
                    raise ExportError(f"batch {batch}: the exported sigma output differs from the model's noise level")
        if got.shape != want.shape or got.dtype != np.float32:
            raise ExportError(f"batch {batch}: output {got.shape} {got.dtype}, expected {want.shape} float32")
        seen.append(inputs), wants.append(want)
        errors.append(np.abs(got - want).reshape(batch, -1).max(1))
    parity = Parity(float(np.concatenate(errors).max()), {k: np.concatenate([x[k] for x in seen]) for k in seen[0]},
                    np.concatenate(wants), np.concatenate(errors))
    tolerance = TOLERANCE[precision]
    if not parity.max_error <= tolerance:
        hint = "; int8 accuracy depends on the trained weights: export with --precision fp16" if precision == "int8" else ""
        raise ExportError(f"parity check failed: max |onnxruntime - torch fp32| = {parity.max_error:.3e} > "
                          f"{tolerance:.1e}{hint}")
    return parity


def export_onnx(run_dir: str | Path, precision: str = "fp32", out: str | Path = "export/decoder.onnx") -> ExportReport:
    """Export, check, then move into place; raises ExportError leaving `out` untouched."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    t0 = time.perf_counter()
    family, model, record = load_trained(run_dir)
    if precision == "int8" and family.contract != ModelMetadata.DECODER:
        raise ExportError(f"int8 is for the fully connected {ModelMetadata.DECODER} graphs; this {family.contract} "
                          "is convolutional: export it with --precision fp32 or fp16")
    reference = family.export_graph(copy.deepcopy(model)).eval()
    n_scanners, tolerance = len(record.vocabulary), TOLERANCE[precision]
    latent = getattr(reference, "latent", 0)
    image_shape = tuple(record.image_shape)
    targets = [record.vocabulary[i] for i in reference.targets] if isinstance(reference, TranslationGraph) else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # intermediate graphs in a scratch folder; the final file through atomic_path, renamed once it passed
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as scratch, atomic_path(out) as final:
        path = Path(scratch) / "model.onnx"
        graph = family.export_graph(model.to(torch.float16 if precision == "fp16" else torch.float32)).eval()
        _torch_export(graph, example_inputs(graph, 2, np.random.default_rng(0), n_scanners, image_shape), path)
        if precision == "int8":
            plain = onnx.load(str(path))
            del plain.graph.value_info[:]  # shapes of the float weights, which quantization replaces
            onnx.save(plain, str(path))
            quantize_int8(path, Path(scratch) / "model.int8.onnx", latent, n_scanners)
            path = Path(scratch) / "model.int8.onnx"
        parity = _check(path, reference, n_scanners, image_shape, precision)
        proto = onnx.load(str(path))
        parity_record = parity.record(tolerance, PARITY_DRAWS if precision == "int8" else 0)
        props = metadata(record, latent, precision, parity_record, getattr(graph, "noise_kind", ""),
                         family.contract, targets).to_props()
        onnx.helper.set_model_props(proto, props)
        onnx.save(proto, str(final))
        onnx.checker.check_model(str(final), full_check=True)
        if precision == "int8":  # the check the sampler makes, on the file as written (float16 references)
            try:
                Sampler(final, device="cpu")
            except SampleError as e:
                raise ExportError(f"the stored parity draws fail: {e}") from None
    return ExportReport(out, precision, out.stat().st_size, parity.max_error, tolerance, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mrgen-export", description="Export a trained model.")
    sub = ap.add_subparsers(dest="format", required=True)
    p = sub.add_parser("onnx", help="the decoder (or translator) as ONNX, for onnxruntime (see export/README.md)")
    p.add_argument("--model", required=True, type=Path, help="run folder of mrgen-train (model.safetensors, config.json)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--out", type=Path, default=Path("export/decoder.onnx"))
    args = ap.parse_args(argv)
    return run("mrgen-export", lambda: print(export_onnx(args.model, args.precision, args.out).line()))


if __name__ == "__main__":
    sys.exit(main())
