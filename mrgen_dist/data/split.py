"""Train/test splits of a store, recorded in its manifest.

* `subject` (default): whole subjects go to one side; per scanner, the sorted subject ids are shuffled with
  the seed and the first round(test_fraction * n) (at least one where a scanner has two or more subjects)
  become test. No subject has slices on both sides.
* `slice`: the thesis's protocol: all slices shuffled with the seed, the first round(test_fraction * N) are
  test. Slices of one subject can fall on both sides (leakage the thesis accepted).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLIT_UNITS = ("subject", "slice")


def subject_split(subjects_by_scanner: dict[str, Sequence[str]], test_fraction: float, seed: int) -> list[str]:
    """Test subjects, stratified by scanner; iteration follows the dict's (vocabulary) order."""
    _check_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    test: list[str] = []
    for subjects in subjects_by_scanner.values():
        ordered = sorted(set(subjects))
        n_test = round(test_fraction * len(ordered))
        if len(ordered) >= 2 and test_fraction > 0:
            n_test = min(max(n_test, 1), len(ordered) - 1)
        test.extend(ordered[i] for i in rng.permutation(len(ordered))[:n_test])
    return sorted(test)


def slice_split(n_slices: int, test_fraction: float, seed: int) -> list[int]:
    """Global slice indices of the test side."""
    _check_fraction(test_fraction)
    n_test = round(test_fraction * n_slices)
    return sorted(np.random.default_rng(seed).permutation(n_slices)[:n_test].tolist())


def holdout_mask(split: dict, subjects: np.ndarray, offset: int = 0) -> np.ndarray:
    """Boolean per slice: True where the slice is on the test side of `split`.

    `subjects` are the subjects of consecutive slices in store order starting at global index `offset`.
    """
    if split["unit"] == "subject":
        return np.isin(subjects, np.asarray(split["test"], dtype=object))
    if split["unit"] == "slice":
        return np.isin(np.arange(offset, offset + len(subjects)), np.asarray(split["test"], dtype=np.int64))
    raise ValueError(f"unknown split unit {split['unit']!r}; expected one of {SPLIT_UNITS}")


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
