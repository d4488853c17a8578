"""`mrgen-compare`: one table comparing models, from the results folders of `mrgen-fid`.

    mrgen-compare runs/cvae/results runs/vae/results --out results/compare --names cvae,vae

Each RESULTS folder is one model's evaluation (the `--out` of `mrgen-fid score` and `mrgen-fid diagnose`):
`fid_<scanner>.json` per scanner, `conditioning.json`, `generation.json` and `diagnostics.json`. Any of them,
or any key in them, may be missing: the cell then shows "—". A folder with `translation.json` (`mrgen-fid
translation`) is a translator's: it gets a row in the translators' table (mrgen_dist/eval/compare_translation.py)
instead. One row per folder; the run's name is the
folder's name (with as many parent folders as it takes to tell the runs apart) unless `--names` is given.

    mrgen-compare t/atlas/results p/atlas/results --names atlas,atlas --cohorts template,physics

`--cohorts` names the cohort of each RESULTS folder (its store): the table gets a cohort column, the rows of
one cohort must share a store, and a run (by name) "meets targets" only where it meets them on every cohort.

    OUT/compare.md   the table, its footnotes, the store (sha256 prefix) and the scanners; also printed
    OUT/compare.csv  the same numbers unrounded, one row per run, with FID, KID and conditioning per scanner
    OUT/compare.png  one row per run: conditioning / z-probe / reconstruction against their targets, KID per
                     scanner, precision / recall / density / coverage

Values averaged over scanners are plain means over the scanners that have them; "(k/n)" marks a mean over k
of the n scanners. The verdict checks the targets (mrgen_dist/eval/targets.py: conditioning >= 0.90,
z-probe <= 0.40, train-on-synthetic accuracy >= 0.90, nearest-neighbour ratio >= 0.9, noise and sharpness within
25 %) and says why a model misses them. Results from different stores (`store_sha256`) or scanner lists are refused.
Reads JSON only: no torch, no model, no store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrgen_dist.cli import run
from mrgen_dist.eval.compare import compare

PROG = "mrgen-compare"


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if any(not n for n in names):
        raise argparse.ArgumentTypeError(f"expected non-empty comma-separated names, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, metavar="RESULTS", help="results folders of mrgen-fid, one per model")
    ap.add_argument("--out", type=Path, default=Path("results/compare"), help="where compare.md/.csv/.png go")
    ap.add_argument("--names", type=_names, help="comma-separated run names, one per RESULTS (default: folder names)")
    ap.add_argument("--cohorts", type=_names, help="comma-separated cohort names, one per RESULTS (e.g. "
                    "template,template,physics,physics)")
    return ap


def _body(args: argparse.Namespace) -> None:
    written = compare(args.results, args.out, args.names, args.cohorts)
    print(written[0].read_text())
    print("wrote " + ", ".join(str(p) for p in written))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option in ("names", "cohorts"):
        given = getattr(args, option)
        if given is not None and len(given) != len(args.results):
            parser.error(f"--{option} has {len(given)} name(s) for {len(args.results)} RESULTS folder(s)")
    if args.names is not None:
        rows = list(zip(args.cohorts or [None] * len(args.names), args.names, strict=True))
        if len(set(rows)) < len(rows):
            parser.error("--names: a run name appears twice" + (" in one cohort" if args.cohorts else "")
                         + f": {', '.join(args.names)}")
    return run(PROG, lambda: _body(args))


if __name__ == "__main__":
    sys.exit(main())
