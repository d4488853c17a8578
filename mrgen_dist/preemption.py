"""Preemption: catch Slurm's warning signal, stop at a step boundary, and requeue the job.

Slurm sends SIGUSR1 (`#SBATCH --signal=USR1@<seconds>`) or SIGTERM before it kills a job. The handler only
records the signal; the training loop finishes its current step, saves a checkpoint and then calls
`requeue()`, which runs `scontrol requeue $SLURM_JOB_ID` under Slurm. The requeued job starts again with
`--resume auto` and continues from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early on purpose, state saved, run again to continue


class PreemptionFlag:
    """Records SIGUSR1/SIGTERM instead of dying on them."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.received: str | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None


def requeue() -> str:
    """Ask Slurm to requeue this job; returns what was done, for the log."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not under Slurm: checkpoint saved, run again with --resume auto to continue"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"scontrol requeue {job} failed: {e}", file=sys.stderr)
        return f"requeue of job {job} FAILED ({e}); resubmit with --resume auto"
    if done.returncode != 0:
        return f"requeue of job {job} FAILED ({done.stderr.strip()}); resubmit with --resume auto"
    return f"job {job} requeued; it will resume from the checkpoint"
