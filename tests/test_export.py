"""mrgen-export onnx: contract, metadata, parity per precision, dynamic batch, nothing written on failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mrgen_dist import export
from mrgen_dist.export import ExportError, export_decoder, load_trained, main


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    return {p: export_decoder(trained_run, p, out / f"decoder-{p}.onnx").path for p in ("fp32", "fp16", "int8")}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_parity_with_torch_decoder(exported: dict[str, Path], trained_run: Path, precision: str) -> None:
    family, model, record = load_trained(trained_run)
    reference = family.sampling_graph(model).eval()
    session = ort.InferenceSession(str(exported[precision]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(42)
    for batch in (1, 7, 64):  # dynamic batch axis
        z = rng.standard_normal((batch, record.model["latent"]), dtype=np.float32)
        s = rng.integers(0, 4, batch).astype(np.int64)
        (got,) = session.run(["image"], {"z": z, "scanner": s})
        with torch.no_grad():
            want = reference(torch.from_numpy(z), torch.from_numpy(s)).numpy()
        assert got.shape == (batch, 1, 218, 182) and got.dtype == np.float32
        assert np.abs(got - want).max() <= export.TOLERANCE[precision]
        assert 0.0 <= got.min() and got.max() <= 1.0


def test_contract_and_metadata(exported: dict[str, Path], trained_run: Path, store_dir: Path) -> None:
    proto = onnx.load(str(exported["fp32"]))
    inputs = {i.name: i for i in proto.graph.input}
    assert set(inputs) == {"z", "scanner"} and [o.name for o in proto.graph.output] == ["image"]
    assert inputs["scanner"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert inputs["z"].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    meta = {p.key: p.value for p in proto.metadata_props}
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert meta["mrgen.format"] == "mrgen-decoder/1"
    assert json.loads(meta["mrgen.scanners"]) == manifest["vocabulary"]
    assert meta["mrgen.store_sha256"] == manifest["store_sha256"]
    assert meta["mrgen.latent"] == "8" and json.loads(meta["mrgen.image_shape"]) == [218, 182]
    assert json.loads(meta["mrgen.config"])["model"]["hidden"] == [32]
    assert {onnx.load(str(p)).metadata_props[5].value for p in exported.values()} == {"fp32", "fp16", "int8"}
    assert meta["mrgen.family"] == "cvae"
    sizes = {p: path.stat().st_size for p, path in exported.items()}
    assert sizes["fp16"] < 0.6 * sizes["fp32"] and sizes["int8"] < 0.35 * sizes["fp32"]


def test_failed_check_leaves_no_file(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(export.TOLERANCE, "int8", 1e-9)  # int8 cannot match fp32 this closely
    out = tmp_path / "decoder.onnx"
    with pytest.raises(ExportError, match="parity check failed"):
        export_decoder(trained_run, "int8", out)
    assert list(tmp_path.iterdir()) == []


def test_cli(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["onnx", "--model", str(trained_run), "--out", str(tmp_path / "d.onnx")]) == 0
    assert "fp32" in capsys.readouterr().out
    assert main(["onnx", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "e.onnx")]) == 1
    assert "no config.json and model.safetensors" in capsys.readouterr().err
