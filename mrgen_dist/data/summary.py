"""What a store holds, for people: a per-scanner table (`store_summary`) and a PNG of real slices (`write_preview`)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from mrgen_dist.data.store import REJECTED_NAME, SliceStore

PREVIEW_NAME = "preview.png"


def _synthetic(store: SliceStore) -> bool:
    return bool(store.manifest.inputs.get("synthetic"))


def store_summary(store: SliceStore) -> str:
    """Per-scanner volumes and slices, split sizes and rejected inputs, as a small table."""
    m = store.manifest
    c, sc, split = m.counts, m.split_counts, m.split
    width = max(len(n) for n in (*store.vocabulary.names, "scanner", "total"))
    lines = [
        f"store {store.root}  sha256 {store.sha256[:16]}  ({len(store.shards)} shards)"
        + ("  [SYNTHETIC demo data]" if _synthetic(store) else ""),
        f"split by {split['unit']}, test fraction {split['test_fraction']}, seed {split['seed']}",
        f"{'scanner':<{width}}  {'volumes':>7}  {'slices':>7}  {'train':>7}  {'test':>6}",
    ]
    for name in store.vocabulary.names:
        per = c["per_scanner"].get(name, {"volumes": 0, "slices": 0})
        lines.append(
            f"{name:<{width}}  {per['volumes']:>7}  {per['slices']:>7}  "
            f"{sc['train'].get(name, 0):>7}  {sc['test'].get(name, 0):>6}"
        )
    lines.append(
        f"{'total':<{width}}  {c['volumes']:>7}  {c['slices']:>7}  "
        f"{sum(sc['train'].values()):>7}  {sum(sc['test'].values()):>6}"
    )
    lines.append(f"rejected inputs: {c['rejected']}" + (f" (see {REJECTED_NAME})" if c["rejected"] else ""))
    return "\n".join(lines)


def write_preview(store: SliceStore, path: Path | None = None, per_scanner: int = 6) -> Path:
    """A PNG grid of real slices, one row per scanner (the middle slice of the first training subjects)."""
    from mrgen_dist.plots import scanner_grid

    idx = store.index
    mid = int(np.median(idx.slice_index)) if len(idx.slice_index) else 0
    rows, captions = [], []
    for sid, name in enumerate(store.vocabulary.names):
        pick = np.flatnonzero((idx.scanner == sid) & (idx.slice_index == mid))[:per_scanner]
        images = []
        for i in pick:
            with h5py.File(store.shard_path(int(idx.shard[i])), "r") as f:
                images.append(f["images"][int(idx.row[i])])
        rows.append((name, np.asarray(images)))
        captions.append([str(idx.subject[i]) for i in pick])
    synthetic = " (SYNTHETIC demo data)" if _synthetic(store) else ""
    title = f"slice store {store.sha256[:12]}: axial slice k={mid}{synthetic}"
    return scanner_grid(rows, path or store.root / PREVIEW_NAME, title, captions)
