"""The shard file format: one HDF5 file per shard, written atomically, read in one checked pass.

A shard holds, for n slices:
  images       float16 (n, 218, 182), contiguous and uncompressed, so a whole shard is one block read
  scanner      int16 (n,)   label id in the store's vocabulary
  subject      str (n,)
  slice_index  int16 (n,)   axial voxel index k on the MNI grid
  source       str (n,)     input path the slice came from
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

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


def write_shard(path: Path, arrays: ShardArrays, attrs: dict[str, str]) -> str:
    """Write atomically (temporary name, fsync, rename); returns the file's sha256."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(tmp, "w", libver="latest") as f:
            f.create_dataset("images", data=arrays.images.astype(IMAGE_DTYPE, copy=False))
            f.create_dataset("scanner", data=arrays.scanner.astype(np.int16))
            f.create_dataset("subject", data=arrays.subject.astype(object), dtype=_STR)
            f.create_dataset("slice_index", data=arrays.slice_index.astype(np.int16))
            f.create_dataset("source", data=arrays.source.astype(object), dtype=_STR)
            f.attrs.update(attrs)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        digest = sha256_file(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


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
    """A shard whose bytes do not hash to the expected sha256."""


def read_shard_checked(path: Path, expected_sha256: str) -> ShardArrays:
    """Read a whole shard into memory in one pass, refusing it unless its bytes hash to `expected_sha256`.

    The file is read once into a buffer; hashing runs in a thread (hashlib releases the GIL) while the
    images are taken straight out of the same buffer, so verification costs no second read. The checksum
    is judged before any parse error, so corruption is reported as such.
    """
    size = path.stat().st_size
    buf = bytearray(size)
    with open(path, "rb", buffering=0) as fh:
        got = fh.readinto(buf)
    if got != size:
        raise OSError(f"{path}: read {got} of {size} bytes")
    digest: list[str] = []
    hasher = threading.Thread(target=lambda: digest.append(hashlib.sha256(buf).hexdigest()))
    hasher.start()
    try:
        with h5py.File(path, "r") as f:  # labels and the images' byte offset; the pixels come from buf
            arrays = read_labels(f)
            ds = f["images"]
            offset = ds.id.get_offset()
            if ds.chunks is None and ds.compression is None and offset is not None:
                images = np.frombuffer(buf, dtype=ds.dtype, count=int(np.prod(ds.shape)), offset=offset)
                arrays.images = images.reshape(ds.shape)
            else:  # a shard written by other tools may be chunked; still correct, just slower
                arrays.images = ds[...]
    except Exception:
        hasher.join()
        if digest[0] != expected_sha256:
            raise ShardChecksumError(f"{path}: sha256 mismatch") from None
        raise
    hasher.join()
    if digest[0] != expected_sha256:
        raise ShardChecksumError(f"{path}: sha256 mismatch")
    return arrays
