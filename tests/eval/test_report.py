"""`mrgen-fid report` and the command line, on hand-written result files: no weights, no model, no store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mrgen_dist.commands.fid import build_parser, main
from mrgen_dist.eval.report import NoResults, ReportError, read_results, write_report

SCANNERS = ["Gyroscan Intera", "Intera", "Unspecified", "Magnetom TrioTim"]


def _result(scanner: str, fids: list[float], n: int = 10) -> dict:
    return {
        "scanner": scanner, "n_real": n, "n_generated": n,
        "repeats": [{"seed": i, "fid": f, "kid": 0.01 * f, "kid_std": 0.001} for i, f in enumerate(fids)],
        "fid_mean": float(np.mean(fids)), "fid_std": float(np.std(fids, ddof=1)),
        "kid_mean": 0.01 * float(np.mean(fids)), "kid_std": 0.001,
        "warnings": [f"{n} samples for 2048-d features: the covariance is rank-deficient"],
        "model": {"mrgen.scanners": json.dumps(SCANNERS)},
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    # written in an order that is neither the label order nor alphabetical
    for i, name in enumerate(reversed(SCANNERS)):
        (tmp_path / f"fid_{name.replace(' ', '_')}.json").write_text(json.dumps(_result(name, [100.0 + i, 110.0 + i])))
    return tmp_path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_report_table_in_label_order_without_conditioning(results: Path) -> None:
    written = write_report(results)
    assert [p.name for p in written] == ["fid_table.md", "fid_table.csv", "fid_boxplot.png"]
    table = (results / "fid_table.md").read_text()
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:6]]
    assert rows == SCANNERS
    assert "| Intera | 107.00 ± 7.07 | 1070.00 ± 1.00 | 10 / 10 | 2 |" in table
    assert "Note: 10 samples for 2048-d features (and similar)" in table and "Conditioning" not in table
    with (results / "fid_table.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:8] == ["scanner", "fid_mean", "fid_std", "kid_mean", "kid_std", "n_real", "n_generated", "repeats"]
    assert [r[0] for r in rows[1:]] == SCANNERS and float(rows[2][1]) == pytest.approx(107.0)
    assert rows[2][8:] == [""] * 12  # results written before the quality measures: empty cells
    assert (results / "fid_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "precision" not in table and "Label effect" not in table and "z-probe" not in table  # parts omitted
    assert not (results / "quality.png").exists()
    assert _leftovers(results) == []


def test_report_with_conditioning(results: Path, capsys: pytest.CaptureFixture) -> None:
    confusion = [[9, 1, 0, 0], [0, 10, 0, 0], [2, 0, 8, 0], [0, 0, 0, 10]]
    (results / "conditioning.json").write_text(json.dumps({
        "scanners": SCANNERS, "confusion": confusion, "real_test_accuracy": 1.0, "generated_accuracy": 0.925,
    }))
    assert main(["report", str(results)]) == 0
    out = capsys.readouterr().out
    table = (results / "fid_table.md").read_text()
    assert table in out and "wrote " in out
    assert "accuracy 1.000 and generated slices as the scanner asked for with accuracy 0.925" in table
    assert "| asked for \\ recognised as | Gyroscan Intera | Intera | Unspecified | Magnetom TrioTim |" in table
    assert "| Unspecified | 2 | 0 | 8 | 0 |" in table
    assert (results / "conditioning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(results) == []


def _with_quality(r: dict, i: int) -> dict:
    """A fid_*.json as `mrgen-fid score --n-generated 16` writes it (12 real test slices)."""
    return {**r, "n_real": 12, "n_generated": 16, "fid_n_generated": 12, "fid_biased": True, "noise": False,
            "prdc_k": 5, "ms_ssim_pairs": 200, "precision": 0.5 + 0.1 * i, "recall": 0.25, "density": 1.25,
            "coverage": 0.75, "ms_ssim": 0.8125, "ms_ssim_real": 0.75,
            "signature": {"intensity_w1": 0.0312, "noise_real": 0.0125, "noise_generated": 0.0031,
                          "sharpness_real": 0.042, "sharpness_generated": 0.021}}


def test_report_quality_generation_and_diagnostics(results: Path) -> None:
    for i, path in enumerate(sorted(results.glob("fid_*.json"))):
        path.write_text(json.dumps(_with_quality(json.loads(path.read_text()), i)))
    (results / "conditioning.json").write_text(json.dumps({
        "scanners": SCANNERS, "confusion": [[4, 0, 0, 0], [0, 4, 0, 0], [1, 0, 3, 0], [0, 0, 0, 4]],
        "real_test_accuracy": 1.0, "generated_accuracy": 0.9375, "n_generated": [4, 4, 4, 4],
    }))
    (results / "generation.json").write_text(json.dumps({
        "scanners": SCANNERS, "noise": True, "n_generated": [16] * 4, "sampling_images_per_s": 4321.5,
        "sampler_device": "cpu", "label_effect": {"between_scanners": 0.0125, "between_draws": 0.05, "ratio": 0.25},
        "label_effect_draws": 16,
    }))
    (results / "diagnostics.json").write_text(json.dumps({
        "scanners": SCANNERS, "family": "cvae", "title": "cVAE", "parameters": 1000,
        "z_probe": {"accuracy": 0.3125, "chance": 0.25, "confusion": [[1] * 4] * 4},
        "reconstruction": {"accuracy": 0.875, "confusion": [[1] * 4] * 4, "real_test_accuracy": 1.0},
        "reason": None,
    }))
    written = write_report(results)
    assert [p.name for p in written] == ["fid_table.md", "fid_table.csv", "fid_boxplot.png", "quality.png",
                                         "conditioning.png"]
    table = (results / "fid_table.md").read_text()
    assert "| Intera | 107.00 ± 7.07 † | 1070.00 ± 1.00 | 12 / 16 | 2 |" in table  # † FID biased, n_generated
    assert "† FID on fewer than 2,048 slices per set (here 12 generated" in table
    assert ("| scanner | precision | recall | density | coverage | MS-SSIM gen / real | noise real / gen | "
            "sharpness real / gen | intensity W1 |") in table
    # i by file name: Gyroscan Intera 0, Intera 1, Magnetom TrioTim 2, Unspecified 3
    assert ("| Intera | 0.600 | 0.250 | 1.250 | 0.750 | 0.812 / 0.750 | 0.0125 / 0.0031 | 0.0420 / 0.0210 | "
            "0.0312 |") in table
    assert "differ by 0.0125 between scanners and 0.0500 between draws" in table and "ratio 0.250" in table
    assert "Sampling: 4,322 images/s (onnxruntime on cpu, with the learned observation noise)." in table
    assert "| generated slices, as the scanner asked for | 0.938 |" in table
    assert "| reconstructions of real test slices (decoder ceiling) | 0.875 |" in table
    assert "| z-probe: scanner from posterior means (chance 0.250) | 0.312 |" in table
    assert "Diagnostics (cVAE): the scanner is read from the posterior means (z-probe) with accuracy 0.312" in table
    with (results / "fid_table.csv").open(newline="") as f:
        rows = {r["scanner"]: r for r in csv.DictReader(f)}
    assert rows["Intera"]["fid_biased"] == "True" and float(rows["Intera"]["precision"]) == pytest.approx(0.6)
    assert float(rows["Intera"]["noise_generated"]) == pytest.approx(0.0031)
    assert (results / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(results) == []

    # a family without an encoder, and a one-scanner run (no label effect): those parts say so or are left out
    (results / "diagnostics.json").write_text(json.dumps({
        "family": "gan", "title": "GAN", "z_probe": None, "reconstruction": None,
        "reason": "family gan has no encoder (encode_mean returns None)"}))
    (results / "generation.json").write_text(json.dumps({"label_effect": None, "sampling_images_per_s": 0.6664,
                                                         "sampler_device": "cuda", "noise": False}))
    write_report(results)
    table = (results / "fid_table.md").read_text()
    assert "Diagnostics (GAN): family gan has no encoder (encode_mean returns None)." in table
    assert "Label effect" not in table and "Sampling: 0.666 images/s (onnxruntime on cuda)." in table
    assert "z-probe" not in table and "decoder ceiling" not in table


def test_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(NoResults, match="no fid_\\*.json in"):
        read_results(tmp_path)
    assert issubclass(NoResults, FileNotFoundError)  # as before the split
    assert main(["report", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"mrgen-fid: error: no fid_*.json in {tmp_path}")
    (tmp_path / "fid_x.json").write_text("{not json")
    with pytest.raises(ReportError, match="fid_x.json: unreadable"):
        read_results(tmp_path)
    assert not (tmp_path / "fid_table.md").exists()


def test_default_command_and_parse_time_checks(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    from mrgen_dist.commands.options import with_default_command

    plain = parser.parse_args(with_default_command(["--store", "S", "--model", "M"], parser, "score"))
    named = parser.parse_args(["score", "--store", "S", "--model", "M"])
    assert plain == named and plain.command == "score" and plain.repeats == 20 and plain.scanner == "all"
    cond = parser.parse_args(with_default_command(["conditioning", "--store", "S", "--model", "M"], parser, "score"))
    assert cond.command == "conditioning" and not hasattr(cond, "repeats")
    report = parser.parse_args(with_default_command(["report", "results/fid"], parser, "score"))
    assert report.command == "report" and report.results == Path("results/fid")
    for bad in (["--repeats", "0"], ["--repeats", "two"]):
        with pytest.raises(SystemExit) as exit_:
            main(["--store", "S", "--model", "M", *bad])
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --repeats: must be > 0, got 0" in err and "expected an integer, got 'two'" in err
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(c in out for c in ("score", "conditioning", "report"))


def test_missing_store_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--store", str(tmp_path / "nope"), "--model", str(tmp_path / "m.onnx"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mrgen-fid: error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["figure.png", "figure.pdf", "figure"])
def test_plots_are_written_atomically_in_the_suffix_format(tmp_path: Path, name: str) -> None:
    from mrgen_dist.plots import confusion_matrix

    path = confusion_matrix(np.array([[3, 1], [0, 4]]), ["a", "b"], tmp_path / name)
    assert path == tmp_path / name
    magic = {"figure.pdf": b"%PDF"}.get(name, b"\x89PNG")  # no suffix: matplotlib's default format (png)
    assert path.read_bytes().startswith(magic)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
