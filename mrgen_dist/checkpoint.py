"""Checkpoints: atomic full-state saves, the newest complete one for `--resume auto`, compatibility checks.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding Accelerate's full state (model, optimizer,
scaler, RNG states of every rank; DeepSpeed's ZeRO partitions under DeepSpeed) and `meta.json` (position in
the data, loss history, what it was trained on). Every rank writes into `.tmp-step-NNNNNNNN/`; the main
process writes `meta.json` last and renames the folder, so a folder named `step-*` with a `meta.json` is
complete, and an interrupted save leaves only a `.tmp-*` folder that is ignored and later removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

META = "meta.json"


class CheckpointMismatch(RuntimeError):
    """A checkpoint from another configuration, vocabulary, store or world size."""


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


class CheckpointManager:
    def __init__(self, run_dir: Path, accelerator: Accelerator, keep: int) -> None:
        self.dir = run_dir / "checkpoints"
        self.accelerator = accelerator
        self.keep = keep

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob("step-*") if (p / META).is_file()]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, meta: dict[str, Any]) -> Path:
        """Collective: every rank must call it at the same step."""
        acc = self.accelerator
        step = int(meta["step"])
        tmp, final = self.dir / f".tmp-step-{step:08d}", self.dir / f"step-{step:08d}"
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / META).write_text(json.dumps(meta, indent=1))
            if final.exists():  # the same step saved again (e.g. a signal right after an epoch-end save)
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.dir.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> dict[str, Any]:
        """Restore the full state; callers check `check_compatible` first, before any work starts."""
        meta = read_meta(path)
        self.accelerator.load_state(str(path))
        return meta


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointMismatch(f"{path} is not a complete checkpoint ({e})") from None


def check_compatible(meta: dict[str, Any], expect: dict[str, Any], path: Path) -> None:
    for key, what in (
        ("fingerprint", "configuration (data, model, optimizer, batch)"),
        ("vocabulary", "scanner vocabulary"),
        ("store_sha256", "slice store"),
        ("world_size", "number of processes"),
        ("distributed_type", "distributed backend"),
    ):
        if meta.get(key) != expect[key]:
            raise CheckpointMismatch(
                f"checkpoint {path} was written with another {what}: {meta.get(key)!r}, this run has {expect[key]!r}"
            )
