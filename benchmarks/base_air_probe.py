"""Base air probe: is a cascade base's loud air its sampler's or its network's?

The background noise of a cascade's samples comes in its low band from the base (background_spectrum.py). This
probe samples a base of `cascade_probe.py base` alone, for one scanner, under each sampler asked for: guidance
scale x step variance (`posterior`, or `calibrated` on 16 train slices per scanner, one bin: the export's
`calibrate_on`) x spacing and steps. It compares the background noise of the drawn block means, each block
repeated to the slice, with that of the real test slices' block means (eval/quality.py `signature`, the
project's noise measure, on the masks of the train slices), and draws the air of the first 4 of each beside
the real ones, windowed to [0, --window]. A ratio that no sampler moves is the network's: its mean in air
carries structure the real air has not, and only training mends it. Beside it, the air's Nyquist share
(`nyquist_share`): how much of the air's fine band sits at the period of the UNet's 2 x 2 patch, a grid that
the real block means have not.

    python benchmarks/base_air_probe.py STORE BASE.pt --scanner NAME --out DIR [--n 24] [--guidance 1.5 1.0]
        [--variance posterior calibrated] [--spacing trailing:100 quadratic:30] [--window 0.03]

Writes DIR/base_air.json (one row per sampler) and DIR/base_air.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from background_spectrum import nyquist_share
from cascade_probe import base_noise, base_settings, block_means, load_base

from mrgen_dist import plots
from mrgen_dist.commands.options import positive
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.quality import head_masks, signature
from mrgen_dist.export.calibration import CALIBRATION_BATCH, calibrate_on
from mrgen_dist.models.base import ModelSpace
from mrgen_dist.runtime.diffusion import VARIANCES, SamplerSettings, sample, to_slices

#: Train slices per scanner the calibrated variance is measured on.
CALIBRATION_SLICES = 16
#: Side, in blocks, of the four corner windows of air the Nyquist share reads (after a margin of one block): at
#: factor 2 the 26 x 26 pixels of background_spectrum.py's corner windows.
AIR_WINDOW = 12


def calibrated(settings: SamplerSettings, denoise, images: np.ndarray, labels: np.ndarray, factor: int
               ) -> SamplerSettings:
    """`settings` with the base's error of x0 measured (one bin) on train slices `images` (n, H, W) of `labels`."""
    x0 = block_means(images, factor)[:, None].astype(np.float32)
    spaces = [ModelSpace(x0[i : i + CALIBRATION_BATCH], denoise, None) for i in range(0, len(x0), CALIBRATION_BATCH)]
    return calibrate_on(spaces, settings, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("base", type=Path, help="BASE.pt of cascade_probe.py base")
    parser.add_argument("--scanner", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=positive(int), default=24, help="slices drawn per sampler")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5])
    parser.add_argument("--variance", choices=VARIANCES, nargs="+", default=["posterior"])
    parser.add_argument("--spacing", nargs="+", default=["trailing:100"], help="SPACING:STEPS of the ancestral sampler")
    parser.add_argument("--window", type=float, default=0.03, help="the figure's intensity window's top")
    args = parser.parse_args()

    torch.set_num_threads(1)
    store = SliceStore(args.store)
    sid = store.vocabulary.index(args.scanner)
    train, test = store.read_split("train"), store.read_split("test")
    checkpoint, denoise = load_base(args.base)
    factor, shape = checkpoint.get("factor", 4), train.images.shape[1:]

    brain, background = head_masks(train.images)
    real = test.images[np.asarray(test.scanner) == sid][: args.n].astype(np.float32)
    real_low = block_means(real, factor)
    real_blocks = to_slices(real_low[:, None], shape, factor)
    reference = signature(real_blocks, brain, background)
    real_share = nyquist_share(real_low, AIR_WINDOW, 1)
    print(f"real block means: the air's Nyquist share {real_share:.2f}", flush=True)
    labels = np.asarray(train.scanner, dtype=np.int64)
    chosen = np.concatenate([np.random.default_rng(0).permutation(np.flatnonzero(labels == k))[:CALIBRATION_SLICES]
                             for k in range(checkpoint["n_scanners"])])
    x_t = base_noise(checkpoint, args.n, sid)
    rows, grid = [], [(f"{args.scanner}, real block means", real_blocks[:4])]
    for spacing_steps in args.spacing:
        spacing, steps = spacing_steps.split(":")
        for guidance in args.guidance:
            settings = base_settings(checkpoint, int(steps), guidance, spacing=spacing)
            for variance in args.variance:
                t0 = time.time()
                chosen_settings = settings if variance == "posterior" else \
                    calibrated(settings, denoise, train.images[chosen].astype(np.float32), labels[chosen], factor)
                blocks = sample(denoise, x_t, np.full(args.n, sid, np.int64), chosen_settings)
                drawn = to_slices(blocks, shape, factor)
                measured = signature(drawn, brain, background)
                row = {"spacing": spacing, "steps": int(steps), "guidance": guidance, "variance": variance,
                       "noise_ratio": measured["noise"] / reference["noise"],
                       "sharpness_ratio": measured["sharpness"] / reference["sharpness"],
                       "mean_brain_ratio": measured["mean_brain"] / reference["mean_brain"],
                       "nyquist_share": nyquist_share(to_slices(blocks, blocks.shape[-2:]), AIR_WINDOW, 1)}
                rows.append(row)
                grid.append((f"{spacing} {steps}, w {guidance:g}, {variance}", drawn[:4]))
                print(f"{spacing} {steps} steps, guidance {guidance:g}, {variance}: noise {row['noise_ratio']:.3f}, "
                      f"sharpness {row['sharpness_ratio']:.3f}, brain mean {row['mean_brain_ratio']:.3f} of the real, "
                      f"the air's Nyquist share {row['nyquist_share']:.2f} ({time.time() - t0:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "base_air.json").write_text(json.dumps({"store": str(args.store), "base": str(args.base),
                                                         "scanner": args.scanner, "n": args.n,
                                                         "real_noise": reference["noise"],
                                                         "real_nyquist_share": real_share, "rows": rows}, indent=1))
    plots.scanner_grid([(name, np.clip(images / args.window, 0, 1)) for name, images in grid],
                       args.out / "base_air.png", f"{args.scanner}: the base's air, intensity 0 to {args.window:g}")


if __name__ == "__main__":
    main()
