"""`mrgen-demo-data OUT`: a SYNTHETIC cohort for the demo and the tests, of the template kind (mrgen_dist.data.demo,
the default) or the physics kind (`--kind physics`, mrgen_dist.data.physics); docs/cohorts.md describes both."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mrgen_dist.cli import run
from mrgen_dist.commands.options import non_negative_int, positive, with_default_command
from mrgen_dist.data.demo import write_cohort
from mrgen_dist.data.physics import write_physics_cohort
from mrgen_dist.scanners import METHOD_SCANNERS

#: The cohort kinds and their writers: (out, subjects_per_scanner, seed, workers) -> the cohort.csv path.
KINDS = {"template": write_cohort, "physics": write_physics_cohort}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mrgen-demo-data",
        description="Write a small SYNTHETIC cohort of T1 volumes (from the MNI152 template) with IXI/SALD-style "
        "names (`mrgen-demo-data OUT` is `mrgen-demo-data write OUT`). Two kinds: `template` (the default) and "
        "`physics` (MR signal equations, coils, k-space and noise; docs/cohorts.md).",
    )
    sub = ap.add_subparsers(dest="command", metavar="{write}")
    w = sub.add_parser(
        "write",
        help="write the cohort (the default command)",
        description="Write a small SYNTHETIC cohort of T1 volumes (from the MNI152 template) with IXI/SALD-style names.",
    )
    w.add_argument("out", type=Path, help="output folder")
    w.add_argument("--subjects-per-scanner", type=positive(int), default=8, help="volumes per scanner (default 8)")
    w.add_argument("--seed", type=non_negative_int, default=0, help="seed of the cohort (an integer >= 0)")
    w.add_argument("--workers", type=positive(int), default=1, help="parallel processes")
    w.add_argument("--kind", choices=KINDS, default="template",
                   help="template: the MNI152 template with scanner-like appearances (the default); physics: "
                   "simulated acquisitions (signal equations, coils, k-space, noise, site populations)")
    w.set_defaults(body=run_write)
    return ap


def run_write(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    manifest = KINDS[args.kind](args.out, args.subjects_per_scanner, args.seed, args.workers)
    n = args.subjects_per_scanner * len(METHOD_SCANNERS)
    print(f"wrote {n} SYNTHETIC demo volumes ({args.kind} kind) to {args.out} in {time.perf_counter() - t0:.1f} s "
          f"({manifest.name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(with_default_command(argv, ap, "write"))
    return run("mrgen-demo-data", lambda: args.body(args))


if __name__ == "__main__":
    sys.exit(main())
