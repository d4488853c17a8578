"""`mrgen-fid report` and the command line, on hand-written result files: no weights, no model, no store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mrgen_dist.fid.evaluate import build_parser, main
from mrgen_dist.fid.report import NoResults, ReportError, read_results, write_report

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
    assert rows[0] == ["scanner", "fid_mean", "fid_std", "kid_mean", "kid_std", "n_real", "n_generated", "repeats"]
    assert [r[0] for r in rows[1:]] == SCANNERS and float(rows[2][1]) == pytest.approx(107.0)
    assert (results / "fid_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
    from mrgen_dist.cli import with_default_command

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
