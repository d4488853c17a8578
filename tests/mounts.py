"""A private mount namespace for tests that fill a small tmpfs (a real full disk)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def mount_namespace(probe: Path) -> list[str] | None:
    """`unshare` options under which this user may mount a tmpfs (as root, or with unprivileged user
    namespaces); None where neither works. Mounts made under them vanish with the command."""
    if shutil.which("unshare") is None:
        return None
    probe.mkdir(exist_ok=True)
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        done = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                              capture_output=True, timeout=60)
        if done.returncode == 0:
            return prefix
    return None
