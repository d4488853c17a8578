"""Figures that no command test draws: the translation bounds of benchmarks/translation_bounds.py, and the loss
curves of a family with one loss term."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.image
import pytest

from mrgen_dist.plots import loss_curves, translation_bounds


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


@pytest.mark.parametrize(("names", "width"), [(["loss"], 450), (["loss", "kl"], 900)])
def test_loss_curves_draw_a_second_panel_only_for_other_terms(tmp_path: Path, names: list[str], width: int) -> None:
    history = [{"epoch": e, **{f"{side}_{n}": 1.0 / e for n in names for side in ("train", "test")}} for e in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty panel's legend warns
        path = loss_curves(history, names, tmp_path / "loss_curves.png")
    image = matplotlib.image.imread(path)
    assert image.shape[1] == width and image[..., :3].std() > 0.05
