"""Where a training split lives (mrgen_dist/data/residency.py): the streamed rows are the resident ones bit for
bit, a shard's checksum is checked once per process and a mismatch names the shard, the read-ahead keeps order
and bounds, and `auto` picks by size."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import xxhash

from mrgen_dist.data import residency
from mrgen_dist.data.epochs import epoch_indices
from mrgen_dist.data.residency import (
    ResidentSplit,
    StreamedSplit,
    choose_residency,
    first_of_each_scanner,
    open_split,
    prefetched,
    split_bytes,
)
from mrgen_dist.data.store import SliceStore, StoreError

CPU = torch.device("cpu")
ALL = [0, 1, 2, 3]


@pytest.mark.parametrize("side", ["train", "test"])
def test_every_residency_serves_the_same_batches(store_dir: Path, side: str) -> None:
    store = SliceStore(store_dir)
    splits = {name: open_split(store, side, [1, 3] if side == "train" else ALL, name, CPU, prefetch=2)
              for name in ("device", "host", "stream")}
    assert len({len(s) for s in splits.values()}) == 1
    n = len(splits["device"])
    order = epoch_indices(n, rank=1, world_size=2, epoch=3, seed=0)  # one rank's share, shuffled across shards
    positions = [order[i : i + 5] for i in range(0, len(order), 5)]
    served = {name: list(split.batches(positions)) for name, split in splits.items()}
    for name in ("host", "stream"):
        for a, b in zip(served["device"], served[name], strict=True):
            assert a.images.dtype == b.images.dtype == torch.float16, name
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), name
    # each slice's level is its axial index in the store
    index = store.index
    rows = np.flatnonzero(index.select(side, None) & np.isin(index.scanner, [1, 3] if side == "train" else ALL))
    assert torch.equal(served["device"][0].level, torch.from_numpy(index.slice_index[rows][positions[0]]))
    preview = {name: first_of_each_scanner(split) for name, split in splits.items()}
    assert all(torch.equal(x, y) for p in preview.values() for x, y in zip(preview["device"], p, strict=True))
    levels = np.unique(index.slice_index)
    assert (preview["device"].level == int(levels[len(levels) // 2])).all()  # the middle level


def test_a_shard_is_hashed_once_per_process_and_a_mismatch_names_it(store_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = []
    real = xxhash.xxh3_128

    def counting() -> object:
        hashed.append(1)
        return real()

    monkeypatch.setattr(xxhash, "xxh3_128", counting)
    store = SliceStore(store_dir)
    split = StreamedSplit(store, "train", ALL, CPU, prefetch=2)
    everything = np.arange(len(split))
    for _ in range(3):
        split.read(everything)
    assert len(hashed) == len(store.shards)  # each shard once, however many batches read it

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    shard = sorted((copy / "shards").glob("*.h5"))[1]
    shard.chmod(0o644)
    with h5py.File(shard, "r") as f:
        pixel = f["images"].id.get_offset() + 1000  # a pixel, not the labels that opening the store reads
    raw = bytearray(shard.read_bytes())
    raw[pixel] ^= 0xFF
    shard.write_bytes(raw)
    damaged = StreamedSplit(SliceStore(copy), "train", ALL, CPU, prefetch=2)
    in_first = np.flatnonzero(damaged.shard == 0)
    assert damaged.read(in_first).shape == (len(in_first), 218, 182)  # the sound shard reads
    with pytest.raises(StoreError, match=rf"{shard.name}: checksum mismatch"):
        list(damaged.batches([np.flatnonzero(damaged.shard == 1)]))


def test_prefetch_keeps_order_bounds_its_lead_and_raises_at_the_item() -> None:
    started: list[int] = []
    consumed: list[int] = []
    lead = []
    lock = threading.Lock()

    def load(item: np.ndarray) -> int:
        with lock:
            started.append(int(item[0]))
        time.sleep(0.002)
        return int(item[0]) * 10

    for value in prefetched(load, (np.array([i]) for i in range(20)), depth=3):
        consumed.append(value)
        time.sleep(0.005)
        with lock:
            lead.append(len(started) - len(consumed))
    assert consumed == [i * 10 for i in range(20)]
    assert max(lead) <= 3

    def failing(item: np.ndarray) -> int:
        if item[0] == 4:
            raise StoreError("shard-00004.h5: checksum mismatch")
        return int(item[0])

    got = []
    with pytest.raises(StoreError, match="shard-00004"):
        for value in prefetched(failing, (np.array([i]) for i in range(10)), depth=2):
            got.append(value)
    assert got == [0, 1, 2, 3]


def test_auto_picks_by_size(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SliceStore(store_dir)
    nbytes = sum(split_bytes(store, side, store.vocabulary.names) for side in ("train", "test"))
    assert nbytes == 120 * 218 * 182 * 2  # 12 volumes x 10 slices, float16
    monkeypatch.setattr(residency, "available_host_bytes", lambda: 8 * nbytes)
    assert choose_residency("auto", nbytes, CPU, local_processes=1) == "device"
    assert choose_residency("auto", nbytes, CPU, local_processes=4) == "device"  # 8 / 4 x 0.5 = exactly it
    assert choose_residency("auto", nbytes, CPU, local_processes=5) == "stream"
    assert choose_residency("stream", nbytes, CPU, local_processes=1) == "stream"
    assert isinstance(open_split(store, "test", ALL, "host", CPU), ResidentSplit)
    with pytest.raises(ValueError, match="residency"):
        open_split(store, "test", ALL, "auto", CPU)
