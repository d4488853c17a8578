"""The real reference's slices (eval/reference.py) and its command's refusal; the reference scored beside a model,
with the real Inception weights, is in test_evaluate.py (it reuses that module's scored model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mrgen_dist.commands.fid import main
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.features import FidError
from mrgen_dist.eval.reference import TrainingSlices


def test_training_slices_are_distinct_seeded_and_bounded(store_dir: Path) -> None:
    store = SliceStore(store_dir)
    train = store.read_split("train", "Intera").images.astype(np.float32)  # 20 slices
    slices = TrainingSlices(store)
    drawn = slices.sample("Intera", 12, seed=3)
    rows = [int(np.flatnonzero((train == image).all(axis=(1, 2)))[0]) for image in drawn]
    assert drawn.dtype == np.float32 and len(set(rows)) == 12  # the store's own slices, none twice
    assert np.array_equal(slices.sample("Intera", 12, seed=3), drawn)  # the seed decides the subset
    assert not np.array_equal(slices.sample("Intera", 12, seed=4), drawn)
    assert len(slices.sample("Intera", 20)) == 20
    with pytest.raises(FidError, match="needs 21 training slices of 'Intera'.* has 20"):
        slices.sample("Intera", 21)


def test_too_many_asked_is_a_user_error(store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["reference", "--store", str(store_dir), "--n-generated", "500", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "mrgen-fid: error: the reference needs 500 training slices of 'Gyroscan Intera'" in err
    assert "--n-generated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # refused before any work: not even the real features' cache
