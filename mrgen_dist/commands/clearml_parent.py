"""`python -m mrgen_dist.commands.clearml_parent --project P --name N`: create the ClearML parent task of a
pipeline (hpc/slurm/pipeline.sh) and print its id, so that its array tasks and report attach to it."""

from __future__ import annotations

import argparse
import sys

from mrgen_dist.tracking import create_parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mrgen_dist.commands.clearml_parent", description=__doc__)
    ap.add_argument("--project", default="mrgen-dist")
    ap.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    print(create_parent(args.project, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
