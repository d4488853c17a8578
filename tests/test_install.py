"""The lean install: `pip install mrgen-dist` with no extras is a working torch-free sampler, and every other
command says which extra it needs. Builds a fresh virtual environment (about a minute, from the registry)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from mrgen_dist.export.exporter import export_onnx

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "accelerate", "deepspeed", "transformers", "clearml", "scipy", "scikit-learn", "matplotlib", "nilearn"}


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("base") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(REPO / "requirements/ci-constraints.txt"), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_base_install_samples_without_torch(base_venv: Path, trained_run: Path, tmp_path: Path) -> None:
    listed = subprocess.run([str(base_venv / "bin/python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert {"mrgen-dist", "numpy", "onnxruntime", "h5py", "nibabel"} <= installed
    assert not installed & HEAVY, installed & HEAVY
    decoder = export_onnx(trained_run, "fp32", tmp_path / "decoder.onnx").path
    done = subprocess.run([str(base_venv / "bin/mrgen-sample"), str(decoder), "--scanner", "all", "--n", "3",
                           "--out", str(tmp_path / "samples.h5")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "12 SYNTHETIC images" in done.stdout
    with h5py.File(tmp_path / "samples.h5") as f:
        assert f["Intera"].shape == (3, 218, 182)


@pytest.mark.slow
def test_base_install_translates_without_torch(base_venv: Path, translator_onnx: Path, cohort_dir: Path,
                                               store_dir: Path, tmp_path: Path) -> None:
    volume = sorted(cohort_dir.glob("*.nii.gz"))[0]
    for source, out in ((volume, tmp_path / "volume.nii.gz"), (store_dir, tmp_path / "test.h5")):
        done = subprocess.run([str(base_venv / "bin/mrgen-translate"), str(translator_onnx), str(source), "--to",
                               "Magnetom TrioTim", "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "translated to Magnetom TrioTim on cpu" in done.stdout and out.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("command, extra", [("mrgen-train", "train"), ("mrgen-convert", "train"),
                                            ("mrgen-export", "train"), ("mrgen-fid", "fid")])
def test_commands_name_their_extra(base_venv: Path, command: str, extra: str) -> None:
    done = subprocess.run([str(base_venv / "bin" / command), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"{command}: error: {command} needs the '{extra}' extra" in done.stderr
    assert f"pip install 'mrgen-dist[{extra}]'" in done.stderr and "Traceback" not in done.stderr
