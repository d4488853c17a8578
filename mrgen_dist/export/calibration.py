"""The ancestral sampler's calibrated variance, measured when a diffusion run is exported.

`variance: calibrated` (runtime/diffusion.py) adds to each ancestral step the share of the network's own error
of x0 that the step carries. That error is a property of the trained network, per scanner and per step of the
file's sampler, so the exporter measures it once, on `CALIBRATION_SLICES` training slices of each scanner of
the store the run was trained on, and writes the table into the file (`mrgen.sampler` `x0_error`). The slices
are mapped to the model's space by the graph (`DenoiserGraph.model_space`) and read back through the same
guided prediction the sampler makes, so that the table describes the file as it is sampled. A refiner's error
is tabled per bin of its low-pass level as well, which its coarse slice gives, not the draw.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from mrgen_dist.artifacts import RunRecord
from mrgen_dist.data.store import SliceStore, StoreError
from mrgen_dist.export import ExportError
from mrgen_dist.models.base import DenoiserGraph, ModelSpace
from mrgen_dist.runs import store_mismatch
from mrgen_dist.runtime.diffusion import SamplerSettings, error_table, level_bins, x0_errors

#: Training slices per scanner the error is measured on, and how many go through the network at once.
CALIBRATION_SLICES, CALIBRATION_BATCH = 32, 16
#: Bins of the low-pass level the error is tabled by, for a graph that has one (at quantiles: equally filled).
LEVEL_BINS = 8


def calibration_slices(record: RunRecord, store: str | Path | None = None, per_scanner: int = CALIBRATION_SLICES,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to `per_scanner` training slices (n, H, W) float32 of each scanner with their labels (n,), drawn with
    `seed` from the store the run was trained on (`store`, or the path its config names); an ExportError when
    that store is not there or is not the run's."""
    path = Path(store or record.config.get("data", {}).get("store", ""))
    try:
        slices = SliceStore(path)
    except (StoreError, OSError) as e:
        raise ExportError(f"model.variance=calibrated measures the network on its training slices, and the run's "
                          f"store {path} cannot be read ({e}); pass the store with --store") from None
    mismatch = store_mismatch(slices, record)
    if mismatch:
        raise ExportError(f"model.variance=calibrated measures the network on its training slices, and the run "
                          f"was {mismatch}; pass that store with --store")
    train = slices.read_split("train")
    labels = np.asarray(train.scanner, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:per_scanner]
                             for k in range(len(record.vocabulary))])
    return train.images[chosen].astype(np.float32), labels[chosen]


def calibrate(graph: DenoiserGraph, settings: SamplerSettings, images: np.ndarray, scanner: np.ndarray,
              seed: int = 0) -> SamplerSettings:
    """`settings` with `x0_error` measured on the slices `images` (n, H, W) in [0, 1] of labels `scanner` (n,):
    the graph's mean squared error of x0 at each step, per scanner (runtime/diffusion.py `x0_errors`), and for a
    graph whose sampler knows the low-pass level (a refiner), per bin of it: `LEVEL_BINS` bins at the pooled
    quantiles of the slices' low-pass, their edges the `x0_error_levels`."""
    spaces = [graph.model_space(images[start : start + CALIBRATION_BATCH])
              for start in range(0, len(images), CALIBRATION_BATCH)]
    return calibrate_on(spaces, settings, scanner, seed)


def calibrate_on(spaces: list[ModelSpace], settings: SamplerSettings, scanner: np.ndarray, seed: int = 0
                 ) -> SamplerSettings:
    """`settings` calibrated (`calibrate`) on slices already in the model's space, batch after batch, with their
    labels `scanner` (all batches' in order)."""
    from tqdm import tqdm

    levels = () if spaces[0].low_pass is None else level_edges(np.concatenate([s.low_pass for s in spaces]))
    rng = np.random.default_rng(seed)
    sums, pixels, start = [], [], 0
    for space in tqdm(spaces, desc="calibrate the sampler's variance", unit="batch", file=sys.stderr):
        bins = None if space.low_pass is None else level_bins(space.low_pass, levels)
        batch = x0_errors(space.denoise, space.x0, scanner[start : start + len(space.x0)], settings, rng, bins,
                          len(levels) + 1)
        sums.append(batch[0])
        pixels.append(batch[1])
        start += len(space.x0)
    table = error_table(np.concatenate(sums), np.concatenate(pixels), scanner, settings.null_label)
    return dataclasses.replace(settings, variance="calibrated", x0_error=table, x0_error_levels=levels)


def level_edges(low_pass: np.ndarray, bins: int = LEVEL_BINS) -> tuple[float, ...]:
    """The inner edges of `bins` bins at the quantiles of the levels `low_pass` (any shape), pooled; fewer where
    quantiles coincide (a slice mostly of one level)."""
    edges = np.unique(np.quantile(low_pass, np.arange(1, bins) / bins))
    return tuple(float(e) for e in edges)
