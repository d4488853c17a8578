"""The job scripts on a real one-node Slurm (hpc/slurm/local-cluster.sh): the whole chain, preemption, and the
model comparison (compare.sh)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "hpc" / "slurm" / "local-cluster.sh"


@pytest.fixture(scope="module")
def slurm() -> None:
    if os.geteuid() != 0:
        pytest.skip("starting a local Slurm needs root (packages, munge, slurmd)")
    done = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and not shutil.which("slurmctld"):
        pytest.skip(f"Slurm could not be installed here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stdout + done.stderr


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML", "SLURM_", "MRGEN_"))}
    env.update(MRGEN_VENV=str(Path(sys.executable).parent.parent), MRGEN_WORK=str(tmp),
               CLEARML_CACHE_DIR=str(tmp / "clearml"), MRGEN_CONFIG="hpc/configs/tiny.yaml", OMP_NUM_THREADS="1", **extra)
    return env


def _wait(job_ids: list[str], timeout: float = 900) -> dict[str, list[dict[str, str]]]:
    """Poll squeue until the jobs are gone; then their records (one per array task) from scontrol."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True, text=True).stdout
        if not queued.strip():
            break
        time.sleep(2)
    else:
        pytest.fail(f"jobs {job_ids} still queued after {timeout} s")
    records = {}
    for job in job_ids:
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        records[job] = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in out.splitlines() if line.strip()]
    return records


def _sessions(cache: Path) -> list[dict]:
    return [json.loads((d / "task.json").read_text()) for d in sorted((cache / "offline").iterdir()) if d.is_dir()]


def test_pipeline_runs_the_whole_chain(slurm: None, cohort_dir: Path, tmp_path: Path) -> None:
    env = _env(tmp_path, MRGEN_INPUT=str(cohort_dir), MRGEN_TRAIN_OVERRIDES="train.epochs=1", MRGEN_CPU_PROCS="2",
               MRGEN_FID_REPEATS="2", MRGEN_CONVERT_PARTS="2")
    t0 = time.time()
    submitted = subprocess.run([str(REPO / "hpc/slurm/pipeline.sh")], capture_output=True, text=True, env=env,
                               cwd=REPO, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    ids = dict(re.findall(r"^(convert-parts|convert|train|export|fanout) (\d+)$", submitted.stdout, re.M))
    assert set(ids) == {"convert-parts", "convert", "train", "export", "fanout"}, submitted.stdout
    records = _wait([ids[k] for k in ("convert-parts", "convert", "train", "export", "fanout")])

    def completed(*names: str) -> None:
        for name in names:
            for rec in records[ids[name]]:
                assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), (name, rec)

    completed("convert-parts", "convert", "train", "export", "fanout")
    # the conversion ran as an array of 2 parts, merged by the job after it
    assert len(records[ids["convert-parts"]]) == 2
    assert max(task["EndTime"] for task in records[ids["convert-parts"]]) <= records[ids["convert"]][0]["StartTime"]
    # the store exists only now: fanout sized the FID array from its manifest and submitted it and the report
    (fanout,) = records[ids["fanout"]]
    fanout_log = Path(fanout["StdOut"]).read_text()
    ids.update(re.findall(r"^(fid|report) (\d+)$", fanout_log, re.M))
    assert {"fid", "report"} <= set(ids), fanout_log
    records.update(_wait([ids["fid"], ids["report"]]))
    print(f"chain wall time {time.time() - t0:.0f} s")
    completed("fid", "report")
    # afterok order (ISO times, one-second resolution): export, fanout, every FID task, report
    assert records[ids["export"]][0]["EndTime"] <= fanout["StartTime"]
    assert all(fanout["EndTime"] <= task["StartTime"] for task in records[ids["fid"]])
    assert max(task["EndTime"] for task in records[ids["fid"]]) <= records[ids["report"]][0]["StartTime"]
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    n_scanners = len(manifest["vocabulary"])
    assert f"{n_scanners} scanner(s), FID array 0-{n_scanners - 1}" in fanout_log
    assert len(records[ids["fid"]]) == n_scanners == 4  # one array task per scanner of the store

    assert manifest["counts"]["volumes"] == 12 and manifest["inputs"]["description"].startswith("2 parts merged")
    assert [json.loads((tmp_path / f"store.parts/part-{k}/manifest.json").read_text())["counts"]["volumes"]
            for k in (1, 2)] == [6, 6]
    assert list((tmp_path / "run" / "checkpoints").glob("step-*/meta.json"))
    latest = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    assert json.loads((latest / "meta.json").read_text())["world_size"] == 2
    assert (tmp_path / "decoder.onnx").stat().st_size > 0
    results = sorted((tmp_path / "fid").glob("fid_*.json"))
    assert [p.name for p in results] == ["fid_Gyroscan_Intera.json", "fid_Intera.json", "fid_Magnetom_TrioTim.json",
                                         "fid_Unspecified.json"]
    assert all(len(json.loads(p.read_text())["repeats"]) == 2 for p in results)
    table = (tmp_path / "fid" / "fid_table.md").read_text()
    assert "Gyroscan Intera" in table and "Conditioning:" in table
    assert (tmp_path / "fid" / "fid_boxplot.png").is_file()

    sessions = _sessions(tmp_path / "clearml")
    parent = next(s for s in sessions if "pipeline" in s["tags"])
    children = [s for s in sessions if "fid" in s["tags"]]
    assert sorted(s["name"] for s in children) == ["FID Gyroscan Intera", "FID Intera", "FID Magnetom TrioTim",
                                                   "FID Unspecified"]
    assert all(s["parent"] == parent["id"] for s in children)
    assert all(s["name"].removeprefix("FID ") in s["tags"] for s in children)
    report = next(s for s in sessions if "report" in s["tags"])
    assert report["parent"] == parent["id"]
    assert {"fid_table.md", "fid_boxplot.png"} <= {a["key"] for a in report["execution"]["artifacts"]}
    print(table)


def test_preemption_requeues_and_resumes(slurm: None, store_dir: Path, tmp_path: Path) -> None:
    """With node-local staging (MRGEN_STAGE=1): each start trains from its own copy of the store."""
    run, local = tmp_path / "run", tmp_path / "node-local"
    env = _env(tmp_path, MRGEN_STORE=str(store_dir), MRGEN_RUN=str(run), MRGEN_CPU_PROCS="1",
               MRGEN_TRAIN_OVERRIDES="train.epochs=30 train.tracker=none", MRGEN_STAGE="1",
               MRGEN_STAGE_DIR=str(local))
    log_path = tmp_path / "train.out"
    job = subprocess.run(["sbatch", "--parsable", f"--output={log_path}", "hpc/slurm/train.sh"], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=60).stdout.strip()
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    # what Slurm does with `#SBATCH --signal=B:USR1@120` shortly before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    (rec,) = _wait([job])[job]
    assert (rec["JobState"], rec["ExitCode"], rec["Restarts"]) == ("COMPLETED", "0:0", "1")
    log = log_path.read_text()
    stopped = re.search(r"SIGTERM at step (\d+): checkpoint (\S+)", log)
    assert stopped and f"job {job} requeued" in log
    assert f"resumed from {stopped.group(2)}" in log and "restart 1" in log
    assert (run / "model.safetensors").is_file()
    losses = {json.loads(line)["step"] for line in metrics.read_text().splitlines()}
    assert losses == set(range(1, 30 * 20 + 1))  # every step of 30 epochs x 20 steps, across the requeue
    stage = local / f"mrgen-store-{job}"
    assert log.count(f"staged {store_dir} (") == 2 and log.count(f"to {stage} on 1 node(s)") == 2
    assert json.loads((run / "config.json").read_text())["config"]["data"]["store"] == str(stage)
    assert local.is_dir() and not stage.exists()  # removed at the end


def test_compare_trains_scores_and_tabulates_two_models(slurm: None, store_dir: Path, tmp_path: Path) -> None:
    """hpc/slurm/compare.sh: one array task per config (train, export, score, diagnose, report; a translator's:
    train, export, mrgen-fid translation), then the tables."""
    out = tmp_path / "compare"
    env = _env(tmp_path, MRGEN_COMPARE_N_GENERATED="8", MRGEN_COMPARE_REPEATS="1")
    t0 = time.time()
    submitted = subprocess.run([str(REPO / "hpc/slurm/compare.sh"), str(store_dir), str(out),
                                "hpc/configs/compare/tiny-a.yaml", "hpc/configs/compare/tiny-b.yaml:noise",
                                "hpc/configs/compare/tiny-translator.yaml"],
                               capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr[-2000:]
    ids = dict(re.findall(r"^(models|table) (\d+)$", submitted.stdout, re.M))
    assert set(ids) == {"models", "table"}, submitted.stdout
    records = _wait([ids["models"], ids["table"]], timeout=600)
    print(f"compare wall time {time.time() - t0:.0f} s")
    logs = {rec.get("ArrayTaskId", "table"): rec["StdOut"] for job in records.values() for rec in job}
    for job in records.values():
        for rec in job:
            log = Path(rec["StdOut"]).read_text()[-3000:] if Path(rec["StdOut"]).is_file() else "(no log)"
            assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), (rec, log)
    assert sorted(logs) == ["0", "1", "2", "table"]  # one array task per config
    (table_job,) = records[ids["table"]]
    assert max(task["EndTime"] for task in records[ids["models"]]) <= table_job["StartTime"]  # afterok

    for name in ("tiny-a", "tiny-b-noise"):
        assert (out / name / "run" / "model.safetensors").is_file() and (out / name / "decoder.onnx").is_file()
        results = out / name / "results"
        assert {"conditioning.json", "generation.json", "diagnostics.json", "fid_table.md"} <= {
            p.name for p in results.iterdir()}
        assert len(list(results.glob("fid_*.json"))) == 4
    assert json.loads((out / "tiny-b-noise" / "results" / "generation.json").read_text())["noise"] is True
    md = (out / "compare.md").read_text()
    rows = [line for line in md.split("## Translation")[0].splitlines() if line.startswith("| tiny-")]
    assert [r.split(" | ")[0] for r in rows] == ["| tiny-a", "| tiny-b-noise"], md
    assert "| tiny-a | cVAE |" in md and "| tiny-b-noise | VAE (unconditional) + noise |" in md
    with (out / "compare.csv").open(newline="", encoding="utf-8") as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert list(table) == ["tiny-a", "tiny-b-noise"]
    for row in table.values():  # real numbers in every measure the two families have
        for column in ("parameters", "train_seconds", "sample_images_per_s", "fid", "kid", "conditioning",
                       "z_probe", "reconstruction", "label_effect_ratio", "ms_ssim", "intensity_w1"):
            assert math.isfinite(float(row[column])), (column, row)
        assert row["n_generated_min"] == row["n_generated_max"] == "8" and row["fid_biased"] == "True"
        assert row["verdict"]
    assert (out / "compare.png").stat().st_size > 10_000
    translator = out / "tiny-translator"
    assert (translator / "translator.onnx").is_file() and (translator / "results" / "translation.json").is_file()
    (row,) = [line for line in md.split("## Translation")[1].splitlines() if line.startswith("| tiny-translator")]
    assert row.startswith("| tiny-translator | stargan | Gyroscan Intera, Intera, Unspecified, Magnetom TrioTim |")
    assert (out / "compare-translation.png").stat().st_size > 10_000
    print(md)


def test_compare_runs_cohorts_times_configs_as_one_array(slurm: None, store_dir: Path, tmp_path: Path) -> None:
    """compare.sh COHORT=STORE,...: every config on every cohort in one array, then one table with a cohort
    column (the same store twice stands for two cohorts: the array's indexing and the table are what is
    tested); a config built on another (CONFIG@NAME: a refiner over tiny-a) in a second array, on the run of
    NAME of its own cohort."""
    from tests.launch import TINY_REFINER

    out = tmp_path / "cohorts"
    env = _env(tmp_path, MRGEN_COMPARE_N_GENERATED="8", MRGEN_COMPARE_REPEATS="1")
    submitted = subprocess.run([str(REPO / "hpc/slurm/compare.sh"), f"one={store_dir},two={store_dir}", str(out),
                                "hpc/configs/compare/tiny-a.yaml", f"{TINY_REFINER}@tiny-a"],
                               capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr[-2000:]
    assert f"task 1: tiny-a ({REPO / 'hpc/configs/compare/tiny-a.yaml'} on two) -> {out}/two/tiny-a" in submitted.stdout
    assert f"built task 1: tiny_refiner ({TINY_REFINER}@tiny-a on two) -> {out}/two/tiny_refiner" in submitted.stdout
    ids = dict(re.findall(r"^(models|built|table) (\d+)$", submitted.stdout, re.M))
    records = _wait([ids["models"], ids["built"], ids["table"]], timeout=900)
    for job in records.values():
        for rec in job:
            log = Path(rec["StdOut"]).read_text()[-3000:] if Path(rec["StdOut"]).is_file() else "(no log)"
            assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), (rec, log)
    assert len(records[ids["models"]]) == len(records[ids["built"]]) == 2
    assert max(task["EndTime"] for task in records[ids["models"]]) <= min(
        task["StartTime"] for task in records[ids["built"]])  # afterok
    for cohort in ("one", "two"):
        assert (out / cohort / "tiny-a" / "results" / "conditioning.json").is_file()
        assert (out / cohort / "tiny_refiner" / "results" / "conditioning.json").is_file()
        trained = json.loads((out / cohort / "tiny_refiner" / "run" / "config.json").read_text())
        assert trained["model"]["coarse"] == str(out / cohort / "tiny-a" / "run")
    with (out / "compare.csv").open(newline="", encoding="utf-8") as f:
        rows = [(row["run"], row["cohort"]) for row in csv.DictReader(f)]
    assert rows == [("tiny-a", "one"), ("tiny_refiner", "one"), ("tiny-a", "two"), ("tiny_refiner", "two")]
    assert "| tiny-a | one |" in (out / "compare.md").read_text()
    bad = subprocess.run([str(REPO / "hpc/slurm/compare.sh"), f"one={store_dir},one={store_dir}", str(out),
                          "hpc/configs/compare/tiny-a.yaml"], capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 1 and "cohort one named twice" in bad.stderr
    unbuilt = subprocess.run([str(REPO / "hpc/slurm/compare.sh"), str(store_dir), str(out), f"{TINY_REFINER}@tiny-a"],
                             capture_output=True, text=True, env=env, cwd=REPO)
    assert unbuilt.returncode == 1 and "tiny-a is not the name of a config of this comparison without @" in unbuilt.stderr
