"""The results schema (mrgen_dist/eval/results.py): each record's round trip, the refusal of another kind, a newer
version or a value of the wrong type, and files of the previous release (no kind, no version) read as version 0.
That the writers of mrgen-fid go through it is checked on the files they write, in test_evaluate.py,
test_diagnostics.py and test_translation.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mrgen_dist.artifacts import ArtifactError
from mrgen_dist.eval.results import (
    RECORDS,
    Conditioning,
    Diagnostics,
    Generation,
    Kid,
    LabelEffect,
    LevelCurve,
    LevelFollowing,
    Reconstruction,
    Repeat,
    ScannerScore,
    Signature,
    Swap,
    TranslationScore,
    ZProbe,
    read_folder,
)

SCANNERS = ["Gyroscan Intera", "Intera"]
STORE = "ab" * 32
MODEL = {"mrgen.family": "cvae", "mrgen.format": "mrgen-decoder/1", "mrgen.scanners": json.dumps(SCANNERS)}

#: One record of each kind with every field set (the nested ones too).
EXAMPLES = [
    ScannerScore(
        scanner="Gyroscan Intera", n_real=10, n_generated=12, fid_n_generated=10, fid_biased=True, noise=False,
        repeats=[Repeat(seed=0, fid=101.5, kid=0.25, kid_std=0.01), Repeat(seed=1, fid=99.5, kid=0.5, kid_std=0.02)],
        fid_mean=100.5, fid_std=1.5, kid_mean=0.375, kid_std=0.125, prdc_k=5, ms_ssim_pairs=200, precision=0.5,
        recall=0.25, density=1.25, coverage=0.75, ms_ssim=0.8125, ms_ssim_real=0.75,
        signature=Signature(intensity_w1=0.03, noise_real=0.0125, noise_generated=0.003, sharpness_real=0.04,
                            sharpness_generated=0.02),
        warnings=["10 samples for 2048-d features: the covariance is rank-deficient"], sampling_seconds=0.5,
        sampling_images_per_s=48.0, real_features_cached=False, extractor="fid-inception", store_sha256=STORE,
        model=MODEL, package_version="1.0"),
    Generation(
        scanners=SCANNERS, store_sha256=STORE, noise=True, n_generated=[12, 12], repeats=2, sampled_images=48,
        sampling_seconds=1.0, sampling_images_per_s=48.0, sampler_device="cpu", sampler_provider="CPUExecutionProvider",
        label_effect=LabelEffect(between_scanners=0.05, between_draws=0.02, ratio=None), label_effect_draws=16,
        label_effect_seed=0, model=MODEL, package_version="1.0"),
    Conditioning(
        scanners=SCANNERS, n_train=[20, 20], n_test=[10, 10], n_generated=[12, 12], generated_seed=0, noise=False,
        real_test_accuracy=1.0, generated_accuracy=0.875, confusion=[[11, 1], [2, 10]], classifier="logistic regression",
        extractor="fid-inception", store_sha256=STORE),
    Diagnostics(
        scanners=SCANNERS, store_sha256=STORE, run="runs/tiny", family="cvae", title="cVAE", parameters=1234,
        training={"seconds": 12.5, "images_per_s": 345.6, "epochs": 2}, encoder=True,
        z_probe=ZProbe(accuracy=0.55, chance=0.5, confusion=[[6, 4], [5, 5]], n_train=[20, 20], n_test=[10, 10],
                       latent=8, classifier="probe"),
        reconstruction=Reconstruction(accuracy=0.95, confusion=[[10, 0], [1, 9]], real_test_accuracy=1.0, n_test=20,
                                      noise=False, classifier="logistic regression"),
        swaps=[Swap(region="interior", band="fine", pixels=2000, accuracy=0.5, confusion=[[10, 0], [10, 0]])],
        reason=None, extractor="fid-inception", device="cpu", package_version="1.0"),
    TranslationScore(
        store_sha256=STORE, scanners=SCANNERS, model="translator.onnx", family="stargan", precision="fp32",
        targets=SCANNERS, n_per_source={"Gyroscan Intera": 3, "Intera": 3}, classifier="logistic regression",
        real_test_accuracy=1.0, conditioning=0.5, conditioning_per_pair=[[None, 0.5], [0.5, None]],
        confusion=[[1, 2], [2, 1]], ssim_matched=0.75, ssim_matched_per_pair=[[None, 0.75], [0.75, None]],
        cycle_ssim=0.9, cycle_ssim_per_pair=[[None, 0.9], [0.9, None]],
        kid={"Intera": Kid(mean=0.01, std=0.001, subset_size=3)}, kid_mean=0.01,
        change=[[0.01, 0.2], [0.3, 0.02]], identity_smallest=True, identity_misses=[], translate_images_per_s=50.0,
        translator_device="cpu (CPUExecutionProvider)", rows_columns="rows source, columns target"),
    LevelFollowing(
        levels=[0, 91, 181], n_generated=16, head_threshold=0.1, store_sha256=STORE, package_version="1.0",
        curves=[LevelCurve(scanner="Intera", real=[0.0, 0.5, 0.0], generated=[0.125, 0.5, 0.0625], correlation=0.99,
                           mean_abs_difference=0.0625)]),
]


def test_every_record_has_an_example() -> None:
    assert sorted(type(r).__name__ for r in EXAMPLES) == sorted(r.__name__ for r in RECORDS)
    assert len({r.KIND for r in RECORDS}) == len(RECORDS) and all(r.VERSION == 1 for r in RECORDS)


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip(record, tmp_path: Path) -> None:
    path = record.write(tmp_path / record.file_name)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    data = json.loads(path.read_text())
    assert list(data)[:2] == ["kind", "version"] and (data["kind"], data["version"]) == (record.KIND, 1)
    assert type(record).read(path) == record
    assert type(record).from_dict(record.to_dict(), "anywhere.json") == record
    assert read_folder(tmp_path) == {path.name: record}


def test_the_json_keys_of_the_files() -> None:
    """The keys the files had before the schema, in the same places (mrgen-compare and the docs name them)."""
    score = EXAMPLES[0].to_dict()
    assert score["repeats"][1] == {"seed": 1, "fid": 99.5, "kid": 0.5, "kid_std": 0.02}
    assert score["signature"]["noise_generated"] == 0.003 and score["precision"] == 0.5
    assert EXAMPLES[0].file_name == "fid_Gyroscan_Intera.json"
    assert EXAMPLES[0].scanners == SCANNERS and EXAMPLES[0].family == "cvae"
    assert EXAMPLES[1].to_dict()["label_effect"] == {"between_scanners": 0.05, "between_draws": 0.02, "ratio": None}
    assert EXAMPLES[3].to_dict()["z_probe"]["accuracy"] == 0.55
    assert EXAMPLES[4].to_dict()["kid"]["Intera"] == {"mean": 0.01, "std": 0.001, "subset_size": 3}


def test_another_kind_is_refused(tmp_path: Path) -> None:
    path = EXAMPLES[2].write(tmp_path / "generation.json")  # a Conditioning under generation.json's name
    with pytest.raises(ArtifactError) as e:
        Generation.read(path)
    assert str(e.value) == (f"{path}: a 'mrgen-conditioning' file, expected 'mrgen-generation' (not this kind of "
                            "file)")


def test_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "conditioning.json"
    path.write_text(json.dumps({**EXAMPLES[2].to_dict(), "version": Conditioning.VERSION + 1}))
    with pytest.raises(ArtifactError) as e:
        Conditioning.read(path)
    assert str(e.value) == (f"{path}: written as mrgen-conditioning version 2 by a newer mrgen-dist; this version "
                            "reads up to 1: upgrade mrgen-dist")
    path.write_text(json.dumps({**EXAMPLES[2].to_dict(), "version": "1"}))
    with pytest.raises(ArtifactError, match="'version' should be a whole number from 1, found '1'"):
        Conditioning.read(path)


def test_a_file_of_the_previous_release_is_version_0_of_its_name(tmp_path: Path) -> None:
    """No kind and no version: the kind its file name says, every field it lacks None."""
    old = {"scanner": "Intera", "n_real": 10, "n_generated": 10, "fid_mean": 100, "fid_std": 2.0, "kid_mean": 0.1,
           "kid_std": 0.01, "repeats": [{"seed": 0, "fid": 100.0, "kid": 0.1, "kid_std": 0.01}], "warnings": [],
           "model": {"mrgen.scanners": json.dumps(SCANNERS)}, "unknown_key": 1}
    path = tmp_path / "fid_Intera.json"
    path.write_text(json.dumps(old))
    record = ScannerScore.read(path)
    assert record.fid_mean == 100.0 and isinstance(record.fid_mean, float)  # a JSON integer where a float is due
    assert record.repeats == [Repeat(seed=0, fid=100.0, kid=0.1, kid_std=0.01)] and record.scanners == SCANNERS
    assert record.precision is None and record.signature is None and record.store_sha256 is None
    (tmp_path / "conditioning.json").write_text(json.dumps({"scanners": SCANNERS, "generated_accuracy": 0.5}))
    assert Conditioning.read(tmp_path / "conditioning.json") == Conditioning(scanners=SCANNERS, generated_accuracy=0.5)
    assert list(read_folder(tmp_path)) == ["fid_Intera.json", "conditioning.json"]
    # without a kind, only the file name tells what it is
    with pytest.raises(ArtifactError, match=r"elsewhere.json: no 'kind', and not named conditioning.json"):
        Conditioning.from_dict({"scanners": SCANNERS}, str(tmp_path / "elsewhere.json"))
    with pytest.raises(ArtifactError, match=r"fid_Intera.json: no 'kind', and not named generation.json"):
        Generation.read(path)


def test_a_missing_scanner_and_values_of_the_wrong_type_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "fid_x.json"
    for content, message in [
        ({"fid_mean": 1.0}, "missing field 'scanner'"),
        ({"scanner": "x", "fid_mean": "high"}, "field 'fid_mean' should be float, found str"),
        ({"scanner": "x", "n_real": 10.5}, "field 'n_real' should be int, found float"),
        ({"scanner": "x", "n_real": True}, "field 'n_real' should be int, found bool"),
        ({"scanner": "x", "signature": [1, 2]}, "field 'signature' should be an object, found list"),
        ({"scanner": "x", "signature": {"noise_real": "low"}}, "field 'signature.noise_real' should be float"),
        ({"scanner": "x", "repeats": [{"fid": 1.0}, {"fid": None, "seed": "0"}]}, "field 'repeats[1].seed' should be"),
    ]:
        path.write_text(json.dumps(content))
        with pytest.raises(ArtifactError, match="^" + re.escape(f"{path}: {message}")):
            ScannerScore.read(path)


def test_unreadable_and_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=f"{tmp_path / 'diagnostics.json'}: no such file"):
        Diagnostics.read(tmp_path / "diagnostics.json")
    (tmp_path / "diagnostics.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="diagnostics.json: expected a JSON object, found list"):
        Diagnostics.read(tmp_path / "diagnostics.json")
