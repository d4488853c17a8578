"""Run one command under one storage fault and report what it did to the outputs already there (JSON on stdout).

    python -m tests.fault_driver SPEC.json

SPEC: `root` (an empty folder), `earlier` ({name: path}: earlier outputs copied into `root` first), `cmd`,
`cwd`, `env`, and `tmpfs` (true: `root` becomes a tmpfs just large enough for the earlier outputs, then
filled to the last byte, so that every new write fails with ENOSPC; needs a private mount namespace, see
tests/test_faults.py). The report: the exit status, stderr, and a sha256 of every file under `root` before and
after the command (the filler excluded).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FILLER = ".filler"


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.name != FILLER}


def _size_kb(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size // 4096 * 4 + 8 for p in files) + 4 * len(files)


def _fill(root: Path) -> None:
    with open(root / FILLER, "wb", buffering=0) as fh:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                continue


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    root, earlier = Path(spec["root"]), {name: Path(p) for name, p in spec["earlier"].items()}
    if spec["tmpfs"]:
        kb = sum(_size_kb(p) for p in earlier.values()) + 1024
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(root)], check=True)
    for name, source in earlier.items():
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, root / name)
    if spec["tmpfs"]:
        _fill(root)
    before = _snapshot(root)
    done = subprocess.run(spec["cmd"], cwd=spec["cwd"], env={**os.environ, **spec["env"]}, capture_output=True,
                          text=True, timeout=600)
    print(json.dumps({"rc": done.returncode, "stderr": done.stderr, "before": before, "after": _snapshot(root)}))


if __name__ == "__main__":
    main(sys.argv[1])
