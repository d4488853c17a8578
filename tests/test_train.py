"""Training in real processes on the CPU: single, 2-process DDP, 2-process DeepSpeed ZeRO-2; resume (of every
family: the cVAE and the adversarial families); signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mrgen_dist.checkpoint import seal
from mrgen_dist.config import load_config
from mrgen_dist.preemption import EXIT_PREEMPTED
from tests.launch import (
    REPO,
    TINY,
    TINY_ATLAS,
    TINY_DISTILLED,
    TINY_GANS,
    TINY_TRANSLATORS,
    env,
    launch,
    run,
    train_cmd,
    two_cpu_processes,
)

REFERENCE = REPO / "tests" / "assets" / "tiny_reference_losses.json"


def step_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """Step -> its logged losses from metrics.jsonl; a step logged again after a resume takes the later values."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec for rec in map(json.loads, lines)}


def test_single_process_run_outputs(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run(train_cmd(store_dir, out, "train.epochs=3"))
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("config.yaml", "config.json", "model.safetensors", "loss_curves.png", "metrics.jsonl",
                 "samples_001.png", "samples_003.png"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "config.json").read_text())
    store_manifest = json.loads((store_dir / "manifest.json").read_text())
    assert meta["vocabulary"] == store_manifest["vocabulary"]
    assert meta["store_sha256"] == store_manifest["store_sha256"]
    weights = load_file(out / "model.safetensors")
    assert weights["to_pixels.weight"].shape == (218 * 182, 32) and weights["to_pixels.weight"].dtype == torch.float32
    latest = sorted((out / "checkpoints").glob("step-*"))[-1]
    history = json.loads((latest / "meta.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_loss"] < history[0]["test_loss"]
    assert "images_per_s" in history[0]


@pytest.mark.parametrize("config, extra", [
    (TINY, ()), (TINY, ("data.residency=stream",)), (TINY, ("optim.schedule=cosine", "optim.warmup_steps=10")),
    (TINY_ATLAS, ()), (TINY_ATLAS, ("model.acquisition=learned",)),
    *((c, ()) for c in TINY_GANS.values()), (TINY_GANS["atlasgan"], ("model.acquisition=learned",)),
    *((c, ()) for c in TINY_TRANSLATORS.values()), (TINY_DISTILLED, ()),
], ids=["cvae", "cvae-stream", "cvae-cosine", "atlas", "atlas-learned", *TINY_GANS, "atlasgan-learned",
        *TINY_TRANSLATORS, "distilled"])
def test_sigusr1_checkpoints_and_resume_equals_uninterrupted_run(config: Path, extra: tuple[str, ...], store_dir: Path,
                                                                   tmp_path: Path, request: pytest.FixtureRequest) -> None:
    steps = 120  # 40 steps per epoch with 80 train slices at batch 2: crosses two epoch boundaries
    common = ("train.batch_size=2", f"train.max_steps={steps}", "train.epochs=10", *extra)
    if config == TINY_DISTILLED:
        common += (f"model.teacher={request.getfixturevalue('atlas_run')}",)
    straight = tmp_path / "straight"
    # streamed: the uninterrupted run keeps the split on the device, so the resumed one equals it only if the
    # streamed batches are the resident ones
    resident = [a.replace("stream", "device") for a in common]
    done = run(train_cmd(store_dir, straight, *resident, config=config))
    assert done.returncode == 0, done.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(train_cmd(store_dir, interrupted, *common, config=config), env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "SIGUSR1 at step" in output and "not under Slurm" in output
    checkpoints = sorted((interrupted / "checkpoints").glob("step-*"))
    stopped_at = json.loads((checkpoints[-1] / "meta.json").read_text())["step"]
    assert 5 <= stopped_at < steps
    assert not (interrupted / "model.safetensors").exists()

    resumed = run(train_cmd(store_dir, interrupted, *common, resume="auto", config=config))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints[-1]}" in resumed.stdout + resumed.stderr
    a, b = step_losses(straight), step_losses(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert a == b  # bit-identical losses (every reported term) at every step
    if "optim.schedule=cosine" in extra:  # the logged rates: the warm-up's first tenth, then down to the floor
        lr = load_config(config, ["data.store=/s"]).optim.lr
        assert a[1]["lr"] == pytest.approx(lr / 10) and a[10]["lr"] == pytest.approx(lr)
        assert a[steps]["lr"] == pytest.approx(lr * 0.1) and a[60]["lr"] < a[30]["lr"]
    wa, wb = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_input_fails_before_work(store_dir: Path, tmp_path: Path) -> None:
    missing = run(train_cmd(tmp_path / "nostore", tmp_path / "r1"))
    assert missing.returncode == 1 and "no manifest.json" in missing.stderr
    typo = run(train_cmd(store_dir, tmp_path / "r2", "train.epoch=3"))
    assert typo.returncode == 1 and "unknown config key 'train.epoch'" in typo.stderr
    first = run(train_cmd(store_dir, tmp_path / "r3", "train.max_steps=3"))
    assert first.returncode == 0, first.stderr[-2000:]
    other = run(train_cmd(store_dir, tmp_path / "r3", "model.latent=4", "train.max_steps=6", resume="auto"))
    assert other.returncode == 1
    assert "was written with another configuration" in other.stdout + other.stderr
    assert not (tmp_path / "r1").exists()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run(train_cmd(store_dir, out, "optim.lr=1e12", "train.checkpoint_every=1", "model.loss=mse"))
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "non-finite loss at step" in done.stderr and "Last good checkpoint:" in done.stderr  # a warning: stderr
    assert "non-finite loss" not in done.stdout
    for ckpt in (out / "checkpoints").glob("step-*"):
        meta = json.loads((ckpt / "meta.json").read_text())
        assert set(meta["epoch_sums"]) == {"loss", "reconstruction", "kl"}
        assert all(abs(v) < float("inf") for v in meta["epoch_sums"].values())  # no NaN or inf was saved


def test_two_process_ddp(store_dir: Path, tmp_path: Path) -> None:
    """Two DDP ranks, the split on the device and streamed (each rank reading its own batches): the same run."""
    runs = {}
    for residency in ("device", "stream"):
        out = runs[residency] = tmp_path / residency
        done = launch(store_dir, out, two_cpu_processes("bf16"), "train.mixed_precision=bf16", "train.epochs=1",
                      "train.world_size=2", f"data.residency={residency}", ACCELERATE_USE_CPU="1")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "2 process(es) [MULTI_CPU, bf16]" in done.stdout + done.stderr
        assert f"test slices ({residency})" in done.stdout + done.stderr
        ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
        assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
        assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    assert step_losses(runs["device"]) == step_losses(runs["stream"])
    wa, wb = (load_file(runs[r] / "model.safetensors") for r in ("device", "stream"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_world_size_is_asserted(store_dir: Path, tmp_path: Path) -> None:
    done = run(train_cmd(store_dir, tmp_path / "r", "train.world_size=2"))
    assert done.returncode == 1 and "expected 2 processes, the launcher started 1" in done.stderr


@pytest.mark.slow
def test_two_process_deepspeed_zero2(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "zero2"
    done = launch(store_dir, out, ["--config_file", str(REPO / "hpc/accelerate/deepspeed-zero2.yaml"),
                                    "--num_processes", "2", "--mixed_precision", "bf16"],
                   "train.mixed_precision=bf16", "train.max_steps=10", "train.world_size=2", "optim.schedule=cosine")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) [DEEPSPEED, bf16]" in done.stdout + done.stderr
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 10
    zero_files = list(ckpt.rglob("*optim_states.pt"))
    assert len(zero_files) == 2  # one ZeRO-2 optimizer partition per rank
    # the schedule reached the optimizer DeepSpeed wraps: its last step ran at the cosine's floor
    lr = load_config(TINY, ["data.store=/s"]).optim.lr
    for f in zero_files:
        groups = torch.load(f, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
        assert [g["lr"] for g in groups] == pytest.approx([lr * 0.1] * len(groups))
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_gradient_accumulation_counts_optimizer_steps(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "accum"
    done = run(train_cmd(store_dir, out, "train.grad_accum=2", "train.batch_size=2", "train.epochs=1"))
    assert done.returncode == 0, done.stderr[-3000:]
    # 80 train slices / batch 2 = 40 micro-batches = 20 optimizer steps
    assert sorted(step_losses(out)) == list(range(1, 21))
    meta = json.loads(sorted((out / "checkpoints").glob("step-*"))[-1].joinpath("meta.json").read_text())
    assert meta["step"] == 20 and meta["history"][0]["epoch"] == 1


def test_losses_follow_the_reference_curve(store_dir: Path, tmp_path: Path) -> None:
    """Any change to what training computes (data order, noise, model, loss, optimizer) moves these numbers;
    a refactor must not. The reference was recorded before the model-family interface existed."""
    reference = json.loads(REFERENCE.read_text())
    out = tmp_path / "run"
    done = run(train_cmd(store_dir, out, *reference["overrides"]))
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {str(rec["step"]): rec for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    history = json.loads(sorted((out / "checkpoints").glob("step-*"))[-1].joinpath("meta.json").read_text())["history"]
    if os.environ.get("MRGEN_UPDATE_REFERENCE") == "1":  # deliberate numerics changes only; say why in the commit
        reference["steps"] = {k: {n: v[n] for n in ("loss", "reconstruction", "kl")} for k, v in steps.items()}
        reference["epochs"] = [{k: h[k] for k in reference["epochs"][0]} for h in history]
        REFERENCE.write_text(json.dumps(reference, indent=1))
    assert sorted(steps, key=int) == sorted(reference["steps"], key=int)
    for step, want in reference["steps"].items():
        for name, value in want.items():
            np.testing.assert_allclose(steps[step][name], value, rtol=reference["rtol"], err_msg=f"step {step} {name}")
    assert len(history) == len(reference["epochs"])
    for got, want in zip(history, reference["epochs"], strict=True):
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=reference["rtol"], err_msg=f"epoch {want['epoch']} {key}")


def test_options_and_overrides_in_any_order(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run([sys.executable, "-m", "mrgen_dist.commands.train", "--config", str(TINY), f"data.store={store_dir}",
                "--tracker", "none", f"train.out={out}", "train.max_steps=2", "--resume", "none"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["steps"] == 2



def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_finished_run_is_never_overwritten_by_accident(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run(train_cmd(store_dir, out, "train.max_steps=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.relative_to(out): _sha(p) for p in out.rglob("*") if p.is_file()}
    again = run(train_cmd(store_dir, out, "train.max_steps=6"))
    assert again.returncode == 1
    assert f"mrgen-train: error: train.out {out} already holds a run; continue it with --resume auto" in again.stderr
    assert {p.relative_to(out): _sha(p) for p in out.rglob("*") if p.is_file()} == before
    fresh = run(train_cmd(store_dir, out, "train.max_steps=6") + ["--overwrite"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    (aside,) = tmp_path.glob("run.replaced-*")
    assert {p.relative_to(aside): _sha(p) for p in aside.rglob("*") if p.is_file()} == before
    assert sorted(step_losses(out)) == list(range(1, 7))  # a metrics.jsonl of the new run only
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))][-1] == "step-00000006"


def test_damaged_checkpoints_are_refused_or_skipped(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run(train_cmd(store_dir, out, "train.max_steps=4", "train.checkpoint_every=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    older, newest = sorted((out / "checkpoints").glob("step-*"))
    meta = json.loads((newest / "meta.json").read_text())
    assert set(meta["files"]) >= {"model.safetensors", "optimizer.bin", "random_states_0.pkl"}
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    explicit = run(train_cmd(store_dir, out, "train.max_steps=6", resume=str(newest)))
    assert explicit.returncode == 1
    assert f"{weights}: sha256" in explicit.stderr and "(modified or truncated)" in explicit.stderr
    auto = run(train_cmd(store_dir, out, "train.max_steps=6", resume="auto"))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert f"mrgen-train: skipping a damaged checkpoint: {weights}: sha256" in auto.stderr
    assert "skipping" not in auto.stdout and f"resumed from {older}" in auto.stdout

    # a pickle payload in the RNG states, with every checksum rewritten to match (meta.json's own too): loading
    # must fail the resume in one line, and run no code
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    latest = sorted((out / "checkpoints").glob("step-*"))[-1]
    rng = latest / "random_states_0.pkl"
    torch.save({"payload": Payload()}, rng)
    meta = json.loads((latest / "meta.json").read_text())
    meta["files"]["random_states_0.pkl"] = _sha(rng)
    (latest / "meta.json").write_text(json.dumps(seal(meta)))
    forged = run(train_cmd(store_dir, out, "train.max_steps=8", resume=str(latest)))
    assert forged.returncode == 1 and "Traceback" not in forged.stderr
    assert forged.stderr.strip().splitlines()[-1].startswith(f"mrgen-train: error: {rng}: cannot be loaded")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=.nan", "optim.lr=-1e-3", "optim.betas=[0.9, .inf]",
                                      "train.seed=-1", "data.seed=-1"])
def test_unusable_numbers_are_refused_before_anything_is_written(override: str, store_dir: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run(train_cmd(store_dir, out, override))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"mrgen-train: error: {override.split('=')[0]}")
    assert not out.exists()


def test_init_from_starts_a_run_from_a_finished_one(store_dir: Path, trained_run: Path, atlas_run: Path,
                                                    tmp_path: Path) -> None:
    """A fine-tune: the finished run's weights, then this run's optimizer and steps (one Adam step moves each
    weight by about the learning rate)."""
    from safetensors.torch import load_file

    done = run(train_cmd(store_dir, tmp_path / "tuned", f"train.init_from={trained_run}", "optim.lr=1e-9",
                         "train.max_steps=1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"weights from {trained_run}" in done.stdout + done.stderr
    before, after = load_file(trained_run / "model.safetensors"), load_file(tmp_path / "tuned" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-8)
    fresh = run(train_cmd(store_dir, tmp_path / "fresh", "optim.lr=1e-9", "train.max_steps=1"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    weights = load_file(tmp_path / "fresh" / "model.safetensors")["encoder.0.weight"]
    assert (weights - before["encoder.0.weight"]).abs().max() > 1e-3
    other = run(train_cmd(store_dir, tmp_path / "other", f"train.init_from={atlas_run}"))
    assert other.returncode == 1 and "was trained as family atlas" in other.stderr
    wider = run(train_cmd(store_dir, tmp_path / "wider", f"train.init_from={trained_run}", "model.latent=16"))
    assert wider.returncode == 1 and "its weights do not fit this run's model settings" in wider.stderr
    assert not (tmp_path / "other").exists() and not (tmp_path / "wider").exists()
