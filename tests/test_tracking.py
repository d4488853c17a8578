"""ClearML tracking, offline with no server (real clearml, no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _scalars(session: Path) -> dict[tuple[str, str, int], float]:
    out = {}
    for line in (session / "metrics.jsonl").read_text().splitlines():
        for ev in json.loads(line):
            if ev["type"] == "training_stats_scalar":
                out[(ev["metric"], ev["variant"], ev["iter"])] = ev["value"]
    return out


def _tracker_script(body: str, env: dict[str, str], cache: Path) -> subprocess.CompletedProcess:
    """Run in a fresh process: clearml keeps a per-process task singleton and patches argparse on import."""
    code = "from pathlib import Path\nfrom mrgen_dist.tracking import ClearMLTracker\n" + body
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARML")}
    full_env.update(CLEARML_CACHE_DIR=str(cache), HOME=str(cache), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=full_env)


@pytest.mark.integration
def test_offline_session_holds_scalars_params_images_and_artifacts(tmp_path: Path) -> None:
    png = tmp_path / "curve.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    done = _tracker_script(
        f"""
import time
t = ClearMLTracker("mrgen-test", "run-a", tags=["train"])
t.log_params({{"optim": {{"lr": 0.001}}, "train": {{"epochs": 3}}}})
for step in range(1, 4):
    t.log_scalars({{"loss/train": 10.0 / step, "loss/test": 12.0 / step}}, step)
t.log_image("loss curves", Path({str(png)!r}), 3)
t.log_artifact("model", Path({str(png)!r}))
t0 = time.perf_counter(); t.close(); print("CLOSE", time.perf_counter() - t0)
print("DIR", t.offline_dir)
""",
        {},
        tmp_path / "cache",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("CLOSE", "DIR")))
    assert float(lines["CLOSE"]) < 1.0  # well under a second
    session = Path(lines["DIR"])
    assert session.parent == tmp_path / "cache" / "offline"
    scalars = _scalars(session)
    assert scalars[("loss", "train", 3)] == pytest.approx(10.0 / 3)
    assert scalars[("loss", "test", 1)] == pytest.approx(12.0)
    task = json.loads((session / "task.json").read_text())
    assert task["tags"] == ["train"]
    (artifact,) = task["execution"]["artifacts"]
    assert artifact["key"] == "model" and artifact["type_data"]["preview"] == png.resolve().as_uri()
    assert "optim.lr" in json.dumps(task["hyperparams"])
    assert list(session.rglob("loss curves_curve_*.png"))


@pytest.mark.integration
def test_unreachable_server_is_reported_fast_and_recorded_offline(tmp_path: Path) -> None:
    env = {"CLEARML_API_HOST": "http://127.0.0.1:9", "CLEARML_API_ACCESS_KEY": "k", "CLEARML_API_SECRET_KEY": "s"}
    t0 = time.perf_counter()
    done = _tracker_script('t = ClearMLTracker("mrgen-test", "run-b")\nt.log_scalars({"loss/train": 1.0}, 1)\nt.close()',
                           env, tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.perf_counter() - t0 < 20  # Task.init against this server, unprobed, hangs for minutes
    assert "ClearML server http://127.0.0.1:9 is configured but unreachable" in done.stderr
    assert "recording OFFLINE" in done.stderr
    assert list((tmp_path / "cache" / "offline").glob("offline-*/metrics.jsonl"))


@pytest.mark.parametrize(("config", "terms"), [
    ("hpc/configs/tiny.yaml", ("loss",)),
    ("tests/assets/tiny_dcgan.yaml", ("generator", "discriminator", "real_accuracy", "scanner_accuracy_fake")),
    ("tests/assets/tiny_stargan.yaml", ("generator", "discriminator", "cycle", "identity")),
], ids=["cvae", "dcgan", "stargan"])
def test_training_reports_epoch_scalars_offline(config: str, terms: tuple[str, ...], store_dir: Path,
                                                 tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARML")}
    env.update(CLEARML_CACHE_DIR=str(cache), HOME=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "mrgen_dist.commands.train", "--config", str(REPO / config), "--tracker", "clearml",
         f"data.store={store_dir}", f"train.out={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (session,) = [p for p in (cache / "offline").iterdir() if p.is_dir()]
    scalars = _scalars(session)
    latest = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    history = json.loads((latest / "meta.json").read_text())["history"]
    for record in history:  # every reported term of each player, train and test
        for term in terms:
            assert scalars[(term, "train", record["epoch"])] == pytest.approx(record[f"train_{term}"])
            assert scalars[(term, "test", record["epoch"])] == pytest.approx(record[f"test_{term}"])
    assert ("throughput", "images_per_s", 2) in scalars
    (artifact,) = json.loads((session / "task.json").read_text())["execution"]["artifacts"]
    assert artifact["type_data"]["preview"] == (tmp_path / "run" / "model.safetensors").resolve().as_uri()
    assert list(session.rglob("loss curves_loss_curves_*.png")) and list(session.rglob("samples_samples_002_*.png"))
