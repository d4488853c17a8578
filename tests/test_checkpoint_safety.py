"""Nothing a user has is deleted or silently replaced (issue 27): `--resume auto` over a run with nothing to
resume, meta.json covered by its own checksum (edited, truncated, forged), and a full disk while training."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mrgen_dist.checkpoint import META, CheckpointDamaged, file_digests, read_meta, seal
from tests.launch import run, train_cmd

MIB = 1 << 20


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(done: subprocess.CompletedProcess, *expected: str) -> str:
    """The process failed with status 1, and stderr ends in one `mrgen-train: error:` line holding `expected`,
    with no traceback."""
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mrgen-train: error: "), done.stderr[-3000:]
    for text in expected:
        assert text in last, last
    return last


def edit_meta(checkpoint: Path, change, reseal: bool) -> None:
    """Apply `change` to the checkpoint's meta.json; with `reseal`, recompute every checksum as a forger would."""
    meta = json.loads((checkpoint / META).read_text())
    change(meta)
    if reseal:
        meta["files"] = file_digests(checkpoint)
        meta = seal(meta)
    (checkpoint / META).write_text(json.dumps(meta, indent=1))


@pytest.fixture(scope="module")
def finished(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run of 4 steps with checkpoints at steps 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = run(train_cmd(store_dir, out, "train.max_steps=4", "train.checkpoint_every=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == ["step-00000002", "step-00000004"]
    return out


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


# ---- `--resume auto` with nothing to resume ----------------------------------------------------------------------

def test_resume_auto_refuses_a_finished_run_whose_checkpoints_are_gone(store_dir: Path, copy: Path) -> None:
    shutil.rmtree(copy / "checkpoints")
    before = snapshot(copy)
    done = run(train_cmd(store_dir, copy, "train.max_steps=2", resume="auto"))
    one_error_line(done, f"train.out {copy} holds a run with no checkpoint to resume", "model.safetensors",
                   "--overwrite")
    assert snapshot(copy) == before
    assert not list(copy.parent.glob("run.replaced-*"))


def test_resume_auto_starts_afresh_where_there_is_nothing_to_lose(store_dir: Path, tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    done = run(train_cmd(store_dir, absent, "train.max_steps=1", resume="auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (absent / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run(train_cmd(store_dir, empty, "train.max_steps=1", resume="auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    # a start stopped before its first checkpoint: nothing to resume, and nothing but its own config and metrics
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints" / ".tmp-step-00000002").mkdir(parents=True)
    (stopped / "config.yaml").write_text("{}\n")
    (stopped / "metrics.jsonl").write_text('{"step": 1}\n')
    done = run(train_cmd(store_dir, stopped, "train.max_steps=1", resume="auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"no checkpoint in {stopped}" in done.stderr and "starting afresh" in done.stderr
    assert [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (stopped / "model.safetensors").is_file()


# ---- meta.json is covered by its own checksum --------------------------------------------------------------------

def test_meta_json_is_checked_against_its_own_checksum(copy: Path) -> None:
    newest = copy / "checkpoints" / "step-00000004"
    assert read_meta(newest)["step"] == 4

    edit_meta(newest, lambda m: m.update(step=3), reseal=False)
    with pytest.raises(CheckpointDamaged, match="does not match its meta_sha256"):
        read_meta(newest)

    edit_meta(newest, lambda m: m.update(step=3), reseal=True)  # sealed again, but not the folder's step
    with pytest.raises(CheckpointDamaged, match="records step 3, the folder is step 4"):
        read_meta(newest)

    edit_meta(newest, lambda m: m.update(step=4), reseal=True)
    assert read_meta(newest)["step"] == 4
    text = (newest / META).read_text()
    (newest / META).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointDamaged, match="cannot be read"):
        read_meta(newest)

    older = copy / "checkpoints" / "step-00000002"
    edit_meta(older, lambda m: m.pop("meta_sha256"), reseal=False)  # as written before meta.json was sealed
    with pytest.raises(CheckpointDamaged, match="no meta_sha256 .written by an older mrgen-dist.*--overwrite"):
        read_meta(older)


@pytest.mark.parametrize("damage", ["edited step", "truncated meta.json"])
def test_a_damaged_newest_meta_json_falls_back_to_the_intact_checkpoint(damage: str, store_dir: Path,
                                                                          copy: Path) -> None:
    older, newest = sorted((copy / "checkpoints").glob("step-*"))
    if damage == "edited step":
        edit_meta(newest, lambda m: m.update(step=3), reseal=False)
    else:
        (newest / META).write_text((newest / META).read_text()[:100])
    explicit = run(train_cmd(store_dir, copy, "train.max_steps=5", resume=str(newest)))
    one_error_line(explicit, f"{newest / META}: ")

    auto = run(train_cmd(store_dir, copy, "train.max_steps=5", resume="auto"))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert f"mrgen-train: skipping a damaged checkpoint: {newest / META}: " in auto.stderr
    assert "skipping a damaged checkpoint" not in auto.stdout
    assert f"resumed from {older} (epoch 0, step 2)" in auto.stdout
    latest = sorted((copy / "checkpoints").glob("step-*"))[-1]
    assert latest.name == "step-00000005" and read_meta(latest)["step"] == 5


def test_no_intact_checkpoint_left_is_one_line(store_dir: Path, copy: Path) -> None:
    for checkpoint in (copy / "checkpoints").glob("step-*"):
        (checkpoint / META).write_text((checkpoint / META).read_text()[:-10])
    before = snapshot(copy)
    done = run(train_cmd(store_dir, copy, "train.max_steps=6", resume="auto"))
    one_error_line(done, f"none of the 2 checkpoints in {copy / 'checkpoints'} is intact")
    assert snapshot(copy) == before


class Payload:
    """A pickle that would create `marker` when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_forged_optimizer_with_every_checksum_recomputed_runs_no_code(store_dir: Path, copy: Path,
                                                                         tmp_path: Path) -> None:
    older, newest = sorted((copy / "checkpoints").glob("step-*"))
    marker = tmp_path / "pwned"
    optimizer = newest / "optimizer.bin"
    torch.save({"state": {}, "param_groups": [Payload(marker)]}, optimizer)
    edit_meta(newest, lambda m: None, reseal=True)  # meta.json's file checksums and its own all match again
    read_meta(newest)

    explicit = run(train_cmd(store_dir, copy, "train.max_steps=6", resume=str(newest)))
    one_error_line(explicit, f"{optimizer}: cannot be loaded")
    assert not marker.exists()

    auto = run(train_cmd(store_dir, copy, "train.max_steps=6", resume="auto"))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert f"skipping a damaged checkpoint: {optimizer}: cannot be loaded" in auto.stderr
    assert f"resumed from {older}" in auto.stdout
    assert not marker.exists()


# ---- a full disk -------------------------------------------------------------------------------------------------

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


def fail_writes(path: Path, after: int = 0) -> list[str]:
    """strace options: every write to `path` after the first `after` fails with ENOSPC."""
    return ["strace", "-f", "-o", os.devnull, "-P", str(path), "-e", "trace=write,writev",
            "-e", f"inject=write,writev:error=ENOSPC:when={after + 1}+"]


@needs_strace
def test_disk_full_while_writing_metrics(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run(fail_writes(out / "metrics.jsonl", after=2) + train_cmd(store_dir, out, "train.max_steps=5"))
    one_error_line(done, f"cannot write {out / 'metrics.jsonl'}: No space left on device")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (out / "model.safetensors").exists()


@needs_strace
def test_disk_full_while_writing_a_checkpoint_leaves_the_earlier_run_as_it_was(store_dir: Path, copy: Path) -> None:
    before = snapshot(copy)
    optimizer = copy / "checkpoints" / ".tmp-step-00000002" / "optimizer.bin"
    done = run(fail_writes(optimizer) + train_cmd(store_dir, copy, "train.max_steps=2") + ["--overwrite"])
    one_error_line(done, f"cannot write {optimizer}: No space left on device")
    (aside,) = copy.parent.glob("run.replaced-*")
    assert snapshot(aside) == before
    assert list((copy / "checkpoints").iterdir()) == []  # the partial checkpoint is removed, no step-* appeared
    assert not (copy / "model.safetensors").exists()


@pytest.fixture
def small_disk(tmp_path: Path):
    """Mounts a tmpfs of the size given to the returned function at tmp_path/disk (root only); unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
        mounted.append(disk)
        return disk

    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("fails_at", ["samples", "checkpoint", "model"])
def test_disk_full_on_a_small_disk(fails_at: str, store_dir: Path, finished: Path, small_disk) -> None:
    checkpoint_bytes = sum(p.stat().st_size for p in (finished / "checkpoints" / "step-00000002").iterdir())
    model_bytes = (finished / "model.safetensors").stat().st_size
    size = {"samples": "200k",  # config, metrics and the loss curves (~30 kB) fit, a sample grid (~480 kB) not
            "checkpoint": "3m",  # no checkpoint (~31 MB) fits
            "model": f"{math.ceil((checkpoint_bytes + model_bytes / 2) / MIB)}m"}[fails_at]  # one checkpoint fits
    out = small_disk(size) / "run"
    overrides = ("train.epochs=1",) if fails_at == "samples" else ("train.max_steps=2",)
    done = run(train_cmd(store_dir, out, *overrides))
    expected = {"samples": out / "samples_001.png", "checkpoint": out / "checkpoints" / ".tmp-step-00000002",
                "model": out / "model.safetensors"}[fails_at]
    one_error_line(done, f"cannot write {expected}: {os.strerror(errno.ENOSPC)}")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert not [n for n in names if ".tmp" in n.split("/")[-1] and n != "checkpoints"], names  # no temporary left
    assert "model.safetensors" not in names and "config.json" not in names
    if fails_at == "samples":
        assert "samples_001.png" not in names and not (out / "checkpoints").exists()
    else:
        complete = sorted((out / "checkpoints").glob("step-*"))
        assert [p.name for p in complete] == (["step-00000002"] if fails_at == "model" else [])
        for checkpoint in complete:  # what was saved is whole
            assert read_meta(checkpoint)["files"] == file_digests(checkpoint)
