"""Fault injection: every command that writes (convert, train, export, sample, translate, fid) meets a full
disk and I/O errors at its writes and renames, with an earlier output of the same command in place.

Each must end with exit status 1 and one line `PROG: error: ...` on stderr (no traceback), and leave every
file of the earlier output byte-identical, with nothing added beside it. The faults are real:

* `ENOSPC at writes`: the output folder is a tmpfs filled to the last byte (in a private mount namespace);
* `EIO at fsync`: strace makes every fsync/fdatasync fail as a disk does when a write could not reach it;
* `EIO at renames`: strace makes every rename fail, so no temporary file can become an output.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import BIN, REPO, TINY, env
from tests.mounts import mount_namespace

pytestmark = pytest.mark.slow

RENAMES = "rename,renameat,renameat2"
STRACE = {
    "EIO at fsync": ("fsync,fdatasync", "EIO"),
    "EIO at renames": (RENAMES, "EIO"),
}
FAULTS = ["ENOSPC at writes", *STRACE]


@pytest.fixture(scope="module")
def earlier(store_dir: Path, trained_run: Path, translator_onnx: Path, cohort_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An output of each command, made once without faults; each case copies its own next to its new output."""
    out = tmp_path_factory.mktemp("earlier")
    decoder = out / "export" / "decoder.onnx"
    runs = [
        [BIN / "mrgen-export", "onnx", "--model", trained_run, "--out", decoder],
        [BIN / "mrgen-convert", cohort_dir, "--out", out / "store", "--slices", "4", "--test-fraction", "0.34"],
        [BIN / "mrgen-sample", decoder, "--scanner", "all", "--n", "3", "--out", out / "samples"],
        [BIN / "mrgen-sample", decoder, "--scanner", "all", "--n", "3", "--out", out / "h5" / "samples.h5"],
        [BIN / "mrgen-translate", translator_onnx, store_dir, "--to", "Intera", "--out", out / "translated"],
        [BIN / "mrgen-fid", "--store", store_dir, "--model", decoder, "--scanner", "Intera", "--repeats", "1",
         "--n-generated", "8", "--no-conditioning", "--out", out / "fid"],
    ]
    for cmd in runs:
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env(), timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    shutil.copytree(trained_run, out / "run")
    return {"store": out / "store", "run": out / "run", "export": out / "export", "samples": out / "samples",
            "h5": out / "h5", "translated": out / "translated", "fid": out / "fid", "decoder": decoder}


def _commands(earlier: dict[str, Path], root: Path, store: Path, translator: Path, cohort: Path
              ) -> dict[str, tuple[str, list]]:
    """Each command and the earlier output (a name of `earlier`) it would replace or extend inside `root`."""
    return {
        "convert": ("store", [BIN / "mrgen-convert", cohort, "--out", root / "store", "--slices", "2",
                              "--test-fraction", "0.34", "--overwrite"]),
        "train": ("run", [sys.executable, "-m", "mrgen_dist.commands.train", "--config", TINY, "--resume", "auto",
                          f"data.store={store}", f"train.out={root / 'run'}", "train.max_steps=40",
                          "train.sample_every=100"]),
        "export": ("export", [BIN / "mrgen-export", "onnx", "--model", earlier["run"], "--out",
                              root / "export" / "decoder.onnx"]),
        "sample png": ("samples", [BIN / "mrgen-sample", earlier["decoder"], "--scanner", "all", "--n", "4",
                                   "--out", root / "samples", "--overwrite"]),
        "sample h5": ("h5", [BIN / "mrgen-sample", earlier["decoder"], "--scanner", "all", "--n", "4",
                             "--out", root / "h5" / "samples.h5", "--overwrite"]),
        "translate": ("translated", [BIN / "mrgen-translate", translator, store, "--to", "Unspecified", "--out",
                                     root / "translated", "--overwrite"]),
        "fid": ("fid", [BIN / "mrgen-fid", "--store", store, "--model", earlier["decoder"], "--scanner", "Intera",
                        "--repeats", "1", "--n-generated", "8", "--no-conditioning", "--seed", "1",
                        "--out", root / "fid"]),
    }


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("command", ["convert", "train", "export", "sample png", "sample h5", "translate", "fid"])
def test_a_storage_fault_is_one_line_and_keeps_the_earlier_output(
        command: str, fault: str, earlier: dict[str, Path], store_dir: Path, translator_onnx: Path,
        cohort_dir: Path, tmp_path: Path) -> None:
    prefix = []
    if fault == "ENOSPC at writes":
        prefix = mount_namespace(tmp_path / "probe")
        if prefix is None:
            pytest.skip("cannot mount a tmpfs here (needs root or unprivileged user namespaces)")
    root = tmp_path / "root"
    root.mkdir()
    name, cmd = _commands(earlier, root, store_dir, translator_onnx, cohort_dir)[command]
    cmd = [str(c) for c in cmd]
    if fault in STRACE:
        calls, errno = STRACE[fault]
        cmd = ["strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e", f"trace={calls}",
               "-e", f"inject={calls}:error={errno}:when=1+", *cmd]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"root": str(root), "earlier": {name: str(earlier[name])}, "cmd": cmd,
                                "cwd": str(REPO), "env": {"PYTHONDONTWRITEBYTECODE": "1"},
                                "tmpfs": fault == "ENOSPC at writes"}))
    done = subprocess.run([*prefix, sys.executable, "-m", "tests.fault_driver", str(spec)], capture_output=True,
                          text=True, env=env(), cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    stderr = report["stderr"]
    assert report["rc"] == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if re.match(r"mrgen-[a-z]+: error: ", line)]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    assert report["after"] == report["before"], f"{command}: the earlier output changed ({errors[0]})"
