"""The onnxruntime sampler: reproducible, torch-free, clear errors, atomic outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import onnx
import pytest

from mrgen_dist.artifacts import ArtifactError
from mrgen_dist.export import export_decoder
from mrgen_dist.sample import SampleError, Sampler, main


@pytest.fixture(scope="module")
def decoder(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_decoder(trained_run, "fp32", tmp_path_factory.mktemp("dec") / "decoder.onnx").path


def test_reproducible_and_independent_of_batch_size(decoder: Path) -> None:
    sampler = Sampler(decoder, device="cpu")
    a = sampler.sample("Intera", n=10, seed=3, batch_size=3)
    b = sampler.sample("Intera", n=10, seed=3, batch_size=256)
    assert a.shape == (10, 218, 182) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sampler.sample("Intera", n=10, seed=4))
    assert not np.array_equal(a, sampler.sample("Unspecified", n=10, seed=3))
    np.testing.assert_array_equal(a[:4], sampler.sample("Intera", n=4, seed=3))  # a prefix of the same stream


def test_cli_outputs(decoder: Path, tmp_path: Path) -> None:
    assert main([str(decoder), "--scanner", "all", "--n", "3", "--out", str(tmp_path / "pngs")]) == 0
    pngs = sorted((tmp_path / "pngs").glob("*/*.png"))
    assert len(pngs) == 12 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "pngs" / "grid.png").is_file()
    assert main([str(decoder), "--scanner", "all", "--n", "5", "--seed", "1", "--out", str(tmp_path / "s.h5")]) == 0
    sampler = Sampler(decoder)
    with h5py.File(tmp_path / "s.h5") as f:
        assert sorted(f) == sorted(sampler.vocabulary.names)
        np.testing.assert_array_equal(f["Intera"][...], sampler.sample("Intera", 5, seed=1))
    assert main([str(decoder), "--scanner", "Intera", "--n", "4", "--out", str(tmp_path / "s.nii.gz")]) == 0
    assert nib.load(tmp_path / "s.nii.gz").shape == (182, 218, 4)


def test_errors_are_clear_and_write_nothing(decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x.h5"
    assert main([str(decoder), "--scanner", "Achieva", "--n", "2", "--out", str(out)]) == 1
    assert ("this model: unknown scanner 'Achieva'; valid scanners: Gyroscan Intera, Intera, Unspecified, Magnetom TrioTim"
            in capsys.readouterr().err)
    assert main([str(decoder), "--scanner", "Intera", "--n", "0", "--out", str(out)]) == 1
    assert "--n must be positive" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"keep")
    assert main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", str(out), "--overwrite"]) == 0
    assert h5py.is_hdf5(out)
    bare = onnx.load(str(decoder))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ArtifactError, match="is not an mrgen-dist model"):
        Sampler(tmp_path / "bare.onnx")
    capsys.readouterr()
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", str(tmp_path / "y.h5"), "--batch-size", bad])
        assert exit_info.value.code == 2 and f"--batch-size: must be > 0, got {bad}" in capsys.readouterr().err
    assert not (tmp_path / "y.h5").exists()


def test_cuda_requested_on_a_machine_without_it(decoder: Path) -> None:
    with pytest.raises(SampleError, match=r"--device cuda needs onnxruntime's CUDAExecutionProvider.*mrgen-dist\[gpu\]"):
        Sampler(decoder, device="cuda")
    assert Sampler(decoder, device="auto").device == "cpu"


def test_sampler_runs_where_torch_cannot_be_imported(decoder: Path, tmp_path: Path) -> None:
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from mrgen_dist.sample import Sampler, main
assert main([{str(decoder)!r}, "--scanner", "all", "--n", "2", "--out", {str(tmp_path / "o.h5")!r}]) == 0
images = Sampler({str(decoder)!r}).sample("Intera", 3, seed=0)
assert images.shape == (3, 218, 182)
assert sys.modules["torch"] is None
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-2000:]
