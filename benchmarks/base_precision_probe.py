"""Base precision probe: precision and recall of a cascade base's own draws, without a refiner.

A cascade's precision can be held by its base or by its refiner; `cascade_probe.py score --real` measures the
refiner's part (its ceiling on the real block means), and this probe the base's, at the base's grid. Per scanner it
draws N block-mean images with the base's sampler (default ancestral; solver, steps, their spacing and guidance as
asked), repeats each block to the slice (what the runtime hands a refiner), and reads them with the FID Inception
against the real test slices' block means repeated alike (precision, recall, density, coverage, k = 5). Its ceiling
row is the real side against itself, as `score --real` reads it: the first N test slices' block means against the
train slices'. A base is judged without training a refiner (an hour or more on 2 CPU cores), so base variants
(training length, precision, architecture) can be told apart in minutes.

--smooth S [S ...] reads both sides again with their block means Gaussian-smoothed by S blocks (0: as drawn)
before they are repeated: which band of the block-mean grid holds a scanner's shortfall. A shortfall that
smoothing both sides takes away lies in the finest band (the grain, the patch's grid); one that stays lies in
coarser structure (shape, contrast, shading). The draws are kept as DIR/draws/<base>-<settings>-<scanner id>.npy
and read back by a later run with the same settings, so the bands cost Inception only.

    python benchmarks/base_precision_probe.py STORE BASE.pt [BASE.pt ...] --out DIR [--n 60] [--guidance 1.5]
        [--solver ancestral] [--steps 100] [--spacing trailing|quadratic] [--seed 0] [--smooth 0 1 2]
        [--cache DIR]

Writes DIR/base_precision.json (the ceiling and one entry per base, per smoothing).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from cascade_probe import base_noise, base_settings, block_means, load_base
from scipy.ndimage import gaussian_filter

from mrgen_dist.commands.options import positive
from mrgen_dist.data.store import SliceStore, SplitArrays
from mrgen_dist.eval.inception import InceptionFeatures, load_inception
from mrgen_dist.eval.quality import prdc
from mrgen_dist.runtime.diffusion import SOLVERS, SPACINGS, sample, to_slices


def smoothed(low: np.ndarray, sigma: float) -> np.ndarray:
    """Block-mean images (N, 1, h, w) Gaussian-smoothed by `sigma` blocks within each image (edges: nearest)."""
    return gaussian_filter(low, (0, 0, sigma, sigma), mode="nearest") if sigma else low


def as_slices(low: np.ndarray, shape: tuple[int, int], factor: int, sigma: float) -> np.ndarray:
    """Block-mean images (N, 1, h, w) in [-1, 1], real or drawn, as Inception reads both: smoothed by `sigma`
    blocks, each block repeated to slices (N, H, W) of `shape` in [0, 1]."""
    return to_slices(smoothed(low, sigma), shape, factor)


def repeated(images: np.ndarray, factor: int, sigma: float = 0.0) -> np.ndarray:
    """(N, H, W) real slices in [0, 1] -> their factor x factor block means as_slices reads them."""
    return as_slices(block_means(images, factor)[:, None], images.shape[1:], factor, sigma)


def scores(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    """Precision, recall, density and coverage (k = 5) of Inception features `fake` against `real`."""
    return {k: float(v) for k, v in prdc(real, fake).items()}


def summary(rows: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{name} P {r['precision']:.2f} R {r['recall']:.2f}" for name, r in rows.items())


def real_block_features(store: SliceStore, side: str, split: SplitArrays, sid: int, factor: int,
                        extractor: InceptionFeatures, cache: Path, sigma: float = 0.0) -> np.ndarray:
    """Inception features of scanner `sid`'s slices of `split` (the store's `side`, read) as repeated block means,
    in the split's order, cached under their own key (eval/features.py's cache holds the full slices' features)."""
    band = f"-s{sigma:g}" if sigma else ""
    path = cache / f"blocks{factor}{band}-{store.sha256[:16]}-{extractor.identity}-{side}-{sid}.npy"
    if path.is_file():
        return np.load(path)
    features = extractor(repeated(split.images[np.asarray(split.scanner) == sid].astype(np.float32), factor, sigma))
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, features)
    return features


def drawn_blocks(path: Path, checkpoint: dict, denoise, sid: int, args: argparse.Namespace) -> np.ndarray:
    """Scanner `sid`'s N draws (N, 1, h, w) from the base at `path`, in [-1, 1], read back from DIR/draws when
    a run with the same base (its folder and name) and settings drew them, N or more (each draw's noise is its
    own stream: base_noise, runtime/diffusion.py noise_streams)."""
    spacing = "" if args.spacing == "trailing" else f"-{args.spacing}"
    solver = "a" if args.solver == "ancestral" else f"{args.solver}-"
    kept = args.out / "draws" / (f"{path.parent.name}-{path.stem}-g{args.guidance:g}-{solver}{args.steps}{spacing}"
                                 f"-seed{args.seed}-{sid}.npy")
    if kept.is_file() and len(low := np.load(kept)) >= args.n:
        return low[: args.n]
    settings = base_settings(checkpoint, args.steps, args.guidance, args.solver, args.spacing)
    low = sample(denoise, base_noise(checkpoint, args.n, sid, args.seed), np.full(args.n, sid, np.int64), settings)
    kept.parent.mkdir(parents=True, exist_ok=True)
    np.save(kept, low)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("bases", type=Path, nargs="+", help="BASE.pt files of cascade_probe.py base")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=positive(int), default=60, help="draws per scanner")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--solver", choices=SOLVERS, default="ancestral", help="the base's sampler")
    parser.add_argument("--steps", type=positive(int), default=100, help="the sampler's steps")
    parser.add_argument("--spacing", choices=SPACINGS, default="trailing", help="of the steps' timesteps")
    parser.add_argument("--seed", type=int, default=0, help="the draws' seed (0: cascade_probe.py score's streams)")
    parser.add_argument("--smooth", type=float, nargs="+", default=[0.0],
                        help="Gaussian sigmas, in blocks, both sides are read at (module doc)")
    parser.add_argument("--cache", type=Path, default=Path("bench-output/fid-cache"))
    args = parser.parse_args()
    if any(sigma < 0 for sigma in args.smooth):
        parser.error("--smooth takes sigmas >= 0")

    store = SliceStore(args.store)
    names = list(store.vocabulary.names)
    splits = {side: store.read_split(side) for side in ("train", "test")}
    cache = args.cache / "blocks"
    extractor = load_inception(device="cpu")
    bases = {path: load_base(path) for path in args.bases}
    factors = {path: checkpoint.get("factor", 4) for path, (checkpoint, _) in bases.items()}
    result: dict = {"store": str(args.store), "n": args.n, "guidance": args.guidance, "steps": args.steps,
                    "solver": args.solver, "spacing": args.spacing, "seed": args.seed, "ceiling": {}, "bases": {}}

    def features(side: str, sid: int, factor: int, sigma: float) -> np.ndarray:
        return real_block_features(store, side, splits[side], sid, factor, extractor, cache, sigma)

    def band(sigma: float) -> str:
        return f"smoothed {sigma:g}" if sigma else "as drawn"

    for factor in sorted(set(factors.values())):
        for sigma in args.smooth:
            rows = {}
            for name in names:
                sid = store.vocabulary.index(name)
                # the first N test slices' features are the first N rows of the test side's
                rows[name] = scores(features("train", sid, factor, sigma), features("test", sid, factor, sigma)[: args.n])
            result["ceiling"].setdefault(factor, {})[f"{sigma:g}"] = rows
            print(f"ceiling at {factor} x {factor}, {band(sigma)}: {summary(rows)}", flush=True)
    for path, (checkpoint, denoise) in bases.items():
        factor = factors[path]
        entry = {"step": checkpoint["step"], "factor": factor, "bands": {},
                 "training_precision": checkpoint["config"].get("precision", "fp32")}
        draws = {}
        for name in names:
            t0 = time.time()
            sid = store.vocabulary.index(name)
            draws[name] = drawn_blocks(path, checkpoint, denoise, sid, args)
            print(f"{path} {name}: {args.n} draws in {time.time() - t0:.0f} s", flush=True)
        for sigma in args.smooth:
            rows = {}
            for name in names:
                sid = store.vocabulary.index(name)
                drawn = as_slices(draws[name], splits["test"].images.shape[1:], factor, sigma)
                rows[name] = scores(features("test", sid, factor, sigma), extractor(drawn))
            entry["bands"][f"{sigma:g}"] = rows
            print(f"{path} (step {checkpoint['step']}), {band(sigma)}: {summary(rows)}", flush=True)
        result["bases"][str(path)] = entry
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "base_precision.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
