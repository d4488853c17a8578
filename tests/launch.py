"""Running mrgen-train in real processes for the tests: one process (`run(train_cmd(...))`) or several through
`accelerate launch` (`launch`), single-threaded each, with the repository as working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "hpc" / "configs" / "tiny.yaml"
TINY_GANS = {f: REPO / "tests" / "assets" / f"tiny_{f}.yaml" for f in ("dcgan", "wgangp", "cvaegan", "atlasgan")}
TINY_ATLAS = REPO / "tests" / "assets" / "tiny_atlas.yaml"
TINY_TRANSLATORS = {f: REPO / "tests" / "assets" / f"tiny_{f}.yaml" for f in ("stargan", "cyclegan")}
TINY_DISTILLED = REPO / "tests" / "assets" / "tiny_distilled.yaml"  # needs model.teacher=<an atlas run>
TINY_DIFFUSION = REPO / "tests" / "assets" / "tiny_diffusion.yaml"
TINY_REFINER = REPO / "tests" / "assets" / "tiny_refiner.yaml"  # needs model.coarse=<a decoder run>
BIN = Path(sys.executable).parent  # the environment's console scripts (mrgen-sample, mrgen-fid, accelerate)
ACCELERATE = str(BIN / "accelerate")


def env(**extra: str) -> dict[str, str]:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    full.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch-extensions"))
    return full


def train_cmd(store: Path, out: Path, *overrides: str, resume: str = "none", config: Path = TINY) -> list[str]:
    return [sys.executable, "-m", "mrgen_dist.commands.train", "--config", str(config), "--resume", resume,
            f"data.store={store}", f"train.out={out}", *overrides]


def run(cmd: list[str], timeout: int = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**extra), cwd=REPO)


def two_cpu_processes(mixed_precision: str = "no") -> list[str]:
    """`accelerate launch` options of a 2-process DDP run on the CPU (with ACCELERATE_USE_CPU=1)."""
    return ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", mixed_precision,
            "--dynamo_backend", "no"]


def launch(store: Path, out: Path, launcher: list[str], *overrides: str, config: Path = TINY, **extra: str
           ) -> subprocess.CompletedProcess:
    """`accelerate launch LAUNCHER -m mrgen_dist.commands.train --config CONFIG ...`; `extra` goes into the environment."""
    cmd = [ACCELERATE, "launch", *launcher, "-m", "mrgen_dist.commands.train", "--config", str(config),
           f"data.store={store}", f"train.out={out}", *overrides]
    return run(cmd, timeout=400, **extra)
