"""`mrgen-fid`: FID and KID per scanner, repeated, with fidelity, diversity and signature measures; the command
line of the conditioning check, the model diagnostics and the report.

    mrgen-fid --store STORE --model export/decoder.onnx --scanner NAME|all --repeats 20 --out results/fid/
    mrgen-fid --store STORE --model export/decoder.onnx --n-generated 2048 --noise --out results/fid/
    mrgen-fid conditioning --store STORE --model export/decoder.onnx --out results/fid/
    mrgen-fid diagnose --store STORE --run RUN --out results/fid/
    mrgen-fid translation --store STORE --model export/translator.onnx --out results/fid/
    mrgen-fid report results/fid/

The first form is the default sub-command `score` (`mrgen-fid score --store ...` is the same).

Per scanner: Inception features of the scanner's real test slices (n_real of them) are computed once and
cached in OUT/cache/ under a key made of the store's sha256, the feature extractor (weights hash) and the
scanner, so a changed store or other weights never reuse them. Each repeat draws a fresh generated set of
`--n-generated` slices (default n_real) with its own seed (seed + repeat) and scores it against the real set:
KID on all generated vs all real slices, FID (float64 statistics) on the first n_real generated slices vs the
real set, so that FIDs of different models (and of different --n-generated) are compared at equal n; below
2,048 slices FID is biased upwards (`fid_biased`, and the warning recorded). `--noise` samples with the model's
learned observation noise (an error for a model without one).

From the first repeat's generated set, against the scanner's real test slices (`mrgen_dist.fid.quality`):
precision, recall, density and coverage on Inception features (k = 5); MS-SSIM diversity of the generated set
and of the real set (200 pairs; the real value is cached); the scanner signature (background noise, sharpness,
brain-intensity Wasserstein-1) in head masks taken from the real slices.

The result is OUT/fid_<scanner>.json with every repeat, mean and std, the sample sizes and those measures.
With `--scanner all` also OUT/generation.json: the sampling speed of onnxruntime on the generated sets, and the
label effect: the same 16 latent draws decoded (the decoder's mean, no noise) for every scanner, how much the
image changes with the label compared with between draws.

With `--scanner all` the conditioning check (`mrgen_dist.fid.conditioning`) runs too, unless
`--no-conditioning`; `diagnose` (`mrgen_dist.fid.diagnostics`) probes a trained run's latent space and its
reconstructions; `translation` (`mrgen_dist.fid.translation`) evaluates a translator; `report`
(`mrgen_dist.fid.report`) turns the results into tables and figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from mrgen_dist import __version__
from mrgen_dist.atomic import atomic_path, atomic_write
from mrgen_dist.cli import UserError, non_negative_int, positive, run, with_default_command
from mrgen_dist.data.store import SliceStore
from mrgen_dist.fid.inception import InceptionFeatures, load_inception
from mrgen_dist.fid.metrics import FeatureStats, frechet_distance, kernel_inception_distance
from mrgen_dist.sample import Sampler
from mrgen_dist.scanners import slug
from mrgen_dist.tracking import Tracker

PROG = "mrgen-fid"
DEFAULT_COMMAND = "score"
#: Neighbours of precision, recall, density and coverage.
PRDC_K = 5
#: Random pairs of the MS-SSIM diversity, and their seed (the same for real and generated sets).
MS_SSIM_PAIRS = 200
MS_SSIM_SEED = 0
#: Latent draws of the label-effect grid, decoded for every scanner, and the seed stream they come from.
LABEL_EFFECT_DRAWS = 16
LABEL_EFFECT_STREAM = 20_000


class FidError(UserError):
    """mrgen-fid cannot do what was asked: the model does not fit the store, too few slices, no results."""


def cache_dir(out: Path) -> Path:
    """Where real features and real MS-SSIM values are cached: $MRGEN_FID_CACHE when set (one cache shared by
    the evaluations of many models on one store, as in hpc/slurm/compare.sh; the keys name the store and the
    weights), else OUT/cache."""
    return Path(os.environ["MRGEN_FID_CACHE"]) if os.environ.get("MRGEN_FID_CACHE") else out / "cache"


def real_features(
    store: SliceStore, scanner: str, side: str, extractor: InceptionFeatures, cache: Path,
    images: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """Features of one scanner's real slices of `side`, and whether they came from the cache; the cache key
    names the store (sha256), the extractor (weights hash), the side and the scanner. `images`: those slices,
    when the caller has loaded them already."""
    path = cache / f"real-{store.sha256[:16]}-{extractor.identity}-{side}-{slug(scanner)}.npy"
    if path.is_file():
        return np.load(path), True
    features = extractor(store.load_split(side, scanner).images if images is None else images)
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, features)
    return features, False


def real_ms_ssim(store: SliceStore, scanner: str, images: np.ndarray, cache: Path) -> float:
    """MS-SSIM diversity of one scanner's real test slices (`images`), cached under the store's sha256."""
    from mrgen_dist.fid.quality import ms_ssim_diversity

    path = cache / f"real-{store.sha256[:16]}-msssim-{MS_SSIM_PAIRS}-{MS_SSIM_SEED}-test-{slug(scanner)}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["ms_ssim"])
    value = ms_ssim_diversity(images, pairs=MS_SSIM_PAIRS, seed=MS_SSIM_SEED)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"ms_ssim": value, "pairs": MS_SSIM_PAIRS, "seed": MS_SSIM_SEED}))
    return value


def check_model_fits_store(store: SliceStore, sampler: Sampler) -> None:
    """The model must have been trained with the store's vocabulary (same names, same order)."""
    model, data = list(sampler.vocabulary.names), list(store.vocabulary.names)
    if model != data:
        raise FidError(f"the model's scanners {model} are not the store's {data}")


def check_noise(sampler: Sampler, noise: bool, model: Path | str) -> None:
    """`--noise` needs a model with a learned observation noise; said before any work."""
    if noise and not sampler.has_noise:
        raise FidError(f"--noise: {model} has no learned observation noise (train with model.observation_noise); "
                       "score its mean images without --noise")


def require_test_slices(store: SliceStore, scanner: str) -> None:
    """FID and KID need at least 2 real test slices of the scanner (the manifest's count, before any work)."""
    n = store.expected_count("test", scanner)
    if n < 2:
        raise FidError(f"scanner {scanner!r} has {n} real test slice(s) in {store.root}; FID and KID need at least 2")


def finite_or_none(values: dict) -> dict:
    """`values` with non-finite floats (a ratio of 0 / 0, x / 0) as None, which JSON can hold."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}


def quality_measures(
    store: SliceStore, scanner: str, real: np.ndarray, real_images: np.ndarray, generated: np.ndarray,
    generated_images: np.ndarray, cache: Path,
) -> tuple[dict, list[str]]:
    """Precision/recall/density/coverage, MS-SSIM of both sets and the signature of one scanner's generated set
    against its real test slices (features and images of each); notes on what could not be computed."""
    from mrgen_dist.fid import quality

    measures: dict = {"prdc_k": PRDC_K, "ms_ssim_pairs": MS_SSIM_PAIRS}
    notes = []
    if min(len(real), len(generated)) > PRDC_K:
        measures.update(quality.prdc(real, generated, k=PRDC_K))
    else:
        measures.update(dict.fromkeys(("precision", "recall", "density", "coverage")))
        notes.append(f"precision, recall, density and coverage need more than k = {PRDC_K} real and generated "
                     f"slices; {len(real)} real, {len(generated)} generated")
    measures["ms_ssim"] = quality.ms_ssim_diversity(generated_images, pairs=MS_SSIM_PAIRS, seed=MS_SSIM_SEED)
    measures["ms_ssim_real"] = real_ms_ssim(store, scanner, real_images, cache)
    try:
        brain, background = quality.head_masks(real_images)
        measures["signature"] = quality.signature_distances(real_images, generated_images, brain, background)
    except ValueError as e:  # slices without a head or without air around it: no masks to measure in
        measures["signature"] = None
        notes.append(f"no scanner signature: {e}")
    return measures, notes


def evaluate_scanner(
    store: SliceStore, sampler: Sampler, extractor: InceptionFeatures, scanner: str, repeats: int, seed: int, out: Path,
    tracker: Tracker | None = None, n_generated: int | None = None, noise: bool = False,
    first_features: dict[str, np.ndarray] | None = None,
) -> dict:
    """`repeats` generated sets of `n_generated` slices (default: as many as the real test slices) of one scanner
    scored against its real test slices; writes and returns OUT/fid_<scanner>.json. The Inception features of
    the first repeat's set go into `first_features[scanner]` when given (the conditioning check reuses them)."""
    from tqdm import tqdm

    require_test_slices(store, scanner)
    real_images = store.load_split("test", scanner).images.float().numpy()  # small: one scanner's test slices
    real, cached = real_features(store, scanner, "test", extractor, cache_dir(out), images=real_images)
    n = len(real)
    n_gen = n if n_generated is None else n_generated
    if n_gen < 2:
        raise FidError(f"--n-generated must be at least 2 (FID and KID), got {n_gen}")
    n_fid = min(n, n_gen)  # FID on the first n_real generated slices: equal n for every model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        real_stats = FeatureStats.of(real)
    small = [str(w.message) for w in caught]
    if n_fid < n:
        small.append(f"FID on {n_fid} generated vs {n} real slices (--n-generated below the real test set)")
    rows, sampling_seconds, first = [], 0.0, None
    for r in tqdm(range(repeats), desc=f"FID {scanner}", unit="repeat", file=sys.stderr):
        t0 = time.perf_counter()
        images = sampler.sample(scanner, n_gen, seed=seed + r, noise=noise)
        sampling_seconds += time.perf_counter() - t0
        generated = extractor(images)
        if r == 0:
            first = images, generated
            if first_features is not None:
                first_features[scanner] = generated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small-sample warning is recorded once, above
            fid = frechet_distance(FeatureStats.of(generated[:n_fid]), real_stats)
        kid = kernel_inception_distance(generated, real, subsets=50, subset_size=min(1000, n), seed=seed + r)
        rows.append({"seed": seed + r, "fid": fid, "kid": kid.mean, "kid_std": kid.std})
        if tracker:
            tracker.log_scalars({f"FID/{scanner}": fid, f"KID/{scanner}": kid.mean}, step=r)
    measures, notes = quality_measures(store, scanner, real, real_images, first[1], first[0], cache_dir(out))
    fids = np.array([row["fid"] for row in rows])
    kids = np.array([row["kid"] for row in rows])
    result = {
        "scanner": scanner,
        "n_real": n,
        "n_generated": n_gen,
        "fid_n_generated": n_fid,
        "fid_biased": n_fid < real.shape[1],  # FID biased upwards below 2,048 (the feature dimension)
        "noise": noise,
        "repeats": rows,
        "fid_mean": float(fids.mean()),
        "fid_std": float(fids.std(ddof=1)) if repeats > 1 else 0.0,
        "kid_mean": float(kids.mean()),
        "kid_std": float(kids.std(ddof=1)) if repeats > 1 else 0.0,
        **measures,
        "warnings": small + notes,
        "sampling_seconds": sampling_seconds,
        "sampling_images_per_s": n_gen * repeats / sampling_seconds if sampling_seconds > 0 else None,
        "real_features_cached": cached,
        "extractor": extractor.identity,
        "store_sha256": store.sha256,
        "model": {k: v for k, v in sampler.metadata.to_props().items() if k != "mrgen.config"},
        "package_version": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = atomic_write(out / f"fid_{slug(scanner)}.json", json.dumps(result, indent=1))
    if tracker:
        tracker.log_params({"scanner": scanner, "repeats": repeats, "seed": seed, "n": n, "n_generated": n_gen,
                            "noise": noise, "store_sha256": store.sha256})
        scalars = {"FID mean/" + scanner: result["fid_mean"], "KID mean/" + scanner: result["kid_mean"],
                   "MS-SSIM/" + scanner: result["ms_ssim"]}
        scalars.update({f"{key}/{scanner}": result[key] for key in ("precision", "recall", "density", "coverage")
                        if result[key] is not None})
        tracker.log_scalars(scalars, step=0)
        tracker.log_artifact(path.name, path, copy=True)
    return result


def label_grid(sampler: Sampler, names: list[str], draws: int = LABEL_EFFECT_DRAWS, seed: int = 0) -> np.ndarray:
    """(K scanners, draws, H, W): the same latent draws (one stream, not the per-scanner streams of
    `Sampler.sample`) decoded for every scanner; the decoder's mean image, no observation noise."""
    rng = np.random.default_rng([seed, LABEL_EFFECT_STREAM])
    z = rng.standard_normal((draws, sampler.latent), dtype=np.float32)
    grid = np.empty((len(names), draws, *sampler.image_shape), dtype=np.float32)
    for k, name in enumerate(names):
        labels = np.full(draws, sampler.scanner_id(name), dtype=np.int64)
        (images,) = sampler.session.run(["image"], {"z": z, "scanner": labels})
        grid[k] = images[:, 0]
    return grid


def generation(store: SliceStore, sampler: Sampler, names: list[str], results: list[dict], noise: bool, seed: int,
               out: Path) -> dict:
    """OUT/generation.json: what the sampler did for the scored sets (speed, device) and the label effect."""
    from mrgen_dist.fid.quality import label_effect

    seconds = sum(r["sampling_seconds"] for r in results)
    images = sum(r["n_generated"] * len(r["repeats"]) for r in results)
    effect = None
    if len(names) >= 2:
        effect = finite_or_none(label_effect(label_grid(sampler, names, LABEL_EFFECT_DRAWS, seed)))
    result = {
        "scanners": names,
        "store_sha256": store.sha256,
        "noise": noise,
        "n_generated": [r["n_generated"] for r in results],
        "repeats": len(results[0]["repeats"]),
        "sampled_images": images,
        "sampling_seconds": seconds,
        "sampling_images_per_s": images / seconds if seconds > 0 else None,
        "sampler_device": sampler.device,
        "sampler_provider": sampler.provider,
        "label_effect": effect,  # None with one scanner
        "label_effect_draws": LABEL_EFFECT_DRAWS,
        "label_effect_seed": seed,
        "model": {k: v for k, v in sampler.metadata.to_props().items() if k != "mrgen.config"},
        "package_version": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "generation.json", json.dumps(result, indent=1))
    return result


# -- command line ---------------------------------------------------------------------------------------------


def _clearml_project() -> str:
    return os.environ.get("MRGEN_CLEARML_PROJECT", "mrgen-dist")


def _common_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("results/fid"))
    ap.add_argument("--inception-weights", type=Path, help="FID Inception weights (see mrgen_dist/fid/inception.py)")


def _model_options(ap: argparse.ArgumentParser) -> None:
    _common_options(ap)
    ap.add_argument("--model", type=Path, required=True, help="decoder exported by mrgen-export onnx")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="for the sampler and Inception")
    ap.add_argument("--n-generated", type=positive(), default=None, metavar="N",
                    help="generated slices per scanner and repeat (default: as many as its real test slices)")
    ap.add_argument("--noise", action="store_true", help="sample with the model's learned observation noise")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=raw)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{score,conditioning,diagnose,translation,report}")
    score = sub.add_parser("score", help="FID and KID per scanner, repeated (the default command)",
                           description=__doc__, formatter_class=raw)
    _model_options(score)
    score.add_argument("--scanner", default="all", help="scanner name or 'all'")
    score.add_argument("--repeats", type=positive(), default=20)
    score.add_argument("--no-conditioning", action="store_true", help="with --scanner all: skip the conditioning check")
    score.add_argument("--tracker", choices=("none", "clearml"), default="none",
                       help="clearml: one task per scanner, linked to $MRGEN_CLEARML_PARENT when set")
    score.set_defaults(body=_score)
    cond = sub.add_parser("conditioning", help="is each generated slice recognised as the scanner it was asked for?",
                          description="A scanner classifier on Inception features of real training slices, applied to "
                          "real test slices and to generated slices; writes OUT/conditioning.json (see "
                          "mrgen_dist/fid/conditioning.py).")
    _model_options(cond)
    cond.set_defaults(body=_run_conditioning)
    diag = sub.add_parser("diagnose", help="where a trained run keeps the scanner: latent probe, reconstructions",
                          description="Needs the trained run folder (model.safetensors + config.json) and the "
                          "'train' extra; writes OUT/diagnostics.json (see mrgen_dist/fid/diagnostics.py).")
    _common_options(diag)
    diag.add_argument("--run", type=Path, required=True, help="the mrgen-train run folder")
    diag.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="for the model and Inception")
    diag.add_argument("--noise", action="store_true",
                      help="draw the model's learned observation noise onto the reconstructions, as --noise does "
                      "onto samples")
    diag.set_defaults(body=_diagnose)
    trans = sub.add_parser("translation", help="a translator: target conditioning, anatomy (SSIM), cycle, KID, identity",
                           description="Translates the store's test slices of each scanner to each target and back; "
                           "writes OUT/translation.json, .md and .png (see mrgen_dist/fid/translation.py).")
    _common_options(trans)
    trans.add_argument("--model", type=Path, required=True, help="translator exported by mrgen-export onnx")
    trans.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="for the translator and Inception")
    trans.add_argument("--n-per-scanner", type=positive(), default=None, metavar="N",
                       help="test slices per source scanner (default: all of them)")
    trans.set_defaults(body=_translation)
    report = sub.add_parser("report", help="FID table, boxplot and confusion matrix from mrgen-fid results",
                            description="fid_table.md / .csv, fid_boxplot.png, quality.png and conditioning.png "
                            "from the results of mrgen-fid in RESULTS.")
    report.add_argument("results", type=Path)
    report.add_argument("--tracker", choices=("none", "clearml"), default="none",
                        help="clearml: attach the table and plots to the pipeline's parent task ($MRGEN_CLEARML_PARENT)")
    report.set_defaults(body=_report)
    return ap


def _open_model(args: argparse.Namespace, store: SliceStore) -> tuple[Sampler, InceptionFeatures]:
    sampler = Sampler(args.model, args.device)
    check_model_fits_store(store, sampler)
    check_noise(sampler, args.noise, args.model)
    extractor = load_inception(args.inception_weights, None if args.device == "auto" else args.device)
    return sampler, extractor


def _conditioning(store: SliceStore, sampler: Sampler, extractor: InceptionFeatures, args: argparse.Namespace,
                  generated: dict[str, np.ndarray] | None = None) -> None:
    from mrgen_dist.fid.conditioning import conditioning, summary

    result = conditioning(store, sampler, extractor, args.seed, args.out, n_generated=args.n_generated,
                          noise=args.noise, generated=generated)
    print(summary(result, args.out))


def _run_conditioning(args: argparse.Namespace) -> None:
    store = SliceStore(args.store)
    _conditioning(store, *_open_model(args, store), args)


def _score(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    store = SliceStore(args.store)
    names = store.vocabulary.resolve(args.scanner)
    for name in names:
        require_test_slices(store, name)
    sampler, extractor = _open_model(args, store)
    print(f"FID features: {extractor.kind} ({extractor.weights}) on {extractor.device}; sampler on {sampler.device}",
          file=sys.stderr)
    results, first_features = [], {}
    for name in names:
        tracker = None
        if args.tracker == "clearml":
            from mrgen_dist.tracking import ClearMLTracker

            tracker = ClearMLTracker(_clearml_project(), f"FID {name}", tags=["fid", name],
                                     parent=os.environ.get("MRGEN_CLEARML_PARENT"))
        try:
            r = evaluate_scanner(store, sampler, extractor, name, args.repeats, args.seed, args.out, tracker,
                                 n_generated=args.n_generated, noise=args.noise, first_features=first_features)
        finally:
            if tracker:
                tracker.close()
        results.append(r)
        print(f"{name}: FID {r['fid_mean']:.2f} ± {r['fid_std']:.2f}{' (biased: n < 2048)' if r['fid_biased'] else ''}"
              f", KID {r['kid_mean']:.4f} ± {r['kid_std']:.4f} (n = {r['n_real']} real, {r['n_generated']} generated, "
              f"{args.repeats} repeats); MS-SSIM {r['ms_ssim']:.3f} (real {r['ms_ssim_real']:.3f})")
    if args.scanner == "all":
        gen = generation(store, sampler, names, results, args.noise, args.seed, args.out)
        effect = gen["label_effect"]
        print(f"sampling: {gen['sampling_images_per_s']:.0f} images/s on {gen['sampler_device']}"
              + (f"; label effect {effect['between_scanners']:.4f} between scanners vs {effect['between_draws']:.4f} "
                 f"between draws" if effect else ""))
    if args.scanner == "all" and not args.no_conditioning:
        if len(store.vocabulary) > 1:
            # the first repeat's sets, already through Inception: at 500 per scanner that halves the CPU time
            _conditioning(store, sampler, extractor, args, first_features)
        else:
            print("conditioning check skipped: the store has one scanner", file=sys.stderr)
    print(f"results in {args.out} ({time.perf_counter() - t0:.0f} s); `{PROG} report {args.out}` writes the table")


def _diagnose(args: argparse.Namespace) -> None:
    from mrgen_dist.cli import require_extra

    require_extra("train", f"{PROG} diagnose")  # the run's model: torch, safetensors, the exporter's loader
    from mrgen_dist.fid.diagnostics import diagnose, summary

    store = SliceStore(args.store)
    result = diagnose(store, args.run, args.out, args.inception_weights, args.device, args.noise)
    print(summary(result, args.out))


def _translation(args: argparse.Namespace) -> None:
    from mrgen_dist.fid.translation import evaluate_translation, table_markdown
    from mrgen_dist.translate import Translator

    store = SliceStore(args.store)
    translator = Translator(args.model, args.device)
    extractor = load_inception(args.inception_weights, None if args.device == "auto" else args.device)
    result = evaluate_translation(store, translator, extractor, args.out, cache_dir(args.out), args.n_per_scanner)
    print(table_markdown(result))
    print(f"wrote {args.out / 'translation.json'}, translation.md, translation.png")


def _report(args: argparse.Namespace) -> None:
    from mrgen_dist.fid.report import write_report

    written = write_report(args.results)
    print(written[0].read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    parent = os.environ.get("MRGEN_CLEARML_PARENT")
    if args.tracker == "clearml" and parent:
        from mrgen_dist.tracking import attach_to_parent

        holder = attach_to_parent(parent, _clearml_project(), written)
        print(f"attached to ClearML task {holder} (parent {parent})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(with_default_command(argv, parser, DEFAULT_COMMAND))
    return run(PROG, lambda: args.body(args))


if __name__ == "__main__":
    sys.exit(main())
