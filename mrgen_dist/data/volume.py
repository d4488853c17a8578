"""One T1 volume -> checked, intensity-scaled central axial slices.

Conventions (they travel in the store manifest as `params`):

* Grid: the FSL MNI152 1 mm grid, 182 x 218 x 182 voxels, affine diag(-1, 1, 1) with origin (90, -126, -72)
  (voxel i runs patient right -> left, j posterior -> anterior, k inferior -> superior). Other grids are
  rejected unless `resample=True`, which resamples them onto this grid with trilinear interpolation.
* Intensities: robust min-max per volume, so that the relations between slices of one volume are kept.
  `lo` is the `low_percentile` of all voxels (the background level), `hi` the `high_percentile` of the voxels
  above `lo` (the bright end of the head, ignoring a few hot voxels); the volume becomes
  clip((x - lo) / (hi - lo), 0, 1). The percentiles are taken on every `percentile_stride`-th voxel in
  memory order, which gives the same values to well under 1/255 at a fraction of the cost.
* Slices: the K central axial slices k = (182 - K) // 2 ... + K - 1, each shown as a 218 x 182 image with
  anterior at the top (row 0 = j 217) and the voxel i axis left to right (patient right on the image left,
  the radiological convention of FSL's default view): image[r, c] = volume[c, 217 - r, k].
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

MNI_SHAPE: tuple[int, int, int] = (182, 218, 182)
MNI_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 90.0], [0.0, 1.0, 0.0, -126.0], [0.0, 0.0, 1.0, -72.0], [0.0, 0.0, 0.0, 1.0]]
)
SLICE_SHAPE: tuple[int, int] = (MNI_SHAPE[1], MNI_SHAPE[0])  # rows = anterior->posterior, cols = i


#: The fields of SliceParams that decide how a volume's slices are cut and scaled (resample only decides which
#: volumes are accepted).
SLICE_PARAM_KEYS = ("slices_per_volume", "low_percentile", "high_percentile", "percentile_stride")


class VolumeRejected(Exception):
    """A volume that cannot enter the store; the message is the one-line reason."""


@dataclass(frozen=True)
class SliceParams:
    """How slices are cut and scaled; recorded in the manifest and in each shard."""

    slices_per_volume: int = 10
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    percentile_stride: int = 16
    resample: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.slices_per_volume <= MNI_SHAPE[2]:
            raise ValueError(f"slices_per_volume must be in 1..{MNI_SHAPE[2]}, got {self.slices_per_volume}")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise ValueError("need 0 <= low_percentile < high_percentile <= 100")
        if self.percentile_stride < 1:
            raise ValueError("percentile_stride must be >= 1")

    @classmethod
    def from_record(cls, values: dict) -> SliceParams:
        """The params recorded in a manifest or a model's metadata (the extra keys of `to_dict` ignored)."""
        return cls(**{k: values[k] for k in SLICE_PARAM_KEYS if k in values})

    def slice_indices(self) -> range:
        start = (MNI_SHAPE[2] - self.slices_per_volume) // 2
        return range(start, start + self.slices_per_volume)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "grid_shape": list(MNI_SHAPE),
            "grid_affine": MNI_AFFINE.tolist(),
            "slice_shape": list(SLICE_SHAPE),
            "axial_indices": list(self.slice_indices()),
            "orientation": "image[r, c] = volume[c, 217 - r, k]: anterior at the top, voxel i (R->L) left to right",
            "intensity_rule": "clip((x - lo) / (hi - lo), 0, 1); lo = low_percentile of all voxels, "
            "hi = high_percentile of voxels > lo; percentiles on every percentile_stride-th voxel",
        }


def load_volume(path: str | Path, resample: bool = False) -> np.ndarray:
    """Read a NIfTI volume as float32 on the MNI grid, or raise VolumeRejected with the reason."""
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for unreadable headers
        raise VolumeRejected(f"unreadable NIfTI header: {_one_line(e)}") from None
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise VolumeRejected(f"expected a 3-D volume, got shape {tuple(shape)}")
    on_grid = tuple(img.shape) == MNI_SHAPE and np.allclose(img.affine, MNI_AFFINE, atol=1e-3)
    if not on_grid:
        if not resample:
            raise VolumeRejected(
                f"not on the MNI152 1 mm grid {'x'.join(map(str, MNI_SHAPE))} (got "
                f"{'x'.join(map(str, img.shape))}, affine diag {np.round(np.diag(img.affine)[:3], 3).tolist()}); "
                "use --resample"
            )
    try:
        if on_grid:
            return img.get_fdata(dtype=np.float32)
        from nibabel.processing import resample_from_to

        return resample_from_to(img, (MNI_SHAPE, MNI_AFFINE), order=1).get_fdata(dtype=np.float32)
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise VolumeRejected(f"truncated or corrupt image data: {_one_line(e)}") from None


def central_slices(volume: np.ndarray, params: SliceParams) -> np.ndarray:
    """Checked and scaled central axial slices, float32 (K, 218, 182) in [0, 1]."""
    finite = np.isfinite(volume)
    if not finite.all():
        raise VolumeRejected(f"{int(finite.size - np.count_nonzero(finite))} non-finite voxels (NaN or inf)")
    flat = volume.ravel(order="K")  # memory order: NIfTI data are Fortran-ordered, reshape would copy
    sample = flat[:: params.percentile_stride]
    lo = float(np.percentile(sample, params.low_percentile))
    above = sample[sample > lo]
    if above.size == 0:
        kind = "all-zero" if not sample.any() and not flat.any() else "constant"
        raise VolumeRejected(f"{kind} volume (no intensity range to scale)")
    hi = float(np.percentile(above, params.high_percentile))
    if hi <= lo:
        raise VolumeRejected("no intensity range between the low and high percentiles")
    ks = list(params.slice_indices())
    slab = volume[:, ::-1, ks[0] : ks[-1] + 1]  # (i, j reversed, k)
    slices = np.ascontiguousarray(slab.transpose(2, 1, 0))  # (k, rows, cols)
    slices -= lo
    slices *= 1.0 / (hi - lo)
    np.clip(slices, 0.0, 1.0, out=slices)
    if not slices.any():
        raise VolumeRejected("central slices are empty after scaling")
    return slices


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:200]
