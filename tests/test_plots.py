"""Figures that no command test draws: the translation bounds of benchmarks/translation_bounds.py."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image

from mrgen_dist.plots import translation_bounds


def test_translation_bounds_figure(tmp_path: Path) -> None:
    names = ["Gyroscan Intera", "Intera", "Unspecified", "Magnetom TrioTim"]
    result = {
        "scanners": names, "subjects": 1, "slices_per_cell": 10, "targets": {"conditioning": 0.95, "cycle_ssim": 0.9},
        "fresh_noise_cycle_ssim": [0.62, 0.77, 0.5, 0.91],
        "blur_left": {"1.6": [0.0, 0.0, None, 0.0], "0.8": [0.97, 1.0, None, 0.82], "0.4": [None, None, None, 1.0]},
    }
    path = translation_bounds(result, tmp_path / "bounds.png")
    assert path == tmp_path / "bounds.png" and not list(tmp_path.glob("*.tmp"))
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (342, 900)  # 10 x 3.8 inches at 90 dpi
    assert image[..., :3].std() > 0.05  # drawn, not blank
