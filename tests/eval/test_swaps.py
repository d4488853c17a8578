"""The component-swap probe (mrgen_dist/eval/swaps.py) on slices whose scanners differ by one known component."""

from __future__ import annotations

import numpy as np
import pytest

from mrgen_dist.eval.results import Diagnostics, Swap
from mrgen_dist.eval.swaps import (
    BANDS,
    REGIONS,
    band,
    band_changes,
    head_regions,
    swap_probe,
    swap_table,
    swapped,
)

SHAPE = (64, 56)


def _heads(n: int, noise: float, seed: int) -> np.ndarray:
    """n slices of a bright disc (a head) on air, with white noise of `noise` over the whole slice."""
    rows, columns = np.mgrid[: SHAPE[0], : SHAPE[1]]
    disc = (((rows - 32) / 26.0) ** 2 + ((columns - 28) / 22.0) ** 2 < 1).astype(np.float32) * 0.5
    return disc + np.random.default_rng(seed).normal(0, noise, (n, *SHAPE)).astype(np.float32)


def _noise_reader(images: np.ndarray) -> np.ndarray:
    """A 'classifier' that reads scanner 1 where the interior's fine texture is strong, else scanner 0."""
    interior = head_regions(_heads(8, 0.0, 0))["interior"]
    return (band(images, "fine")[:, interior].std(axis=1) > 0.05).astype(int)


def test_the_regions_split_the_slice_and_the_bands_add_up() -> None:
    images = _heads(4, 0.02, 0)
    regions = head_regions(images)
    total = sum(m.astype(int) for m in regions.values())
    assert (total == 1).all()  # disjoint, together the whole slice
    assert regions["interior"][32, 28] and regions["background"][0, 0] and regions["rim"].sum() > 0
    assert not regions["interior"][32, 4]  # the disc's edge is rim, not interior
    np.testing.assert_allclose(band(images, "coarse") + band(images, "fine"), images, atol=1e-6)
    np.testing.assert_array_equal(band(images, "all"), images)


def test_a_swap_changes_only_its_region_and_band() -> None:
    real, recon = _heads(3, 0.02, 0), _heads(3, 0.1, 1)
    regions = head_regions(real)
    out = swapped(real, band_changes(real, recon)["all"], regions["background"])
    np.testing.assert_array_equal(out[:, ~regions["background"]], real[:, ~regions["background"]])
    np.testing.assert_allclose(out[:, regions["background"]], recon[:, regions["background"]], atol=1e-7)
    np.testing.assert_array_equal(swapped(real, band_changes(real, real)["fine"], regions["interior"]), real)


def test_the_probe_names_the_component_that_is_misread() -> None:
    """Scanner 0 has quiet slices, scanner 1 noisy ones; every reconstruction is noisy. Only swaps that carry the
    reconstructions' fine interior texture into scanner 0's slices make them read as scanner 1."""
    real = np.concatenate([_heads(10, 0.01, 0), _heads(10, 0.2, 1)])
    scanner = np.repeat([0, 1], 10)
    recon = _heads(20, 0.2, 2)
    assert (_noise_reader(real) == scanner).all()
    swaps = {(s.region, s.band): s for s in swap_probe(real, recon, scanner, _noise_reader, 2)}
    assert list(swaps) == [(r, b) for r in REGIONS for b in BANDS]
    for key in (("interior", "all"), ("interior", "fine")):
        assert swaps[key].accuracy == 0.5 and swaps[key].confusion == [[0, 10], [0, 10]]
    for key in (("interior", "coarse"), ("background", "all"), ("rim", "fine")):
        assert swaps[key].accuracy == 1.0 and swaps[key].confusion == [[10, 0], [0, 10]]
    assert swaps["interior", "all"].pixels == int(head_regions(real)["interior"].sum())
    table = swap_table(list(swaps.values()), ["quiet", "noisy"])
    assert "| interior, fine |" in table and "| 0.500 | 0.00 | 1.00 |" in table


def test_swaps_round_trip_in_the_diagnostics_file(tmp_path) -> None:
    record = Diagnostics(scanners=["a", "b"], swaps=[Swap("interior", "fine", 12, 0.5, [[0, 1], [0, 1]])])
    path = record.write(tmp_path / Diagnostics.NAME)
    assert Diagnostics.read(path) == record
    assert Diagnostics.read(path).swaps[0].confusion == [[0, 1], [0, 1]]


@pytest.mark.parametrize("name", ["all", "coarse", "fine"])
def test_bands_keep_the_shape_and_dtype(name: str) -> None:
    images = _heads(2, 0.02, 0)
    assert band(images, name).shape == images.shape and band(images, name).dtype == np.float32
