"""One convention for every `mrgen-*` command: one error path, extras named (argparse pieces: commands/options.py).

* `UserError` is the base of every error a user can fix (bad input, bad config, a missing file or extra).
  `run()` prints it as one line `PROG: error: MESSAGE` on stderr (once, from rank 0 under a multi-process
  launch) and returns its exit status; anything else is a bug and keeps its traceback.
* `require()` imports a module of an optional extra, or says which extra to install.

Stdlib only: the torch-free sampler uses it.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType

EXIT_ERROR = 1


class UserError(Exception):
    """An error the user can fix; the message names the problem (file, field, option)."""

    exit_code = EXIT_ERROR


class MissingExtra(UserError):
    """A command needs a package of an optional extra that is not installed."""


#: The import names of what each optional extra of `pip install 'mrgen-dist[EXTRA]'` brings (pyproject.toml).
EXTRAS = {
    "train": ("torch", "accelerate", "deepspeed", "transformers", "safetensors", "clearml", "matplotlib", "nilearn",
              "tqdm", "yaml", "xxhash", "scipy", "onnx", "onnxscript"),
    "fid": ("torch", "xxhash", "tqdm", "matplotlib", "scipy", "sklearn", "prdc", "pytorch_msssim"),
}


def _extra_of(module: str) -> str:
    return next((extra for extra, modules in EXTRAS.items() if module in modules), "all")


def require(module: str, purpose: str) -> ModuleType:
    """`import module`, or a MissingExtra naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingExtra(f"{purpose} needs {top!r}, which this installation lacks: "
                           f"pip install 'mrgen-dist[{_extra_of(top)}]' ({e})") from None


def require_extra(extra: str, purpose: str) -> None:
    """A MissingExtra naming `extra` when any of its packages is not installed (looked up, not imported)."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{purpose} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                           f"pip install 'mrgen-dist[{extra}]'")


def report(prog: str, error: UserError) -> int:
    """Print `error` the one way every command prints errors; returns its exit status."""
    if os.environ.get("RANK", "0") == "0":  # under torchrun/accelerate every rank raises the same error
        print(f"{prog}: error: {error}", file=sys.stderr)
    return error.exit_code


#: Errors of the file system a user can fix (space, quota, a failing or read-only disk), reported in one line.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


def run(prog: str, command: Callable[[], int | None]) -> int:
    """Run a command body; a UserError becomes its one-line message and exit status, and so does an OSError of
    the storage (disk full, I/O error), named by its file."""
    try:
        return command() or 0
    except UserError as e:
        return report(prog, e)
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        return report(prog, UserError(f"{e.filename or 'a file'}: {e.strerror}"))


