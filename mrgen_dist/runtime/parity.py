"""Parity draws: a few decoder inputs with their float32 reference images, stored as text in an int8 file's
metadata (`mrgen.parity`) by the exporter and checked by the sampler on the machine that runs the file."""

from __future__ import annotations

import base64
import binascii
import zlib

import numpy as np

from mrgen_dist.artifacts import ArtifactError


def encode_draws(z: np.ndarray, scanner: np.ndarray, images: np.ndarray) -> dict:
    """Parity draws as JSON-able text: z float32 and images float16 (zlib), little-endian, base64."""
    return {
        "scanner": [int(s) for s in scanner],
        "z": base64.b64encode(np.ascontiguousarray(z, dtype="<f4").tobytes()).decode(),
        "image": base64.b64encode(zlib.compress(np.ascontiguousarray(images, dtype="<f2").tobytes(), 9)).decode(),
    }


def decode_draws(draws: dict, latent: int, image_shape: tuple[int, ...], source: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z float32 [n, latent], scanner int64 [n], images float32 [n, 1, H, W]) from `encode_draws`'s text."""
    try:
        scanner = np.asarray(draws["scanner"], dtype=np.int64)
        n = len(scanner)
        z = np.frombuffer(base64.b64decode(draws["z"], validate=True), dtype="<f4").reshape(n, latent)
        raw = zlib.decompress(base64.b64decode(draws["image"], validate=True))
        images = np.frombuffer(raw, dtype="<f2").reshape(n, 1, *image_shape)
    except (KeyError, TypeError, ValueError, binascii.Error, zlib.error) as e:
        raise ArtifactError(f"{source}: metadata mrgen.parity is corrupt ({type(e).__name__}: {e})") from None
    return z.astype(np.float32), scanner, images.astype(np.float32)
