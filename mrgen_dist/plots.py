"""Figures people look at rather than read: slice grids per scanner, loss curves, FID boxplots, confusion matrices.

Every figure is written atomically (`mrgen_dist.atomic.atomic_path`), in the format its file name's suffix
names (png, pdf, svg, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mrgen_dist.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: compute nodes have no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int) -> Path:
    """Save `fig` to `path` atomically, in the format of its suffix (matplotlib's default without one), and
    close it."""
    plt = _pyplot()
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            # the format is named: the temporary file's own suffix ends in .tmp when `path` has none
            fig.savefig(tmp, dpi=dpi, format=path.suffix[1:] or plt.rcParams["savefig.format"])
    finally:
        plt.close(fig)
    return path


def scanner_grid(
    rows: Sequence[tuple[str, np.ndarray]],
    path: str | Path,
    title: str,
    captions: Sequence[Sequence[str]] | None = None,
) -> Path:
    """One row per scanner: (name, images (n, H, W) in [0, 1]), shown with a fixed [0, 1] grey scale so that
    brightness and contrast differences between scanners stay visible."""
    plt = _pyplot()
    n_cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(1.6 * n_cols + 1.2, 1.95 * len(rows) + 0.4), squeeze=False
    )
    for r, (name, images) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(np.asarray(images[c], dtype=np.float32), cmap="gray", vmin=0.0, vmax=1.0)
                if captions is not None:
                    ax.set_title(captions[r][c], fontsize=7)
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi=80)


def loss_curves(history: Sequence[dict], names: Sequence[str], path: str | Path) -> Path:
    """Train and test value per epoch of the run's loss, `names[0]` (left), and of its other terms (right,
    log scale, only where there are other terms); `history` records hold `train_<name>` and `test_<name>`."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2 if len(names) > 1 else 1, figsize=(10 if len(names) > 1 else 5, 3.6),
                             squeeze=False)
    ax = axes[0, 0]
    ax.plot(epochs, [h[f"train_{names[0]}"] for h in history], "o-", ms=3, label="train")
    ax.plot(epochs, [h[f"test_{names[0]}"] for h in history], "s-", ms=3, label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{names[0]} per image")
    ax.legend()
    ax.grid(alpha=0.3)
    if len(names) == 1:
        return _save(fig, path, dpi=90)
    ax2 = axes[0, 1]
    for key, style in zip(names[1:], ("-", "--", "-.", ":") * len(names), strict=False):
        ax2.plot(epochs, [h[f"train_{key}"] for h in history], style, label=f"train {key}")
        ax2.plot(epochs, [h[f"test_{key}"] for h in history], style, label=f"test {key}", alpha=0.7)
    ax2.set_xlabel("epoch")
    values = [h[f"{side}_{key}"] for h in history for key in names[1:] for side in ("train", "test")]
    ax2.set_yscale("log" if all(v > 0 for v in values) else "symlog")  # a critic's terms can be negative
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return _save(fig, path, dpi=90)


def fid_boxplot(results: Sequence[dict], path: str | Path) -> Path:
    """FID over repeats, one box per scanner (the thesis's figure), with each repeat drawn as a point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.8 * len(results) + 2, 4))
    values = [[r["fid"] for r in res["repeats"]] for res in results]
    ax.boxplot(values)
    for i, v in enumerate(values, start=1):
        ax.plot(np.full(len(v), i) + np.linspace(-0.08, 0.08, len(v)), v, ".", alpha=0.5, color="tab:blue")
    ax.set_xticks(range(1, len(results) + 1), [f"{res['scanner']}\n(n={res['n_real']})" for res in results], fontsize=8)
    ax.set_ylabel(f"FID over {len(values[0])} repeats")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, dpi=90)


def confusion_matrix(counts: np.ndarray, names: Sequence[str], path: str | Path) -> Path:
    """Generated slices: scanner asked for (rows) vs scanner recognised by the classifier (columns)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    ax.imshow(counts, cmap="Blues")
    for (r, c), v in np.ndenumerate(counts):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > counts.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("recognised as")
    ax.set_ylabel("asked for")
    ax.set_title("conditioning of generated slices")
    return _save(fig, path, dpi=90)


def level_curves(levels: Sequence[int], curves: Sequence[tuple[str, Sequence[float], Sequence[float], float]],
                 threshold: float, path: str | Path) -> Path:
    """Per scanner (name, real, generated, correlation): the fraction of the slice inside the head at each
    asked axial level, real (solid) and generated (dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, real, generated, correlation) in enumerate(curves):
        ax.plot(levels, real, color=f"C{i}", label=f"{name} real")
        ax.plot(levels, generated, "--", color=f"C{i}", label=f"generated (r = {correlation:.2f})")
    ax.set_xlabel("axial level k (MNI grid)")
    ax.set_ylabel(f"fraction of the slice > {threshold:g}")
    ax.set_title("SYNTHETIC slices asked for a level vs real test slices")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path, dpi=120)


def translation_bounds(result: dict, path: str | Path) -> Path:
    """benchmarks/translation_bounds.py's figure: the cycle SSIM a translator that draws fresh noise can reach,
    per scanner, and how often the target's appearance with some of Unspecified's blur left is read as it."""
    plt = _pyplot()
    names, targets = result["scanners"], result["targets"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.bar(range(len(names)), result["fresh_noise_cycle_ssim"], color="tab:gray")
    left.axhline(targets["cycle_ssim"], color="tab:red", linestyle="--", label=f"target {targets['cycle_ssim']}")
    left.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    left.set_ylim(0, 1)
    left.set_ylabel("SSIM(x, second noise draw)")
    left.set_title("cycle SSIM of a perfect translator\nthat draws fresh noise", fontsize=10)
    left.legend(fontsize=8, loc="lower right")
    blurs = sorted(result["blur_left"], key=float, reverse=True)
    for t, name in enumerate(names):
        points = [(float(b), result["blur_left"][b][t]) for b in blurs if result["blur_left"][b][t] is not None]
        if points:
            right.plot(*zip(*points, strict=True), "o-", label=name)
    right.axhline(targets["conditioning"], color="tab:red", linestyle="--", label=f"target {targets['conditioning']}")
    right.invert_xaxis()
    right.set_xlabel("Gaussian point-spread left (mm; Unspecified's is 1.6)")
    right.set_ylabel("read as the target")
    right.set_ylim(-0.03, 1.03)
    right.set_title("the target's appearance with blur left", fontsize=10)
    right.legend(fontsize=8, loc="center left")
    fig.suptitle(f"what a translator can reach ({result['subjects']} new demo subjects, "
                 f"{result['slices_per_cell']} slices per cell)", fontsize=10)
    return _save(fig, path, dpi=90)
