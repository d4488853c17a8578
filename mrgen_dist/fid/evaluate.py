"""`mrgen-fid`: FID and KID per scanner, repeated; the command line of the conditioning check and the report.

    mrgen-fid --store STORE --model export/decoder.onnx --scanner NAME|all --repeats 20 --out results/fid/
    mrgen-fid conditioning --store STORE --model export/decoder.onnx --out results/fid/
    mrgen-fid report results/fid/

The first form is the default sub-command `score` (`mrgen-fid score --store ...` is the same).

Per scanner: Inception features of the scanner's real test slices are computed once and cached in
OUT/cache/ under a key made of the store's sha256, the feature extractor (weights hash) and the scanner, so a
changed store or other weights never reuse them. Each repeat draws a fresh generated set of the same size
with its own seed (seed + repeat) and scores it against the real set: FID (float64 statistics) and KID.
The result is OUT/fid_<scanner>.json with every repeat, mean and std, and the sample sizes.

With `--scanner all` the conditioning check (`mrgen_dist.fid.conditioning`) runs too, unless
`--no-conditioning`; `report` (`mrgen_dist.fid.report`) turns the results into a table and figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from mrgen_dist import __version__
from mrgen_dist.atomic import atomic_path, atomic_write
from mrgen_dist.cli import UserError, positive, run, with_default_command
from mrgen_dist.data.store import SliceStore
from mrgen_dist.fid.inception import InceptionFeatures, load_inception
from mrgen_dist.fid.metrics import FeatureStats, frechet_distance, kernel_inception_distance
from mrgen_dist.sample import Sampler
from mrgen_dist.tracking import Tracker

PROG = "mrgen-fid"
DEFAULT_COMMAND = "score"


class FidError(UserError):
    """mrgen-fid cannot do what was asked: the model does not fit the store, too few slices, no results."""


def slug(name: str) -> str:
    """A scanner name as a file-name part: every character that is not a letter or digit becomes `_`."""
    return "".join(c if c.isalnum() else "_" for c in name)


def real_features(
    store: SliceStore, scanner: str, side: str, extractor: InceptionFeatures, cache: Path
) -> tuple[np.ndarray, bool]:
    """Features of one scanner's real slices of `side`, and whether they came from the cache; the cache key
    names the store (sha256), the extractor (weights hash), the side and the scanner."""
    path = cache / f"real-{store.sha256[:16]}-{extractor.identity}-{side}-{slug(scanner)}.npy"
    if path.is_file():
        return np.load(path), True
    features = extractor(store.load_split(side, scanner).images)
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, features)
    return features, False


def check_model_fits_store(store: SliceStore, sampler: Sampler) -> None:
    """The model must have been trained with the store's vocabulary (same names, same order)."""
    model, data = list(sampler.vocabulary.names), list(store.vocabulary.names)
    if model != data:
        raise FidError(f"the model's scanners {model} are not the store's {data}")


def require_test_slices(store: SliceStore, scanner: str) -> None:
    """FID and KID need at least 2 real test slices of the scanner (the manifest's count, before any work)."""
    n = store.expected_count("test", scanner)
    if n < 2:
        raise FidError(f"scanner {scanner!r} has {n} real test slice(s) in {store.root}; FID and KID need at least 2")


def evaluate_scanner(
    store: SliceStore, sampler: Sampler, extractor: InceptionFeatures, scanner: str, repeats: int, seed: int, out: Path,
    tracker: Tracker | None = None,
) -> dict:
    """`repeats` generated sets of one scanner scored against its real test slices; writes and returns
    OUT/fid_<scanner>.json."""
    from tqdm import tqdm

    require_test_slices(store, scanner)
    real, cached = real_features(store, scanner, "test", extractor, out / "cache")
    n = len(real)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        real_stats = FeatureStats.of(real)
    small = [str(w.message) for w in caught]
    rows = []
    for r in tqdm(range(repeats), desc=f"FID {scanner}", unit="repeat", file=sys.stderr):
        generated = extractor(sampler.sample(scanner, n, seed=seed + r))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small-sample warning is recorded once, above
            fid = frechet_distance(FeatureStats.of(generated), real_stats)
        kid = kernel_inception_distance(generated, real, subsets=50, subset_size=min(1000, n), seed=seed + r)
        rows.append({"seed": seed + r, "fid": fid, "kid": kid.mean, "kid_std": kid.std})
        if tracker:
            tracker.log_scalars({f"FID/{scanner}": fid, f"KID/{scanner}": kid.mean}, step=r)
    fids = np.array([row["fid"] for row in rows])
    kids = np.array([row["kid"] for row in rows])
    result = {
        "scanner": scanner,
        "n_real": n,
        "n_generated": n,
        "repeats": rows,
        "fid_mean": float(fids.mean()),
        "fid_std": float(fids.std(ddof=1)) if repeats > 1 else 0.0,
        "kid_mean": float(kids.mean()),
        "kid_std": float(kids.std(ddof=1)) if repeats > 1 else 0.0,
        "warnings": small,
        "real_features_cached": cached,
        "extractor": extractor.identity,
        "store_sha256": store.sha256,
        "model": {k: v for k, v in sampler.metadata.to_props().items() if k != "mrgen.config"},
        "package_version": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = atomic_write(out / f"fid_{slug(scanner)}.json", json.dumps(result, indent=1))
    if tracker:
        tracker.log_params({"scanner": scanner, "repeats": repeats, "seed": seed, "n": n, "store_sha256": store.sha256})
        tracker.log_scalars({"FID mean/" + scanner: result["fid_mean"], "KID mean/" + scanner: result["kid_mean"]}, step=0)
        tracker.log_artifact(path.name, path, copy=True)
    return result


# -- command line ---------------------------------------------------------------------------------------------


def _clearml_project() -> str:
    return os.environ.get("MRGEN_CLEARML_PROJECT", "mrgen-dist")


def _model_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True, help="decoder exported by mrgen-export onnx")
    ap.add_argument("--out", type=Path, default=Path("results/fid"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inception-weights", type=Path, help="FID Inception weights (see mrgen_dist/fid/inception.py)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="for the sampler and Inception")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=raw)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{score,conditioning,report}")
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
    report = sub.add_parser("report", help="FID table, boxplot and confusion matrix from mrgen-fid results",
                            description="fid_table.md / .csv, fid_boxplot.png and conditioning.png from the results "
                            "of mrgen-fid in RESULTS.")
    report.add_argument("results", type=Path)
    report.add_argument("--tracker", choices=("none", "clearml"), default="none",
                        help="clearml: attach the table and plots to the pipeline's parent task ($MRGEN_CLEARML_PARENT)")
    report.set_defaults(body=_report)
    return ap


def _open_model(args: argparse.Namespace, store: SliceStore) -> tuple[Sampler, InceptionFeatures]:
    sampler = Sampler(args.model, args.device)
    check_model_fits_store(store, sampler)
    extractor = load_inception(args.inception_weights, None if args.device == "auto" else args.device)
    return sampler, extractor


def _conditioning(store: SliceStore, sampler: Sampler, extractor: InceptionFeatures, args: argparse.Namespace) -> None:
    from mrgen_dist.fid.conditioning import conditioning, summary

    print(summary(conditioning(store, sampler, extractor, args.seed, args.out), args.out))


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
    for name in names:
        tracker = None
        if args.tracker == "clearml":
            from mrgen_dist.tracking import ClearMLTracker

            tracker = ClearMLTracker(_clearml_project(), f"FID {name}", tags=["fid", name],
                                     parent=os.environ.get("MRGEN_CLEARML_PARENT"))
        try:
            r = evaluate_scanner(store, sampler, extractor, name, args.repeats, args.seed, args.out, tracker)
        finally:
            if tracker:
                tracker.close()
        print(f"{name}: FID {r['fid_mean']:.2f} ± {r['fid_std']:.2f}, KID {r['kid_mean']:.4f} ± {r['kid_std']:.4f} "
              f"(n = {r['n_real']}, {args.repeats} repeats)")
    if args.scanner == "all" and not args.no_conditioning:
        if len(store.vocabulary) > 1:
            _conditioning(store, sampler, extractor, args)
        else:
            print("conditioning check skipped: the store has one scanner", file=sys.stderr)
    print(f"results in {args.out} ({time.perf_counter() - t0:.0f} s); `{PROG} report {args.out}` writes the table")


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
