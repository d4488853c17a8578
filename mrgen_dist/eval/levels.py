"""Does a level-conditioned generator make the axial level it is asked for? (`mrgen-fid levels`)

For up to LEVEL_POINTS levels spread over the model's trained levels, `n` generated slices of each scanner
are asked for the level, and the fraction of their pixels inside the head (brighter than `head`: above the
background of every cohort, below any tissue) is set against that of the scanner's real test slices of the
same level. The head's cross-section changes several-fold between the lowest levels and the widest, so a
generator that ignores the level draws a flat line and one that follows it the real curve. Per scanner: the
Pearson correlation over the levels and the mean absolute difference. Written: OUT/levels.json
(results.LevelFollowing), OUT/levels.png (the curves) and OUT/levels-strip.png (real and generated slices of
the first scanner at five levels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mrgen_dist import __version__
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.results import LevelCurve, LevelFollowing
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.runtime.session import SampleError

LEVEL_POINTS = 15
HEAD = 0.1
STRIP_LEVELS = 5


def spread(levels: np.ndarray, points: int) -> np.ndarray:
    """At most `points` of the sorted `levels`, evenly spaced, the first and the last included."""
    picks = np.unique(np.round(np.linspace(0, len(levels) - 1, min(points, len(levels)))).astype(int))
    return levels[picks]


def head_fraction(images: np.ndarray, head: float) -> float:
    return float((images > head).mean())


def level_following(store: SliceStore, sampler: Sampler, out: Path, n: int = 16, seed: int = 0,
                    head: float = HEAD) -> LevelFollowing:
    """Score and plot how `sampler`'s slices follow the asked level on `store`'s test split; writes OUT/levels.json
    and the figures, returns the record."""
    from tqdm import tqdm

    if sampler.levels is None:
        raise SampleError(f"{sampler.path}: this model was not trained with the slice level as a condition "
                          "(model.level_condition): there is no level to follow")
    test = store.load_split("test")
    real_levels = np.unique(test.slice_index)
    levels = spread(sampler.levels[np.isin(sampler.levels, real_levels)], LEVEL_POINTS)
    if len(levels) < 2:
        raise SampleError(f"the test split of {store.root} shares fewer than 2 levels with the model's "
                          f"({sampler.levels[0]}..{sampler.levels[-1]}): nothing to follow")
    names = sampler.resolve("all")
    curves, strip = [], {}
    for name in tqdm(names, desc="levels", unit="scanner"):
        own = np.asarray(test.scanner) == store.vocabulary.index(name)
        real, generated = [], []
        for k in levels:
            rows = np.flatnonzero(own & (test.slice_index == k))
            images = sampler.sample(name, n, seed=seed, level=int(k))
            real.append(head_fraction(np.asarray(test.images[rows], dtype=np.float32), head))
            generated.append(head_fraction(images, head))
            if name == names[0]:
                strip[int(k)] = (np.asarray(test.images[rows[0]], dtype=np.float32), images[0])
        r, g = np.array(real), np.array(generated)
        correlation = float(np.corrcoef(r, g)[0, 1]) if r.std() > 0 and g.std() > 0 else 0.0
        curves.append(LevelCurve(name, [round(x, 5) for x in real], [round(x, 5) for x in generated],
                                 correlation, float(np.abs(r - g).mean())))
    record = LevelFollowing(levels=[int(k) for k in levels], n_generated=n, head_threshold=head, curves=curves,
                            store_sha256=store.sha256, package_version=__version__)
    out.mkdir(parents=True, exist_ok=True)
    record.write(out / LevelFollowing.NAME)
    _plot(record, strip, names[0], out)
    return record


def _plot(record: LevelFollowing, strip: dict[int, tuple[np.ndarray, np.ndarray]], first: str, out: Path) -> None:
    from mrgen_dist.plots import level_curves, scanner_grid

    level_curves(record.levels, [(c.scanner, c.real, c.generated, c.correlation) for c in record.curves],
                 record.head_threshold, out / "levels.png")
    shown = spread(np.array(sorted(strip)), STRIP_LEVELS)
    rows = [(f"{first} real", np.stack([strip[int(k)][0] for k in shown])),
            (f"{first} generated", np.stack([strip[int(k)][1] for k in shown]))]
    captions = [[f"k = {k}" for k in shown]] * 2
    scanner_grid(rows, out / "levels-strip.png", "asked level: real test slice and SYNTHETIC sample", captions)


def summary(record: LevelFollowing) -> str:
    lines = [f"levels {record.levels[0]}..{record.levels[-1]} ({len(record.levels)} points), {record.n_generated} "
             "generated per scanner and level; fraction of the slice inside the head, generated vs real:"]
    lines += [f"  {c.scanner}: correlation {c.correlation:.3f}, mean |difference| {c.mean_abs_difference:.3f}"
              for c in record.curves or []]
    return "\n".join(lines)
