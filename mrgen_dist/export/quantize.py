"""int8 quantisation of an exported decoder: uint8 weights fitted by GPTQ on prior draws, activation ranges
calibrated on the same draws (the accuracy is checked by the exporter and again by the sampler per CPU)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mrgen_dist.export import ExportError

CALIBRATION_DRAWS = 4096  # prior draws that set the int8 activation ranges and the GPTQ statistics


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


def signed_weight_layout(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The int8 graph of `quantize_int8` with every weight and weight zero point of its MatMulIntegerToFloat
    layers as int8, value - 128: the same integer products (x - x0)(w - w0), computed by onnxruntime's
    uint8 x int8 kernels, which are exact and about twice as fast where the CPU has VNNI and saturate where it
    has not (AVX2, AVX512 without VNNI). The sampler runs this layout only where it passes the file's parity
    draws (mrgen_dist.runtime.sampler)."""
    from onnx import numpy_helper

    signed = copy.deepcopy(proto)
    inits = {t.name: t for t in signed.graph.initializer}
    for node in signed.graph.node:
        if node.op_type != "MatMulIntegerToFloat":
            continue
        for slot in (1, 5):  # B and its zero point
            old = inits[node.input[slot]]
            values = numpy_helper.to_array(old).astype(np.int16) - 128
            name = old.name.removesuffix(".uint8") + ".int8" if slot == 1 else old.name
            old.CopyFrom(numpy_helper.from_array(values.astype(np.int8), name))
            node.input[slot] = name
    return signed
