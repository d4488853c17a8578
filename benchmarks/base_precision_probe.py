"""Base precision probe: precision and recall of a cascade base's own draws, without a refiner.

A cascade's precision can be held by its base or by its refiner; `cascade_probe.py score --real` measures the
refiner's part (its ceiling on the real block means), and this probe the base's, at the base's grid. Per
scanner it draws N block-mean images with the base's sampler (ancestral, trailing steps, guidance), repeats
each block to the slice (what the runtime hands a refiner), and reads them with the FID Inception against the
real test slices' block means repeated alike (precision, recall, density, coverage, k = 5). Its ceiling row is
the real side against itself, as `score --real` reads it: the first N test slices' block means against the
train slices'. A base is judged without training a refiner (an hour or more on 2 CPU cores), so base variants
(training length, precision, architecture) can be told apart in minutes.

    python benchmarks/base_precision_probe.py STORE BASE.pt [BASE.pt ...] --out DIR [--n 60] [--guidance 1.5]
        [--steps 100] [--seed 0] [--cache DIR]

Writes DIR/base_precision.json (the ceiling and one entry per base).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from cascade_probe import base_noise, base_settings, block_means, load_base

from mrgen_dist.commands.options import positive
from mrgen_dist.data.store import SliceStore, SplitArrays
from mrgen_dist.eval.inception import InceptionFeatures, load_inception
from mrgen_dist.eval.quality import prdc
from mrgen_dist.runtime.diffusion import sample, to_slices


def repeated(images: np.ndarray, factor: int) -> np.ndarray:
    """(N, H, W) real slices in [0, 1] -> their factor x factor block means, each block repeated to (N, H, W)."""
    return to_slices(block_means(images, factor)[:, None], images.shape[1:], factor)


def real_block_features(store: SliceStore, side: str, split: SplitArrays, sid: int, factor: int,
                        extractor: InceptionFeatures, cache: Path) -> np.ndarray:
    """Inception features of scanner `sid`'s slices of `split` (the store's `side`, read) as repeated block means,
    in the split's order, cached under their own key (eval/features.py's cache holds the full slices' features)."""
    path = cache / f"blocks{factor}-{store.sha256[:16]}-{extractor.identity}-{side}-{sid}.npy"
    if path.is_file():
        return np.load(path)
    features = extractor(repeated(split.images[np.asarray(split.scanner) == sid].astype(np.float32), factor))
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, features)
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("bases", type=Path, nargs="+", help="BASE.pt files of cascade_probe.py base")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=positive(int), default=60, help="draws per scanner")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--steps", type=positive(int), default=100, help="ancestral steps, trailing spacing")
    parser.add_argument("--seed", type=int, default=0, help="the draws' seed (0: cascade_probe.py score's streams)")
    parser.add_argument("--cache", type=Path, default=Path("bench-output/fid-cache"))
    args = parser.parse_args()

    store = SliceStore(args.store)
    names = list(store.vocabulary.names)
    splits = {side: store.read_split(side) for side in ("train", "test")}
    cache = args.cache / "blocks"
    extractor = load_inception(device="cpu")
    bases = {path: load_base(path) for path in args.bases}
    factors = {path: checkpoint.get("factor", 4) for path, (checkpoint, _) in bases.items()}
    result: dict = {"store": str(args.store), "n": args.n, "guidance": args.guidance, "steps": args.steps,
                    "seed": args.seed, "ceiling": {}, "bases": {}}
    def features(side: str, sid: int, factor: int) -> np.ndarray:
        return real_block_features(store, side, splits[side], sid, factor, extractor, cache)

    for factor in sorted(set(factors.values())):
        rows = {}
        for name in names:
            sid = store.vocabulary.index(name)
            # the first N test slices' features are the first N rows of the test side's
            ceiling = prdc(features("train", sid, factor), features("test", sid, factor)[: args.n])
            rows[name] = {k: float(v) for k, v in ceiling.items()}
        result["ceiling"][factor] = rows
        print(f"ceiling at {factor} x {factor}: " + "; ".join(
            f"{name} P {r['precision']:.2f} R {r['recall']:.2f}" for name, r in rows.items()), flush=True)
    for path, (checkpoint, denoise) in bases.items():
        t0 = time.time()
        factor = factors[path]
        settings = base_settings(checkpoint, args.steps, args.guidance)
        rows = {}
        for name in names:
            sid = store.vocabulary.index(name)
            low = sample(denoise, base_noise(checkpoint, args.n, sid, args.seed), np.full(args.n, sid, np.int64), settings)
            drawn = to_slices(low, splits["test"].images.shape[1:], factor)
            rows[name] = {k: float(v) for k, v in prdc(features("test", sid, factor), extractor(drawn)).items()}
        result["bases"][str(path)] = {"step": checkpoint["step"], "factor": factor, "scanners": rows,
                                      "training_precision": checkpoint["config"].get("precision", "fp32")}
        print(f"{path} (step {checkpoint['step']}): " + "; ".join(
            f"{name} P {r['precision']:.2f} R {r['recall']:.2f}" for name, r in rows.items())
            + f" ({time.time() - t0:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "base_precision.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
