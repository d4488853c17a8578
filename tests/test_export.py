"""mrgen-export onnx: contract, metadata, parity per precision, dynamic batch, nothing written on failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mrgen_dist.commands.export import main
from mrgen_dist.export import exporter as export
from mrgen_dist.export.exporter import ExportError, export_onnx
from mrgen_dist.runs import load_trained


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    return {p: export_onnx(trained_run, p, out / f"decoder-{p}.onnx").path for p in ("fp32", "fp16", "int8")}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_parity_with_torch_decoder(exported: dict[str, Path], trained_run: Path, precision: str) -> None:
    family, model, record = load_trained(trained_run)
    reference = family.export_graph(model).eval()
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
    parity = {p: json.loads({m.key: m.value for m in onnx.load(str(path)).metadata_props}["mrgen.parity"])
              for p, path in exported.items()}
    record = len(json.dumps(parity["int8"]))  # 4 reference images, float16: ~0.3 MB whatever the model size
    assert record < 400_000
    assert sizes["fp16"] < 0.6 * sizes["fp32"] and sizes["int8"] - record < 0.35 * sizes["fp32"]
    for precision, p in parity.items():
        assert 0 <= p["max_error"] <= p["tolerance"] == export.TOLERANCE[precision]
        assert p["batches"] == [1, 7, 64] and p["cpu"] and p["onnxruntime"] == ort.__version__
        assert ("draws" in p) == (precision == "int8")
    assert len(parity["int8"]["draws"]["scanner"]) == export.PARITY_DRAWS


def test_failed_check_leaves_no_file(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(export.TOLERANCE, "int8", 1e-9)  # int8 cannot match fp32 this closely
    out = tmp_path / "decoder.onnx"
    with pytest.raises(ExportError, match="parity check failed"):
        export_onnx(trained_run, "int8", out)
    assert list(tmp_path.iterdir()) == []


def test_cli(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["onnx", "--model", str(trained_run), "--out", str(tmp_path / "d.onnx")]) == 0
    assert "fp32" in capsys.readouterr().out
    assert main(["onnx", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "e.onnx")]) == 1
    assert "no config.json and model.safetensors" in capsys.readouterr().err


def _damaged_runs(trained_run: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Run folders each with one damaged file: name -> (folder, what the error must name)."""
    runs = {}

    def make(name: str) -> Path:
        folder = root / name
        folder.mkdir()
        for f in ("config.json", "model.safetensors"):
            (folder / f).write_bytes((trained_run / f).read_bytes())
        return folder

    weights = (trained_run / "model.safetensors").read_bytes()
    runs["truncated weights"] = (make("truncated"), "model.safetensors")
    (runs["truncated weights"][0] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    runs["random weights"] = (make("random"), "model.safetensors")
    (runs["random weights"][0] / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(5000))
    runs["weights of another model"] = (make("other"), "model.safetensors")
    config = json.loads((trained_run / "config.json").read_text())
    config["model"]["hidden"] = [16]
    (runs["weights of another model"][0] / "config.json").write_text(json.dumps(config))
    runs["corrupt config"] = (make("config"), "config.json")
    (runs["corrupt config"][0] / "config.json").write_text((trained_run / "config.json").read_text()[:100])
    runs["unknown family"] = (make("family"), "config.json")
    config = json.loads((trained_run / "config.json").read_text())
    config["family"] = "gan"
    (runs["unknown family"][0] / "config.json").write_text(json.dumps(config))
    return runs


def test_damaged_run_is_one_line_naming_the_file(trained_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "export"
    for what, (folder, name) in _damaged_runs(trained_run, tmp_path).items():
        assert main(["onnx", "--model", str(folder), "--out", str(out / "d.onnx")]) == 1, what
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(folder / name) in err, (what, err)
        assert "Traceback" not in err and "mrgen-export: error: " in err
    assert not out.exists() or list(out.iterdir()) == []
