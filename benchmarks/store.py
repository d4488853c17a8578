"""Slice-store benchmark: three ratios measured in one run on this machine.

1. conversion time per volume (1 worker: load, checks, scaling, slicing, shard write) vs the bare
   `nibabel.load(path).get_fdata(dtype=float32)` of the same files (target: <= 1.3x);
2. loading a whole split from the store (one pass, sha256 checked) vs `np.load` of the same array from a
   .npy file (target: >= 0.5x the speed of np.load);
3. batches per second drawn from the resident split tensor (seeded per-rank indices, fp16 -> fp32).

The cohort is the synthetic demo cohort; a manifest CSV lists its files several times under distinct
subject ids so the store reaches a size where reads are not dominated by fixed costs.

    python benchmarks/store.py [--volumes 120] [--out bench-output/store]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from cohort import replicated_manifest  # benchmarks/cohort.py

from mrgen_dist.data.convert import ConvertOptions, convert
from mrgen_dist.data.epochs import epoch_indices
from mrgen_dist.data.inputs import read_manifest
from mrgen_dist.data.store import SliceStore
from mrgen_dist.scanners import Vocabulary


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=120, help="volumes in the benchmark store")
    ap.add_argument("--unique", type=int, default=2, help="distinct demo subjects per scanner")
    ap.add_argument("--out", type=Path, default=Path("bench-output/store"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    manifest = replicated_manifest(args.out, args.volumes, args.unique)
    files = sorted((args.out / "cohort").glob("*.nii.gz"))
    volumes = read_manifest(manifest)

    # 1. conversion vs bare nibabel load, same files, page cache warm for both
    for p in files:
        nib.load(p).get_fdata(dtype=np.float32)
    t0 = time.perf_counter()
    for v in volumes:
        nib.load(v.path).get_fdata(dtype=np.float32)
    bare = (time.perf_counter() - t0) / len(volumes)
    store_dir = args.out / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    t0 = time.perf_counter()
    convert(volumes, Vocabulary.method(), store_dir, ConvertOptions(shard_volumes=100, workers=1))
    conv = (time.perf_counter() - t0) / len(volumes)
    shutil.rmtree(store_dir)
    t0 = time.perf_counter()
    convert(volumes, Vocabulary.method(), store_dir, ConvertOptions(shard_volumes=100, workers=2))
    conv2 = (time.perf_counter() - t0) / len(volumes)

    # 2. whole train split from the store vs np.load of the same array
    store = SliceStore(store_dir)
    train = store.load_split("train")
    npy = args.out / "train.npy"
    np.save(npy, train.images.numpy())
    nbytes = train.images.numel() * train.images.element_size()
    t_store = _best_of(lambda: store.load_split("train"), 5)
    t_npy = _best_of(lambda: np.load(npy), 5)
    npy.unlink()

    # 3. batches per second from the resident tensor, as the training loop draws them
    rates = {}
    for batch in (8, 64):
        order = torch.from_numpy(epoch_indices(len(train), rank=0, world_size=1, epoch=0, seed=0))
        n_batches = 2000
        t0 = time.perf_counter()
        for b in range(n_batches):
            start = (b * batch) % (len(order) - batch)
            x = train.images.index_select(0, order[start : start + batch]).float()
        rates[batch] = n_batches / (time.perf_counter() - t0)
        assert x.shape == (batch, 218, 182)

    results = {
        "volumes": len(volumes),
        "train_slices": len(train),
        "train_bytes": nbytes,
        "bare_load_s_per_volume": bare,
        "convert_s_per_volume_1_worker": conv,
        "convert_s_per_volume_2_workers": conv2,
        "convert_vs_bare_ratio": conv / bare,
        "store_load_s": t_store,
        "npy_load_s": t_npy,
        "store_vs_npy_speed": t_npy / t_store,
        "batches_per_s": rates,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    mb = nbytes / 2**20
    ok = lambda good: "met" if good else "MISSED"  # noqa: E731
    print(f"store benchmark: {len(volumes)} volumes, train split {len(train)} slices ({mb:.0f} MiB fp16)")
    print(f"  bare nibabel load          {bare * 1e3:7.1f} ms/volume")
    print(f"  conversion, 1 worker       {conv * 1e3:7.1f} ms/volume  -> {conv / bare:.2f}x bare load "
          f"(target <= 1.30x: {ok(conv / bare <= 1.3)})")
    print(f"  conversion, 2 workers      {conv2 * 1e3:7.1f} ms/volume  (wall time per volume)")
    print(f"  np.load of the split       {t_npy * 1e3:7.1f} ms ({mb / t_npy:.0f} MiB/s)")
    print(f"  store.load_split (checked) {t_store * 1e3:7.1f} ms ({mb / t_store:.0f} MiB/s) -> "
          f"{t_npy / t_store:.2f}x np.load speed (target >= 0.50x: {ok(t_npy / t_store >= 0.5)})")
    print(f"  resident batches/s         batch 8: {rates[8]:,.0f}/s   batch 64: {rates[64]:,.0f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
