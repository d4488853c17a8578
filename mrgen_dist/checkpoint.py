"""Checkpoints: atomic full-state saves, the newest intact one for `--resume auto`, compatibility checks.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding Accelerate's full state (model, optimizers,
scaler, RNG states of every rank; DeepSpeed's ZeRO partitions under DeepSpeed) and `meta.json`: the run's
identity (what it was trained on and how), the registered training state (position in the data, loss
history) as JSON, the sha256 of every other file of the checkpoint, and `meta_sha256`, the sha256 of
meta.json's own canonical content (every other key, sorted, compact JSON), so that no byte of a checkpoint
goes unchecked. Every rank writes into `.tmp-step-NNNNNNNN/`; the main process writes `meta.json` last and
renames the folder, so a folder named `step-*` with a `meta.json` is complete, and an interrupted save leaves
only a `.tmp-*` folder that is ignored and later removed. `--resume auto` takes the newest checkpoint that is
intact (meta.json, every file, every pickled part loadable as plain tensors): a damaged newer one is skipped,
and said so on stderr. Checkpoints of a version that wrote no `meta_sha256` are refused (start again with
`--overwrite`).

Trust boundary: Accelerate and DeepSpeed load parts of a checkpoint with pickle (DeepSpeed's engine with
`torch.load(weights_only=False)`), which can run code. Before anything is loaded, meta.json and every file
are checked against their sha256, and every pickled part outside DeepSpeed's own folder is test-loaded the
way Accelerate loads it (`weights_only`: tensors and numbers only, no code), so that a part that holds
anything else is refused in one line naming it. A forger who rewrites a file and recomputes every checksum
still gets no code run by those parts, but DeepSpeed's partitions are plain pickles: resume only your own
checkpoints.

A write that fails (disk full, over quota, I/O error) is a one-line `WriteFailed` naming the file; the
checkpoint being written is removed and the complete ones are left as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from accelerate import Accelerator

from mrgen_dist import __version__
from mrgen_dist.atomic import atomic_write
from mrgen_dist.cli import STORAGE_ERRNOS, UserError

META = "meta.json"
META_SHA = "meta_sha256"
#: The identity keys a resumed run must share with its checkpoint, and what each one means.
IDENTITY = {
    "fingerprint": "configuration (data, model, optimizer, batch)",
    "vocabulary": "scanner vocabulary",
    "store_sha256": "slice store",
    "world_size": "number of processes",
    "distributed_type": "distributed backend",
}
#: Files that Accelerate reads with `torch.load` (weights_only), tested before loading.
PICKLED = (".bin", ".pkl", ".pt")
_STEP_DIR = re.compile(r"step-\d+")


class CheckpointMismatch(UserError):
    """A checkpoint from another configuration, vocabulary, store or world size, or not a checkpoint."""


class CheckpointDamaged(CheckpointMismatch):
    """A checkpoint whose files or meta.json do not match the sha256 recorded when it was written, or a part
    that cannot be loaded."""


class WriteFailed(UserError):
    """A file of the run could not be written (disk full, over quota, I/O error); the message names it."""


def disk_errno(e: BaseException) -> int | None:
    """The errno of a failed write for lack of space, quota or a failing disk, else None: an OSError's, or the
    `(os error N)` of a Rust library's error (safetensors)."""
    if isinstance(e, OSError):
        code = e.errno
    else:
        found = re.search(r"\(os error (\d+)\)", str(e))
        code = int(found.group(1)) if found else None
    return code if code in STORAGE_ERRNOS else None


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """A write under the block that fails for lack of space, quota or a failing disk becomes a WriteFailed
    naming `path` (the name the user knows, not a temporary sibling's)."""
    try:
        yield
    except Exception as e:
        code = disk_errno(e)
        if code is None:
            raise
        raise WriteFailed(f"cannot write {path}: {os.strerror(code)}") from None


@contextmanager
def _torch_saves_through_python_files() -> Iterator[None]:
    """Within the block, `torch.save(obj, path)` writes through a Python file object. Given a path, torch's
    C++ writer reports a failed write only as `unexpected pos N vs M`; through a Python file the failed write's
    OSError (errno and all) is kept, and it is re-raised here naming the file."""
    import torch

    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(f, (str, os.PathLike)):
            return real(obj, f, *args, **kwargs)
        try:
            with open(f, "wb") as fh:
                real(obj, fh, *args, **kwargs)
        except RuntimeError as e:
            cause = e.__context__
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror, os.fspath(f)) from e
            raise
        except OSError as e:
            raise OSError(e.errno, e.strerror, os.fspath(f)) from e
        return None

    torch.save = save
    try:
        yield
    finally:
        torch.save = real


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


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of meta.json's canonical content: every key but `meta_sha256`, sorted, compact JSON."""
    rest = {k: v for k, v in meta.items() if k != META_SHA}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with its own checksum added."""
    return {**meta, META_SHA: meta_digest(meta)}


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
        """Complete checkpoints (intact or not), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob("step-*") if _STEP_DIR.fullmatch(p.name) and (p / META).is_file()]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int) -> Path:
        """Collective: every rank must call it at the same step, with the registered state up to date. A write
        that fails (disk full) raises WriteFailed naming the file, and the partial checkpoint is removed."""
        acc = self.accelerator
        tmp, final = self.dir / f".tmp-step-{step:08d}", self.dir / f"step-{step:08d}"
        try:
            if acc.is_main_process:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
            acc.wait_for_everyone()
            with _torch_saves_through_python_files():
                acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                meta = seal({**self.identity, **self.state.state_dict(), "package_version": __version__,
                             "files": file_digests(tmp)})
                atomic_write(tmp / META, json.dumps(meta, indent=1))
                if final.exists():  # the same step saved again (e.g. a signal right after an epoch-end save)
                    shutil.rmtree(final)
                tmp.rename(final)
                for old in self.complete()[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
                for stale in self.dir.glob(".tmp-step-*"):
                    shutil.rmtree(stale, ignore_errors=True)
        except Exception as e:
            code = disk_errno(e)
            if code is None:
                raise
            if acc.is_main_process:  # free the space the partial checkpoint took; the complete ones stay
                shutil.rmtree(tmp, ignore_errors=True)
            raise WriteFailed(f"cannot write {getattr(e, 'filename', None) or tmp}: {os.strerror(code)}") from None
        acc.wait_for_everyone()
        return final

    def resume_point(self, request: str) -> Path | None:
        """The checkpoint to resume from, checked before any work: None for "none"; for "auto" the newest
        checkpoint that is intact (a damaged newer one is skipped, and said so on stderr); else the folder named.
        Refuses one written by another configuration, store or world size."""
        if request == "none":
            return None
        if request != "auto":
            path = Path(request)
            self.verify(path)
            return path
        complete = self.complete()
        for path in reversed(complete):
            try:
                self.verify(path)
            except CheckpointDamaged as e:
                if self.accelerator.is_main_process:
                    print(f"mrgen-train: skipping a damaged checkpoint: {e}", file=sys.stderr)
                continue
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
        """meta.json matches its own sha256 and this run (`check`), every file of the checkpoint matches the
        sha256 recorded in it and none was added, and every pickled part that Accelerate reads loads as plain
        tensors and numbers (this rank's RNG states among them: Accelerate would skip them silently, breaking
        exact resume). A CheckpointDamaged names the first fault; a CheckpointMismatch is another run's."""
        self.check(path)
        recorded = read_meta(path).get("files")
        if not isinstance(recorded, dict) or not recorded:
            raise CheckpointDamaged(f"{path / META}: records no file checksums")
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
        if not rng.is_file():
            raise CheckpointDamaged(f"{rng}: missing (this rank's RNG states)")
        # top level only: DeepSpeed's folder holds pickles that only its own loader reads (see the trust boundary)
        for part in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in PICKLED):
            try:
                accelerate_load(part, map_location="cpu")  # weights_only, as Accelerate loads it: runs no code
            except Exception as e:  # noqa: BLE001 - any failure to load a part fails the resume
                raise CheckpointDamaged(f"{part}: cannot be loaded ({_first_line(e)})") from None

    def load(self, path: Path) -> None:
        """Restore Accelerate's state and the registered state; `resume_point` checked it first."""
        meta = read_meta(path)
        try:
            self.accelerator.load_state(str(path))
        except Exception as e:  # noqa: BLE001 - whatever the loaders raise, the checkpoint cannot be resumed
            raise CheckpointDamaged(f"{path}: cannot be loaded ({_first_line(e)})") from None
        self.state.load_state_dict(meta)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of the checkpoint `path`, checked against its own sha256 (and its step against the folder's
    name): a CheckpointMismatch when there is none, a CheckpointDamaged when it is unreadable or edited."""
    file = path / META
    if not file.is_file():
        raise CheckpointMismatch(f"{path} is not a complete checkpoint (no {META})")
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 decoding errors
        raise CheckpointDamaged(f"{file}: cannot be read ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointDamaged(f"{file}: not a JSON object")
    if META_SHA not in meta:
        raise CheckpointDamaged(f"{file}: no {META_SHA} (written by an older mrgen-dist), "
                                "so it cannot be checked; start again with --overwrite")
    if meta[META_SHA] != meta_digest(meta):
        raise CheckpointDamaged(f"{file}: its content does not match its {META_SHA} (edited or damaged)")
    if _STEP_DIR.fullmatch(path.name) and meta.get("step") != _step_of(path):
        raise CheckpointDamaged(f"{file}: records step {meta.get('step')!r}, the folder is step {_step_of(path)}")
    return meta
