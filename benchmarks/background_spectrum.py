"""Background noise spectrum: generated / real amplitude per spatial frequency, per scanner.

A background noise ratio off the target says the air is too quiet or too loud, not where. This reads the
four 24 x 24 corner windows of every slice (air on the comparison cohorts' 218 x 182 slices), each less its
mean, and compares the radially binned power spectra of generated and real test slices: a ratio flat over
frequency is a level drawn wrongly, a ratio falling with frequency a texture too smooth. The low band of a
cascade comes from its coarse stage, the high band from its refiner, so the split says which stage to mend.
Beside it, the grain inside the brain (the std of x less its 3 x 3 mean in the slice's central 64 x 64
window, generated / real): a band too quiet in air but right in the brain is drawn wrongly by region, and
no gain of the whole band mends it. And the air's Nyquist share (`nyquist_share`): its power at the period of
2 pixels over the rest of its fine band, high where a UNet's 2 x 2 patch has left a grid.

    python benchmarks/background_spectrum.py STORE DIR [DIR ...] [--plot FILE.png [--names NAME ...]]

--plot draws the air's ratio per frequency band, one panel per scanner, one line per DIR (named by --names).

DIR holds `samples-<scanner id>.npy`, N slices of the store's shape in [0, 1], as benchmarks/cascade_probe.py score writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.ndimage import uniform_filter

from mrgen_dist.data.store import SliceStore

WINDOW, MARGIN = 24, 2
EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.71)  # cycles per pixel; the last bin holds the diagonal corners


def corner_windows(images: np.ndarray, window: int = WINDOW, margin: int = MARGIN) -> np.ndarray:
    """(N, H, W) -> (4N, window, window): each slice's four corner windows, each less its mean."""
    lo, hi = slice(margin, margin + window), slice(-margin - window, -margin)
    windows = np.concatenate([images[:, r, c] for r in (lo, hi) for c in (lo, hi)]).astype(np.float64)
    return windows - windows.mean(axis=(1, 2), keepdims=True)


def corner_power(images: np.ndarray, window: int = WINDOW, margin: int = MARGIN) -> np.ndarray:
    """(window, window): the corner windows' power spectrum, their mean."""
    return (np.abs(np.fft.fft2(corner_windows(images, window, margin))) ** 2).mean(axis=0)


def radial_power(images: np.ndarray) -> np.ndarray:
    """Mean power of the corner windows' spectra in the bins between EDGES."""
    power = corner_power(images)
    f = np.fft.fftfreq(WINDOW)
    radius = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    return np.array([power[(radius > a) & (radius <= b)].mean() for a, b in zip(EDGES[:-1], EDGES[1:], strict=True)])


def nyquist_share(images: np.ndarray, window: int = WINDOW, margin: int = MARGIN) -> float:
    """The corner windows' power on the Nyquist lines (period 2 pixels along either axis, the period of a 2 x 2
    patch) over their mean power at the other frequencies above 0.3 cycles/pixel: near 1 for white noise, above
    it for a grid at that period, below it for noise smoothed (by block means or resampling) before."""
    power = corner_power(images, window, margin)
    f = np.abs(np.fft.fftfreq(window))
    nyquist = (f[:, None] == 0.5) | (f[None, :] == 0.5)
    high = np.hypot(f[:, None], f[None, :]) > 0.3
    return float(power[nyquist].mean() / power[high & ~nyquist].mean())


def brain_grain(images: np.ndarray) -> float:
    """The std of the slices' central 64 x 64 windows less their 3 x 3 means (the window's rim left out)."""
    h, w = images.shape[1:]
    centre = images[:, h // 2 - 32 : h // 2 + 32, w // 2 - 32 : w // 2 + 32].astype(np.float64)
    return float((centre - uniform_filter(centre, size=(1, 3, 3)))[:, 2:-2, 2:-2].std())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path, default=None, help="a figure of the air's ratios (PNG)")
    parser.add_argument("--names", nargs="+", default=None, help="the figure's name of each DIR, in order")
    args = parser.parse_args()
    if args.names is not None and len(args.names) != len(args.dirs):
        parser.error(f"--names: {len(args.names)} names for {len(args.dirs)} folders")
    store = SliceStore(args.store)
    test = store.read_split("test")
    bins = " ".join(f"{a:.1f}-{b:.1f}" for a, b in zip(EDGES[:-1], EDGES[1:], strict=True))
    print(f"amplitude generated / real per frequency bin (cycles/pixel: {bins}), then the brain's grain and "
          "the air's Nyquist share")
    ratios: dict[str, list[np.ndarray]] = {}
    for sid, name in enumerate(store.vocabulary.names):
        images = test.images[np.asarray(test.scanner) == sid]
        real, real_grain = radial_power(images), brain_grain(images)
        print(f"{name:18s} real: air std {corner_windows(images).std():.3f}, brain grain {real_grain:.4f}, "
              f"Nyquist share {nyquist_share(images):.2f}")
        for folder in args.dirs:
            generated = np.load(folder / f"samples-{sid}.npy").reshape(-1, *test.images.shape[1:])
            ratio = np.sqrt(radial_power(generated) / real)
            ratios.setdefault(name, []).append(ratio)
            print(f"{name:18s} {str(folder):28s} " + " ".join(f"{r:.2f}" for r in ratio)
                  + f"  brain {brain_grain(generated) / real_grain:.2f}  Nyquist share {nyquist_share(generated):.2f}")
    if args.plot:
        print(f"wrote {plot(ratios, args.names or [str(d) for d in args.dirs], args.plot)}")


def plot(ratios: dict[str, list[np.ndarray]], labels: list[str], path: Path) -> Path:
    """One panel per scanner: the air's amplitude ratio per band, one line per folder, the target's 25 %
    shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [(a + b) / 2 for a, b in zip(EDGES[:-1], EDGES[1:], strict=True)]
    fig, axes = plt.subplots(1, len(ratios), figsize=(3.2 * len(ratios), 3.2), sharey=True)
    for ax, (name, lines) in zip(np.atleast_1d(axes), ratios.items(), strict=True):
        ax.axhspan(0.75, 1.25, color="0.9")
        ax.axhline(1.0, color="0.5", lw=0.8)
        for i, (label, ratio) in enumerate(zip(labels, lines, strict=True)):
            ax.plot(centres, ratio, "o-", color=f"C{i}", label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cycles / pixel")
    np.atleast_1d(axes)[0].set_ylabel("air amplitude, generated / real")
    np.atleast_1d(axes)[0].legend(fontsize=6)
    fig.suptitle("SYNTHETIC cohort: the air corners' spectrum, generated against real test slices", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
