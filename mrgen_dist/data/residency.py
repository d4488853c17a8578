"""Where a training split lives (`data.residency`): on the device, in host memory, or streamed from the shards.

* `device`: the whole split is read once (every shard checksum-checked) and kept in device memory; a batch is
  an index into it. The fastest, for splits that fit (IXI + SALD, 10 slices: about 0.9 GB in float16).
* `host`: read once into host memory, a batch copied to the device when it is drawn (GPU runs whose split
  fits the node's memory but not the GPU's).
* `stream`: nothing is read up front but the labels. Each rank reads only the rows its batches need, straight
  from the shards' contiguous image blocks (`os.preadv` at the dataset's offset: no h5py in the hot path), in a
  background thread at most `prefetch` batches ahead of the loop. A shard's checksum (xxh3 over the whole
  file) is checked once per process, the first time a batch needs it; a mismatch is an error naming the shard.
  For cohorts beyond memory (UK Biobank: 40,000 subjects x 10 slices = 32 GB, x 182 slices = 580 GB).
* `auto` (the default): `device` when the split takes at most DEVICE_SHARE of the device's memory (a CUDA
  device) or, on the CPU, HOST_SHARE of the memory available to each of the node's processes; else `host`
  where that fits; else `stream`.

Every residency serves the same batches for the same indices (the loop's seeded per-epoch order,
mrgen_dist.data.epochs), bit for bit, so a run trains the same whatever its residency, and a resumed run
equals an uninterrupted one in each.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import h5py
import numpy as np

from mrgen_dist.data.shards import IMAGE_DTYPE, file_digests
from mrgen_dist.data.store import Side, SliceStore, StoreError
from mrgen_dist.data.volume import SLICE_SHAPE

if TYPE_CHECKING:
    import torch

RESIDENCIES = ("auto", "device", "host", "stream")
#: auto: the largest share of a CUDA device's memory a resident split may take (the model, its optimizer
#: state and activations need the rest).
DEVICE_SHARE = 0.25
#: auto: the largest share of the host memory available to one process (MemAvailable / processes per node)
#: that a split held in host memory may take.
HOST_SHARE = 0.5

T = TypeVar("T")


class Batch(NamedTuple):
    """One batch as the loop gets it, on the device."""

    images: torch.Tensor  # float16 (n, H, W) in [0, 1]
    scanner: torch.Tensor  # int64 (n,)
    level: torch.Tensor  # int64 (n,): each slice's axial index k on the MNI grid (a condition, model.level_condition)


def split_bytes(store: SliceStore, side: Side, scanners: list[str]) -> int:
    """Bytes of one side of the split (of these scanners) in memory, from the manifest's counts."""
    n = sum(store.expected_count(side, name) for name in scanners)
    return n * int(np.prod(SLICE_SHAPE)) * IMAGE_DTYPE().itemsize


def available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (the page cache counts as available), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_residency(requested: str, nbytes: int, device: torch.device, local_processes: int) -> str:
    """The residency of a split of `nbytes` (train + test) for `requested` (see the module doc for `auto`)."""
    if requested != "auto":
        return requested
    host = HOST_SHARE * available_host_bytes() / max(1, local_processes)
    if device.type == "cuda":
        import torch

        if nbytes <= DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory:
            return "device"
        return "host" if nbytes <= host else "stream"
    return "device" if nbytes <= host else "stream"  # on the CPU, device memory is host memory


class ResidentSplit:
    """A split read once into memory (`device` or `host` residency); `batches` indexes it."""

    def __init__(self, store: SliceStore, side: Side, scanner_ids: list[int], device: torch.device,
                 on_device: bool) -> None:
        import torch

        split = store.load_split(side).of_scanners(scanner_ids)
        self.device = device
        self.images = split.images.to(device) if on_device else split.images
        self.scanner = split.scanner.to(device) if on_device else split.scanner
        self.level = torch.from_numpy(split.slice_index.astype(np.int64)).to(self.scanner.device)
        if not on_device and device.type == "cuda":
            self.images = self.images.pin_memory()

    def __len__(self) -> int:
        return len(self.scanner)

    def batches(self, positions: Iterable[np.ndarray]) -> Iterator[Batch]:
        """The Batch of each array of split positions."""
        import torch

        for idx in positions:
            rows = torch.from_numpy(np.asarray(idx)).to(self.images.device)
            yield Batch(*(x[rows].to(self.device, non_blocking=True) for x in (self.images, self.scanner, self.level)))


class StreamedSplit:
    """A split whose rows are read from the shards when a batch needs them (`stream` residency)."""

    def __init__(self, store: SliceStore, side: Side, scanner_ids: list[int], device: torch.device,
                 prefetch: int) -> None:
        import torch

        index = store.index  # the labels of every shard: no pixels
        keep = index.select(side, None) & np.isin(index.scanner, scanner_ids)
        self.store, self.device, self.prefetch = store, device, prefetch
        self.shard, self.row = index.shard[keep], index.row[keep]
        self.scanner = torch.from_numpy(index.scanner[keep].astype(np.int64))
        self.level = torch.from_numpy(index.slice_index[keep].astype(np.int64))
        self.offsets: dict[int, int] = {}  # shard -> byte offset of its image block, once checked
        self.row_bytes = int(np.prod(SLICE_SHAPE)) * IMAGE_DTYPE().itemsize

    def __len__(self) -> int:
        return len(self.scanner)

    def _open(self, shard: int) -> int:
        """The offset of the shard's image block, after its checksum was checked (once per process)."""
        if shard not in self.offsets:
            path = self.store.shard_path(shard)
            expected = self.store.shards[shard]["xxh3_128"]
            try:
                digest = file_digests(path, names=("xxh3_128",))["xxh3_128"]  # as read_selected_rows checks
                with h5py.File(path, "r") as f:
                    ds = f["images"]
                    offset, layout_ok = ds.id.get_offset(), ds.chunks is None and ds.compression is None
            except OSError as e:
                raise StoreError(f"{path}: unreadable shard ({e}); run `mrgen-convert verify {self.store.root}`") \
                    from None
            if digest != expected:
                raise StoreError(f"{path}: checksum mismatch (store modified or corrupt since conversion); run "
                                 f"`mrgen-convert verify {self.store.root}`")
            if not layout_ok or offset is None:
                raise StoreError(f"{path}: images are chunked or compressed; shards are written contiguous")
            self.offsets[shard] = offset
        return self.offsets[shard]

    def read(self, positions: np.ndarray) -> np.ndarray:
        """float16 (n, H, W): the split's rows at `positions`, each read from its shard."""
        out = np.empty((len(positions), *SLICE_SHAPE), dtype=IMAGE_DTYPE)
        shards, rows = self.shard[positions], self.row[positions]
        for shard in np.unique(shards):
            offset = self._open(int(shard))
            path = self.store.shard_path(int(shard))
            fd = os.open(path, os.O_RDONLY)
            try:
                for i in np.flatnonzero(shards == shard):
                    view = memoryview(out[i]).cast("B")
                    if os.preadv(fd, [view], offset + int(rows[i]) * self.row_bytes) != self.row_bytes:
                        raise StoreError(f"{path}: shorter than its image block; run `mrgen-convert verify "
                                         f"{self.store.root}`")
            finally:
                os.close(fd)
        return out

    def batches(self, positions: Iterable[np.ndarray]) -> Iterator[Batch]:
        """As ResidentSplit.batches; the rows are read by a background thread `prefetch` batches ahead."""
        import torch

        def load(idx: np.ndarray) -> Batch:
            rows = torch.from_numpy(idx)
            return Batch(torch.from_numpy(self.read(idx)), self.scanner[rows], self.level[rows])

        for batch in prefetched(load, positions, self.prefetch):
            yield Batch(*(x.to(self.device, non_blocking=True) for x in batch))


def prefetched(load: Callable[[np.ndarray], T], items: Iterable[np.ndarray], depth: int) -> Iterator[T]:
    """load(item) for each item, in order, computed by one background thread at most `depth` items ahead; an
    error of `load` is raised here at its item. Leaving early cancels what was not started."""
    todo = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="mrgen-prefetch") as pool:
        pending: deque[Future[T]] = deque(pool.submit(load, np.asarray(item)) for _, item in zip(range(depth), todo,
                                                                                                 strict=False))
        try:
            while pending:
                future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(load, np.asarray(nxt)))
                yield future.result()
        finally:
            for future in pending:
                future.cancel()


def open_split(store: SliceStore, side: Side, scanner_ids: list[int], residency: str, device: torch.device,
               prefetch: int = 4) -> ResidentSplit | StreamedSplit:
    """One side of the split (of these scanners) with the residency `device`, `host` or `stream`."""
    if residency == "stream":
        return StreamedSplit(store, side, scanner_ids, device, prefetch)
    if residency in ("device", "host"):
        return ResidentSplit(store, side, scanner_ids, device, on_device=residency == "device")
    raise ValueError(f"residency must be one of device, host, stream, got {residency!r}")


def first_of_each_scanner(split: ResidentSplit | StreamedSplit) -> Batch:
    """The first slice of each scanner in the split (in scanner order) at the split's middle level, on the
    device: what the per-epoch preview shows (a translator's inputs; a level-conditioned generator's level),
    without holding the split."""
    scanner, level = split.scanner.cpu().numpy(), split.level.cpu().numpy()
    levels = np.unique(level)
    middle = levels[len(levels) // 2]
    first = np.array([np.flatnonzero((scanner == sid) & (level == middle))[0] for sid in np.unique(scanner)],
                     dtype=np.int64)
    return next(split.batches([first]))
