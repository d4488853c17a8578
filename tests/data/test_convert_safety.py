"""mrgen-convert never destroys a store the user has: one writer per folder, staged replacement, --overwrite,
write failures (file size limit, full file system) reported in one line with the old store intact."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from mrgen_dist.cli import EXIT_ERROR
from mrgen_dist.commands.convert import main
from mrgen_dist.data.convert import EXIT_OK
from mrgen_dist.data.demo import MARKER_FILE
from mrgen_dist.data.lock import LOCK_NAME, FolderBusy, FolderLock
from mrgen_dist.data.store import SliceStore
from tests.mounts import mount_namespace

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: a file's bytes (sha256), inode and mtime; a folder's name."""
    snap: dict[str, tuple] = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(folder))
        snap[rel] = ("dir",) if p.is_dir() else (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns)
    return snap


def _inputs(cohort_dir: Path, folder: Path, n: int | None = None) -> Path:
    """A folder of symbolic links to the first `n` cohort volumes (and to the synthetic-data marker)."""
    folder.mkdir()
    for p in [*sorted(cohort_dir.glob("*.nii.gz"))[:n], cohort_dir / MARKER_FILE]:
        (folder / p.name).symlink_to(p)
    return folder


def _cli(*args: str, fsize_limit: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`mrgen-convert ARGS` in a fresh process, optionally with RLIMIT_FSIZE (writes past it fail, EFBIG)."""
    code = "import sys; from mrgen_dist.commands.convert import main; sys.exit(main(sys.argv[1:]))"
    if fsize_limit is not None:
        code = f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize_limit}, {fsize_limit})); " + code
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=ENV)


def _one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [s for s in stderr.replace("\r", "\n").splitlines() if s.strip() and not s.startswith("volumes:")]
    assert len(lines) == 1 and lines[0].startswith("mrgen-convert: error: "), stderr
    return lines[0]


# -- one writer ----------------------------------------------------------------------------------------------


def test_a_second_conversion_refuses_while_the_first_runs_and_a_killed_one_does_not_block(
    cohort_dir: Path, tmp_path: Path
) -> None:
    """Two real processes. The first converts 64 volumes; once it has staged a shard it is stopped (SIGSTOP)
    in the middle of its conversion, holding the folder. The second, started then, refuses at once naming
    the holder and changes nothing. The first is then killed (SIGKILL): its lock file stays but no longer
    blocks, and a third run finishes the store from the shards the killed one had staged."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = sorted(cohort_dir.glob("IXI*-Guys-*.nii.gz"))[0]
    for i in range(1000, 1064):  # 64 subjects of one file: long enough a conversion to stop it midway
        (inputs / f"IXI{i}-Guys-{i}-T1.nii.gz").symlink_to(source)
    out = tmp_path / "store"
    args = [str(inputs), "--out", str(out), "--shard-volumes", "4"]
    code = "import sys; from mrgen_dist.commands.convert import main; sys.exit(main(sys.argv[1:]))"
    first = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        staged = out / ".staging" / "shards"
        deadline = time.monotonic() + 240
        while not list(staged.glob("shard-*.json")):
            assert first.poll() is None and time.monotonic() < deadline, "the first conversion did not get going"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        assert first.poll() is None and not (out / "manifest.json").exists(), "the first conversion ended too soon"
        assert f"{first.pid}@{socket.gethostname()}" in (out / LOCK_NAME).read_text()
        before = _snapshot(out)

        second = _cli(str(cohort_dir), "--out", str(out), "--shard-volumes", "4")
        assert second.returncode == EXIT_ERROR
        line = _one_line_error(second.stderr)
        assert f"{out} is in use by mrgen-convert in another process ({first.pid}@{socket.gethostname()}" in line
        assert "nothing was changed" in line
        assert _snapshot(out) == before and first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)

    assert (out / LOCK_NAME).exists()  # left by the killed process: the kernel dropped its lock
    staged_by_first = len(list(staged.glob("shard-*.json")))
    third = _cli(*args)
    assert third.returncode == EXIT_OK, third.stderr
    assert f"{16 - staged_by_first} shards written, {staged_by_first} kept from an earlier run" in third.stdout
    assert SliceStore(out).verify() == [] and SliceStore(out).manifest.counts["volumes"] == 64
    assert not list(out.rglob(".*"))  # no lock file, no staging folder


def test_folder_lock_in_one_process(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("4242@gone-host since 2020-01-01\n")  # a dead holder's file
    with FolderLock(tmp_path) as lock:
        assert (tmp_path / LOCK_NAME).read_text().startswith(f"{os.getpid()}@")
        with pytest.raises(FolderBusy, match=f"in use by mrgen-convert in this process \\({os.getpid()}@"):
            FolderLock(tmp_path).acquire()
        assert lock.path.exists()
    assert not (tmp_path / LOCK_NAME).exists()
    with FolderLock(tmp_path):
        pass


# -- a failed or different conversion leaves the store alone ------------------------------------------------


def test_a_failed_reconversion_leaves_the_store_byte_identical(
    cohort_dir: Path, store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "store"
    shutil.copytree(store_dir, out)
    before = _snapshot(out)
    bad = tmp_path / "bad-inputs"
    bad.mkdir()
    good = sorted(cohort_dir.glob("IXI*.nii.gz"))[0].read_bytes()
    (bad / "IXI951-HH-0951-T1.nii.gz").write_bytes(good[: len(good) // 3])  # truncated
    assert main([str(bad), "--out", str(out)]) == EXIT_ERROR  # refused before any work: other inputs
    assert "holds a finished store made from other inputs" in _one_line_error(capsys.readouterr().err)
    assert _snapshot(out) == before
    assert main([str(bad), "--out", str(out), "--overwrite"]) == EXIT_ERROR  # tried, and failed
    captured = capsys.readouterr()
    line = _one_line_error(captured.err)
    assert "no volume was accepted (1 rejected; first: IXI951-HH-0951-T1.nii.gz: truncated or corrupt" in line
    assert line.endswith(f"the store in {out} is unchanged")
    assert "rejected IXI951-HH-0951-T1.nii.gz: truncated or corrupt" in captured.out
    assert _snapshot(out) == before
    assert SliceStore(out).verify() == []


def test_replacing_a_store_from_other_inputs_or_parameters_needs_overwrite(
    cohort_dir: Path, store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "store"
    shutil.copytree(store_dir, out)  # 5 volumes per shard, test fraction 0.34
    before = _snapshot(out)
    fewer = _inputs(cohort_dir, tmp_path / "fewer", n=8)
    for args, what in (
        ([str(cohort_dir), "--shard-volumes", "12", "--test-fraction", "0.34"], "(shard_volumes 5 -> 12)"),
        ([str(cohort_dir), "--shard-volumes", "5"], "(split test_fraction 0.34 -> 0.1)"),
        ([str(fewer), "--shard-volumes", "5", "--test-fraction", "0.34"], "(inputs: 4 gone)"),
        ([str(cohort_dir), "--shard-volumes", "5", "--test-fraction", "0.34", "--vocabulary", "Intera,Unspecified"],
         "(vocabulary Gyroscan Intera,Intera,Unspecified,Magnetom TrioTim -> Intera,Unspecified; inputs: 6 gone)"),
    ):
        capsys.readouterr()
        assert main([*args, "--out", str(out)]) == EXIT_ERROR
        line = _one_line_error(capsys.readouterr().err)
        assert f"{out} holds a finished store made from other inputs or parameters {what}; add --overwrite" in line
        assert _snapshot(out) == before

    capsys.readouterr()
    assert main([str(cohort_dir), "--out", str(out), "--shard-volumes", "12", "--test-fraction", "0.34",
                 "--overwrite"]) == EXIT_OK
    assert "1 shards written, 0 kept from an earlier run, previous store replaced" in capsys.readouterr().out
    store = SliceStore(out)
    assert [s["slices"] for s in store.shards] == [120] and store.verify() == []
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "preview.png", "rejected.csv", "shards"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.h5", "shard-00000.json"]


def test_rerunning_the_same_conversion_keeps_the_store_as_it_is(
    cohort_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "store"
    args = [str(cohort_dir), "--out", str(out), "--shard-volumes", "5"]
    assert main(args) == EXIT_OK
    before = _snapshot(out)
    assert "preview.png" in before and "shards/shard-00002.h5" in before
    capsys.readouterr()
    assert main(args) == EXIT_OK
    assert f"store unchanged: {out} already holds this conversion (same inputs and parameters, 3 shards checked)" \
        in capsys.readouterr().out
    assert _snapshot(out) == before  # same bytes, same inodes, same mtimes: nothing rewritten
    # the same files given by another path are the same conversion
    assert main([str(_inputs(cohort_dir, tmp_path / "links")), "--out", str(out), "--shard-volumes", "5"]) == EXIT_OK
    assert _snapshot(out) == before


# -- write failures ----------------------------------------------------------------------------------------


def _no_temporaries(folder: Path) -> None:
    leftovers = [p for p in folder.rglob("*") if ".tmp" in p.name or (p.is_file() and p.stat().st_size == 0)]
    assert leftovers == []


def test_a_write_failure_is_one_line_and_keeps_the_old_store(store_dir: Path, cohort_dir: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every write past 2 MB fail (EFBIG) as a full disk would: the new 12-volume shard
    (9.5 MB) cannot be written."""
    out = tmp_path / "store"
    shutil.copytree(store_dir, out)
    before = _snapshot(out)
    done = _cli(str(cohort_dir), "--out", str(out), "--shard-volumes", "12", "--test-fraction", "0.34", "--overwrite",
                fsize_limit=2 << 20)
    assert done.returncode == EXIT_ERROR
    line = _one_line_error(done.stderr)
    assert line == (f"mrgen-convert: error: cannot write {out}/.staging/shards/shard-00000.h5: File too large; "
                    f"the store in {out} is unchanged")
    assert _snapshot(out) == before
    _no_temporaries(out)


_ON_TMPFS = r'''
import hashlib, json, os, subprocess, sys
from pathlib import Path

inputs, store_kb, preview_kb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
results = {}

def cli(*args):
    done = subprocess.run([sys.executable, "-m", "mrgen_dist.commands.convert", *args], capture_output=True, text=True)
    return [done.returncode, done.stdout, done.stderr]

def snapshot(folder):
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else [hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_ino, p.stat().st_mtime_ns] for p in sorted(folder.rglob("*"))}

def leftovers(folder):
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name or (p.is_file() and p.stat().st_size == 0)]

def mount(folder, kb, remount=False):
    folder.mkdir(exist_ok=True)
    opts = f"remount,size={kb}k" if remount else f"size={kb}k"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], check=True)

# 1. the disk fills up while a new store replaces an old one, then space is freed and the run resumed
full = Path("full")
mount(full, 5000)
out = str(full / "store")
results["first"] = cli(inputs, "--out", out, "--shard-volumes", "4")
results["before"] = snapshot(full / "store")
results["full"] = cli(inputs, "--out", out, "--shard-volumes", "2", "--overwrite")
results["after"] = snapshot(full / "store")
results["leftovers"] = leftovers(full / "store")
results["staged"] = sorted(p.name for p in (full / "store" / ".staging" / "shards").iterdir())
mount(full, 20000, remount=True)
results["resumed"] = cli(inputs, "--out", out, "--shard-volumes", "2", "--overwrite")

# 2. room for the store but not for its preview.png
small = Path("small")
mount(small, store_kb + preview_kb // 2)
results["no_preview"] = cli(inputs, "--out", str(small / "store"), "--shard-volumes", "4")
results["verify"] = cli("verify", str(small / "store"))
results["files"] = sorted(str(p.relative_to(small)) for p in small.rglob("*"))
print(json.dumps(results))
'''


def test_a_full_file_system_is_one_line_keeps_the_old_store_and_spares_the_preview(
    cohort_dir: Path, tmp_path: Path
) -> None:
    """On a real tmpfs (in a private mount namespace): a conversion that fills it fails in one line naming
    the file, leaves the old store byte-identical and no temporary or empty file; a store that fits while its
    preview.png does not is written, with a warning and exit 0."""
    prefix = mount_namespace(tmp_path / "probe")
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (needs root or unprivileged user namespaces)")
    inputs = _inputs(cohort_dir, tmp_path / "in", n=4)
    # the sizes a 4-volume store and its preview take on this machine, in 4 KiB pages as tmpfs counts them
    sizes = tmp_path / "sizes"
    assert main([str(inputs), "--out", str(sizes), "--shard-volumes", "4"]) == EXIT_OK
    kb = {p.relative_to(sizes): 4 * math.ceil(p.stat().st_size / 4096) for p in sizes.rglob("*") if p.is_file()}
    preview_kb = kb.pop(Path("preview.png"))
    assert preview_kb >= 32  # the test needs a preview larger than the margin left for it (half of it)
    script = tmp_path / "on_tmpfs.py"
    script.write_text(_ON_TMPFS)
    done = subprocess.run([*prefix, sys.executable, str(script), str(inputs), str(sum(kb.values())), str(preview_kb)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**ENV, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)

    assert r["first"][0] == EXIT_OK, r["first"][2]
    rc, _, err = r["full"]
    assert rc == EXIT_ERROR
    line = _one_line_error(err)
    out = Path("full/store")  # as the script named it, relative to its working folder
    assert line == (f"mrgen-convert: error: cannot write {out}/.staging/shards/shard-00001.h5: No space left on "
                    f"device; the store in {out} is unchanged; 1 finished shard(s) of this conversion kept in "
                    f"{out}/.staging for a re-run to resume (or delete it)")
    assert {k: v for k, v in r["after"].items() if not k.startswith(".staging")} == r["before"]
    assert r["leftovers"] == [] and r["staged"] == ["shard-00000.h5", "shard-00000.json"]
    rc, stdout, err = r["resumed"]
    assert rc == EXIT_OK, err
    assert "1 shards written, 1 kept from an earlier run, previous store replaced" in stdout

    rc, stdout, err = r["no_preview"]
    assert rc == EXIT_OK and "Traceback" not in err
    assert f"mrgen-convert: warning: {Path('small/store/preview.png')} not written (OSError: No space left on " \
           "device); the store is complete" in err
    assert "preview:" not in stdout
    assert r["verify"][0] == EXIT_OK, r["verify"][2]
    assert not [f for f in r["files"] if ".tmp" in f or "preview" in f or "staging" in f or "lock" in f]


# -- a failure while the new store is switched in ------------------------------------------------------------


_SWAP_SYSCALLS = "rename,renameat,renameat2,link,linkat,unlink,unlinkat,rmdir,mkdir,mkdirat,chmod,fchmodat"
_TRACE_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(.*)$")


@dataclass(frozen=True)
class _Call:
    pid: str
    name: str
    nth: int  # its number among the calls of this syscall by this process: strace's `when=`
    text: str  # name(arguments)
    result: str


def _strace_prefix() -> list[str] | None:
    """`strace -f ...` that can inject a failure into this machine's processes; None where it cannot."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    probe = "import os\ntry:\n    os.rename('no-such-file', 'x')\nexcept OSError as e:\n    raise SystemExit(e.errno != 5)"
    for fast in (["--seccomp-bpf"], []):  # stop only at the traced calls where strace can
        prefix = [strace, "-f", "-qq", "-s", "4096", *fast]
        done = subprocess.run([*prefix, "-o", os.devnull, "-e", "inject=rename,renameat,renameat2:error=EIO:when=1",
                               sys.executable, "-c", probe], capture_output=True, timeout=60)
        if done.returncode == 0:
            return prefix
    return None


def _traced_calls(log: Path) -> list[_Call]:
    counts: Counter[tuple[str, str]] = Counter()
    calls = []
    for line in log.read_text().splitlines():
        m = _TRACE_LINE.match(line)
        if m:
            pid, name, args, result = m.groups()
            counts[pid, name] += 1
            calls.append(_Call(pid, name, counts[pid, name], f"{name}({args})", result))
    return calls


def _swap_window(calls: list[_Call], out: Path) -> list[_Call]:
    """The calls of the replacement: after the new manifest is staged, before the new preview is written."""
    start = next(i for i, c in enumerate(calls) if c.name.startswith("rename")
                 and c.text.endswith(f'"{out}/.staging/manifest.json")'))
    pid = calls[start].pid
    end = next(i for i, c in enumerate(calls) if i > start and c.pid == pid and c.text.endswith(f'"{out}/preview.png")'))
    return [c for c in calls[start + 1 : end] if c.pid == pid and ".tmp" not in c.text]  # not the manifest's temporary


def _mrgen_convert() -> list[str]:
    script = Path(sys.executable).parent / "mrgen-convert"  # the installed command line
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mrgen_dist.commands.convert"]


def _without_staging(snapshot: dict[str, tuple]) -> dict[str, tuple]:
    return {k: v for k, v in snapshot.items() if not k.startswith(".staging") and k != LOCK_NAME}


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "in-place"])
def test_a_failure_at_any_step_of_the_replacement_keeps_the_old_store(
    exchange: bool, cohort_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`mrgen-convert IN --out OUT --slices 8 --overwrite` over a store of 10 slices a volume, under strace,
    which makes one system call of the replacement fail (EIO), each in turn: every one up to the point where
    the new store is in place fails in one line and leaves the old store byte-identical (same bytes, inodes
    and mtimes) and sound for `verify`, and a plain re-run then finishes; a failure after it, while the old
    store is removed, is a warning, and the next run removes what was left. `exchange`: the folders are
    exchanged (renameat2 RENAME_EXCHANGE); in-place: strace makes the exchange fail with EINVAL, as a file
    system without it (NFS, Lustre) does, and the old files are moved out and the new ones in. Last, the
    process is killed at the step that puts the new store in place (and, exchanging, just after it): the next
    run finds the old store as it was (in-place: after putting it back), or the new one complete."""
    prefix = _strace_prefix()
    if prefix is None:
        pytest.skip("strace is missing or cannot trace here")
    inputs = _inputs(cohort_dir, tmp_path / "in", n=4)
    old = tmp_path / "old"
    assert main([str(inputs), "--out", str(old)]) == EXIT_OK
    out, swap = tmp_path / "OUT", tmp_path / ".OUT.mrgen-swap"
    args = [str(inputs), "--out", str(out), "--slices", "8", "--overwrite"]
    env = {**ENV, "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc written: the same calls in every run
    before: dict[str, tuple] = {}

    def traced(log: Path, *injections: str, kill: bool = False) -> subprocess.CompletedProcess:
        """The command under strace, from a fresh copy of the old store in OUT (its snapshot in `before`)."""
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(swap, ignore_errors=True)
        shutil.copytree(old, out)
        before.clear()
        before.update(_without_staging(_snapshot(out)))
        inject = [x for spec in injections for x in ("-e", f"inject={spec}")]
        strace = [x for x in prefix if x != "--seccomp-bpf"] if kill else prefix  # it drops signal= (strace 6.1)
        return subprocess.run([*strace, "-o", str(log), "-e", f"trace={_SWAP_SYSCALLS}", *inject, *_mrgen_convert(),
                               *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)

    # a run without a failure (but for the exchange in-place): which calls the replacement makes
    done = traced(tmp_path / "reference.log")
    assert done.returncode == EXIT_OK, done.stderr
    window = _swap_window(_traced_calls(tmp_path / "reference.log"), out)
    exchange_call = next((c for c in window if c.name == "renameat2" and "RENAME_EXCHANGE" in c.text), None)
    can_exchange = exchange_call is not None and exchange_call.result == "0"
    if exchange and not can_exchange:
        pytest.skip("folders cannot be exchanged here (no renameat2 RENAME_EXCHANGE on this file system)")
    base: tuple[str, ...] = ()
    if not exchange:
        if exchange_call is not None:
            base = (f"renameat2:error=EINVAL:when={exchange_call.nth}",)
            done = traced(tmp_path / "reference.log", *base)
            assert done.returncode == EXIT_OK, done.stderr
        assert "previous store replaced" in done.stdout
        reference = _traced_calls(tmp_path / "reference.log")
        window = _swap_window(reference, out)
        window = window[next(i for i, c in enumerate(window) if c.text.startswith("mkdir(") and "replaced" in c.text):]
        commit = next(i for i, c in enumerate(window)
                      if c.text == f'rename("{out}/.staging/manifest.json", "{out}/manifest.json")')
        undo = next((c for c in reference if c.text == f'rename("{swap}", "{out}/.staging")'), None)
    else:
        commit = window.index(exchange_call)
        assert [c.name for c in window[: commit + 1]] == ["chmod", "unlink", "link", "rename", "renameat2"]
    assert window[commit + 1].name in ("unlinkat", "unlink"), window[commit + 1]  # the old store being removed

    cases = [(c, True) for c in window[: commit + 1]] + [(window[commit + 1], False)]
    for call, before_commit in cases:
        if not exchange and call.name == "renameat2":
            continue  # one injection per system call: cannot happen where rename(2) is renameat2
        log = tmp_path / f"{call.name}-{call.nth}.log"
        done = traced(log, *base, f"{call.name}:error=EIO:when={call.nth}")
        injected = next(c for c in _traced_calls(log) if "(INJECTED)" in c.result and "EIO" in c.result)
        assert injected.text == call.text, (injected, call)  # the failure hit the call it was meant for
        what = f"{call.text} failing"
        if before_commit:
            assert done.returncode == EXIT_ERROR, (what, done.stderr)
            line = _one_line_error(done.stderr)
            assert "Input/output error" in line and f"the store in {out} is unchanged" in line, (what, line)
            assert _without_staging(_snapshot(out)) == before, what
            assert main(["verify", str(out)]) == EXIT_OK, what
            assert not swap.exists(), what
        else:
            assert done.returncode == EXIT_OK, (what, done.stderr)
            lines = [s for s in done.stderr.splitlines() if s.strip()]
            assert len(lines) == 1 and lines[0].startswith("mrgen-convert: warning: the replaced store could not be "
                                                           "removed from "), (what, done.stderr)
            assert "(Input/output error); delete it (the next conversion into this store does)" in lines[0]
            assert SliceStore(out).verify() == [] and SliceStore(out).manifest.params["slices_per_volume"] == 8
        capsys.readouterr()
        assert main(args) == EXIT_OK, (what, capsys.readouterr().err)  # a plain re-run finishes (or keeps) it
        assert ("store unchanged" in capsys.readouterr().out) is not before_commit, what
        assert SliceStore(out).verify() == [] and SliceStore(out).manifest.params["slices_per_volume"] == 8, what
        assert not swap.exists() and not (out / ".staging").exists(), what

    if not exchange and undo is not None:  # the exchange fails, and so does moving the staged store back
        done = traced(tmp_path / "undo.log", *base, f"rename:error=EIO:when={undo.nth}")
        assert done.returncode == EXIT_ERROR, done.stderr
        line = _one_line_error(done.stderr)
        assert line.endswith(f"the store in {out} is unchanged; the new one is left in {swap}, which the next "
                             "conversion removes"), line
        assert main(["verify", str(out)]) == EXIT_OK and swap.is_dir()
        assert main(args) == EXIT_OK and not swap.exists()

    # killed (SIGKILL) in the middle: at the commit step itself, and (exchange) just after it
    old_args = [str(inputs), "--out", str(out)]  # the conversion that made the old store: no work if it is intact
    for call, committed in [(window[commit], False)] + ([(window[commit + 1], True)] if exchange else []):
        done = traced(tmp_path / "killed.log", *base, f"{call.name}:error=EIO:signal=SIGKILL:when={call.nth}",
                      kill=True)
        assert done.returncode == -signal.SIGKILL, done.stderr
        what = f"killed at {call.text}"
        if exchange:  # a complete store in OUT at every moment, old or new
            assert SliceStore(out).verify() == [], what
            assert SliceStore(out).manifest.params["slices_per_volume"] == (8 if committed else 10), what
        else:  # an unfinished conversion until the next run puts the old store back
            assert main(["verify", str(out)]) == EXIT_ERROR, what
        capsys.readouterr()
        assert main(args if committed else old_args) == EXIT_OK, what
        assert "store unchanged" in capsys.readouterr().out, what
        if not committed:
            assert _without_staging(_snapshot(out)) == before, what  # the old store, as it was
            assert main(["verify", str(out)]) == EXIT_OK, what
        assert not swap.exists() and not (out / ".staging" / "replaced").exists(), what
