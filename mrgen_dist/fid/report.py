"""The report of `mrgen-fid` results: table, CSV, boxplot and confusion matrix (`mrgen-fid report RESULTS`).

    RESULTS/fid_table.md    scanner, FID mean ± std, KID × 10³ mean ± std, n, repeats (the thesis table),
                            with the conditioning summary and its confusion matrix when conditioning.json exists
    RESULTS/fid_table.csv   the same numbers, unrounded
    RESULTS/fid_boxplot.png FID over repeats, one box per scanner
    RESULTS/conditioning.png the confusion matrix of the conditioning check

Rows follow the model's label order (its `mrgen.scanners` metadata, kept in every fid_<scanner>.json).
Reads JSON only: no torch, no model, no store.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from mrgen_dist.atomic import atomic_write
from mrgen_dist.cli import UserError
from mrgen_dist.scanners import Vocabulary

CSV_COLUMNS = ("scanner", "fid_mean", "fid_std", "kid_mean", "kid_std", "n_real", "n_generated", "repeats")


class ReportError(UserError):
    """The results folder cannot be reported: no results, or a result file that cannot be read."""


class NoResults(ReportError, FileNotFoundError):
    """No fid_*.json in the results folder."""


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: unreadable ({e})") from None


def read_results(results: Path) -> tuple[list[dict], dict | None]:
    """The per-scanner results in the model's label order, and the conditioning result (None when absent)."""
    per_scanner = [_read(p) for p in sorted(results.glob("fid_*.json"))]
    if not per_scanner:
        raise NoResults(f"no fid_*.json in {results}; run mrgen-fid first")
    try:
        order = Vocabulary.from_names(json.loads(per_scanner[0]["model"]["mrgen.scanners"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ReportError(f"{results}: the fid_*.json do not name the model's scanners ({e!r}); "
                          "run mrgen-fid again") from None
    per_scanner.sort(key=lambda r: order.index(r["scanner"]) if r["scanner"] in order else len(order))
    cond_path = results / "conditioning.json"
    return per_scanner, _read(cond_path) if cond_path.is_file() else None


def table_csv(per_scanner: list[dict]) -> str:
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for r in per_scanner:
        w.writerow([r["scanner"], r["fid_mean"], r["fid_std"], r["kid_mean"], r["kid_std"], r["n_real"],
                    r["n_generated"], len(r["repeats"])])
    return text.getvalue()


def table_markdown(per_scanner: list[dict], cond: dict | None) -> str:
    lines = ["| scanner | FID (mean ± std) | KID × 10³ (mean ± std) | n real / generated | repeats |",
             "|---|---|---|---|---|"]
    for r in per_scanner:
        lines.append(f"| {r['scanner']} | {r['fid_mean']:.2f} ± {r['fid_std']:.2f} | "
                     f"{1e3 * r['kid_mean']:.2f} ± {1e3 * r['kid_std']:.2f} | {r['n_real']} / {r['n_generated']} | "
                     f"{len(r['repeats'])} |")
    notes = sorted({w for r in per_scanner for w in r["warnings"]})
    if notes:
        lines += ["", "Note: " + notes[0].split(":")[0] + " (and similar): FID is biased upwards at these sample "
                  "sizes; compare FIDs only at equal n, or use KID."]
    if cond:
        lines += ["", f"Conditioning: a scanner classifier on Inception features recognises real test slices with "
                  f"accuracy {cond['real_test_accuracy']:.3f} and generated slices as the scanner asked for with "
                  f"accuracy {cond['generated_accuracy']:.3f}.", "",
                  "| asked for \\ recognised as | " + " | ".join(cond["scanners"]) + " |",
                  "|---" * (len(cond["scanners"]) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(map(str, row)) + " |"
                  for name, row in zip(cond["scanners"], cond["confusion"], strict=True)]
    return "\n".join(lines) + "\n"


def write_report(results: Path) -> list[Path]:
    """fid_table.md, fid_table.csv, fid_boxplot.png and, when conditioning.json is present, conditioning.png;
    returns their paths in that order."""
    from mrgen_dist.plots import confusion_matrix, fid_boxplot

    results = Path(results)
    per_scanner, cond = read_results(results)
    written = [atomic_write(results / "fid_table.md", table_markdown(per_scanner, cond)),
               atomic_write(results / "fid_table.csv", table_csv(per_scanner)),
               fid_boxplot(per_scanner, results / "fid_boxplot.png")]
    if cond:
        written.append(confusion_matrix(np.array(cond["confusion"]), cond["scanners"], results / "conditioning.png"))
    return written
