"""onnxruntime sessions of exported models: the provider asked for or a clear error (never a silent CPU
fallback), the graph checked against its contract, outputs checked finite. No torch.

`auto` takes CUDA when onnxruntime-gpu and a GPU are present, else the CPU; asking for `cuda` or `tensorrt` when
that provider cannot run is an error that names what is missing.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mrgen_dist.cli import UserError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class SampleError(UserError):
    """A request that cannot be served; the message says why."""


def open_session(path: Path, device: str = "auto", threads: int = 0) -> tuple[ort.InferenceSession, str]:
    """An onnxruntime session of the model file on `device` and the provider it runs on; a SampleError naming
    what is missing when the file cannot be loaded or the asked provider cannot start (never a silent fallback)."""
    if not path.is_file():
        raise SampleError(f"{path}: no such model file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # onnxruntime's provider errors are checked below, not printed
    wanted = providers(device)
    try:
        session = ort.InferenceSession(str(path), options, providers=wanted)
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, InvalidGraph, ...)
        if "onnxruntime" not in type(e).__module__:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SampleError(f"{path}: not an ONNX model that onnxruntime can load ({type(e).__name__}: "
                          f"{first[:300]})") from None
    used = session.get_providers()
    if device in ("cuda", "tensorrt") and used[0] != wanted[0]:
        raise SampleError(
            f"onnxruntime could not start {wanted[0]} (it fell back to {used[0]}): the CUDA/cuDNN libraries "
            "that onnxruntime-gpu needs are missing or do not match it, or no GPU is visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return session, used[0]


def providers(device: str) -> list[str]:
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


def device_of(provider: str) -> str:
    """"cuda" or "cpu": where an onnxruntime execution provider runs."""
    return "cuda" if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"


def _gpu_visible() -> bool:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1") and any(
        Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl")
    )


#: The `level` input of a level-conditioned generator (decoder or denoiser), as `check_graph` expects it.
LEVEL_INPUT = ("tensor(int64)", [None])


def level_feed(level: np.ndarray | None) -> dict[str, np.ndarray]:
    """The `level` input of a run of a level-conditioned graph: {} without levels."""
    return {} if level is None else {"level": np.asarray(level, dtype=np.int64)}


def check_graph(session: ort.InferenceSession, path: Path, contract: str, expected: dict[str, tuple[str, list]],
                inputs: tuple[str, ...]) -> None:
    """A SampleError naming the difference unless the graph has each `expected` input (names in `inputs`) and
    output with its type (e.g. "tensor(float)") and shape (None: any size)."""
    found_inputs = {i.name: i for i in session.get_inputs()}
    found_outputs = {o.name: o for o in session.get_outputs()}
    for name, (kind, shape) in expected.items():
        where = "input" if name in inputs else "output"
        found = found_inputs.get(name) if where == "input" else found_outputs.get(name)
        if found is None:
            names = ", ".join(found_inputs if where == "input" else found_outputs) or "none"
            raise SampleError(f"{path}: not an {contract}: it has no {where} {name!r} ({where}s: {names})")
        dims = list(found.shape)
        fits = len(dims) == len(shape) and all(
            want is None or not isinstance(got, int) or got == want for got, want in zip(dims, shape, strict=True))
        if found.type != kind or not fits:
            raise SampleError(f"{path}: not an {contract}: its {where} {name!r} is {found.type} {dims}")


def check_finite(outputs: list[np.ndarray], names: list[str], path: Path, what: str, offset: int) -> None:
    """A SampleError naming the model and the first non-finite output of a batch (`offset`: the batch's first
    item), so that NaN or infinite values never reach a file or a metric."""
    for name, values in zip(names, outputs, strict=False):
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            raise SampleError(f"{path}: the model's output {name!r} is not finite (first at {what} "
                              f"{offset + int(np.argmax(bad))}); the model is broken: export it again from an "
                              "intact run")


def cpu_description() -> str:
    """This machine's CPU and the instruction sets its integer kernels depend on, e.g.
    'AMD EPYC (avx2, avx512f, avx512_vnni)'; from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model") and value.strip():
            name = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm") if f in flags]
    return f"{name} ({', '.join(isa)})" if isa else name
