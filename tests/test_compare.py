"""`mrgen-compare` on results folders written here as real JSON files (the schema of mrgen-fid score / diagnose)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mrgen_dist.commands.compare import main
from mrgen_dist.eval.compare import compare, default_names, verdict
from mrgen_dist.eval.table import CompareError, MismatchError, human_count

SCANNERS = ["Gyroscan Intera", "Intera", "Unspecified", "Magnetom TrioTim"]
STORE = "ab12cd34ef56ab78" + "0" * 48


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _fid(i: int, scanner: str, family: str, scanners: list[str], store: str, **over: object) -> dict:
    """fid_<scanner>.json of scanner i, numbers chosen so that their means are exact."""
    record = {
        "scanner": scanner, "n_real": 8, "n_generated": 8,
        "fid_mean": 10.0 * (i + 1), "fid_std": 1.0, "kid_mean": 0.001 * (i + 1), "kid_std": 0.0001,
        "fid_biased": i == 0,
        "precision": 0.5 + 0.125 * i, "recall": 0.375, "density": 1.0 + 0.25 * i, "coverage": 0.5,
        "ms_ssim": 0.375, "ms_ssim_real": 0.25,
        "signature": {"intensity_w1": 0.01 * (i + 1), "noise_real": 0.5, "noise_generated": 0.625,
                      "sharpness_real": 2.0, "sharpness_generated": 1.5},
        "store_sha256": store,
        "model": {"mrgen.family": family, "mrgen.format": "mrgen-decoder/1", "mrgen.scanners": json.dumps(scanners)},
    }
    record.update(over)
    return record


def _confusion(hits: list[int], n: int = 8) -> list[list[int]]:
    """Row i (asked for scanner i): hits[i] recognised as i, the rest as the next scanner."""
    k = len(hits)
    rows = [[0] * k for _ in range(k)]
    for i, h in enumerate(hits):
        rows[i][i] = h
        rows[i][(i + 1) % k] += n - h
    return rows


def write_results(folder: Path, *, family: str = "cvae", title: str | None = "cVAE", conditioning: float = 0.96875,
                  hits: tuple[int, ...] = (8, 8, 7, 8), z_probe: float | None = 0.3, reconstruction: float | None = 0.97,
                  ratio: float = 2.5, noise: bool = False, scanners: list[str] = SCANNERS, store: str = STORE,
                  fid_scanners: list[str] | None = None, side_files: tuple[str, ...] = ("conditioning", "generation",
                                                                                         "diagnostics")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(scanners):
        if fid_scanners is None or s in fid_scanners:
            (folder / f"fid_{_slug(s)}.json").write_text(json.dumps(_fid(i, s, family, scanners, store)))
    files = {
        "conditioning": {"scanners": scanners, "generated_accuracy": conditioning, "real_test_accuracy": 0.99,
                         "synthetic_trained_accuracy": 0.9375, "memorisation_ratio": [1.05, 0.98, 1.1, 1.0],
                         "confusion": _confusion(list(hits)), "n_generated": [8] * len(scanners), "store_sha256": store},
        "generation": {"scanners": scanners, "store_sha256": store, "noise": noise, "n_generated": [8] * len(scanners),
                       "sampling_images_per_s": 1234.4, "sampler_device": "cpu",
                       "label_effect": {"between_scanners": 0.05, "between_draws": 0.02, "ratio": ratio}},
        "diagnostics": {"scanners": scanners, "store_sha256": store, "family": family, "title": title,
                        "parameters": 1234567, "training": {"seconds": 12.5, "images_per_s": 345.6, "steps": 30,
                                                            "epochs": 2},
                        "z_probe": None if z_probe is None else {"accuracy": z_probe, "chance": 0.25,
                                                                 "confusion": _confusion([2, 2, 2, 2])},
                        "reconstruction": None if reconstruction is None else {"accuracy": reconstruction,
                                                                               "confusion": _confusion([8, 8, 8, 8])},
                        "reason": None if z_probe is not None else "family has no encoder"},
    }
    for name in side_files:
        (folder / f"{name}.json").write_text(json.dumps(files[name]))
    return folder


def _table(md: str) -> list[dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")), strict=True)) for line in lines[2:]]


@pytest.fixture
def two_models(tmp_path: Path) -> list[Path]:
    a = write_results(tmp_path / "cvae" / "results")
    b = write_results(tmp_path / "vae" / "results", family="vae", title="VAE (unconditional)", conditioning=0.25,
                      hits=(2, 2, 2, 2), z_probe=0.9, reconstruction=0.5, ratio=0.01, noise=True)
    return [a, b]


def test_table_values(two_models: list[Path], tmp_path: Path) -> None:
    written = compare(two_models, tmp_path / "out")
    assert [p.name for p in written] == ["compare.md", "compare.csv", "compare.png"]
    md = written[0].read_text()
    a, b = _table(md)
    assert a == {
        "run": "cvae/results", "model": "cVAE", "parameters": "1.2 M", "train s": "12.5", "train img/s": "346",
        "sample img/s (ORT)": "1,234", "n gen/scanner": "8", "FID": "25.00 †", "KID ×10³": "2.50",
        "precision": "0.688", "recall": "0.375", "density": "1.375", "coverage": "0.500",
        "MS-SSIM gen / real": "0.375 / 0.250", "conditioning": "0.97", "TSTR": "0.94",
        "NN ratio (min)": "0.98", "z-probe (chance)": "0.30 (0.25)",
        "recon. conditioning": "0.97", "label effect": "2.50", "intensity W1": "0.0250", "Δ noise": "0.125",
        "Δ sharpness": "0.500", "noise/sharpness off (max)": "25%", "verdict": "meets targets",
    }
    assert b["run"] == "vae/results" and b["model"] == "VAE (unconditional) + noise"
    assert b["verdict"] == "reconstruction ceiling 0.50; scanner in z (probe 0.90); decoder ignores the label"
    assert "† FID at n < 2048 is biased upwards; compare at equal n" in md
    assert f"Store {STORE[:16]}; scanners (vocabulary order): Gyroscan Intera, Intera, Unspecified, Magnetom TrioTim" in md
    assert "cvae/results: classifier accuracy on real test slices 0.99; sampled on cpu." in md
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]


def test_names_option_and_default_names(two_models: list[Path], tmp_path: Path) -> None:
    md = compare(two_models, tmp_path / "out", names=["A", "B"])[0].read_text()
    assert [r["run"] for r in _table(md)] == ["A", "B"]
    assert default_names([tmp_path / "x" / "one", tmp_path / "y" / "two"]) == ["one", "two"]
    assert default_names([tmp_path / "a" / "r", tmp_path / "b" / "r", tmp_path / "c"]) == ["a/r", "b/r", "c"]
    assert default_names([tmp_path / "a" / "x" / "r", tmp_path / "b" / "x" / "r"]) == ["a/x/r", "b/x/r"]
    with pytest.raises(CompareError, match="given twice"):
        default_names([tmp_path / "x", tmp_path / "y" / ".." / "x"])


def test_missing_files_and_keys_show_a_dash(two_models: list[Path], tmp_path: Path) -> None:
    sparse = write_results(tmp_path / "sparse", fid_scanners=["Intera", "Magnetom TrioTim"], side_files=())
    record = json.loads((sparse / "fid_Intera.json").read_text())
    for key in ("precision", "signature", "fid_biased"):
        del record[key]
    (sparse / "fid_Intera.json").write_text(json.dumps(record))
    md = compare([two_models[0], sparse], tmp_path / "out")[0].read_text()
    row = _table(md)[1]
    assert row["run"] == "sparse" and row["model"] == "cvae"  # no diagnostics.json: the ONNX metadata's family
    for column in ("parameters", "train s", "train img/s", "sample img/s (ORT)", "conditioning", "z-probe (chance)",
                   "recon. conditioning", "label effect"):
        assert row[column] == "—", column
    assert row["n gen/scanner"] == "8"  # from the fid_*.json
    # (20 + 40) / 2; Magnetom's fid_biased is False, Intera's is missing and its n = 8 < 2048 marks it
    assert row["FID"] == "30.00 (2/4) †"
    assert row["precision"] == "0.875 (1/4)" and row["intensity W1"] == "0.0400 (1/4)"
    assert row["verdict"] == "conditioning not measured; z-probe not measured"
    assert "sparse: no fid_*.json for Gyroscan Intera, Unspecified; no conditioning.json, generation.json, " \
           "diagnostics.json." in md


def test_missing_key_in_a_scored_file_infers_bias_from_n(tmp_path: Path) -> None:
    folder = write_results(tmp_path / "r", side_files=())
    for p in folder.glob("fid_*.json"):
        record = json.loads(p.read_text())
        del record["fid_biased"]
        p.write_text(json.dumps(record))
    assert _table(compare([folder], tmp_path / "out")[0].read_text())[0]["FID"] == "25.00 †"  # n = 8 < 2048


def test_no_encoder_reason_and_noise(tmp_path: Path) -> None:
    folder = write_results(tmp_path / "gan", family="gan", title="GAN", z_probe=None, reconstruction=None)
    md = compare([folder], tmp_path / "out")[0].read_text()
    row = _table(md)[0]
    assert row["z-probe (chance)"] == "—" and row["recon. conditioning"] == "—"
    assert row["verdict"] == "conditioning ≥ 0.90; z-probe not measured (family has no encoder)"
    assert "gan: z-probe n/a: family has no encoder;" in md
    # diagnostics that say the family has no encoder: the z-probe target holds by construction
    diagnostics = json.loads((folder / "diagnostics.json").read_text())
    (folder / "diagnostics.json").write_text(json.dumps({**diagnostics, "encoder": False}))
    row = _table(compare([folder], tmp_path / "out")[0].read_text())[0]
    assert row["verdict"] == "meets targets; no encoder: z carries no scanner"


@pytest.mark.parametrize(("cond", "z", "rec", "ratio", "expected"), [
    (0.95, 0.30, 0.99, 3.0, "meets targets"),
    (0.90, 0.40, None, None, "meets targets"),  # the targets are inclusive
    (0.80, 0.30, 0.85, 3.0, "reconstruction ceiling 0.85"),
    (0.80, 0.30, 0.95, 3.0, "conditioning 0.80 < 0.90"),
    (0.80, 0.30, None, 3.0, "conditioning 0.80 < 0.90"),
    (0.95, 0.55, 0.99, 3.0, "conditioning ≥ 0.90; scanner in z (probe 0.55)"),
    (0.25, 0.95, 0.97, 0.02, "conditioning 0.25 < 0.90; scanner in z (probe 0.95); decoder ignores the label"),
    (0.30, 0.35, 0.40, 0.05, "reconstruction ceiling 0.40; decoder ignores the label"),
    (None, None, None, None, "conditioning not measured; z-probe not measured"),
])
def test_verdict(cond: float | None, z: float | None, rec: float | None, ratio: float | None, expected: str) -> None:
    assert verdict(cond, z, rec, ratio) == expected


def test_verdict_asks_generated_slices_to_train_a_classifier_of_real_ones() -> None:
    assert verdict(0.97, 0.3, 0.97, 2.0, synthetic_trained=0.93) == "meets targets"
    assert verdict(0.97, 0.3, 0.97, 2.0, synthetic_trained=0.60) == "conditioning ≥ 0.90; TSTR 0.60 < 0.90"
    assert verdict(0.97, 0.3, 0.97, 2.0) == "meets targets"  # results written before TSTR was measured
    assert verdict(0.97, 0.3, 0.97, 2.0, synthetic_trained=0.93, memorisation=0.5) == (
        "conditioning ≥ 0.90; near the training slices (NN ratio 0.50)")


def test_verdict_asks_the_noise_and_sharpness_of_real_slices() -> None:
    assert verdict(0.97, 0.3, 0.97, 2.0, signature_gap=0.25) == "meets targets"
    assert verdict(0.97, 0.3, 0.97, 2.0, signature_gap=0.40) == "conditioning ≥ 0.90; noise/sharpness off by 40% (> 25%)"


def test_verdict_asks_precision_and_recall() -> None:
    assert verdict(0.97, 0.3, 0.97, 2.0, precision=0.31, recall=0.30) == "meets targets"
    assert verdict(0.97, 0.3, 0.97, 2.0, precision=0.22, recall=0.08) == (
        "conditioning ≥ 0.90; precision 0.22 and recall 0.08 < 0.30")


def test_the_worst_scanners_signature_gap_decides(tmp_path: Path) -> None:
    folder = write_results(tmp_path / "noisy")
    record = json.loads((folder / "fid_Intera.json").read_text())
    record["signature"]["noise_generated"] = 1.0  # twice the real background noise, on one scanner
    (folder / "fid_Intera.json").write_text(json.dumps(record))
    row = _table(compare([folder], tmp_path / "out")[0].read_text())[0]
    assert row["noise/sharpness off (max)"] == "100%"
    assert row["verdict"] == "conditioning ≥ 0.90; noise/sharpness off by 100% (> 25%)"


def test_cohorts_a_run_meets_the_targets_only_on_every_cohort(tmp_path: Path) -> None:
    """The same two configs on two cohorts (two stores): a cohort column, each cohort's store, and the verdict
    of a run that meets the targets on one cohort but not on the other."""
    other = "cd" * 32
    folders = [write_results(tmp_path / "template" / "good"), write_results(tmp_path / "template" / "fragile"),
               write_results(tmp_path / "physics" / "good", store=other),
               write_results(tmp_path / "physics" / "fragile", store=other, conditioning=0.43, hits=(8, 1, 1, 4))]
    md = compare(folders, tmp_path / "out", names=["good", "fragile"] * 2,
                 cohorts=["template", "template", "physics", "physics"])[0].read_text()
    rows = _table(md)
    assert [(r["run"], r["cohort"]) for r in rows] == [("good", "template"), ("fragile", "template"),
                                                       ("good", "physics"), ("fragile", "physics")]
    assert rows[0]["verdict"] == rows[2]["verdict"] == "meets targets"
    assert rows[1]["verdict"] == "meets targets here, not on every cohort (physics: conditioning 0.43 < 0.90)"
    assert rows[3]["verdict"].startswith("conditioning 0.43 < 0.90")
    assert f"Stores: template {STORE[:16]}, physics {other[:16]}" in md
    # within a cohort, one store
    with pytest.raises(MismatchError, match="one store per cohort"):
        compare(folders, tmp_path / "out2", names=["a", "b", "c", "d"], cohorts=["t", "t", "t", "p"])
    # a run scored on one cohort only does not meet them on every cohort
    md = compare(folders[:3], tmp_path / "out3", names=["good", "fragile", "good"],
                 cohorts=["template", "template", "physics"])[0].read_text()
    assert _table(md)[1]["verdict"] == "meets targets here, not on every cohort (physics: not scored)"
    # without cohorts there is no cohort column
    assert "cohort" not in _table(compare(folders[:2], tmp_path / "out4")[0].read_text())[0]


def test_verdict_without_an_encoder() -> None:
    assert verdict(0.97, None, None, 2.0, "no encoder", encoder=False) == "meets targets; no encoder: z carries no scanner"
    assert verdict(0.70, None, None, 2.0, encoder=False) == "conditioning 0.70 < 0.90; no encoder: z carries no scanner"


def test_human_count() -> None:
    assert [human_count(n) for n in (950, 8200, 1234567, 82.7e6, 3.2e9, None)] == [
        "950", "8.2 k", "1.2 M", "82.7 M", "3.2 G", "—"]


def test_csv_parses_back(two_models: list[Path], tmp_path: Path) -> None:
    compare(two_models, tmp_path / "out", names=["cvae", "vae"])
    with (tmp_path / "out" / "compare.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["cvae", "vae"]
    a, b = rows
    assert float(a["fid"]) == pytest.approx(25.0) and float(a["kid"]) == pytest.approx(0.0025)
    assert a["fid_biased"] == "True" and a["parameters"] == "1234567" and a["noise"] == "False"
    assert [float(a[f"fid_{_slug(s)}"]) for s in SCANNERS] == [10.0, 20.0, 30.0, 40.0]
    assert [float(a[f"kid_{_slug(s)}"]) for s in SCANNERS] == pytest.approx([0.001, 0.002, 0.003, 0.004])
    assert [float(a[f"conditioning_{_slug(s)}"]) for s in SCANNERS] == [1.0, 1.0, 0.875, 1.0]
    assert float(a["conditioning"]) == 0.96875 and float(a["z_probe_chance"]) == 0.25
    assert b["verdict"].startswith("reconstruction ceiling 0.50") and b["noise"] == "True"
    assert float(b["label_effect_ratio"]) == 0.01 and float(b["noise_gap"]) == pytest.approx(0.125)


def test_csv_has_empty_cells_for_missing_values(two_models: list[Path], tmp_path: Path) -> None:
    sparse = write_results(tmp_path / "sparse", side_files=("conditioning",))
    compare([two_models[0], sparse], tmp_path / "out")
    with (tmp_path / "out" / "compare.csv").open(newline="", encoding="utf-8") as f:
        row = list(csv.DictReader(f))[1]
    assert row["z_probe"] == "" and row["parameters"] == "" and row["sample_images_per_s"] == ""
    assert float(row["conditioning"]) == 0.96875


def test_png_is_written(two_models: list[Path], tmp_path: Path) -> None:
    import matplotlib.image

    png = compare(two_models, tmp_path / "out")[2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 1000
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_refuses_results_of_different_stores(two_models: list[Path], tmp_path: Path) -> None:
    other = write_results(tmp_path / "other", store="ff" * 32)
    with pytest.raises(MismatchError) as e:
        compare([two_models[0], other], tmp_path / "out")
    message = str(e.value)
    assert str(two_models[0]) in message and str(other) in message
    assert "store_sha256" in message and STORE in message and "ff" * 32 in message
    assert not (tmp_path / "out").exists()


def test_refuses_results_of_different_scanner_lists(two_models: list[Path], tmp_path: Path) -> None:
    other = write_results(tmp_path / "three", scanners=SCANNERS[:3], hits=(8, 8, 8))
    with pytest.raises(MismatchError) as e:
        compare([two_models[0], other], tmp_path / "out")
    message = str(e.value)
    assert str(two_models[0]) in message and str(other) in message and "scanners" in message
    assert repr(SCANNERS) in message and repr(SCANNERS[:3]) in message
    reordered = write_results(tmp_path / "reordered", scanners=SCANNERS[::-1])
    with pytest.raises(MismatchError, match="different scanners"):
        compare([two_models[0], reordered], tmp_path / "out")


def test_refuses_a_folder_whose_files_disagree(tmp_path: Path) -> None:
    folder = write_results(tmp_path / "mixed")
    gen = json.loads((folder / "generation.json").read_text())
    gen["store_sha256"] = "ee" * 32
    (folder / "generation.json").write_text(json.dumps(gen))
    with pytest.raises(MismatchError, match=r"mixed: .* has store_sha256 .* but generation.json has 'eeee"):
        compare([folder], tmp_path / "out")


def test_missing_empty_and_unreadable_folders(tmp_path: Path) -> None:
    with pytest.raises(CompareError, match=f"results folder {tmp_path / 'nope'} does not exist"):
        compare([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "fid_table.md").write_text("not a result")
    with pytest.raises(CompareError, match=f"results folder {tmp_path / 'empty'} holds no result file"):
        compare([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "generation.json").write_text("{truncated")
    with pytest.raises(CompareError, match=r"bad/generation.json: unreadable"):
        compare([tmp_path / "bad"], tmp_path / "out")


def test_cli(two_models: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main([str(p) for p in two_models] + ["--out", str(out), "--names", "cvae,vae"]) == 0
    printed = capsys.readouterr().out
    assert "| cvae | cVAE |" in printed and "| vae | VAE (unconditional) + noise |" in printed
    assert f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'}" in printed


def test_cli_errors(two_models: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # bad input: one line `mrgen-compare: error: ...`, exit status 1 (the package's convention for UserError)
    assert main([str(two_models[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"mrgen-compare: error: results folder {tmp_path / 'nope'} does not exist\n"
    other = write_results(tmp_path / "other", store="ff" * 32)
    assert main([str(two_models[0]), str(other), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mrgen-compare: error: ") and err.count("\n") == 1 and str(other) in err
    # usage errors: argparse, exit status 2
    for argv in ([], [str(two_models[0]), "--names", "a,b"], [*map(str, two_models), "--names", "a,a"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "--names has 2 name(s) for 1 RESULTS folder(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*map(str, two_models), "--names", "a,a", "--cohorts", "t,t"])
    assert "--names: a run name appears twice in one cohort" in capsys.readouterr().err
    out = tmp_path / "by-cohort"
    assert main([*map(str, two_models), "--names", "a,a", "--cohorts", "t,p", "--out", str(out)]) == 0
    assert "| a | t |" in capsys.readouterr().out


@pytest.mark.integration
def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "mrgen-compare"
    done = subprocess.run([str(script), str(tmp_path / "nope")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (done.returncode, done.stderr) == (1, f"mrgen-compare: error: results folder {tmp_path / 'nope'} "
                                                 "does not exist\n")
