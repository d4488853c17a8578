"""The shard file format: one HDF5 file per shard, written atomically, read in one checked pass.

Each shard has two checksums in the manifest: `sha256`, the archival one (`mrgen-convert verify`, resume,
`sha256sum`), and `xxh3_128`, checked on every load because it hashes at ~20 GB/s where sha256 manages
~1.7 GB/s, which would make the check cost more than the read itself.

A shard holds, for n slices:
  images       float16 (n, 218, 182), contiguous and uncompressed, so a whole shard is one block read
  scanner      int16 (n,)   label id in the store's vocabulary
  subject      str (n,)
  slice_index  int16 (n,)   axial voxel index k on the MNI grid
  source       str (n,)     input path the slice came from
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import xxhash

from mrgen_dist.atomic import atomic_path

IMAGE_DTYPE = np.float16
_STR = h5py.string_dtype("utf-8")


@dataclass
class ShardArrays:
    images: np.ndarray
    scanner: np.ndarray
    subject: np.ndarray
    slice_index: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.scanner)


def shard_image(arrays: ShardArrays, attrs: dict[str, str]) -> bytes:
    """The bytes of the shard file, built in memory (the same bytes h5py would write to disk)."""
    with h5py.File("shard.h5", "w", libver="latest", driver="core", backing_store=False) as f:
        f.create_dataset("images", data=arrays.images.astype(IMAGE_DTYPE, copy=False))
        f.create_dataset("scanner", data=arrays.scanner.astype(np.int16))
        f.create_dataset("subject", data=arrays.subject.astype(object), dtype=_STR)
        f.create_dataset("slice_index", data=arrays.slice_index.astype(np.int16))
        f.create_dataset("source", data=arrays.source.astype(object), dtype=_STR)
        f.attrs.update(attrs)
        f.flush()
        return f.id.get_file_image()


def write_shard(path: Path, arrays: ShardArrays, attrs: dict[str, str]) -> dict[str, str]:
    """Write atomically (temporary name, fsync, rename); returns the digests of the bytes renamed into place.

    The file is built in memory and written with plain file I/O, so that a failed write (disk full, quota,
    file too large) is an ordinary OSError naming the file; HDF5 itself never meets one (when it does, it
    leaves its objects in a state that ends the process with a crash). The temporary file is then removed
    and `path` left as it was.
    """
    image = shard_image(arrays, attrs)
    digests = {"sha256": hashlib.sha256(image).hexdigest(), "xxh3_128": xxhash.xxh3_128(image).hexdigest()}
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as fh:
                fh.write(image)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None
    return digests


def file_digests(path: Path, block: int = 8 << 20, names: tuple[str, ...] = ("sha256", "xxh3_128")
                 ) -> dict[str, str]:
    """The digests `names` (sha256, xxh3_128) of a file, in one read."""
    makers = {"sha256": hashlib.sha256, "xxh3_128": xxhash.xxh3_128}
    hashers = {name: makers[name]() for name in names}
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        view = memoryview(buf)
        while n := f.readinto(buf):
            for hasher in hashers.values():
                hasher.update(view[:n])
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def read_labels(f: h5py.File) -> ShardArrays:
    """The small per-slice arrays of an open shard; `images` left as the lazy h5py dataset."""
    return ShardArrays(
        images=f["images"],
        scanner=f["scanner"][...].astype(np.int64),
        subject=f["subject"].asstr()[...],
        slice_index=f["slice_index"][...].astype(np.int64),
        source=f["source"].asstr()[...],
    )


class ShardChecksumError(OSError):
    """A shard whose bytes do not hash to the expected digest."""


def read_selected_rows(
    path: Path, expected_xxh3: str, select: Callable[[ShardArrays], np.ndarray], out: np.ndarray
) -> tuple[ShardArrays, int]:
    """Read the rows of a shard that `select(labels)` keeps into `out[:m]`, checking the whole file's xxh3.

    The file is streamed once in order: the selected rows land directly in `out` (no staging copy), the rest
    passes through a small scratch buffer, and every byte goes through the hash. Returns the kept labels
    (images set to `out[:m]`) and m. The checksum is judged before any parse error, so corruption is
    reported as such; nothing read is returned unless the whole file matched.
    """
    try:
        with h5py.File(path, "r") as f:
            labels = read_labels(f)
            ds = f["images"]
            offset, shape, contiguous = ds.id.get_offset(), ds.shape, ds.chunks is None and ds.compression is None
    except Exception:
        if file_digests(path)["xxh3_128"] != expected_xxh3:
            raise ShardChecksumError(f"{path}: checksum mismatch") from None
        raise
    if not contiguous or offset is None:
        raise ValueError(f"{path}: images are chunked or compressed; shards are written contiguous")
    keep = select(labels)
    m = int(keep.sum())
    if m > len(out):
        raise ValueError(f"{path}: {m} selected rows do not fit in {len(out)}")
    row_bytes = int(np.prod(shape[1:])) * IMAGE_DTYPE().itemsize
    hasher = xxhash.xxh3_128()
    scratch = memoryview(bytearray(4 << 20))

    with open(path, "rb", buffering=0) as fh:

        def read(view: memoryview) -> None:
            while len(view):
                n = fh.readinto(view)
                if not n:
                    raise ShardChecksumError(f"{path}: file shorter than its image block")
                hasher.update(view[:n])
                view = view[n:]

        def skip(nbytes: int) -> None:
            while nbytes > 0:
                chunk = min(nbytes, len(scratch))
                read(scratch[:chunk])
                nbytes -= chunk

        skip(offset)
        dest = out.reshape(-1).view(np.uint8)  # out is C-contiguous: row r starts at byte r * row_bytes
        filled = 0
        edges = np.flatnonzero(np.diff(np.concatenate([[False], keep, [False]]).astype(np.int8)))
        row = 0
        for start, stop in zip(edges[::2], edges[1::2], strict=True):  # runs of kept rows
            skip((start - row) * row_bytes)
            read(memoryview(dest[filled * row_bytes : (filled + stop - start) * row_bytes]))
            filled += stop - start
            row = stop
        skip((len(labels) - row) * row_bytes)
        while n := fh.readinto(scratch):
            hasher.update(scratch[:n])
    if hasher.hexdigest() != expected_xxh3:
        raise ShardChecksumError(f"{path}: checksum mismatch")
    kept = ShardArrays(out[:m], labels.scanner[keep], labels.subject[keep], labels.slice_index[keep], labels.source[keep])
    return kept, m
