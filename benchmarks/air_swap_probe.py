"""Air swap probe: is a scanner's precision held by its generated air or by the head?

Precision and recall (Inception, k = 5, against the real test slices) of a folder of generated slices per
scanner three ways: as drawn; with the air (the background mask of `mrgen-fid`'s measures, outside the head)
of the real test slices put in place of the generated air (generated slice i takes real slice i mod n's air);
and with the air of both sides set to 0. A precision that rises when the real air is swapped in is held by
the generated air; one that stays is held inside the head, by the anatomy, contrast or texture there.

    python benchmarks/air_swap_probe.py STORE DIR [--cache DIR]

DIR holds `samples-<scanner id>.npy`, as benchmarks/cascade_probe.py score writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.features import real_features
from mrgen_dist.eval.inception import load_inception
from mrgen_dist.eval.quality import head_masks, prdc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--cache", type=Path, default=Path("bench-output/fid-cache"), help="Inception feature cache")
    args = parser.parse_args()
    store = SliceStore(args.store)
    test = store.read_split("test")
    _, background = head_masks(store.read_split("train").images)
    extractor = load_inception(device="cpu")
    print("precision, recall: as drawn | the real air swapped in | both airs set to 0")
    for sid, name in enumerate(store.vocabulary.names):
        real = test.images[np.asarray(test.scanner) == sid].astype(np.float32)
        generated = np.load(args.dir / f"samples-{sid}.npy").astype(np.float32)
        real_test = real_features(store, name, "test", extractor, args.cache)[0]
        swapped = np.where(background, real[np.arange(len(generated)) % len(real)], generated)
        rows = [prdc(real_test, extractor(generated)), prdc(real_test, extractor(swapped)),
                prdc(extractor(np.where(background, 0, real)), extractor(np.where(background, 0, generated)))]
        print(f"{name:18s} " + " | ".join(f"{row['precision']:.2f}, {row['recall']:.2f}" for row in rows), flush=True)


if __name__ == "__main__":
    main()
