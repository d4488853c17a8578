"""Every file the package writes appears whole or not at all.

    atomic_write(path, text_or_bytes)          # small files: JSON, CSV, Markdown
    with atomic_path(path) as tmp:             # anything written by a library: h5py, np.save, savefig, onnx
        h5py.File(tmp, "w") ...

The data goes to a temporary sibling whose name is unique to this process (two writers never share one),
is flushed to disk, and is renamed over `path` only when the block finished without an exception; on an
exception the temporary file is removed and `path` is left as it was. An OSError of the write (disk full,
I/O error) names `path`, not the temporary file. The file gets the permissions of any
newly created file (0o666 less the umask), not the owner-only 0o600 of `tempfile.mkstemp`. Stdlib only.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _new_temp_file(path: Path, suffix: str) -> Path:
    """An empty file beside `path` whose name no other writer holds, created 0o666 less the umask."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block ends without an exception.

    `suffix` (default: `path`'s own suffixes) keeps libraries that pick a format by extension
    (nibabel's `.nii.gz`, numpy's `.npy`) writing the right format.
    """
    path = Path(path)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    tmp = _new_temp_file(path, suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None or e.filename in (str(tmp), tmp):  # a write error names the file the user asked for
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)
