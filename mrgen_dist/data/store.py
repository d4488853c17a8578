"""Reading a slice store: manifest, checks, one-pass split loading, per-rank views, DataLoader access.

A store is a folder:
  manifest.json          vocabulary, conversion params, shards with sha256, split, counts, store_sha256
  rejected.csv           inputs that were not converted, with the reason
  shards/shard-NNNNN.h5  the slices (format in `mrgen_dist.data.shards`)

`store_sha256` is the store's identity: a hash over the vocabulary, conversion params, the shards' own
sha256 and the split. Checkpoints, exported models and FID caches record it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch

from mrgen_dist.data.shards import ShardArrays, ShardChecksumError, file_digests, read_labels, read_selected_rows
from mrgen_dist.data.split import holdout_mask
from mrgen_dist.data.volume import SLICE_SHAPE
from mrgen_dist.scanners import Vocabulary

MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.csv"
FORMAT = "mrgen-slice-store"
FORMAT_VERSION = 1
_IDENTITY_KEYS = ("format_version", "vocabulary", "params", "shards", "split")

Side = Literal["train", "test", "all"]


class StoreError(RuntimeError):
    """A store that cannot be used as it is; the message says what is wrong."""


def compute_store_sha256(manifest: dict) -> str:
    identity = {k: manifest[k] for k in _IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class SplitData:
    """A split resident in memory: one image tensor and its labels, in store order."""

    images: torch.Tensor  # float16 (N, 218, 182) in [0, 1]
    scanner: torch.Tensor  # int64 (N,)
    subject: np.ndarray  # str (N,)
    slice_index: np.ndarray  # int (N,)
    vocabulary: Vocabulary

    def __len__(self) -> int:
        return len(self.scanner)


@dataclass
class SliceIndex:
    """Per-slice labels of the whole store (no pixels), in store order."""

    shard: np.ndarray  # int, position in manifest["shards"]
    row: np.ndarray  # int, row inside the shard
    scanner: np.ndarray
    subject: np.ndarray
    slice_index: np.ndarray
    is_test: np.ndarray  # bool

    def select(self, side: Side, scanner_id: int | None) -> np.ndarray:
        return _keep(self.is_test, self.scanner, side, scanner_id)


def _keep(is_test: np.ndarray, scanner: np.ndarray, side: Side, scanner_id: int | None) -> np.ndarray:
    """Slices on `side` of the split (all for "all"), of one scanner when `scanner_id` is given."""
    keep = np.ones(len(is_test), dtype=bool) if side == "all" else is_test == (side == "test")
    if scanner_id is not None:
        keep &= scanner == scanner_id
    return keep


class SliceStore:
    """An opened store. Opening checks the manifest; loading a split checks every shard it reads."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST_NAME
        if not path.is_file():
            hint = " (conversion unfinished or not a store; run mrgen-convert)" if self.root.is_dir() else ""
            raise StoreError(f"{self.root}: no {MANIFEST_NAME}{hint}")
        try:
            self.manifest: dict = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{path}: unreadable manifest ({e})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest (format={self.manifest.get('format')!r}, "
                f"version={self.manifest.get('format_version')!r})"
            )
        missing = [k for k in (*_IDENTITY_KEYS, "store_sha256", "counts") if k not in self.manifest]
        if missing:
            raise StoreError(f"{path}: manifest lacks {', '.join(missing)}")
        shard_keys = {"file", "sha256", "xxh3_128", "bytes", "slices"}
        if any(not shard_keys <= set(shard) for shard in self.manifest["shards"]):
            raise StoreError(f"{path}: shard entries need {', '.join(sorted(shard_keys))} (convert again with this version)")
        if compute_store_sha256(self.manifest) != self.manifest["store_sha256"]:
            raise StoreError(f"{path}: manifest does not match its store_sha256 (edited or corrupt)")
        self.vocabulary = Vocabulary.from_names(self.manifest["vocabulary"])

    @property
    def sha256(self) -> str:
        return self.manifest["store_sha256"]

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def shard_path(self, i: int) -> Path:
        return self.root / self.shards[i]["file"]

    @cached_property
    def index(self) -> SliceIndex:
        parts = []
        for i in range(len(self.shards)):
            try:
                with h5py.File(self.shard_path(i), "r") as f:
                    parts.append(read_labels(f))
            except (OSError, KeyError) as e:
                raise StoreError(f"{self.shard_path(i)}: unreadable shard ({e}); run `mrgen-convert verify {self.root}`") from None
        n = [len(p) for p in parts]
        subject = np.concatenate([p.subject for p in parts]) if parts else np.array([], dtype=object)
        return SliceIndex(
            shard=np.repeat(np.arange(len(parts)), n),
            row=np.concatenate([np.arange(k) for k in n]),
            scanner=np.concatenate([p.scanner for p in parts]),
            subject=subject,
            slice_index=np.concatenate([p.slice_index for p in parts]),
            is_test=holdout_mask(self.manifest["split"], subject),
        )

    def expected_count(self, side: Side, scanner: str | None) -> int:
        counts = self.manifest["split_counts"]
        sides = ("train", "test") if side == "all" else (side,)
        names = [scanner] if scanner else self.vocabulary.names
        return sum(counts[s].get(name, 0) for s in sides for name in names)

    def load_split(self, side: Side = "train", scanner: str | None = None) -> SplitData:
        """One side of the split (optionally one scanner) as one resident tensor, read in one pass.

        Every shard is read once; its sha256 is computed from the same bytes and checked against the
        manifest, so a corrupt store is refused rather than trained on.
        """
        scanner_id = self.vocabulary.index(scanner) if scanner is not None else None
        n_expected = self.expected_count(side, scanner)
        images = np.empty((n_expected, *SLICE_SHAPE), dtype=np.float16)
        labels = []
        filled = offset = 0

        def select(shard_labels: ShardArrays) -> np.ndarray:
            is_test = holdout_mask(self.manifest["split"], shard_labels.subject, offset)
            return _keep(is_test, shard_labels.scanner, side, scanner_id)

        for i, shard in enumerate(self.shards):
            path = self.shard_path(i)
            try:
                kept, m = read_selected_rows(path, shard["xxh3_128"], select, images[filled:])
            except ShardChecksumError:
                raise StoreError(
                    f"{path}: checksum mismatch (store modified or corrupt since conversion); "
                    f"run `mrgen-convert verify {self.root}`"
                ) from None
            except ValueError as e:  # more rows than the manifest counts
                raise StoreError(f"{self.root}: {e}; the manifest's {side} count is {n_expected}") from None
            labels.append(kept)
            filled += m
            offset += shard["slices"]
        if filled != n_expected:
            raise StoreError(f"{self.root}: manifest counts {n_expected} {side} slices, shards hold {filled}")
        return SplitData(
            images=torch.from_numpy(images),
            scanner=torch.from_numpy(np.concatenate([k.scanner for k in labels]).astype(np.int64)),
            subject=np.concatenate([k.subject for k in labels]),
            slice_index=np.concatenate([k.slice_index for k in labels]),
            vocabulary=self.vocabulary,
        )

    def verify(self) -> list[str]:
        """Every problem found by re-checking checksums, files and counts; empty when the store is sound."""
        problems: list[str] = []
        per_scanner: Counter[str] = Counter()
        total = 0
        for i, shard in enumerate(self.shards):
            path = self.shard_path(i)
            if not path.is_file():
                problems.append(f"{shard['file']}: missing")
                continue
            if path.stat().st_size != shard["bytes"]:
                problems.append(f"{shard['file']}: size {path.stat().st_size} bytes, manifest says {shard['bytes']}")
            digests = file_digests(path)
            bad = [k for k in ("sha256", "xxh3_128") if digests[k] != shard[k]]
            if bad:
                problems.extend(
                    f"{shard['file']}: {k} {digests[k][:12]}… does not match manifest {shard[k][:12]}…" for k in bad
                )
                continue
            try:
                with h5py.File(path, "r") as f:
                    arrays = read_labels(f)
                    shape, dtype = f["images"].shape, f["images"].dtype
            except Exception as e:  # noqa: BLE001 - report any unreadable shard as a problem
                problems.append(f"{shard['file']}: unreadable HDF5 ({e})")
                continue
            if shape != (len(arrays), *SLICE_SHAPE) or dtype != np.float16:
                problems.append(f"{shard['file']}: images {shape} {dtype}, expected ({len(arrays)}, 218, 182) float16")
            if len(arrays) != shard["slices"]:
                problems.append(f"{shard['file']}: {len(arrays)} slices, manifest says {shard['slices']}")
            bad_ids = arrays.scanner[(arrays.scanner < 0) | (arrays.scanner >= len(self.vocabulary))]
            if bad_ids.size:
                problems.append(f"{shard['file']}: scanner ids {sorted(set(bad_ids.tolist()))} outside the vocabulary")
                continue
            per_scanner.update(self.vocabulary.names[s] for s in arrays.scanner)
            total += len(arrays)
        if problems:
            return problems
        counts = self.manifest["counts"]
        if total != counts["slices"]:
            problems.append(f"store holds {total} slices, manifest says {counts['slices']}")
        for name in self.vocabulary.names:
            want = counts["per_scanner"].get(name, {}).get("slices", 0)
            if per_scanner[name] != want:
                problems.append(f"scanner {name!r}: {per_scanner[name]} slices, manifest says {want}")
        idx = self.index
        for side in ("train", "test"):
            for sid, name in enumerate(self.vocabulary.names):
                got = int(idx.select(side, sid).sum())
                want = self.manifest["split_counts"][side].get(name, 0)
                if got != want:
                    problems.append(f"{side} split, scanner {name!r}: {got} slices, manifest says {want}")
        return problems

    def summary(self) -> str:
        """Per-scanner volumes and slices, split sizes and rejected inputs, as a small table."""
        c = self.manifest["counts"]
        sc = self.manifest["split_counts"]
        split = self.manifest["split"]
        width = max(len(n) for n in (*self.vocabulary.names, "scanner", "total"))
        lines = [
            f"store {self.root}  sha256 {self.sha256[:16]}  ({len(self.shards)} shards)"
            + ("  [SYNTHETIC demo data]" if self.manifest.get("inputs", {}).get("synthetic") else ""),
            f"split by {split['unit']}, test fraction {split['test_fraction']}, seed {split['seed']}",
            f"{'scanner':<{width}}  {'volumes':>7}  {'slices':>7}  {'train':>7}  {'test':>6}",
        ]
        for name in self.vocabulary.names:
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
    synthetic = " (SYNTHETIC demo data)" if store.manifest.get("inputs", {}).get("synthetic") else ""
    return scanner_grid(
        rows, path or store.root / "preview.png", f"slice store {store.sha256[:12]}: axial slice k={mid}{synthetic}", captions
    )


def epoch_indices(n: int, *, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """This rank's indices into a resident split for one epoch.

    All ranks draw the same seeded permutation of range(n) for (seed, epoch) and take every world_size-th
    element from position `rank`, after dropping the tail so that every rank gets n // world_size indices
    (equal step counts keep collective ops in lockstep). Ranks are disjoint; together they cover all but
    n % world_size slices, which differ from epoch to epoch.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if n < world_size:
        raise ValueError(f"{n} slices cannot be split over {world_size} ranks")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = n // world_size
    return order[: per_rank * world_size][rank::world_size]


class SliceDataset(torch.utils.data.Dataset):
    """Slice-by-slice access for DataLoader workers (for data that does not fit in memory).

    HDF5 handles are opened lazily inside whichever process reads, never inherited across fork, so any
    number of workers is safe. Items are (image float32 (1, 218, 182), scanner id).
    """

    def __init__(self, store: SliceStore, side: Side = "train", scanner: str | None = None) -> None:
        scanner_id = store.vocabulary.index(scanner) if scanner is not None else None
        keep = store.index.select(side, scanner_id)
        self._paths = [str(store.shard_path(i)) for i in range(len(store.shards))]
        self._shard = store.index.shard[keep]
        self._row = store.index.row[keep]
        self._scanner = store.index.scanner[keep]
        self._files: dict[int, h5py.File] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self._row)

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # first access in this process: drop handles copied from the parent
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = h5py.File(self._paths[shard], "r")
        return self._files[shard]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self._file(int(self._shard[i]))["images"][int(self._row[i])]
        return torch.from_numpy(image.astype(np.float32))[None], int(self._scanner[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_pid": None}
