"""Checkpoints: atomic full-state saves, the newest complete one for `--resume auto`, compatibility checks.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding Accelerate's full state (model, optimizers,
scaler, RNG states of every rank; DeepSpeed's ZeRO partitions under DeepSpeed) and `meta.json`: the run's
identity (what it was trained on and how), the registered training state (position in the data, loss
history) as JSON, and the sha256 of every file of the checkpoint. Every rank writes into
`.tmp-step-NNNNNNNN/`; the main process writes `meta.json` last and renames the folder, so a folder named
`step-*` with a `meta.json` is complete, and an interrupted save leaves only a `.tmp-*` folder that is ignored
and later removed. `--resume auto` takes the newest complete checkpoint whose files are intact.

Trust boundary: Accelerate and DeepSpeed load parts of a checkpoint with pickle (DeepSpeed's engine with
`torch.load(weights_only=False)`), which can run code. Every file's sha256 is therefore checked against
meta.json before anything is loaded, and a part that cannot be loaded fails the resume. Resume only your own
checkpoints: the checksums catch damage and edits of single files, not a forger who rewrites meta.json too.
"""

from __future__ import annotations

import hashlib
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


class CheckpointDamaged(CheckpointMismatch):
    """A checkpoint whose files do not match the sha256 recorded when it was written, or cannot be loaded."""


def _sha256(path: Path, block: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but meta.json, by relative path."""
    return {p.relative_to(folder).as_posix(): _sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != META}


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
            meta = {**self.identity, **self.state.state_dict(), "package_version": __version__,
                    "files": file_digests(tmp)}
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

    def resume_point(self, request: str) -> Path | None:
        """The checkpoint to resume from, checked before any work: None for "none"; for "auto" the newest
        complete checkpoint whose files are intact (a damaged newer one is skipped, and said so); else the
        folder named. Refuses one written by another configuration, store or world size."""
        if request == "none":
            return None
        if request != "auto":
            path = Path(request)
            self.verify(path)
            self.check(path)
            return path
        complete = self.complete()
        for path in reversed(complete):
            try:
                self.verify(path)
            except CheckpointDamaged as e:
                self.accelerator.print(f"mrgen-train: skipping a damaged checkpoint: {e}")
                continue
            self.check(path)
            return path
        if complete:
            raise CheckpointDamaged(f"none of the {len(complete)} checkpoints in {self.dir} is intact; "
                                    "resume from none of them, or start again with --overwrite")
        return None

    def check(self, path: Path) -> None:
        """Refuse, before any work starts, a checkpoint that this run cannot continue."""
        meta = read_meta(path)
        for key, what in IDENTITY.items():
            if meta.get(key) != self.identity[key]:
                raise CheckpointMismatch(f"checkpoint {path} was written with another {what}: {meta.get(key)!r}, "
                                         f"this run has {self.identity[key]!r}")

    def verify(self, path: Path) -> None:
        """Every file of the checkpoint matches the sha256 recorded in its meta.json, and none was added,
        and this rank's RNG states load (Accelerate would skip them silently, breaking exact resume)."""
        recorded = read_meta(path).get("files")
        if not isinstance(recorded, dict) or not recorded:
            raise CheckpointDamaged(f"{path}: meta.json records no file checksums (written by an older mrgen-dist); "
                                    "it cannot be checked before loading")
        found = file_digests(path)
        for name in sorted(set(recorded) | set(found)):
            if name not in found:
                raise CheckpointDamaged(f"{path / name}: missing (recorded in meta.json)")
            if name not in recorded:
                raise CheckpointDamaged(f"{path / name}: not recorded in meta.json (added after the checkpoint)")
            if found[name] != recorded[name]:
                raise CheckpointDamaged(f"{path / name}: sha256 {found[name][:12]}... does not match meta.json's "
                                        f"{recorded[name][:12]}... (modified or truncated)")
        from accelerate.utils import load as accelerate_load

        rng = path / f"random_states_{self.accelerator.process_index}.pkl"
        try:
            accelerate_load(rng)
        except Exception as e:  # noqa: BLE001 - any failure to load a part fails the resume
            raise CheckpointDamaged(f"{rng}: cannot be loaded ({type(e).__name__}: {str(e)[:200]})") from None

    def load(self, path: Path) -> None:
        """Restore Accelerate's state and the registered state; `resume_point` checked it first."""
        meta = read_meta(path)
        self.accelerator.load_state(str(path))
        self.state.load_state_dict(meta)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointMismatch(f"{path} is not a complete checkpoint ({e})") from None
