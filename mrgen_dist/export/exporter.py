"""`mrgen-export onnx`: a trained generator as a self-describing ONNX file, checked before it is written.

    mrgen-export onnx --model RUN_DIR [--precision fp32|fp16|int8] [--out export/decoder.onnx]

Any model family works: the run's config.json names the family, which rebuilds the model and gives the graph
of its contract (mrgen_dist/models/). The `mrgen-decoder` contract (the generators): inputs `z` float32
[batch, latent] and `scanner` int64 [batch] (the one-hot is made inside the graph); output `image` float32
[batch, 1, 218, 182] in [0, 1]. The `mrgen-translator` contract (the translators): inputs `image` float32
[batch, 1, 218, 182] in [0, 1] and `scanner` int64 [batch], the target scanner; output `translated` of the
image's shape. The `mrgen-denoiser` contract (diffusion): inputs `x` float32 [batch, 1, 218, 182], `t`
float32 [batch] and `scanner` int64 [batch] (the null label allowed); output `out` of x's shape, with the DDIM
settings in `mrgen.sampler`. A generator trained with `model.level_condition` takes one more input, `level`
int64 [batch], the slice's axial index on the MNI grid; the levels it was trained on are the file's
`mrgen.slice_params` `axial_indices`. fp16 keeps float32 inputs and outputs and computes in half precision. int8 is
static QDQ quantization (`quantize_int8`): uint8 activations with ranges calibrated on draws from the prior
N(0, I) and uint8 per-channel weights rounded by GPTQ, the first layer in float. The contract, including the
metadata keys, is in export/README.md.

Nothing reaches the output path unless the file passes `onnx.checker` and matches the float32 torch graph in
onnxruntime at batch 1, 7 and 64 within the precision's tolerance (a translator is checked on random images).
The measured error goes into the file's metadata (`mrgen.parity`); an int8 file also carries a few prior draws
with their float32 reference images, which the sampler checks again on the CPU it runs on. Beside an int8 file
goes the same model in the uint8 x int8 weight layout (`NAME.u8s8.onnx`, recorded in `mrgen.variants`), which
the sampler takes instead where it passes those draws and runs faster (CPUs with VNNI).
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mrgen_dist import __version__
from mrgen_dist.artifacts import ModelMetadata, RunRecord
from mrgen_dist.atomic import atomic_path, atomic_write
from mrgen_dist.export import ExportError
from mrgen_dist.export.calibration import calibrate, calibration_slices
from mrgen_dist.export.quantize import quantize_int8, signed_weight_layout
from mrgen_dist.models.base import DenoiserGraph, ExportGraph, SamplingGraph
from mrgen_dist.runs import load_trained
from mrgen_dist.runtime.parity import encode_draws
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.runtime.session import SampleError, cpu_description

PRECISIONS = ("fp32", "fp16", "int8")
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "int8": 1 / 255}  # max |onnxruntime - torch fp32| on [0, 1] pixels
CHECK_BATCHES = (1, 7, 64)
PARITY_DRAWS = 4  # draws (the worst of the parity check) stored in an int8 file for the sampler's re-check


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
             contract: str = ModelMetadata.DECODER, targets: list[str] | None = None,
             sampler: dict | None = None, noise_texture: dict | None = None) -> ModelMetadata:
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
        noise_texture=noise_texture or {},
        targets=targets or [],
        slice_params=record.slice_params,
        sampler=sampler or {},
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


class _WithNoise(torch.nn.Module):
    """The graph with its learned observation noise as a second output, `sigma`."""

    def __init__(self, decoder: SamplingGraph) -> None:
        super().__init__()
        self.decoder = decoder  # not `graph`: torch.export's GraphModule has an attribute of that name

    def forward(self, z: torch.Tensor, scanner: torch.Tensor, *level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder(z, scanner, *level), self.decoder.noise_sigma(scanner)


def _torch_export(graph: ExportGraph, inputs: dict[str, np.ndarray], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        _WithNoise(graph).eval() if graph.has_noise else graph,
        tuple(torch.from_numpy(x) for x in inputs.values()),
        input_names=list(inputs),
        output_names=graph.output_names(),
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


def _as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _check(path: Path, reference: ExportGraph, n_scanners: int, image_shape: tuple[int, int], precision: str) -> Parity:
    """onnx.checker, then onnxruntime (CPU) against the float32 torch graph at each CHECK_BATCHES size."""
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    seen: list[dict[str, np.ndarray]] = []
    wants, errors = [], []
    for batch in CHECK_BATCHES:
        inputs = reference.example_inputs(batch, rng, n_scanners, image_shape)
        outputs = session.run(None, inputs)
        got = outputs[0]
        with torch.no_grad():
            want, *more = _as_tuple(reference(*(torch.from_numpy(x) for x in inputs.values())))
            want = want.numpy()
            for name, value, expected in zip(reference.output_names()[1:], outputs[1:], more, strict=False):
                error = float(np.abs(value - expected.numpy()).max())
                if not error <= TOLERANCE[precision]:
                    raise ExportError(f"batch {batch}: the exported {name} output differs from the model's by {error:.2e}")
            if reference.has_noise:  # the noise level is one learned table: exact up to rounding
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


def coarse_path(out: Path) -> Path:
    """Where a refiner file's coarse generator is written: `refiner.onnx` -> `refiner.coarse.onnx`."""
    return out.with_name(f"{out.stem}.coarse{out.suffix}")


def variant_path(out: Path) -> Path:
    """Where an int8 file's u8s8 layout is written: `decoder.int8.onnx` -> `decoder.int8.u8s8.onnx`."""
    return out.with_name(f"{out.stem}.u8s8{out.suffix}")


def export_onnx(run_dir: str | Path, precision: str = "fp32", out: str | Path = "export/decoder.onnx",
                sampler: dict | None = None, store: str | Path | None = None) -> ExportReport:
    """Export, check, then move into place; raises ExportError leaving `out` untouched (int8: the u8s8 file beside
    it is written first, and a failure after that leaves the old `out`, whose record of it no longer matches it,
    so the sampler does not use it). `sampler` sets how a diffusion run's file samples (runs.SAMPLER_KEYS); a
    calibrated variance is measured on the training slices of `store` (default: the path the run's config
    names)."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    t0 = time.perf_counter()
    family, model, record = load_trained(run_dir, sampler)
    if precision == "int8" and family.kind != "decoder":
        raise ExportError(f"int8 is for the fully connected {ModelMetadata.DECODER} graphs; this {family.contract} "
                          "is convolutional: export it with --precision fp32 or fp16")
    reference = family.export_graph(copy.deepcopy(model)).eval()
    if precision == "int8" and reference.level_condition:
        raise ExportError("int8 calibrates and checks on (z, scanner) draws; this decoder also takes the slice level "
                          "(model.level_condition): export it with --precision fp32 or fp16")
    n_scanners, tolerance = len(record.vocabulary), TOLERANCE[precision]
    latent = reference.latent
    image_shape = tuple(record.image_shape)
    targets = reference.target_names(record.vocabulary)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    calibrated = None
    if isinstance(reference, DenoiserGraph) and reference.sampler_settings.variance == "calibrated":
        images, labels = calibration_slices(record, store)
        calibrated = calibrate(reference, reference.sampler_settings, images, labels)
    coarse = {}
    if family.kind == "refiner":  # its coarse generator first, beside it, at the same precision
        coarse_file = export_onnx(model.coarse_dir, precision, coarse_path(out), store=store).path
        coarse = {"file": coarse_file.name, "sha256": hashlib.sha256(coarse_file.read_bytes()).hexdigest()}
    # intermediate graphs in a scratch folder; the final file through atomic_path, renamed once it passed
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as scratch, atomic_path(out) as final:
        path = Path(scratch) / "model.onnx"
        graph = family.export_graph(model.to(torch.float16 if precision == "fp16" else torch.float32)).eval()
        if calibrated is not None:
            graph.use_sampler(calibrated)
        _torch_export(graph, graph.example_inputs(2, np.random.default_rng(0), n_scanners, image_shape), path)
        if precision == "int8":
            plain = onnx.load(str(path))
            del plain.graph.value_info[:]  # shapes of the float weights, which quantization replaces
            onnx.save(plain, str(path))
            quantize_int8(path, Path(scratch) / "model.int8.onnx", latent, n_scanners)
            path = Path(scratch) / "model.int8.onnx"
        parity = _check(path, reference, n_scanners, image_shape, precision)
        proto = onnx.load(str(path))
        parity_record = parity.record(tolerance, PARITY_DRAWS if precision == "int8" else 0)
        meta = metadata(record, latent, precision, parity_record, graph.noise_kind,
                        family.contract, targets, graph.sampler_metadata(), graph.noise_texture())
        meta.coarse = coarse
        if precision == "int8":  # beside it, the u8s8 layout, which the sampler runs where it is exact
            signed = signed_weight_layout(proto)
            onnx.helper.set_model_props(signed, meta.to_props())
            data = signed.SerializeToString()
            atomic_write(variant_path(out), data)
            meta.variants = [{"file": variant_path(out).name, "layout": "u8s8",
                              "sha256": hashlib.sha256(data).hexdigest()}]
        onnx.helper.set_model_props(proto, meta.to_props())
        onnx.save(proto, str(final))
        onnx.checker.check_model(str(final), full_check=True)
        if precision == "int8":  # the check the sampler makes, on the file as written (float16 references)
            try:
                Sampler(final, device="cpu")
            except SampleError as e:
                raise ExportError(f"the stored parity draws fail: {e}") from None
    return ExportReport(out, precision, out.stat().st_size, parity.max_error, tolerance, time.perf_counter() - t0)


