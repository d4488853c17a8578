"""One writer per store folder: an exclusive lock held for a whole conversion, tied to the process.

    with FolderLock(out):          # FolderBusy (a UserError naming the holder) when another process has it
        ...

The lock is a POSIX record lock (`fcntl.lockf`) on `FOLDER/.mrgen-convert.lock`. The kernel drops it when
its process ends, however it ends (exit, crash, SIGKILL), so a lock left by a dead process never blocks;
unlike `flock`, it is not inherited by forked worker processes, which could otherwise keep it alive after
their parent was killed. The file holds `pid@host` and the start time of the holder, for the message the
refused process prints; it is removed when the lock is released (a lock file left by a killed process is
simply taken over). A second `FolderLock` on the same folder in the same process is refused as well.
A holder that replaces the folder by another one carrying a hard link of the lock file (mrgen-convert's
atomic exchange) keeps the lock: the file at `FOLDER/.mrgen-convert.lock` is still the one it holds, and
`follow()` makes the in-process check follow the new folder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from mrgen_dist.cli import UserError

LOCK_NAME = ".mrgen-convert.lock"

_HELD_HERE: set[tuple[int, int]] = set()  # (st_dev, st_ino) of folders this process holds


class FolderBusy(UserError):
    """Another process (or this one) is converting into the folder."""


class LockError(UserError):
    """The lock file cannot be created or locked (read-only folder, file system without locks)."""


def _holder(fd: int) -> str:
    """`pid@host since TIME` as written by the holder; it writes just after locking, so wait a moment."""
    for _ in range(20):
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown process"


class FolderLock:
    def __init__(self, folder: str | os.PathLike, purpose: str = "mrgen-convert") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None

    def _busy(self, holder: str, where: str = "another process") -> FolderBusy:
        return FolderBusy(f"{self.folder} is in use by {self.purpose} in {where} ({holder}); nothing was changed: "
                          "wait for it to end or stop it")

    def acquire(self) -> FolderLock:
        st = self.folder.stat()
        key = (st.st_dev, st.st_ino)
        if key in _HELD_HERE:
            raise self._busy(f"{os.getpid()}@{socket.gethostname()}", "this process")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise LockError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _holder(fd) if e.errno in (errno.EACCES, errno.EAGAIN) else ""
                os.close(fd)
                if holder:
                    raise self._busy(holder) from None
                raise LockError(f"cannot lock {self.path}: {e.strerror or e} (the file system must support "
                                "POSIX locks)") from None
            # the previous holder removes the file when it is done: if it did so between our open and our lock,
            # we hold a lock on a file nobody else will see; start again on the file now at the path
            try:
                here = os.stat(self.path)
                mine = os.fstat(fd)
                if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()} since {since}\n".encode(), 0)
        except OSError as e:  # a full disk: take nothing, leave nothing
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise LockError(f"cannot write the lock file {self.path}: {e.strerror or e}") from None
        self._fd, self._key = fd, key
        _HELD_HERE.add(key)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can take a lock on it meanwhile
        finally:
            os.close(self._fd)  # drops the lock
            _HELD_HERE.discard(self._key)
            self._fd = self._key = None

    def follow(self) -> None:
        """The folder at the path was exchanged for another one holding a hard link of the held lock file (an
        atomic replacement of the folder): from now on this lock is the one of the folder now at the path."""
        if self._fd is None:
            return
        try:
            st = self.folder.stat()
        except OSError:
            return
        _HELD_HERE.discard(self._key)
        self._key = (st.st_dev, st.st_ino)
        _HELD_HERE.add(self._key)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
