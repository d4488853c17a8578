"""Checkpoints: atomic full-state saves, the newest complete one for `--resume auto`, compatibility checks.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding Accelerate's full state (model, optimizers,
scaler, RNG states of every rank; DeepSpeed's ZeRO partitions under DeepSpeed) and `meta.json`: the run's
identity (what it was trained on and how) and the registered training state (position in the data, loss
history), as JSON. Every rank writes into `.tmp-step-NNNNNNNN/`; the main process writes `meta.json` last and
renames the folder, so a folder named `step-*` with a `meta.json` is complete, and an interrupted save
leaves only a `.tmp-*` folder that is ignored and later removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

from accelerate import Accelerator

from mrgen_dist import __version__
from mrgen_dist.atomic import atomic_write
from mrgen_dist.cli import UserError

META = "meta.json"
#: The identity keys a resumed run must share with its checkpoint, and what each one means.
IDENTITY = {
    "fingerprint": "configuration (data, model, optimizer, batch)",
    "vocabulary": "scanner vocabulary",
    "store_sha256": "slice store",
    "world_size": "number of processes",
    "distributed_type": "distributed backend",
}


class CheckpointMismatch(UserError):
    """A checkpoint from another configuration, vocabulary, store or world size, or not a checkpoint."""


class Stateful(Protocol):
    """What the manager saves into meta.json besides Accelerate's state (JSON-serialisable)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


class CheckpointManager:
    def __init__(self, run_dir: Path, accelerator: Accelerator, keep: int, identity: dict[str, Any],
                 state: Stateful) -> None:
        self.dir = run_dir / "checkpoints"
        self.accelerator = accelerator
        self.keep = keep
        self.identity = identity
        self.state = state

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob("step-*") if (p / META).is_file()]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int) -> Path:
        """Collective: every rank must call it at the same step, with the registered state up to date."""
        acc = self.accelerator
        tmp, final = self.dir / f".tmp-step-{step:08d}", self.dir / f"step-{step:08d}"
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {**self.identity, **self.state.state_dict(), "package_version": __version__}
            atomic_write(tmp / META, json.dumps(meta, indent=1))
            if final.exists():  # the same step saved again (e.g. a signal right after an epoch-end save)
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.dir.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def check(self, path: Path) -> None:
        """Refuse, before any work starts, a checkpoint that this run cannot continue."""
        meta = read_meta(path)
        for key, what in IDENTITY.items():
            if meta.get(key) != self.identity[key]:
                raise CheckpointMismatch(f"checkpoint {path} was written with another {what}: {meta.get(key)!r}, "
                                         f"this run has {self.identity[key]!r}")

    def load(self, path: Path) -> None:
        """Restore Accelerate's state and the registered state; `check` it first, before any work starts."""
        meta = read_meta(path)
        self.accelerator.load_state(str(path))
        self.state.load_state_dict(meta)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointMismatch(f"{path} is not a complete checkpoint ({e})") from None
