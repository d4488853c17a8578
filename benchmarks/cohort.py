"""The benchmarks' cohort: the synthetic demo cohort's files listed many times, under distinct subject ids, in a
manifest CSV, so that a store reaches a size where reads are not dominated by fixed costs without rendering
thousands of volumes."""

from __future__ import annotations

import csv
from pathlib import Path

from mrgen_dist.data.demo import write_cohort


def replicated_manifest(out: Path, volumes: int, unique: int = 2) -> Path:
    """OUT/bench.csv listing `volumes` inputs (path, scanner, subject), drawn in turn from a demo cohort of `unique`
    subjects per scanner written once to OUT/cohort."""
    cohort = out / "cohort"
    if not (cohort / "cohort.csv").is_file():
        write_cohort(cohort, subjects_per_scanner=unique, seed=0, workers=2)
    files = sorted(cohort.glob("*.nii.gz"))
    with (cohort / "cohort.csv").open() as f:
        scanner_of = {row["path"]: row["scanner"] for row in csv.DictReader(f)}
    manifest = out / "bench.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "scanner", "subject"])
        for i in range(volumes):
            p = files[i % len(files)]
            w.writerow([f"cohort/{p.name}", scanner_of[p.name], f"bench{i:05d}"])
    return manifest
