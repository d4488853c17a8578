"""The learning rate over a run (mrgen_dist/lr_schedule.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mrgen_dist.lr_schedule import lr_factor, set_learning_rates


def test_constant_is_one_after_its_warm_up() -> None:
    assert [lr_factor(s, 100, "constant", 0, 0.1) for s in (0, 50, 99, 500)] == [1.0] * 4
    assert [lr_factor(s, 100, "constant", 4, 0.1) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_falls_from_one_to_the_floor_at_the_last_step() -> None:
    factors = [lr_factor(s, 101, "cosine", 0, 0.1) for s in range(101)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.1) and factors[50] == pytest.approx(0.55)
    assert all(a > b for a, b in zip(factors[:-1], factors[1:], strict=True))
    assert lr_factor(30, 101, "cosine", 0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    assert lr_factor(150, 101, "cosine", 0, 0.1) == pytest.approx(0.1)  # past the end: the floor
    # after a warm-up the decay spans the remaining steps
    assert lr_factor(9, 100, "cosine", 10, 0.1) == 1.0 == lr_factor(10, 100, "cosine", 10, 0.1)
    assert lr_factor(99, 100, "cosine", 10, 0.2) == pytest.approx(0.2)


def test_an_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        lr_factor(5, 10, "step", 0, 0.1)


def test_rates_scale_each_groups_own_base_and_survive_a_state_dict() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([{"params": [w], "lr": 1e-3}, {"params": [b], "lr": 4e-3}])
    set_learning_rates([optimizer], 0.5)
    set_learning_rates([optimizer], 0.25)  # from the base, not from the last rate
    assert [g["lr"] for g in optimizer.param_groups] == [2.5e-4, 1e-3]
    resumed = torch.optim.Adam([{"params": [w], "lr": 1e-3}, {"params": [b], "lr": 4e-3}])
    resumed.load_state_dict(optimizer.state_dict())
    set_learning_rates([resumed], 1.0)
    assert [g["lr"] for g in resumed.param_groups] == [1e-3, 4e-3]
