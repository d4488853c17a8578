"""Translation bounds: what can any translator reach on the demo cohort, and what must it change to get there?

`mrgen-fid translation` scores a translator against mrgen_dist/eval/targets.py (translated slices recognised as
the target >= 0.95, cycle SSIM >= 0.90). On the demo cohort the truth is known: mrgen_dist.data.demo renders a
subject (`subject_anatomy`) through a scanner's appearance (`acquire`). This benchmark renders new synthetic
subjects on every scanner and scores *perfect* translations with the same classifier and the same SSIM:

1. **truth**: the subject's slices on scanner t, read as t: the ceiling of any translator's conditioning;
2. **fresh noise**: a perfect translator that draws new noise for its target. Its cycle back to s is the
   subject on s with a second noise draw, so SSIM(x, that) is the best cycle SSIM of any translator that draws
   noise. A translator that carries the slice's own noise draw to the target's level (the same normal numbers,
   `acquire` with the same generator state) cycles back to x itself;
3. **one trait kept**: t's appearance with one trait of s (tone curve, point-spread, noise level), read as t?
   A translator that does not change that trait is capped near that rate;
4. **blur left**: t's appearance with a point-spread between Unspecified's (1.6 mm) and t's own: how much of
   Unspecified's blur a translator from Unspecified has to undo.

The classifier is `mrgen-fid`'s conditioning classifier, fitted on the real train slices of STORE (a store of
the demo cohort, whose physics the renders share) on the FID Inception's features (cached in --cache). The new
subjects' seeds are far from the cohort's. Writes OUT/translation_bounds.json, .md and .png.

    python benchmarks/translation_bounds.py STORE [--cache DIR] [--subjects 4] [--out bench-output/translation-bounds]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mrgen_dist import plots
from mrgen_dist.commands.options import positive
from mrgen_dist.data.demo import APPEARANCE, Appearance, acquire, subject_anatomy, template_on_fsl_grid
from mrgen_dist.data.store import SliceStore
from mrgen_dist.data.volume import SliceParams, central_slices
from mrgen_dist.eval import targets
from mrgen_dist.eval.conditioning import scanner_classifier
from mrgen_dist.eval.inception import load_inception
from mrgen_dist.eval.translation import ssim
from mrgen_dist.runtime.session import cpu_description

SEED_BASE = 10**9  # above the cohort's subject seeds (seed * 100_003 + 901 + ...) for any --seed below 9,999
TRAITS = {"tone curve": "gamma", "point-spread": "blur_mm", "noise level": "noise"}
BLUR_LEFT_MM = (1.6, 1.2, 0.8, 0.4)


def _render(params: SliceParams, anatomy: np.ndarray, jitter: float, subject: int, look: Appearance, draw: int
            ) -> np.ndarray:
    """The central slices of `anatomy` seen through `look`, with the subject's noise draw number `draw`."""
    raw = acquire(anatomy, look, jitter, np.random.default_rng([SEED_BASE + subject, draw]))
    return central_slices(np.round(raw).astype(np.int16).astype(np.float32), params)  # as a file is read


def _rendered(template: np.ndarray, names: list[str], params: SliceParams, n_subjects: int
              ) -> dict[tuple, np.ndarray]:
    """Every render of the module docstring, (10 * n_subjects, H, W) per key, in the store's [0, 1] scaling."""
    cells: dict[tuple, list[np.ndarray]] = {}
    for i in tqdm(range(n_subjects), desc="subjects", unit="subject", file=sys.stderr):
        rng = np.random.default_rng(SEED_BASE + i)
        anatomy = subject_anatomy(template, rng)
        jitter = rng.uniform(0.95, 1.05)
        render = functools.partial(_render, params, anatomy, jitter, i)
        for t, target in enumerate(names):
            look = APPEARANCE[target]
            cells.setdefault(("truth", t), []).append(render(look, 0))
            cells.setdefault(("second draw", t), []).append(render(look, 1))
            for s, source in enumerate(names):
                if s != t:
                    for trait, field in TRAITS.items():
                        kept = dataclasses.replace(look, **{field: getattr(APPEARANCE[source], field)})
                        cells.setdefault((trait, s, t), []).append(render(kept, 0))
            for blur in BLUR_LEFT_MM:
                if blur > look.blur_mm:
                    cells.setdefault(("blur left", blur, t), []).append(render(dataclasses.replace(look, blur_mm=blur), 0))
    return {key: np.concatenate(v) for key, v in cells.items()}


def _table(title: str, rows: list[str], columns: list[str], values: list[list[float | None]]) -> str:
    head = f"| {title} | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for row, vals in zip(rows, values, strict=True):
        lines.append(f"| {row} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path, help="a slice store of the demo cohort (mrgen-demo-data + mrgen-convert)")
    ap.add_argument("--cache", type=Path, default=Path("bench-output/fid-cache"), help="Inception feature cache")
    ap.add_argument("--subjects", type=positive(int), default=4, help="new synthetic subjects (10 slices each)")
    ap.add_argument("--threads", type=positive(int), default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-output/translation-bounds"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = SliceStore(args.store)
    if not store.manifest.inputs.get("synthetic"):
        print(f"translation_bounds: {args.store} is not a store of the demo cohort; the renders share the demo "
              "cohort's physics, so the classifier must be fitted on it (mrgen-demo-data, then mrgen-convert)",
              file=sys.stderr)
        return 2
    names = list(store.vocabulary.names)
    unknown = [n for n in names if n not in APPEARANCE]
    if unknown:
        print(f"translation_bounds: scanners without a demo appearance: {unknown}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    params = SliceParams.from_record(store.manifest.params)
    cells = _rendered(template_on_fsl_grid(), names, params, args.subjects)
    extractor = load_inception(None, "cpu")
    classifier = scanner_classifier(store, extractor, args.cache)
    read = {key: classifier.predict(extractor(images)) for key, images in
            tqdm(cells.items(), desc="classify", unit="set", file=sys.stderr)}

    def rate(key: tuple) -> float | None:
        return float(np.mean(read[key] == key[-1])) if key in read else None

    k = len(names)
    truth = [rate(("truth", t)) for t in range(k)]
    fresh = [float(ssim(cells[("truth", s)], cells[("second draw", s)]).mean()) for s in range(k)]
    traits = {trait: [[None if s == t else rate((trait, s, t)) for t in range(k)] for s in range(k)]
              for trait in TRAITS}
    blur_left = {blur: [rate(("blur left", blur, t)) for t in range(k)] for blur in BLUR_LEFT_MM}
    result = {
        "store": str(args.store), "subjects": args.subjects, "slices_per_cell": len(cells[("truth", 0)]),
        "scanners": names, "truth_conditioning": truth, "fresh_noise_cycle_ssim": fresh,
        "fresh_noise_cycle_ssim_mean": float(np.mean(fresh)), "one_trait_kept": traits,
        "blur_left": {str(b): v for b, v in blur_left.items()},
        "targets": {"conditioning": targets.TRANSLATION_CONDITIONING, "cycle_ssim": targets.CYCLE_SSIM},
        "seconds": time.perf_counter() - t0, "cpu": cpu_description(),
    }
    short = [n.replace("Magnetom TrioTim", "Magnetom").replace("Gyroscan Intera", "Gyroscan") for n in names]
    n = result["slices_per_cell"]
    text = [
        f"# Translation bounds ({args.subjects} new synthetic subjects, {n} slices per cell; classifier of {args.store})",
        "",
        _table("scanner", short, ["truth read as itself", "cycle SSIM with fresh noise (cap)"],
               [[truth[s], fresh[s]] for s in range(k)]),
        "",
        f"Mean cap on the cycle SSIM of a translator that draws fresh noise: **{np.mean(fresh):.3f}** "
        f"(target ≥ {targets.CYCLE_SSIM}); the truth is read as its scanner at {np.mean(truth):.3f} "
        f"(target for translations ≥ {targets.TRANSLATION_CONDITIONING}).",
    ]
    for trait, m in traits.items():
        text += ["", f"The target's appearance with the source's {trait} (rows: source, columns: target), read as "
                 "the target:", "", _table("source", short, short, m)]
    text += ["", "The target's appearance with blur left (rows: Gaussian sigma in mm), read as the target:", "",
             _table("blur", [f"{b} mm" for b in BLUR_LEFT_MM], short, [blur_left[b] for b in BLUR_LEFT_MM]),
             "", f"{result['seconds']:.0f} s on {result['cpu']}"]
    report = "\n".join(text) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "translation_bounds.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "translation_bounds.md").write_text(report)
    plots.translation_bounds(result, args.out / "translation_bounds.png")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
