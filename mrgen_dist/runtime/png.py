"""PNG without an imaging library: an 8-bit greyscale encoder for outputs and a reader of greyscale, grey +
alpha, RGB and RGBA PNGs of 8 or 16 bits (not interlaced) for inputs. Stdlib zlib and numpy."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from mrgen_dist.cli import UserError


class PngError(UserError):
    """A PNG that cannot be read; the message names the file."""


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG (stdlib zlib, no imaging library). [0, 1] -> round(255 x)."""
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    h, w = pixels.shape
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))



def read_png(path: Path) -> np.ndarray:
    """A PNG as float32 (H, W) in [0, 1]: grey, grey + alpha, RGB or RGBA, 8 or 16 bits, not interlaced."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PngError(f"{path}: cannot read ({e.strerror})") from None
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise PngError(f"{path}: not a PNG file")
    chunks, pos = {}, 8
    try:
        while pos < len(data):
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            chunks.setdefault(kind, []).append(data[pos + 8 : pos + 8 + length])
            pos += 12 + length
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
        raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    except (struct.error, KeyError, zlib.error) as e:
        raise PngError(f"{path}: corrupt PNG ({type(e).__name__})") from None
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if channels is None or depth not in (8, 16) or interlace:
        raise PngError(f"{path}: unsupported PNG (colour type {colour}, {depth} bits, interlace {interlace}); "
                             "use 8- or 16-bit greyscale or RGB, not interlaced")
    step = channels * depth // 8
    if len(raw) != height * (width * step + 1):
        raise PngError(f"{path}: corrupt PNG (its header says {width}x{height}, {depth}-bit, {channels} "
                             f"channel(s): {height * (width * step + 1)} bytes of rows; its data holds {len(raw)})")
    rows = _unfilter(np.frombuffer(raw, dtype=np.uint8).reshape(height, width * step + 1), step)
    pixels = rows.view(">u2") if depth == 16 else rows
    pixels = pixels.reshape(height, width, channels).astype(np.float32) / (2**depth - 1)
    colours = pixels[..., : 3 if channels >= 3 else 1]  # alpha dropped
    return colours.mean(axis=2)


def _unfilter(rows: np.ndarray, step: int) -> np.ndarray:
    """Undo PNG's per-row filters (None, Sub, Up, Average, Paeth) of `rows` (filter byte first); `step` is
    the bytes per pixel."""
    out = np.zeros((rows.shape[0], rows.shape[1] - 1), dtype=np.uint8)
    previous = np.zeros(out.shape[1], dtype=np.int64)
    for r, row in enumerate(rows):
        kind, line = int(row[0]), row[1:].astype(np.int64)
        if kind == 0:
            current = line
        elif kind == 1:  # Sub: a running sum along the row, per byte of the pixel
            current = np.empty_like(line)
            for j in range(step):
                current[j::step] = np.cumsum(line[j::step])
        elif kind == 2:  # Up
            current = line + previous
        elif kind in (3, 4):  # Average, Paeth: each byte depends on the one decoded before it
            current = line.copy()
            for i in range(len(line)):
                left = current[i - step] % 256 if i >= step else 0
                up, corner = previous[i], previous[i - step] if i >= step else 0
                if kind == 3:
                    current[i] += (left + up) // 2
                else:
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    current[i] += left if pa <= pb and pa <= pc else up if pb <= pc else corner
        else:
            raise PngError(f"corrupt PNG: unknown row filter {kind}")
        previous = current % 256
        out[r] = previous
    return out
