"""Train a generator of any model family: one loop, top to bottom, that knows no family.

    accelerate launch -m mrgen_dist.commands.train --config hpc/configs/thesis.yaml data.store=/scratch/store
    mrgen-train --config hpc/configs/demo.yaml train.epochs=5 --resume auto

The family (`model.family`, mrgen_dist/models/) builds the networks and their optimizers and makes one
micro-step, returning named losses; this loop feeds it batches, keeps the books and checkpoints.
The split is read from the store once and kept on the device; every rank draws its batches from it with
seeded per-epoch indices, and the family's noise is drawn from a generator seeded by (seed, rank,
micro-step), so an interrupted and resumed run makes exactly the steps an uninterrupted one makes.

Exit status: 0 finished; 75 stopped by SIGUSR1/SIGTERM after saving a checkpoint (requeued under Slurm);
3 non-finite loss (the last good checkpoint is kept); 1 a configuration, store or checkpoint error, or a file
that cannot be written (disk full: one line naming the file; no file is left half-written under its name).

`--resume auto` continues from the newest intact checkpoint, and starts afresh only in a folder that is absent,
empty or holds no more than a start stopped before its first checkpoint (config.yaml, metrics.jsonl); a run with
nothing to resume (a finished run whose checkpoints were removed) is refused: `--overwrite` moves it aside.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrgen_dist.cli import run
from mrgen_dist.training import TrainRequest, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mrgen-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="YAML config (hpc/configs/*.yaml)")
    ap.add_argument("--resume", default="none",
                    help="auto (newest complete checkpoint, if any), none, or a checkpoint folder")
    ap.add_argument("--overwrite", action="store_true",
                    help="start afresh in a train.out that holds another run, moving that run aside to "
                         "TRAIN.OUT.replaced-<time> (without it, such a folder is refused unless resumed)")
    ap.add_argument("--tracker", choices=("clearml", "none"), help="overrides train.tracker")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-4 train.epochs=5")
    return ap.parse_intermixed_args(argv)  # options and overrides in any order


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    request = TrainRequest(args.config, args.overrides, args.resume, args.overwrite, args.tracker)
    return run("mrgen-train", lambda: train(request))


if __name__ == "__main__":
    sys.exit(main())
