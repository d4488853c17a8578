"""Per-rank, per-epoch views of a resident split: which slices each process trains on in one epoch.

Pure numpy: the training loop indexes its resident split tensor with these indices, so no process reads a
file per step.
"""

from __future__ import annotations

import numpy as np


def epoch_indices(n: int, *, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """This rank's indices into a resident split for one epoch.

    All ranks draw the same seeded permutation of range(n) for (seed, epoch) and take every world_size-th
    element from position `rank`, after dropping the tail so that every rank gets n // world_size indices
    (equal step counts keep collective ops in lockstep). Ranks are disjoint; together they cover all but
    n % world_size slices, which differ from epoch to epoch.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if n < world_size:
        raise ValueError(f"{n} slices cannot be split over {world_size} ranks")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = n // world_size
    return order[: per_rank * world_size][rank::world_size]
