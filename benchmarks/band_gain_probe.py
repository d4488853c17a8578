"""Band gain probe: would a cascade refiner's slices be read as real if its drawn band had the real level?

benchmarks/background_spectrum.py finds a refiner's band too quiet in air at some sites. This takes the
slices of `cascade_probe.py score --real` (the real test slices' block means refined), recomputes their
low-pass `base` with the refiner file itself, scales the drawn band slice - base by one gain per scanner (so
that the air corners' band above 0.2 cycles/pixel reaches the real train slices' level) and reads both sets
against the real train slices (precision and recall, k = 5, the probe's Inception features).

    python benchmarks/band_gain_probe.py STORE REFINER.onnx DIR --scanner Intera [--scanner ...] [--cache DIR]

The block side and hand-over of the probe's run are read from DIR/probe.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from background_spectrum import radial_power
from cascade_probe import block_means, hand_over

from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.features import real_features
from mrgen_dist.eval.inception import load_inception
from mrgen_dist.eval.quality import prdc

HIGH_BANDS = slice(2, None)  # radial_power's bins above 0.2 cycles/pixel: the refiner's band


def refiner_base(session: ort.InferenceSession, coarse: np.ndarray, scanner: int) -> np.ndarray:
    """The refiner graph's low-pass of coarse slices (N, 1, H, W) -> (N, H, W)."""
    n = len(coarse)
    inputs = {"x": np.zeros_like(coarse), "t": np.zeros(n, np.float32), "scanner": np.full(n, scanner, np.int64),
              "coarse": coarse}
    return session.run(["base"], inputs)[0][:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("refiner", type=Path)
    parser.add_argument("dir", type=Path, help="a `cascade_probe.py score --real` folder")
    parser.add_argument("--scanner", action="append", required=True)
    parser.add_argument("--cache", type=Path, default=Path("fid-cache"))
    args = parser.parse_args()
    probe = json.loads((args.dir / "probe.json").read_text())
    if not probe["real"]:
        raise SystemExit(f"{args.dir} is not a `score --real` run: its slices' coarse stage is not known")
    store = SliceStore(args.store)
    test, train = store.read_split("test"), store.read_split("train")
    shape = test.images.shape[1:]
    session = ort.InferenceSession(str(args.refiner), providers=["CPUExecutionProvider"])
    extractor = load_inception(device="cpu")
    for name in args.scanner:
        sid = store.vocabulary.index(name)
        refined = np.load(args.dir / f"samples-{sid}.npy").reshape(-1, *shape)
        real = test.images[np.asarray(test.scanner) == sid][: len(refined)]
        coarse = hand_over(block_means(real, probe["factor"]), shape, probe["handover"], probe["factor"])
        base = refiner_base(session, coarse, sid)
        real_train = train.images[np.asarray(train.scanner) == sid]
        reference = radial_power(real_train)[HIGH_BANDS]
        gain = 1 / np.sqrt(radial_power(refined)[HIGH_BANDS] / reference).mean()
        features = real_features(store, name, "train", extractor, args.cache)[0]
        for label, images in (("as drawn", refined), (f"band x {gain:.2f}", np.clip(base + gain * (refined - base), 0, 1))):
            level = np.sqrt(radial_power(images)[HIGH_BANDS] / reference).mean()
            scores = prdc(features, extractor(images.astype(np.float32)))
            print(f"{name:18s} {label:12s} air band / real {level:.2f}  precision {scores['precision']:.3f}  "
                  f"recall {scores['recall']:.3f}", flush=True)


if __name__ == "__main__":
    main()
