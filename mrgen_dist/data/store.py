"""Reading a slice store: manifest checks, one-pass split loading, the per-slice index, verification.

A store is a folder:
  manifest.json          vocabulary, conversion params, shards with sha256, split, counts, store_sha256
  rejected.csv           inputs that were not converted, with the reason
  shards/shard-NNNNN.h5  the slices (format in `mrgen_dist.data.shards`)

`store_sha256` is the store's identity: a hash over every other field of the manifest (format 2; format 1
covered the vocabulary, conversion params, the shards' own sha256 and the split). Checkpoints, exported
models and FID caches record it. The manifest's format, its fields and that hash are defined once, in
`mrgen_dist.artifacts.StoreManifest`. Writing a store (lock, staging, replacement) is `mrgen_dist.data.convert`.

Elsewhere: `mrgen_dist.data.summary` (table and preview), `mrgen_dist.data.epochs` (per-rank views).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import h5py
import numpy as np

from mrgen_dist.artifacts import ArtifactError, StoreManifest
from mrgen_dist.cli import UserError
from mrgen_dist.data.shards import ShardArrays, ShardChecksumError, file_digests, read_labels, read_selected_rows
from mrgen_dist.data.split import holdout_mask
from mrgen_dist.data.volume import SLICE_SHAPE
from mrgen_dist.scanners import Vocabulary

if TYPE_CHECKING:
    import torch

REJECTED_NAME = "rejected.csv"

Side = Literal["train", "test", "all"]


class StoreError(UserError):
    """A store that cannot be used as it is; the message says what is wrong."""


@dataclass
class SplitArrays:
    """A split resident in memory as numpy arrays, in store order (no torch: mrgen-translate reads stores)."""

    images: np.ndarray  # float16 (N, 218, 182) in [0, 1]
    scanner: np.ndarray  # int64 (N,)
    subject: np.ndarray  # str (N,)
    slice_index: np.ndarray  # int (N,)
    vocabulary: Vocabulary

    def __len__(self) -> int:
        return len(self.scanner)


@dataclass
class SplitData(SplitArrays):
    """A split resident in memory: one image tensor and its labels, in store order (torch, for training)."""

    images: torch.Tensor  # float16 (N, 218, 182) in [0, 1]
    scanner: torch.Tensor  # int64 (N,)

    def of_scanners(self, ids: list[int]) -> SplitData:
        """The slices of the scanners `ids` (this split itself when that is all of them)."""
        keep = np.isin(self.scanner.numpy(), ids)
        if keep.all():
            return self
        import torch

        rows = torch.from_numpy(np.flatnonzero(keep))
        return SplitData(self.images[rows], self.scanner[rows], self.subject[keep], self.slice_index[keep],
                         self.vocabulary)


@dataclass
class SliceIndex:
    """Per-slice labels of the whole store (no pixels), in store order."""

    shard: np.ndarray  # int, position in manifest.shards
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
        path = self.root / StoreManifest.NAME
        if not path.is_file():
            hint = " (conversion unfinished or not a store; run mrgen-convert)" if self.root.is_dir() else ""
            raise StoreError(f"{self.root}: no {StoreManifest.NAME}{hint}")
        try:
            self.manifest = StoreManifest.read(path)
        except ArtifactError as e:
            raise StoreError(str(e)) from None
        try:
            self.vocabulary = Vocabulary.from_names(self.manifest.vocabulary)
        except ValueError as e:
            raise StoreError(f"{path}: field 'vocabulary': {e}") from None

    @property
    def sha256(self) -> str:
        return self.manifest.store_sha256

    @property
    def shards(self) -> list[dict]:
        return self.manifest.shards

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
                raise StoreError(
                    f"{self.shard_path(i)}: unreadable shard ({e}); run `mrgen-convert verify {self.root}`"
                ) from None
        n = [len(p) for p in parts]
        subject = np.concatenate([p.subject for p in parts]) if parts else np.array([], dtype=object)
        return SliceIndex(
            shard=np.repeat(np.arange(len(parts)), n),
            row=np.concatenate([np.arange(k) for k in n]),
            scanner=np.concatenate([p.scanner for p in parts]),
            subject=subject,
            slice_index=np.concatenate([p.slice_index for p in parts]),
            is_test=holdout_mask(self.manifest.split, subject),
        )

    def expected_count(self, side: Side, scanner: str | None) -> int:
        counts = self.manifest.split_counts
        sides = ("train", "test") if side == "all" else (side,)
        names = [scanner] if scanner else self.vocabulary.names
        return sum(counts[s].get(name, 0) for s in sides for name in names)

    def load_split(self, side: Side = "train", scanner: str | None = None) -> SplitData:
        """One side of the split (optionally one scanner) as one resident tensor, read in one pass (`read_split`)."""
        import torch

        arrays = self.read_split(side, scanner)
        return SplitData(images=torch.from_numpy(arrays.images), scanner=torch.from_numpy(arrays.scanner),
                         subject=arrays.subject, slice_index=arrays.slice_index, vocabulary=arrays.vocabulary)

    def read_split(self, side: Side = "train", scanner: str | None = None) -> SplitArrays:
        """One side of the split (optionally one scanner) as numpy arrays, read in one pass.

        Every shard is read once; its checksum is computed from the same bytes and checked against the
        manifest, so a corrupt store is refused rather than trained on.
        """
        scanner_id = self.vocabulary.index(scanner) if scanner is not None else None
        n_expected = self.expected_count(side, scanner)
        images = np.empty((n_expected, *SLICE_SHAPE), dtype=np.float16)
        labels = []
        filled = offset = 0

        def select(shard_labels: ShardArrays) -> np.ndarray:
            is_test = holdout_mask(self.manifest.split, shard_labels.subject, offset)
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
        return SplitArrays(
            images=images,
            scanner=np.concatenate([k.scanner for k in labels]).astype(np.int64),
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
        counts = self.manifest.counts
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
                want = self.manifest.split_counts[side].get(name, 0)
                if got != want:
                    problems.append(f"{side} split, scanner {name!r}: {got} slices, manifest says {want}")
        return problems
