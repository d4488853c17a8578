"""Cohorts beyond memory: conversion as an array of parts, and training from a store larger than the memory the
training process may use (data.residency: stream), both measured side by side on this machine.

1. Conversion of the cohort: one process (1 worker) against an array of `--parts` parts run side by side (1
   worker each, as Slurm array tasks on one node would) plus `mrgen-convert merge`; seconds per 1,000 volumes.
   The merged store must hold the one-process store's slices in its order (checked here too).
2. Training the demo model (hpc/configs/demo.yaml, the atlas cVAE) on the merged store: `stream` inside a memory
   cgroup of `--limit-gib` (the store at least 3x that), the store's shards dropped from the page cache first
   (posix_fadvise DONTNEED), against `device` (the whole split read into memory, no limit) on the same store
   and steps. images/s over the steps after `--warmup` (the loop's own work: stream checks each shard's
   checksum on first use, device reads the split before step 1); peak RSS of the streaming process (its
   ru_maxrss) and of the cgroup (page cache included). Target: stream >= 0.8x device, peak RSS under the limit.

Needs root for the cgroup (v1 memory controller or v2); the store is --volumes x --slices slices of 79 KB.

    sudo .venv/bin/python benchmarks/stream.py [--volumes 1600] [--slices 40] [--limit-gib 1.5] [--steps 240]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from cohort import replicated_manifest  # benchmarks/cohort.py

from mrgen_dist.data.store import SliceStore

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def cgroup(limit_bytes: int) -> tuple[Path, Path, Path]:
    """A fresh memory cgroup with this limit: (folder, the file its processes go in, its peak usage file)."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.is_file() and "memory" in v2.read_text():
        folder = Path(f"/sys/fs/cgroup/mrgen-bench-{os.getpid()}")
        folder.mkdir()
        (folder / "memory.max").write_text(str(limit_bytes))
        (folder / "memory.swap.max").write_text("0")
        return folder, folder / "cgroup.procs", folder / "memory.peak"
    folder = Path(f"/sys/fs/cgroup/memory/mrgen-bench-{os.getpid()}")
    folder.mkdir()
    (folder / "memory.limit_in_bytes").write_text(str(limit_bytes))
    return folder, folder / "cgroup.procs", folder / "memory.max_usage_in_bytes"


def drop_from_page_cache(store: Path) -> None:
    for shard in (store / "shards").glob("*.h5"):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def convert_cmd(source: Path, out: Path, *extra: str) -> list[str]:
    return [PY, "-m", "mrgen_dist.commands.convert", str(source), "--out", str(out), "--workers", "1",
            "--shard-volumes", "25", *extra]


def timed(cmds: list[list[str]]) -> float:
    """Run the commands side by side; the wall time until the last one ends (each must succeed)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(cmds)) as pool:
        for done in pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), cmds):
            if done.returncode not in (0, 3):
                raise SystemExit(f"{' '.join(done.args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def train(store: Path, out: Path, residency: str, steps: int, warmup: int, procs_file: Path | None) -> dict:
    """One training run of `steps` optimizer steps; img/s over the steps after `warmup`, from the times at which
    metrics.jsonl gained its lines."""
    cmd = [PY, "-m", "mrgen_dist.commands.train", "--config", str(REPO / "hpc/configs/demo.yaml"),
           f"data.store={store}", f"train.out={out}", f"data.residency={residency}", "train.tracker=none",
           "train.epochs=1", f"train.max_steps={steps}", "--overwrite"]
    join = (lambda: procs_file.write_text(str(os.getpid()))) if procs_file else None
    metrics = out / "metrics.jsonl"
    seen: dict[int, float] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=join,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    while proc.poll() is None:
        if metrics.is_file():
            n = len(metrics.read_bytes().splitlines())
            seen.setdefault(n, time.perf_counter())
        time.sleep(0.05)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"training ({residency}) failed:\n{log[-3000:]}")
    lines = sorted(seen)
    first = min(n for n in lines if n >= warmup)
    last = max(lines)
    batch = 16  # demo.yaml
    return {"residency": residency, "images_per_s": (last - first) * batch / (seen[last] - seen[first]),
            "steps_timed": last - first, "wall_s": time.perf_counter() - t0,
            "start_line": next((line for line in log.splitlines() if "test slices" in line), "")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=1600)
    ap.add_argument("--slices", type=int, default=40, help="central slices per volume (mrgen-convert --slices)")
    ap.add_argument("--parts", type=int, default=2, help="parts of the array conversion, run side by side")
    ap.add_argument("--limit-gib", type=float, default=1.5, help="memory limit of the streaming training process")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("bench-output/stream"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    manifest = replicated_manifest(args.out, args.volumes)
    slices = ("--slices", str(args.slices), "--test-fraction", "0.1")

    # 1. conversion: one process against the array of parts + merge
    whole, merged = args.out / "store-whole", args.out / "store"
    parts = [args.out / f"part-{k}" for k in range(1, args.parts + 1)]
    for folder in (whole, merged, *parts):
        shutil.rmtree(folder, ignore_errors=True)
    t_one = timed([convert_cmd(manifest, whole, *slices)])
    t_parts = timed([convert_cmd(manifest, part, *slices, "--part", f"{k}/{args.parts}")
                     for k, part in enumerate(parts, start=1)])
    t_merge = timed([[PY, "-m", "mrgen_dist.commands.convert", "merge", *map(str, parts), "--out", str(merged)]])
    a, b = SliceStore(whole), SliceStore(merged)
    assert b.manifest.split == a.manifest.split and b.manifest.counts == a.manifest.counts
    for side in ("train", "test"):
        assert np.array_equal(a.read_split(side).images, b.read_split(side).images), side
    shutil.rmtree(whole)
    for part in parts:
        shutil.rmtree(part)  # the merged store's shards are hard links: their data stays

    # 2. training: stream under the memory limit, device without
    store_bytes = sum(s["bytes"] for s in b.shards)
    limit = int(args.limit_gib * 2**30)
    folder, procs, peak_file = cgroup(limit)
    try:
        drop_from_page_cache(merged)
        stream = train(merged, args.out / "run-stream", "stream", args.steps, args.warmup, procs)
        stream["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        stream["cgroup_peak_bytes"] = int(peak_file.read_text())
    finally:
        time.sleep(0.5)
        folder.rmdir()
    drop_from_page_cache(merged)
    device = train(merged, args.out / "run-device", "device", args.steps, args.warmup, None)

    ratio = stream["images_per_s"] / device["images_per_s"]
    results = {
        "volumes": args.volumes, "slices_per_volume": args.slices, "store_bytes": store_bytes,
        "limit_bytes": limit, "store_over_limit": store_bytes / limit,
        "convert_one_process_s_per_1000_volumes": t_one / args.volumes * 1000,
        "convert_array_s_per_1000_volumes": (t_parts + t_merge) / args.volumes * 1000,
        "convert_parts": args.parts, "merge_s": t_merge,
        "stream": stream, "device": device, "stream_over_device": ratio,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    gib = 2**30
    ok = lambda good: "met" if good else "MISSED"  # noqa: E731
    print(f"stream benchmark: {args.volumes} volumes x {args.slices} slices, store {store_bytes / gib:.2f} GiB, "
          f"memory limit {args.limit_gib:.2f} GiB ({store_bytes / limit:.1f}x)")
    print(f"  conversion, one process      {t_one / args.volumes * 1000:7.1f} s per 1,000 volumes")
    print(f"  conversion, {args.parts} parts + merge   {(t_parts + t_merge) / args.volumes * 1000:7.1f} s per 1,000 "
          f"volumes (merge {t_merge:.1f} s) -> {t_one / (t_parts + t_merge):.2f}x faster; merged = one process")
    print(f"  training, device (resident)  {device['images_per_s']:7.1f} img/s  ({device['wall_s']:.0f} s in all)")
    print(f"  training, stream (limited)   {stream['images_per_s']:7.1f} img/s  ({stream['wall_s']:.0f} s in all) "
          f"-> {ratio:.2f}x device (target >= 0.80x: {ok(ratio >= 0.8)})")
    print(f"  streaming peak RSS {stream['peak_rss_bytes'] / gib:.2f} GiB, cgroup peak (page cache included) "
          f"{stream['cgroup_peak_bytes'] / gib:.2f} GiB, limit {args.limit_gib:.2f} GiB "
          f"(under it: {ok(stream['peak_rss_bytes'] < limit)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
