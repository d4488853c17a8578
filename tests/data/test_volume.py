"""Volume checks, intensity scaling and slice orientation on real NIfTI files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrgen_dist.data.demo import template_on_fsl_grid
from mrgen_dist.data.volume import MNI_AFFINE, MNI_SHAPE, SliceParams, VolumeRejected, central_slices, load_volume


def _save(path: Path, data: np.ndarray, affine: np.ndarray = MNI_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_orientation_anterior_at_top_and_voxel_i_left_to_right() -> None:
    vol = np.zeros(MNI_SHAPE, dtype=np.float32)
    vol[10:20, 200:210, :] = 1.0  # high j = anterior, low i = patient right
    vol[0, 0, 0] = 0.0
    vol[100, 100, :] = 0.5
    slices = central_slices(vol, SliceParams(low_percentile=0, high_percentile=100))
    assert slices.shape == (10, 218, 182)
    # anterior (j 200..209) lands in rows 217-209 .. 217-200 = 8..17, voxel i 10..19 in columns 10..19
    assert slices[0, 8:18, 10:20].min() == 1.0
    assert slices[0, 117, 100] == pytest.approx(0.5)
    assert slices.sum() == pytest.approx(10 * (100 + 0.5))


def test_central_indices_and_scaling_rule() -> None:
    params = SliceParams(slices_per_volume=10, percentile_stride=1)
    assert list(params.slice_indices()) == list(range(86, 96))
    rng = np.random.default_rng(0)
    vol = rng.uniform(100, 1100, size=MNI_SHAPE).astype(np.float32)
    slices = central_slices(vol.copy(), params)
    lo = np.percentile(vol, 0.5)
    hi = np.percentile(vol[vol > lo], 99.5)
    expected = np.clip((vol[:, ::-1, 86:96].transpose(2, 1, 0) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(slices, expected, atol=1e-5)
    # the strided percentile (default) agrees with the exact one to well under 1/255
    strided = central_slices(vol.copy(), SliceParams())
    assert np.abs(strided - expected).max() < 1 / 255 / 4


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda v: v.__setitem__((5, 5, 5), np.nan) or v, "non-finite"),
        (lambda v: v.__setitem__((5, 5, 5), np.inf) or v, "non-finite"),
        (lambda v: v * 0, "all-zero"),
        (lambda v: v * 0 + 3, "constant"),
    ],
)
def test_rejects_bad_values(make, reason: str) -> None:
    vol = np.random.default_rng(1).uniform(0, 1, MNI_SHAPE).astype(np.float32)
    with pytest.raises(VolumeRejected, match=reason):
        central_slices(make(vol), SliceParams())


def test_rejects_wrong_dimensionality_and_grid(tmp_path: Path) -> None:
    with pytest.raises(VolumeRejected, match="expected a 3-D volume"):
        load_volume(_save(tmp_path / "a.nii.gz", np.ones((182, 218, 182, 2), np.float32)))
    with pytest.raises(VolumeRejected, match="not on the MNI152 1 mm grid .*use --resample"):
        load_volume(_save(tmp_path / "b.nii.gz", np.ones((181, 217, 181), np.float32)))
    flipped = MNI_AFFINE.copy()
    flipped[0, 0] = 1.0
    with pytest.raises(VolumeRejected, match="not on the MNI152"):
        load_volume(_save(tmp_path / "c.nii.gz", np.ones(MNI_SHAPE, np.float32), flipped))
    # a trailing singleton 4th axis is a 3-D volume
    assert load_volume(_save(tmp_path / "d.nii.gz", np.ones((*MNI_SHAPE, 1), np.float32))).shape == MNI_SHAPE


def test_resample_native_template_equals_exact_reindexing(tmp_path: Path) -> None:
    """nilearn's template on its own 197x233x189 RAS grid, resampled, equals the exact FSL-grid re-indexing."""
    from nilearn.datasets import load_mni152_template

    native = tmp_path / "mni152_native.nii.gz"
    nib.save(load_mni152_template(resolution=1), native)
    with pytest.raises(VolumeRejected, match="197x233x189"):
        load_volume(native)
    resampled = load_volume(native, resample=True)
    exact = template_on_fsl_grid()
    np.testing.assert_allclose(resampled / resampled.max(), exact, atol=1e-5)


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    good = _save(tmp_path / "good.nii.gz", np.random.default_rng(2).uniform(0, 1, MNI_SHAPE).astype(np.float32))
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(VolumeRejected, match="truncated or corrupt"):
        load_volume(truncated)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(np.random.default_rng(3).bytes(5000))
    with pytest.raises(VolumeRejected, match="unreadable NIfTI header"):
        load_volume(garbage)
