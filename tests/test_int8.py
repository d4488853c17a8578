"""int8 export on every kind of x86-64 CPU.

onnxruntime's uint8 x int8 kernels sum pairs of products in 16 bits and saturate on CPUs without VNNI (AVX2,
AVX512 without VNNI); with VNNI they are exact and about twice as fast as the uint8 x uint8 ones. The int8 file
therefore holds uint8 x uint8 products (exact everywhere), and the u8s8 file beside it the same products in
the other layout, which the sampler runs only where it passes the file's parity draws. onnxruntime has no
switch that turns its VNNI kernels off, so the AVX2 path is run on an emulated AVX2-only CPU:
`qemu-x86_64 -cpu Haswell` (Debian package qemu-user) runs this venv's Python and onnxruntime with the CPU flags
of a Haswell. Each check runs natively and emulated; the emulated ones are skipped, with the reason, only where
qemu-x86_64 is missing or cannot run this Python.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from mrgen_dist.export.exporter import TOLERANCE, export_onnx
from mrgen_dist.runs import load_trained

QEMU = shutil.which("qemu-x86_64")
REPO = Path(__file__).resolve().parents[1]

# A uint8 x int8 product whose pairs of products (2 x 255 x 127) overflow 16 bits: exact with VNNI, saturated on
# an AVX2-only CPU. It shows which kernels the CPU that runs it (emulated or not) gives onnxruntime.
PROBE = """
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
k = 64
b = numpy_helper.from_array(np.full((k, 8), 127, np.int8), "b")
graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, k])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])], [b])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
(y,) = session.run(None, {"a": np.full((4, k), 255, np.uint8)})
print(int(y.max()), k * 255 * 127)
"""

# The sampler's own check of the draws stored in the file, then fresh draws against torch float32 references.
CHECK = """
import sys
import numpy as np
sys.modules["torch"] = None  # as on a sampling machine: no torch
from mrgen_dist.runtime.sampler import Sampler
sampler = Sampler(sys.argv[1], device="cpu")
ref = np.load(sys.argv[2])
(got,) = sampler.session.run(["image"], {"z": ref["z"], "scanner": ref["scanner"]})
print(f"{sampler.parity_error:.6e} {np.abs(got - ref['want']).max():.6e} {sampler.layout}",
      ",".join(sampler.exact_layouts))
"""


def _python(emulated: bool) -> list[str]:
    return [QEMU, "-cpu", "Haswell", sys.executable] if emulated else [sys.executable]


def _run(emulated: bool, *args: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_python(emulated), "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


@pytest.fixture(scope="module")
def haswell() -> None:
    """Skips (saying why) where an emulated AVX2-only CPU is not available."""
    if QEMU is None:
        pytest.skip("qemu-x86_64 not installed (Debian: apt-get install qemu-user); the AVX2 path is not checked")
    done = _run(True, code="import numpy, onnxruntime; print('ok')")
    if done.returncode != 0 or "ok" not in done.stdout:
        pytest.skip(f"qemu-x86_64 -cpu Haswell cannot run {sys.executable}: {done.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def int8(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(trained_run, "int8", tmp_path_factory.mktemp("int8") / "decoder-int8.onnx").path


@pytest.fixture(scope="module")
def reference(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 fresh prior draws (not those of the export check) and the torch float32 decoder's images, as .npz."""
    family, model, record = load_trained(trained_run)
    graph = family.export_graph(model).eval()
    rng = np.random.default_rng(2024)
    z = rng.standard_normal((64, record.model["latent"]), dtype=np.float32)
    scanner = np.arange(64, dtype=np.int64) % len(record.vocabulary)
    with torch.no_grad():
        want = graph(torch.from_numpy(z), torch.from_numpy(scanner)).numpy()
    path = tmp_path_factory.mktemp("int8-ref") / "reference.npz"
    np.savez(path, z=z, scanner=scanner, want=want)
    return path


def _errors(emulated: bool, int8: Path, reference: Path) -> tuple[float, float, str, list[str]]:
    """The int8 file's parity error and its error on fresh draws, as the sampler runs it there, the weight
    layout the sampler chose and the layouts that passed the file's parity draws there."""
    done = _run(emulated, str(int8), str(reference), code=CHECK)
    assert done.returncode == 0, done.stderr[-3000:]
    stored, fresh, layout, exact = done.stdout.split()
    return float(stored), float(fresh), layout, exact.split(",")


def test_graph_has_no_uint8_x_int8_product(int8: Path) -> None:
    """Every integer product is uint8 x uint8 (no int8 tensor anywhere); the first layer stays float."""
    proto = onnx.load(str(int8))
    types = {t.data_type for t in proto.graph.initializer}
    assert onnx.TensorProto.INT8 not in types and onnx.TensorProto.UINT8 in types
    ops = [n.op_type for n in proto.graph.node]
    assert "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
    assert ops.count("MatMulIntegerToFloat") == 1 and ops.count("Gemm") == 1  # tiny model: 2 layers
    # beside it, the same products with int8 weights, recorded by checksum
    (variant,) = json.loads({p.key: p.value for p in proto.metadata_props}["mrgen.variants"])
    signed = onnx.load(str(int8.parent / variant["file"]))
    assert variant["layout"] == "u8s8" and variant["sha256"] == hashlib.sha256(
        (int8.parent / variant["file"]).read_bytes()).hexdigest()
    assert [n.op_type for n in signed.graph.node] == ops
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    signed_weights = {t.name: numpy_helper.to_array(t) for t in signed.graph.initializer}
    for node, signed_node in zip(proto.graph.node, signed.graph.node, strict=True):
        if node.op_type == "MatMulIntegerToFloat":
            for slot in (1, 5):  # the weight and its zero point: int8, 128 less, the same differences
                u, s = weights[node.input[slot]], signed_weights[signed_node.input[slot]]
                assert u.dtype == np.uint8 and s.dtype == np.int8
                assert np.array_equal(u.astype(np.int16) - 128, s)


@pytest.mark.parametrize("emulated", [False, True], ids=["native", "emulated-avx2"])
def test_int8_accurate(emulated: bool, int8: Path, reference: Path, request: pytest.FixtureRequest) -> None:
    if emulated:
        request.getfixturevalue("haswell")
    stored, fresh, _, _ = _errors(emulated, int8, reference)
    assert stored <= TOLERANCE["int8"] and fresh <= TOLERANCE["int8"], (stored, fresh)


@pytest.mark.integration
def test_emulated_cpu_takes_the_avx2_kernels(haswell: None) -> None:
    """The emulation is meaningful: uint8 x int8 products saturate there, as on a real AVX2-only CPU."""
    done = _run(True, code=PROBE)
    assert done.returncode == 0, done.stderr[-2000:]
    got, exact = map(int, done.stdout.split())
    assert got < exact, "qemu-x86_64 -cpu Haswell ran onnxruntime's exact (VNNI) kernels: the AVX2 path is untested"


def test_same_images_on_both_cpus(haswell: None, int8: Path, reference: Path) -> None:
    """Integer sums are exact on both, whichever layout each runs; only float rounding (vector widths) may differ.
    The u8s8 layout passes the file's parity draws exactly where its kernels are exact (VNNI), as the probe tells,
    and each CPU runs a layout that passed. Which of two passing layouts runs is a timing (the faster), so the
    check names no winner there: on this tiny model the two run within timing noise of each other."""
    native, emulated = _errors(False, int8, reference), _errors(True, int8, reference)
    assert abs(native[1] - emulated[1]) < 1e-5 and abs(native[0] - emulated[0]) < 1e-5, (native, emulated)
    for cpu, (_, _, layout, passed) in (("native", native), ("emulated", emulated)):
        got, exact = map(int, _run(cpu == "emulated", code=PROBE).stdout.split())
        assert sorted(passed) == (["u8s8", "u8u8"] if got == exact else ["u8u8"]), (cpu, passed, got, exact)
        assert layout in passed, (cpu, layout, passed)


@pytest.mark.parametrize("case", ["changed", "missing"])
def test_a_variant_that_is_not_the_exported_one_is_not_run(int8: Path, tmp_path: Path, case: str) -> None:
    from mrgen_dist.runtime.sampler import Sampler

    for path in int8.parent.glob(f"{int8.stem}*"):
        shutil.copy(path, tmp_path / path.name)
    variant = tmp_path / f"{int8.stem}.u8s8.onnx"
    if case == "changed":
        variant.write_bytes(variant.read_bytes() + b"\0")  # another file than the one recorded
    else:
        variant.unlink()
    with pytest.warns(UserWarning, match="u8s8 layout .* is missing or not the file exported with it"):
        sampler = Sampler(tmp_path / int8.name, device="cpu")
    assert sampler.layout == "u8u8"


def test_sampler_refuses_a_u8s8_file_on_avx2(haswell: None, trained_run: Path, int8: Path, tmp_path: Path) -> None:
    """A file quantized the old way (onnxruntime dynamic quantization, int8 weights) with the int8 file's parity
    record: the sampler's check catches the saturation on the AVX2 CPU, in one line that names the fix."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = export_onnx(trained_run, "fp32", tmp_path / "fp32.onnx").path
    plain = onnx.load(str(fp32))
    del plain.graph.value_info[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    quantize_dynamic(str(tmp_path / "plain.onnx"), str(tmp_path / "old.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True)
    old = onnx.load(str(tmp_path / "old.onnx"))
    onnx.helper.set_model_props(old, {p.key: p.value for p in onnx.load(str(int8)).metadata_props})
    onnx.save(old, str(tmp_path / "old.onnx"))
    assert json.loads({p.key: p.value for p in old.metadata_props}["mrgen.parity"])["draws"]

    code = "import sys; from mrgen_dist.commands.sample import main; sys.exit(main(sys.argv[1:]))"
    done = _run(True, str(tmp_path / "old.onnx"), "--scanner", "Intera", "--n", "2", "--out", str(tmp_path / "o.h5"),
                code=code)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("qemu-x86_64: warning")]
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert "inaccurate on this machine" in lines[0] and "--precision fp16" in lines[0]
    assert not (tmp_path / "o.h5").exists()
