"""The outputs of `mrgen-sample` and `mrgen-translate`: what `--overwrite` may replace, and how they are written.

A user's folder is never emptied by a command. `--overwrite` replaces only an earlier output of the same
command:

* a folder output carries `.mrgen-output.json` (an `OutputRecord`: the command and every file it wrote); a
  folder is replaced only when that record names the same command and the folder holds nothing the record
  does not list. Anything else is refused in one line naming the first foreign file;
* an HDF5 output carries the attribute `mrgen.tool`, a NIfTI output starts its `descrip` with the command's
  name; a file without that mark is refused;
* never the current directory, the home folder, `/`, or a path that is, or holds, one of the command's inputs.

Writing is atomic: a file is written to a temporary sibling and renamed (HDF5 is built in memory first, since
h5py can crash when the disk fills under it); a folder is built beside the output and switched in with two
renames, the old one removed only after the new one is in place. A write that fails (disk full, I/O error)
is one line naming the file, and whatever was at the output before is left as it was.

Stdlib only (h5py and nibabel are imported when an output of that format is read or written).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mrgen_dist.atomic import atomic_path
from mrgen_dist.cli import UserError

MARKER = ".mrgen-output.json"
#: The HDF5 attribute that names the command that wrote a file.
TOOL_ATTRIBUTE = "mrgen.tool"


class OutputError(UserError):
    """An output that cannot be written or may not be replaced; the message names the path."""


@dataclass(frozen=True)
class OutputRecord:
    """What a command wrote into a folder output: its name and the files, relative to the folder."""

    tool: str
    files: tuple[str, ...]

    KIND = "mrgen-output"
    VERSION = 1

    def to_json(self) -> str:
        return json.dumps({"kind": self.KIND, "version": self.VERSION, "tool": self.tool,
                           "files": list(self.files)}, indent=1)

    @classmethod
    def read(cls, folder: Path) -> OutputRecord | None:
        """The folder's record; None when there is none or it is not one this version can read."""
        try:
            data = json.loads((folder / MARKER).read_text())
            if data.get("kind") != cls.KIND or data.get("version") != cls.VERSION:
                return None
            files = data["files"]
            if not isinstance(data["tool"], str) or not all(isinstance(f, str) for f in files):
                return None
            return cls(data["tool"], tuple(files))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def _protected(path: Path) -> str | None:
    """Why `path` (resolved) may never be replaced, or None."""
    named = {Path.cwd().resolve(): "the current directory", Path.home().resolve(): "the home folder",
             Path(Path.cwd().anchor): "the root folder"}
    return named.get(path)


def _foreign_file(folder: Path, tool: str) -> str | None:
    """The first entry of `folder` that an earlier output of `tool` did not write, or None."""
    entries = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    if not entries:
        return None
    record = OutputRecord.read(folder)
    if record is None or record.tool != tool:
        return next((e for e in entries if e != MARKER), entries[0])
    listed = set(record.files) | {MARKER}
    listed |= {parent.as_posix() for f in record.files for parent in Path(f).parents if parent != Path(".")}
    return next((e for e in entries if e not in listed), None)


def _file_written_by(path: Path, tool: str) -> bool:
    """Whether the file at `path` carries `tool`'s mark (HDF5 attribute or NIfTI description)."""
    try:
        if path.suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                return f.attrs.get(TOOL_ATTRIBUTE) == tool
        import nibabel as nib

        descrip = nib.load(path).header["descrip"].item()
        return descrip.decode(errors="replace").startswith(tool)
    except Exception:  # any file h5py or nibabel cannot read as an output of ours is not one
        return False


def check_output(out: Path, tool: str, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """An OutputError, before any work, unless `tool` may write `out`: it does not exist, or `overwrite` is
    given and it is an earlier output of `tool` (see the module docstring)."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace an earlier output of {tool}")
    target = out.resolve()
    if (why := _protected(target)) is not None:
        raise OutputError(f"--overwrite never replaces {why} ({target}); give a new output path")
    for given in inputs:
        source = given.resolve()
        if source == target or target in source.parents:
            raise OutputError(f"--overwrite would replace the input {given}: give another output path")
    if target.is_dir():
        if (foreign := _foreign_file(target, tool)) is not None:
            raise OutputError(f"{out} holds {foreign}, which {tool} did not write; --overwrite replaces only an "
                              f"earlier output of {tool}: remove it yourself or give a new output path")
    elif not _file_written_by(target, tool):
        raise OutputError(f"{out} is not an earlier output of {tool}; --overwrite replaces only those: remove it "
                          "yourself or give a new output path")


def write_error(error: OSError, path: Path) -> OutputError:
    """A failed write as one line naming the file."""
    return OutputError(f"cannot write {error.filename or path}: {error.strerror or error}")


def write_file(out: Path, fill: Callable[[Path], None]) -> None:
    """`fill(tmp)` writes the output to a temporary sibling, renamed onto `out` when it succeeded."""
    try:
        with atomic_path(out) as tmp:
            fill(tmp)
    except OSError as e:
        raise write_error(e, out) from None


def h5_bytes(fill: Callable[..., None], tool: str) -> bytes:
    """The bytes of an HDF5 file built in memory by `fill(h5py.File)`, marked as written by `tool`."""
    import h5py

    with h5py.File(f"{tool}.h5", "w", driver="core", backing_store=False) as f:
        fill(f)
        f.attrs[TOOL_ATTRIBUTE] = tool
        f.flush()
        return f.id.get_file_image()


@contextmanager
def folder_output(out: Path, tool: str) -> Iterator[Path]:
    """A folder built beside `out`, recorded as `tool`'s output and switched in for `out` when the block ends
    without an exception: `out` renamed aside, the new folder renamed to `out` (the old one renamed back if
    that fails), then the old one removed. On any failure the new folder is removed and `out` is as it was."""
    target = out.resolve() if out.exists() else out.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as e:
        raise write_error(e, out) from None
    try:
        yield tmp
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        (tmp / MARKER).write_text(OutputRecord(tool, tuple(files)).to_json())
        for name in (*files, MARKER):  # on disk before the switch, so that a crash cannot leave empty files
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        aside = None
        if target.exists():
            aside = target.with_name(f".{target.name}.replaced-{secrets.token_hex(4)}")
            os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if aside is not None:
                try:
                    os.rename(aside, target)
                except OSError:
                    raise OutputError(f"cannot write {out} ({e.strerror}); the earlier output is in {aside}") from None
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except OSError as e:
        raise write_error(e, out) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
