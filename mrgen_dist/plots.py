"""Figures people look at rather than read: slice grids per scanner (and, later, curves and boxplots)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: compute nodes have no display
    import matplotlib.pyplot as plt

    return plt


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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
