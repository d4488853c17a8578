"""`mrgen-convert`: NIfTI volumes -> sharded HDF5 slice store (atomic, resumable, parallel, one writer).

    mrgen-convert [convert] INPUT_DIR_OR_CSV --out STORE [--workers N] [--resample] [--split subject|slice]
                  [--overwrite] ...
    mrgen-convert merge PART [PART ...] --out STORE [--overwrite]
    mrgen-convert verify STORE

Exit status of a conversion: 0 every input converted; 3 the store was written (or was already there) but
some inputs were rejected (listed in STORE/rejected.csv and in the summary); 1 an error, no new store
(unusable input, nothing accepted, a write failure, the folder in use, a different store there without
--overwrite); 2 a usage error. `verify`: 0 sound, 1 problems found (each printed on its own line).

One writer: a conversion holds an exclusive lock on STORE (`mrgen_dist.data.lock`) from start to end; a
second one refuses at once naming the holder (pid@host). The lock dies with its process.

Staged: the new store is built in `STORE/.staging/` (shards, their records, rejected.csv, manifest) and
replaces the store in STORE only once it is complete and every shard matches the sha256 of its record; a
conversion that fails leaves the store in STORE as it was, byte for byte. The replacement (`_replace`):

* Where it can (Linux, a file system with `renameat2(RENAME_EXCHANGE)`: ext4, xfs, btrfs, tmpfs, ...; STORE a
  plain folder of this converter's files, not the working folder), the complete staging folder is renamed
  beside STORE, to `.STORE.mrgen-swap`, with a hard link of the lock file in it, and the two folders are
  exchanged in one atomic step: STORE then holds the new store (and the same, still held, lock file), the
  sibling the old store, which is then removed. A failure before the exchange undoes what was done; a crash
  at any point leaves a complete store in STORE (old or new) and, at most, the sibling, which the next
  conversion removes.
* Elsewhere (NFS, Lustre, ...) the old store's files are moved into `STORE/.staging/replaced/` and the new
  ones into STORE, the manifest last; a failure undoes every move, newest first. A crash in between leaves a
  folder without a manifest (an unfinished conversion the reader refuses), and the next conversion into
  STORE first puts the old store back (or, if the new manifest was in place, finishes the replacement).

A failure to remove the old store once the new one is in place is a warning, not an error.

Resumable: shards hold a fixed number of accepted volumes (`--shard-volumes`, the last one fewer). Each shard
is written under a temporary name and renamed, then a small record `shard-NNNNN.json` (its sha256 and the
inputs it consumed) is written the same way. A run keeps every shard, from the first on, whose record matches
the inputs and parameters and whose file matches its sha256, taken from the staging folder of an interrupted
run or from the store in STORE (hard-linked, so the files are the same), and converts from the first one that
does not. A re-run of the conversion that made the finished store in STORE (same inputs, same parameters,
every shard intact) leaves it untouched; replacing a finished store made from other inputs or parameters
needs `--overwrite`.

In parts (`--part k/N`, mrgen_dist.data.parts): each part is a store of its own, and `merge` links the parts'
shards, in part order, into one store with one manifest and one split over every subject, published as a
conversion is (staged, checked, swapped in under the lock): the merged store holds the slices of a one-process
conversion of the same inputs, in the same order, with the same split.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import functools
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mrgen_dist import __version__
from mrgen_dist.artifacts import ArtifactError, StoreManifest
from mrgen_dist.atomic import atomic_write
from mrgen_dist.cli import UserError
from mrgen_dist.data.inputs import InputError, InputVolume, Rejection, screen
from mrgen_dist.data.lock import LOCK_NAME, FolderLock
from mrgen_dist.data.parts import Part, PartError, check_parts
from mrgen_dist.data.shards import ShardArrays, file_digests, write_shard
from mrgen_dist.data.split import SPLIT_UNITS, slice_split, subject_split
from mrgen_dist.data.store import REJECTED_NAME, SliceStore, StoreError
from mrgen_dist.data.summary import PREVIEW_NAME, write_preview
from mrgen_dist.data.volume import SliceParams, VolumeRejected, central_slices, load_volume
from mrgen_dist.scanners import Vocabulary

EXIT_OK, EXIT_USAGE, EXIT_REJECTED = 0, 2, 3
SHARD_DIR = "shards"
STAGING = ".staging"
_PARKED = "replaced"  # inside the staging folder: the old store's files during an in-place replacement
_LEGACY_PARKED = "replaced-shards"  # the old store's shards, left by an earlier version's interrupted replacement
_SWAP_SUFFIX = ".mrgen-swap"  # `.STORE.mrgen-swap` beside STORE: the new store before the exchange, the old after
#: What a conversion puts in STORE: the names a replacement moves.
_STORE_NAMES = (StoreManifest.NAME, PREVIEW_NAME, REJECTED_NAME, SHARD_DIR)
#: Errors of the exchange's preparation that mean "not possible here" (another file system, no renameat2, no
#: hard links, no write permission on STORE's parent): the in-place replacement is used instead.
_NO_EXCHANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM,
                          errno.EACCES, errno.EEXIST, errno.ENOTEMPTY, errno.EMLINK})
_RENAME_EXCHANGE = 2  # linux/fs.h


class ConvertError(UserError):
    """The conversion could not write or replace the store; the message names the file."""


class _ReplaceError(ConvertError):
    """The new store could not be moved into place and undoing the replacement failed as well; the message says
    where the old store's files are."""


class StoreExists(UserError):
    """STORE holds a finished store from other inputs or parameters and --overwrite was not given."""


class NothingAccepted(InputError):
    """Every input was rejected; `rejected` holds the reasons."""

    def __init__(self, message: str, rejected: list[Rejection]) -> None:
        super().__init__(message)
        self.rejected = rejected


@dataclass(frozen=True)
class ConvertOptions:
    params: SliceParams = field(default_factory=SliceParams)
    shard_volumes: int = 100
    split_unit: str = "subject"
    test_fraction: float = 0.1
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        if self.shard_volumes < 1:
            raise ValueError("shard_volumes must be >= 1")
        if self.split_unit not in SPLIT_UNITS:
            raise ValueError(f"split must be one of {SPLIT_UNITS}")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")

    def store_params(self) -> dict:
        """The manifest's `params`, as they read back from JSON."""
        params = {**self.params.to_dict(), "shard_volumes": self.shard_volumes, "image_dtype": "float16"}
        return json.loads(json.dumps(params))

    def split_settings(self) -> dict:
        return {"unit": self.split_unit, "test_fraction": self.test_fraction, "seed": self.seed}


@dataclass
class ConversionResult:
    store: Path
    rejected: list[Rejection]
    shards_written: int
    shards_kept: int
    seconds: float
    unchanged: bool = False  # STORE already held this conversion and was left as it was
    replaced: bool = False  # a finished store in STORE was replaced by the new one
    preview: Path | None = None
    warnings: list[str] = field(default_factory=list)  # problems that do not make the store unusable


# -- per volume (runs in worker processes) ---------------------------------------------------------------


def _convert_volume(job: tuple[str, SliceParams]) -> np.ndarray | str:
    """Slices of one volume as float16, or the one-line reason it was rejected."""
    path, params = job
    try:
        return central_slices(load_volume(path, params.resample), params).astype(np.float16)
    except VolumeRejected as e:
        return str(e)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure on one file rejects that file, not the run
        return f"unexpected error: {type(e).__name__}: {e}"[:200]


# -- the store -----------------------------------------------------------------------------------------------


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write (disk full, quota, file too large, read-only) into one line naming `path`."""
    try:
        yield
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else (str(e).splitlines() or [type(e).__name__])[0]
        raise ConvertError(f"cannot write {path}: {reason}") from None


def _record_path(shard_path: Path) -> Path:
    return shard_path.with_suffix(".json")


def _valid_record(path: Path, keys: list[str], cursor: int, params_key: str) -> dict | None:
    """The record of the shard at `path` if it continues the inputs at `cursor` with these parameters and the
    file matches its sha256; None otherwise."""
    rec_path = _record_path(path)
    if not rec_path.is_file() or not path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict):
        return None
    consumed = rec.get("inputs")
    if rec.get("params_key") != params_key or not consumed or consumed != keys[cursor : cursor + len(consumed)]:
        return None
    if file_digests(path)["sha256"] != rec.get("sha256"):
        return None
    return rec


def _link(src: Path, dst: Path) -> None:
    """`dst` becomes the same file as `src` (a hard link; a copy where the file system has none)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _resume(staged: Path, earlier: Path, volumes: list[InputVolume], params_key: str) -> tuple[list[dict], int]:
    """Records of the leading shards that are complete and current, and how many inputs they consumed.

    Shard i is taken from `staged` (an interrupted run) or else from `earlier` (the store's own shards, linked
    into `staged`); `earlier` is only read. Anything in `staged` after the kept prefix is removed.
    """
    keys = [v.key() for v in volumes]
    records: list[dict] = []
    cursor = 0
    while True:
        name = f"shard-{len(records):05d}.h5"
        rec = _valid_record(staged / name, keys, cursor, params_key)
        if rec is None:
            rec = _valid_record(earlier / name, keys, cursor, params_key)
            if rec is None:
                break
            _link(earlier / name, staged / name)
            _link(_record_path(earlier / name), _record_path(staged / name))
        records.append(rec)
        cursor += len(rec["inputs"])
    # anything after the kept prefix is stale: a later shard cannot be valid if an earlier one was redone;
    # dot files are temporaries of an interrupted run
    for stale in [*staged.glob("shard-*.h5"), *staged.glob("shard-*.json"), *staged.glob(".shard-*")]:
        if stale.name.startswith(".") or int(stale.stem.split("-")[1]) >= len(records):
            stale.unlink()
    return records, cursor


def _results(volumes: list[InputVolume], params: SliceParams, workers: int) -> Iterator[np.ndarray | str]:
    jobs = [(str(v.path), params) for v in volumes]
    if workers == 1:
        yield from map(_convert_volume, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_convert_volume, jobs, chunksize=1)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if out.is_dir():
        names = {p.name for p in out.iterdir()}
        if names and not names & {StoreManifest.NAME, SHARD_DIR, STAGING, LOCK_NAME}:
            raise InputError(f"{out} exists and is not a slice store; choose an empty or new folder")


def _finished_store(out: Path) -> tuple[StoreManifest | None, str]:
    """The manifest of the finished store in `out` (None when there is none), or why it cannot be read."""
    path = out / StoreManifest.NAME
    if not path.exists():
        return None, ""
    try:
        return StoreManifest.read(path), ""
    except ArtifactError as e:
        return None, str(e)


def _store_inputs(out: Path, manifest: StoreManifest) -> list[str] | None:
    """The input keys the store's shards consumed, from their records; None when a record is unreadable."""
    keys: list[str] = []
    for shard in manifest.shards:
        try:
            rec = json.loads(_record_path(out / shard["file"]).read_text())
            keys.extend(rec["inputs"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            return None
    return keys


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _differences(
    out: Path, old: StoreManifest, vocabulary: Vocabulary, options: ConvertOptions, volumes: list[InputVolume]
) -> list[str]:
    """How the conversion asked for differs from the one that made the finished store in `out` (empty: none)."""
    diffs = []
    if list(old.vocabulary) != list(vocabulary.names):
        diffs.append(f"vocabulary {','.join(old.vocabulary)} -> {','.join(vocabulary.names)}")
    new_params = options.store_params()
    for key in sorted(set(old.params) | set(new_params)):
        if old.params.get(key) != new_params.get(key):
            diffs.append(f"{key} {_short(old.params.get(key))} -> {_short(new_params.get(key))}")
    for key, value in options.split_settings().items():
        if old.split.get(key) != value:
            diffs.append(f"split {key} {_short(old.split.get(key))} -> {_short(value)}")
    old_keys = _store_inputs(out, old)
    new_keys = [v.key() for v in volumes]
    if old_keys is None:
        diffs.append("inputs unknown (shard records missing or unreadable)")
    elif old_keys != new_keys:
        before = {k.rsplit("|", 3)[0]: k for k in old_keys}
        after = {k.rsplit("|", 3)[0]: k for k in new_keys}
        counts = {
            "new": len(after.keys() - before.keys()),
            "gone": len(before.keys() - after.keys()),
            "changed": sum(before[s] != after[s] for s in after.keys() & before.keys()),
        }
        diffs.append("inputs: " + (", ".join(f"{n} {what}" for what, n in counts.items() if n) or "differ"))
    return diffs


def _content(manifest: StoreManifest) -> dict:
    """What a manifest says about the store, without when, by which version and from which path it was made."""
    d = manifest.to_dict()
    for key in ("created_utc", "created_by", "format_version", "store_sha256"):
        d.pop(key)
    d["inputs"] = {k: v for k, v in d["inputs"].items() if k != "description"}
    return d


def _check_staged(staging: Path, records: list[dict]) -> None:
    """Every staged shard is the file its record describes (size and sha256), read back from the disk."""
    for rec in records:
        path = staging / rec["file"]
        if not path.is_file() or path.stat().st_size != rec["bytes"] or file_digests(path)["sha256"] != rec["sha256"]:
            raise ConvertError(f"{path}: does not match its record after writing (disk or file system fault?)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(e: OSError) -> str:
    if e.errno:
        return e.strerror or os.strerror(e.errno)
    return str(e) or type(e).__name__


def _swap_folder(out: Path) -> Path:
    """`.STORE.mrgen-swap` beside STORE: the new store just before the exchange, the old one just after it."""
    return out.parent / f".{out.name}{_SWAP_SUFFIX}"


@functools.cache
def _renameat2() -> ctypes._CFuncPtr | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> None:
    """Swap the entries at `a` and `b` in one atomic step (renameat2 with RENAME_EXCHANGE)."""
    fn = _renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(a), None, str(b))
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _can_exchange(out: Path, staging: Path) -> bool:
    """Whether STORE can be replaced by exchanging folders: it is a plain folder (not a link, not the working
    folder or above it) holding only this converter's files, owned like the staging folder."""
    if out.name in ("", ".", "..") or out.is_symlink() or _renameat2() is None:
        return False
    try:
        real, cwd = out.resolve(), Path.cwd().resolve()
        if real == cwd or real in cwd.parents:
            return False
        if {p.name for p in out.iterdir()} - {*_STORE_NAMES, STAGING, LOCK_NAME}:
            return False  # a file of the user's: it stays where it is (in-place replacement)
        if {p.name for p in staging.iterdir()} - {SHARD_DIR, REJECTED_NAME, StoreManifest.NAME, LOCK_NAME}:
            return False
        a, b = out.stat(), staging.stat()
    except OSError:
        return False
    return (a.st_uid, a.st_gid) == (b.st_uid, b.st_gid)


def _remove(path: Path, what: str, warnings: list[str]) -> None:
    """Remove `path` (a folder or file); a failure only leaves it behind, with a warning."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        warnings.append(f"{what} could not be removed from {path} ({_reason(e)}); delete it (the next conversion "
                        "into this store does)")


def _replace_by_exchange(out: Path, staging: Path, lock: FolderLock, warnings: list[str]) -> bool:
    """Replace the store in `out` by the complete one in `staging` by exchanging the folders (module doc).

    False, with nothing changed, where this file system cannot; ConvertError when a step failed (the store in
    `out` untouched); _ReplaceError when undoing a failed step failed too."""
    swap = _swap_folder(out)
    lock_link = staging / LOCK_NAME
    done: list[str] = []
    try:
        for folder in (staging / SHARD_DIR, staging):  # the new store's names on disk before it goes in
            _fsync_dir(folder)
        os.chmod(staging, stat.S_IMODE(out.stat().st_mode))  # the folder keeps its permissions
        lock_link.unlink(missing_ok=True)
        os.link(lock.path, lock_link)  # the lock file, still held, goes with the new store
        done.append("link")
        os.rename(staging, swap)
        done.append("rename")
        _exchange(swap, out)
    except OSError as e:
        if "rename" in done:
            try:
                os.rename(swap, staging)
            except OSError:
                raise _ReplaceError(
                    f"cannot exchange {swap} with {out}: {_reason(e)}, and cannot move it back to {staging}; the "
                    f"store in {out} is unchanged; the new one is left in {swap}, which the next conversion removes"
                ) from None
        if "link" in done:
            with contextlib.suppress(OSError):
                lock_link.unlink()  # else a stray link of the lock file in the staging folder: harmless
        if e.errno in _NO_EXCHANGE:
            return False
        raise ConvertError(f"cannot move the new store into {out}: {_reason(e)}") from None
    # the new store is in place: what is left only tidies up
    lock.follow()
    try:
        _fsync_dir(out.parent)
    except OSError as e:
        warnings.append(f"cannot flush {out.parent} to disk ({_reason(e)})")
    _remove(swap, "the replaced store", warnings)
    return True


def _replace_in_place(out: Path, staging: Path, warnings: list[str]) -> None:
    """Replace the store in `out` by the complete one in `staging` by moving the old store's files into
    `staging/replaced` and the new ones into `out`, the manifest last (module doc); every move is undone,
    newest first, when one fails: ConvertError, the store in `out` as it was; _ReplaceError when undoing failed."""
    parked = staging / _PARKED
    moves = [(out / name, parked / name) for name in _STORE_NAMES if os.path.lexists(out / name)]
    moves += [(staging / name, out / name) for name in (SHARD_DIR, REJECTED_NAME, StoreManifest.NAME)]
    done: list[tuple[Path, Path]] = []
    try:
        parked.mkdir()
        for src, dst in moves:
            os.rename(src, dst)
            done.append((src, dst))
    except OSError as e:
        for src, dst in reversed(done):
            try:
                os.rename(dst, src)
            except OSError as undo_error:
                raise _ReplaceError(
                    f"cannot move the new store into {out}: {_reason(e)}, and undoing the replacement failed as "
                    f"well ({_reason(undo_error)}): the old store's files are in {parked}; the next conversion "
                    f"into {out} puts them back"
                ) from None
        try:
            parked.rmdir()
        except OSError:
            pass  # an empty folder: the next conversion removes it
        raise ConvertError(f"cannot move the new store into {out}: {_reason(e)}") from None
    try:
        _fsync_dir(out)
    except OSError as e:
        warnings.append(f"cannot flush {out} to disk ({_reason(e)})")
    _remove(staging, "the replaced store", warnings)


def _replace(out: Path, staging: Path, lock: FolderLock) -> list[str]:
    """Replace the store in `out` by the complete one in `staging`; the warnings of tidying up after."""
    warnings: list[str] = []
    if not (_can_exchange(out, staging) and _replace_by_exchange(out, staging, lock, warnings)):
        _replace_in_place(out, staging, warnings)
    return warnings


def _recover(out: Path, staging: Path) -> None:
    """Finish a replacement that was interrupted (killed, power cut) before it tidied up, or undo it."""
    swap = _swap_folder(out)
    if swap.is_dir() and not swap.is_symlink():  # STORE holds a complete store (old or new) either way
        shutil.rmtree(swap, ignore_errors=True)
    shutil.rmtree(staging / _LEGACY_PARKED, ignore_errors=True)
    parked = staging / _PARKED
    if not parked.is_dir():
        return
    try:
        if (staging / StoreManifest.NAME).exists():  # the new manifest never went in: put the old store back
            for name in (SHARD_DIR, REJECTED_NAME):
                if not os.path.lexists(staging / name) and os.path.lexists(out / name):
                    os.rename(out / name, staging / name)
            for name in _STORE_NAMES:
                if os.path.lexists(parked / name) and not os.path.lexists(out / name):
                    os.rename(parked / name, out / name)
            parked.rmdir()
        else:  # the new store was in place: only the old one's files were left
            shutil.rmtree(parked)
    except OSError as e:
        raise ConvertError(f"cannot finish the interrupted replacement of the store in {out} ({parked}): "
                           f"{_reason(e)}") from None


def _has_shards(staging: Path) -> int:
    return len(list((staging / SHARD_DIR).glob("shard-*.h5"))) if staging.is_dir() else 0


def convert(
    volumes: list[InputVolume],
    vocabulary: Vocabulary,
    out: Path,
    options: ConvertOptions = ConvertOptions(),
    synthetic: bool = False,
    description: str = "",
    overwrite: bool = False,
    preview: bool = False,
    part: Part | None = None,
) -> ConversionResult:
    """Convert `volumes` (or, with `part`, one part of them) into the store at `out`; see the module doc for
    locking, staging and resume.

    `overwrite` allows replacing a finished store made from other inputs or parameters; `preview` writes
    STORE/preview.png once the store is in place (a failure there is a warning in the result, not an error).
    """
    with _store_folder(out, "mrgen-convert") as lock:
        return _convert_locked(volumes, vocabulary, Path(out), lock, options, synthetic, description, overwrite,
                               preview, part)


@contextmanager
def _store_folder(out: Path, holder: str) -> Iterator[FolderLock]:
    """`out` checked, created where missing and locked for `holder`; a failure that leaves a folder this
    created empty removes it."""
    out = Path(out)
    _check_out(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the store folder {out}: {e.strerror or e}") from None
    try:
        with FolderLock(out, holder) as lock:
            yield lock
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed conversion into a new folder leaves no folder behind


def _convert_locked(
    volumes: list[InputVolume],
    vocabulary: Vocabulary,
    out: Path,
    lock: FolderLock,
    options: ConvertOptions,
    synthetic: bool,
    description: str,
    overwrite: bool,
    preview: bool,
    part: Part | None,
) -> ConversionResult:
    t0 = time.perf_counter()
    staging = out / STAGING
    _recover(out, staging)
    old, unreadable = _finished_store(out)
    if unreadable and not overwrite:
        raise StoreExists(f"{out} holds a store whose manifest cannot be read ({unreadable}); add --overwrite "
                          "to replace it")
    kept, rejected = screen(volumes, vocabulary)
    inputs: dict = {"description": description, "synthetic": synthetic}
    if part is not None:
        inputs["part"] = part.record([v.key() for v in kept] + sorted(r.source for r in rejected))
        start, stop = part.bounds(len(kept))
        kept, rejected = kept[start:stop], (rejected if part.index == 1 else [])
    same = False
    if old is not None:
        diffs = _differences(out, old, vocabulary, options, kept)
        same = not diffs
        if diffs and not overwrite:
            raise StoreExists(
                f"{out} holds a finished store made from other inputs or parameters ({'; '.join(diffs)}); add "
                "--overwrite to replace it (it stays until the new store is complete)"
            )
    params_key = hashlib.sha256(
        json.dumps([options.params.to_dict(), vocabulary.names, options.shard_volumes], sort_keys=True).encode()
    ).hexdigest()

    staged = staging / SHARD_DIR
    try:
        with _writing(staged):
            staged.mkdir(parents=True, exist_ok=True)
            records, cursor = _resume(staged, out / SHARD_DIR, kept, params_key)
        shards_kept = len(records)
        for rec in records:
            rejected.extend(Rejection(**r) for r in rec["rejected"])
        _build(kept[cursor:], cursor, len(kept), vocabulary, options, params_key, staged, records, rejected)
        shards_written = len(records) - shards_kept
        if not records:
            first = min(rejected, key=lambda r: r.source, default=Rejection("-", "no input given"))
            raise NothingAccepted(
                f"no volume was accepted ({len(rejected)} rejected; first: {first.source}: {first.reason})"
                + (f"; the store in {out} is unchanged" if old is not None or unreadable else ""),
                rejected,
            )
        manifest = _manifest(records, vocabulary, options.store_params(), options.split_settings(), rejected,
                             inputs).sealed()
        if same and shards_written == 0 and _content(manifest) == _content(old):
            shutil.rmtree(staging)
            result = ConversionResult(out, rejected, 0, shards_kept, 0.0, unchanged=True)
        else:
            warnings = _publish(out, staging, records, manifest, rejected, lock)
            replaced = old is not None or bool(unreadable)
            result = ConversionResult(out, rejected, shards_written, shards_kept, 0.0, replaced=replaced,
                                      warnings=warnings)
    except NothingAccepted:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except _ReplaceError:
        raise
    except ConvertError as e:
        n = _has_shards(staging)
        kept_note = (f"; {n} finished shard(s) of this conversion kept in {staging} for a re-run to resume "
                     "(or delete it)") if n else ""
        state = _state_after_failure(out, old is not None or bool(unreadable))
        raise ConvertError(f"{e}; {state}{kept_note}") from None
    finally:
        if staging.is_dir() and not _has_shards(staging) and not (staging / _PARKED).exists():
            shutil.rmtree(staging, ignore_errors=True)

    _finish(result, preview, t0)
    return result


def _state_after_failure(out: Path, had_store: bool) -> str:
    """What a failed conversion or merge left in `out`, for its error message."""
    return f"the store in {out} is unchanged" if had_store else "no store was written"


def _publish(out: Path, staging: Path, records: list[dict], manifest: StoreManifest, rejected: list[Rejection],
             lock: FolderLock) -> list[str]:
    """Check the staged shards, write rejected.csv and the manifest beside them, and swap the staged store into
    `out`; the warnings of tidying up after."""
    _check_staged(staging, records)
    with _writing(staging / REJECTED_NAME):
        _write_rejected(staging / REJECTED_NAME, rejected)
    with _writing(staging / StoreManifest.NAME):
        manifest.write(staging / StoreManifest.NAME)
    if StoreManifest.read(staging / StoreManifest.NAME) != manifest:
        raise ConvertError(f"{staging / StoreManifest.NAME}: reads back differently from what was written")
    return _replace(out, staging, lock)


def _finish(result: ConversionResult, preview: bool, t0: float) -> None:
    """The preview (a failure is a warning: the store is complete) and the time taken."""
    out = result.store
    if preview and not (result.unchanged and (out / PREVIEW_NAME).is_file()):
        try:
            result.preview = write_preview(SliceStore(out))
        except Exception as e:  # noqa: BLE001 - the store is complete and valid: a missing picture is a warning
            reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else (str(e).splitlines() or [""])[0]
            result.warnings.append(f"{out / PREVIEW_NAME} not written ({type(e).__name__}: {reason}); the store "
                                   "is complete")
    elif preview:
        result.preview = out / PREVIEW_NAME
    result.seconds = time.perf_counter() - t0


def merge(parts: list[Path], out: Path, overwrite: bool = False, preview: bool = False) -> ConversionResult:
    """Join the finished part stores `parts` (any order) into one store at `out`: their shards linked in part
    order, one manifest and one split over every subject; see the module doc and mrgen_dist.data.parts.

    Every part is verified first (checksums and counts) and must come from the same input list, N, vocabulary,
    parameters and split settings. A finished store in `out` that is not this merge is replaced only with
    `overwrite`."""
    t0 = time.perf_counter()
    stores: dict[Path, StoreManifest] = {}
    for path in map(Path, parts):
        try:
            part = SliceStore(path)
        except StoreError as e:
            raise PartError(f"part {e}") from None
        problems = part.verify()
        if problems:
            raise PartError(f"part {path}: {problems[0]} ({len(problems)} problem(s): mrgen-convert verify {path})")
        stores[path] = part.manifest
    check_parts({str(path): m.inputs.get("part") for path, m in stores.items()})
    ordered = sorted(stores.items(), key=lambda item: item[1].inputs["part"]["index"])
    first_path, first = ordered[0]
    settings = {key: value for key, value in first.split.items() if key != "test"}
    for path, m in ordered[1:]:
        for what, mine, theirs in (("vocabulary", m.vocabulary, first.vocabulary), ("parameters", m.params, first.params),
                                   ("split settings", {k: v for k, v in m.split.items() if k != "test"}, settings),
                                   ("inputs.synthetic", m.inputs.get("synthetic"), first.inputs.get("synthetic"))):
            if mine != theirs:
                raise PartError(f"{path} and {first_path} were converted with different {what} ({_short(mine)} vs "
                                f"{_short(theirs)}): convert every part with the same options")
    inputs = {"description": f"{len(ordered)} parts merged: {first.inputs.get('description', '')}",
              "synthetic": first.inputs.get("synthetic", False)}
    vocabulary = Vocabulary.from_names(first.vocabulary)
    with _store_folder(out, "mrgen-convert merge") as lock:
        out = Path(out)
        staging = out / STAGING
        _recover(out, staging)
        old, unreadable = _finished_store(out)
        shutil.rmtree(staging, ignore_errors=True)  # a merge only links: nothing to resume
        staged = staging / SHARD_DIR
        records: list[dict] = []
        rejected: list[Rejection] = []
        try:
            with _writing(staged):
                staged.mkdir(parents=True)
                for path, m in ordered:
                    for shard in m.shards:
                        name = f"shard-{len(records):05d}.h5"
                        record = json.loads(_record_path(path / shard["file"]).read_text())
                        _link(path / shard["file"], staged / name)
                        records.append({**record, "file": f"{SHARD_DIR}/{name}"})
                        atomic_write(_record_path(staged / name), json.dumps(records[-1], indent=1))
                    rejected.extend(_read_rejected(path / REJECTED_NAME))
            manifest = _manifest(records, vocabulary, first.params, settings, rejected, inputs).sealed()
            if old is not None and _content(manifest) == _content(old):
                result = ConversionResult(out, rejected, 0, len(records), 0.0, unchanged=True)
            elif (old is not None or unreadable) and not overwrite:
                raise StoreExists(f"{out} holds a finished store that is not this merge of {len(ordered)} parts; "
                                  "add --overwrite to replace it (it stays until the merged store is complete)")
            else:
                warnings = _publish(out, staging, records, manifest, rejected, lock)
                result = ConversionResult(out, rejected, len(records), 0, 0.0, replaced=old is not None or
                                          bool(unreadable), warnings=warnings)
        except _ReplaceError:
            raise
        except ConvertError as e:
            state = _state_after_failure(out, old is not None or bool(unreadable))
            raise ConvertError(f"{e}; {state}") from None
        finally:
            if not (staging / _PARKED).exists():  # else the old store's files wait there for _recover
                shutil.rmtree(staging, ignore_errors=True)
    _finish(result, preview, t0)
    return result


def _read_rejected(path: Path) -> list[Rejection]:
    """The rows of a store's rejected.csv (none when the file is absent: stores of earlier versions)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [Rejection(row["source"], row["reason"]) for row in csv.DictReader(f)]


def _build(
    todo: list[InputVolume],
    done: int,
    total: int,
    vocabulary: Vocabulary,
    options: ConvertOptions,
    params_key: str,
    staged: Path,
    records: list[dict],
    rejected: list[Rejection],
) -> None:
    """Convert `todo` into new shards in `staged`, appending their records to `records`."""
    pending: list[tuple[InputVolume, np.ndarray]] = []
    consumed: list[InputVolume] = []
    pending_rejected: list[Rejection] = []

    def flush() -> None:
        path = staged / f"shard-{len(records):05d}.h5"
        k = options.params.slices_per_volume
        arrays = ShardArrays(
            images=np.concatenate([s for _, s in pending]),
            scanner=np.repeat([vocabulary.index(v.scanner) for v, _ in pending], k),
            subject=np.repeat([v.subject for v, _ in pending], k),
            slice_index=np.tile(np.asarray(options.params.slice_indices()), len(pending)),
            source=np.repeat([v.source for v, _ in pending], k),
        )
        with _writing(path):
            digests = write_shard(path, arrays, {"format": StoreManifest.FORMAT, "params_key": params_key})
        rec = {
            "file": f"{SHARD_DIR}/{path.name}",
            **digests,
            "bytes": path.stat().st_size,
            "slices": len(arrays),
            "params_key": params_key,
            "volumes": [{"subject": v.subject, "scanner": v.scanner, "source": v.source} for v, _ in pending],
            "inputs": [v.key() for v in consumed],
            "rejected": [r.__dict__ for r in pending_rejected],
        }
        with _writing(_record_path(path)):
            atomic_write(_record_path(path), json.dumps(rec, indent=1))
        records.append(rec)
        rejected.extend(pending_rejected)
        pending.clear()
        consumed.clear()
        pending_rejected.clear()

    bar = tqdm(total=total, initial=done, desc="volumes", unit="vol", file=sys.stderr, dynamic_ncols=True)
    with bar:
        for volume, result in zip(todo, _results(todo, options.params, options.workers), strict=True):
            consumed.append(volume)
            if isinstance(result, str):
                pending_rejected.append(Rejection(volume.source, result))
            else:
                pending.append((volume, result))
            if len(pending) == options.shard_volumes:
                flush()
            bar.update()
    if pending:
        flush()
    rejected.extend(pending_rejected)


def _write_rejected(path: Path, rejected: list[Rejection]) -> None:
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["source", "reason"])
    for r in sorted(rejected, key=lambda r: r.source):
        w.writerow([r.source, r.reason])
    atomic_write(path, text.getvalue())


def _manifest(
    records: list[dict],
    vocabulary: Vocabulary,
    params: dict,
    split: dict,
    rejected: list[Rejection],
    inputs: dict,
) -> StoreManifest:
    """The manifest of the store made of `records` (unsealed: `.sealed()` sets its store_sha256); `params` as
    ConvertOptions.store_params, `split` as its split_settings."""
    k = params["slices_per_volume"]
    volumes = [v for rec in records for v in rec["volumes"]]
    per_scanner = {n: {"volumes": 0, "slices": 0} for n in vocabulary.names}
    for v in volumes:
        per_scanner[v["scanner"]]["volumes"] += 1
        per_scanner[v["scanner"]]["slices"] += k
    if split["unit"] == "subject":
        by_scanner = {n: [v["subject"] for v in volumes if v["scanner"] == n] for n in vocabulary.names}
        test = subject_split(by_scanner, split["test_fraction"], split["seed"])
        test_set = set(test)
        slice_is_test = np.repeat([v["subject"] in test_set for v in volumes], k)
    else:
        test = slice_split(len(volumes) * k, split["test_fraction"], split["seed"])
        slice_is_test = np.zeros(len(volumes) * k, dtype=bool)
        slice_is_test[test] = True
    slice_scanner = np.repeat([v["scanner"] for v in volumes], k)
    split_counts = {
        side: {n: int(np.sum((slice_scanner == n) & (slice_is_test == (side == "test")))) for n in vocabulary.names}
        for side in ("train", "test")
    }
    return StoreManifest(
        created_by={"package": "mrgen-dist", "version": __version__},
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        inputs=inputs,
        vocabulary=list(vocabulary.names),
        params=params,
        shards=[{key: rec[key] for key in StoreManifest.SHARD_FIELDS} for rec in records],
        split={**split, "test": test},
        counts={"volumes": len(volumes), "slices": len(volumes) * k, "per_scanner": per_scanner, "rejected": len(rejected)},
        split_counts=split_counts,
    )


# -- command line ----------------------------------------------------------------------------------------------


