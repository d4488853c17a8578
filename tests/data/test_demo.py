"""The synthetic demo cohort: deterministic, labelled synthetic, inferable names, distinct scanners, its command."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mrgen_dist.commands.demo_data import build_parser, main
from mrgen_dist.commands.options import with_default_command
from mrgen_dist.data.demo import (
    APPEARANCE,
    DESCRIP,
    MARKER_FILE,
    acquire,
    cohort_plan,
    make_volume,
    subject_anatomy,
    template_on_fsl_grid,
)
from mrgen_dist.data.store import SliceStore
from mrgen_dist.data.volume import MNI_AFFINE, MNI_SHAPE
from mrgen_dist.scanners import infer_from_path


def test_cohort_files(cohort_dir: Path) -> None:
    files = sorted(cohort_dir.glob("*.nii.gz"))
    assert len(files) == 12
    assert "SYNTHETIC" in (cohort_dir / MARKER_FILE).read_text()
    assert "synthetic" in (cohort_dir / "cohort.csv").read_text().splitlines()[0]
    for p in files:
        img = nib.load(p)
        assert img.shape == MNI_SHAPE and np.allclose(img.affine, MNI_AFFINE)
        assert img.header["descrip"].tobytes().rstrip(b"\0") == DESCRIP
        assert infer_from_path(p.name) is not None
    assert {infer_from_path(p.name)[0] for p in files} == {"Gyroscan Intera", "Intera", "Unspecified", "Magnetom TrioTim"}


def test_deterministic_by_seed() -> None:
    template = template_on_fsl_grid()
    plan = cohort_plan(1, seed=3)
    a = make_volume(template, plan[0].scanner, plan[0].seed)
    assert np.array_equal(a, make_volume(template, plan[0].scanner, plan[0].seed))
    other = cohort_plan(1, seed=4)[0]
    assert not np.array_equal(a, make_volume(template, other.scanner, other.seed))


def test_one_subject_on_two_scanners() -> None:
    """The subject and its acquisition are separate: Unspecified is Magnetom TrioTim's image blurred (both have
    gamma 1), and one noise generator state draws the same noise at any level (what the translation bounds use)."""
    anatomy = subject_anatomy(template_on_fsl_grid(), np.random.default_rng(5))
    sharp, blurry = APPEARANCE["Magnetom TrioTim"], APPEARANCE["Unspecified"]
    clean_sharp = acquire(anatomy, sharp, 1.0, None) / sharp.raw_max
    clean_blurry = acquire(anatomy, blurry, 1.0, None) / blurry.raw_max
    np.testing.assert_allclose(clean_blurry, ndimage.gaussian_filter(clean_sharp, blurry.blur_mm), atol=1e-6)
    noisy = acquire(anatomy, sharp, 1.0, np.random.default_rng(9)) / sharp.raw_max
    noisier = acquire(anatomy, replace(blurry, blur_mm=0.0), 1.0, np.random.default_rng(9)) / blurry.raw_max
    background = anatomy == 0
    assert background.mean() > 0.3
    np.testing.assert_allclose(noisier[background] / blurry.noise, noisy[background] / sharp.noise, rtol=1e-5)
    assert not np.allclose(noisier[background], noisy[background])


def test_scanner_traits_survive_conversion(store_dir: Path) -> None:
    """After scaling to [0, 1]: Intera brightest, Gyroscan Intera most contrasted, Unspecified blurriest."""
    store = SliceStore(store_dir)
    data = store.load_split("all")
    stats = {}
    for sid, name in enumerate(store.vocabulary.names):
        imgs = data.images[data.scanner == sid].float().numpy()
        brain = imgs[imgs > 0.1]
        # steepest edges relative to the bright end; mild smoothing keeps noise out of the gradient
        smooth = ndimage.gaussian_filter(imgs, (0, 0.7, 0.7))
        sharpness = np.percentile(np.abs(np.diff(smooth, axis=2)), 99.5) / np.percentile(smooth, 99)
        stats[name] = (brain.mean(), brain.std() / brain.mean(), sharpness)
    assert max(stats, key=lambda n: stats[n][0]) == "Intera"
    assert max(stats, key=lambda n: stats[n][1]) == "Gyroscan Intera"
    assert min(stats, key=lambda n: stats[n][2]) == "Unspecified"
    assert store.manifest.inputs["synthetic"] is False  # fixture converts via the API, no marker lookup


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ap = build_parser()
    assert vars(ap.parse_args(with_default_command(["out", "--seed", "3"], ap, "write"))) == vars(
        ap.parse_args(["write", "out", "--seed", "3"])
    )
    for option, value in (("--subjects-per-scanner", "0"), ("--workers", "-2")):
        with pytest.raises(SystemExit) as exit_:
            main([str(tmp_path / "c"), option, value])
        assert exit_.value.code == 2 and f"argument {option}: must be > 0" in capsys.readouterr().err
    (tmp_path / "file").write_text("not a folder")
    assert main([str(tmp_path / "file" / "cohort")]) == 1
    assert capsys.readouterr().err.startswith(f"mrgen-demo-data: error: cannot create the output folder {tmp_path}")
    assert not (tmp_path / "c").exists()
