"""`mrgen-fid`: FID and KID per scanner, repeated, plus a conditioning check; and the report.

    mrgen-fid --store STORE --model export/decoder.onnx --scanner NAME|all --repeats 20 --out results/fid/
    mrgen-fid conditioning --store STORE --model export/decoder.onnx --out results/fid/
    mrgen-fid report results/fid/

Per scanner: Inception features of the scanner's real test slices are computed once and cached in
OUT/cache/ under a key made of the store's sha256, the feature extractor (weights hash) and the scanner, so a
changed store or other weights never reuse them. Each repeat draws a fresh generated set of the same size
with its own seed (seed + repeat) and scores it against the real set: FID (float64 statistics) and KID.
The result is OUT/fid_<scanner>.json with every repeat, mean and std, and the sample sizes.

Conditioning accuracy: a multinomial logistic regression on standardised Inception features of the real
training slices; reported are its accuracy on the real test slices and the rate at which generated slices are
recognised as the scanner they were asked for, with the confusion matrix (OUT/conditioning.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mrgen_dist import __version__
from mrgen_dist.data.store import SliceStore, StoreError
from mrgen_dist.fid.inception import InceptionFeatures, WeightsNotFound, load_inception
from mrgen_dist.fid.metrics import FeatureStats, frechet_distance, kernel_inception_distance
from mrgen_dist.sample import Sampler, SampleError
from mrgen_dist.tracking import Tracker


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def real_features(store: SliceStore, scanner: str, side: str, extractor: InceptionFeatures, cache: Path) -> tuple[np.ndarray, bool]:
    """Features of one scanner's real slices, from the cache when the store and extractor are the same."""
    path = cache / f"real-{store.sha256[:16]}-{extractor.identity}-{side}-{_slug(scanner)}.npy"
    if path.is_file():
        return np.load(path), True
    features = extractor(store.load_split(side, scanner).images)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, features)
    tmp.replace(path)
    return features, False


def evaluate_scanner(
    store: SliceStore, sampler: Sampler, extractor: InceptionFeatures, scanner: str, repeats: int, seed: int, out: Path,
    tracker: Tracker | None = None,
) -> dict:
    from tqdm import tqdm

    real, cached = real_features(store, scanner, "test", extractor, out / "cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        real_stats = FeatureStats.of(real)
    small = [str(w.message) for w in caught]
    n = len(real)
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
        "model": {k: v for k, v in sampler.metadata.items() if k != "mrgen.config"},
        "package_version": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fid_{_slug(scanner)}.json"
    path.write_text(json.dumps(result, indent=1))
    if tracker:
        tracker.log_params({"scanner": scanner, "repeats": repeats, "seed": seed, "n": n, "store_sha256": store.sha256})
        tracker.log_scalars({"FID mean/" + scanner: result["fid_mean"], "KID mean/" + scanner: result["kid_mean"]}, step=0)
        tracker.log_artifact(path.name, path, copy=True)
    return result


def _fit_softmax(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray, torch.nn.Linear]:
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std).float()
    yt = torch.from_numpy(y).long()
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xt), yt) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mean, std, linear


def conditioning(store: SliceStore, sampler: Sampler, extractor: InceptionFeatures, seed: int, out: Path) -> dict:
    names = list(store.vocabulary.names)
    cache = out / "cache"
    train = [real_features(store, s, "train", extractor, cache)[0] for s in names]
    test = [real_features(store, s, "test", extractor, cache)[0] for s in names]
    mean, std, linear = _fit_softmax(np.concatenate(train), np.repeat(np.arange(len(names)), [len(f) for f in train]), len(names))

    @torch.no_grad()
    def predict(features: np.ndarray) -> np.ndarray:
        return linear(torch.from_numpy((features - mean) / std).float()).argmax(1).numpy()

    confusion = np.zeros((len(names), len(names)), dtype=int)
    real_correct = 0
    for i, (name, feats) in enumerate(zip(names, test)):
        real_correct += int((predict(feats) == i).sum())
        generated = extractor(sampler.sample(name, len(feats), seed=seed + 10_000))
        np.add.at(confusion[i], predict(generated), 1)
    result = {
        "scanners": names,
        "n_train": [len(f) for f in train],
        "n_test": [len(f) for f in test],
        "real_test_accuracy": real_correct / sum(len(f) for f in test),
        "generated_accuracy": float(np.trace(confusion) / confusion.sum()),
        "confusion": confusion.tolist(),  # rows: scanner asked for, columns: scanner recognised
        "classifier": "multinomial logistic regression (L2 1e-3) on standardised Inception features of real train slices",
        "extractor": extractor.identity,
        "store_sha256": store.sha256,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "conditioning.json").write_text(json.dumps(result, indent=1))
    return result


def write_report(results: Path) -> list[Path]:
    """fid_table.md / .csv (thesis form: scanner, FID mean ± std, KID, n), fid_boxplot.png, and the
    conditioning confusion matrix when conditioning.json is present."""
    from mrgen_dist.plots import confusion_matrix, fid_boxplot

    per_scanner = [json.loads(p.read_text()) for p in results.glob("fid_*.json")]
    if not per_scanner:
        raise FileNotFoundError(f"no fid_*.json in {results}; run mrgen-fid first")
    order = json.loads(per_scanner[0]["model"]["mrgen.scanners"])  # the model's label order
    per_scanner.sort(key=lambda r: order.index(r["scanner"]) if r["scanner"] in order else len(order))
    cond_path = results / "conditioning.json"
    cond = json.loads(cond_path.read_text()) if cond_path.is_file() else None
    lines = ["| scanner | FID (mean ± std) | KID × 10³ (mean ± std) | n real / generated | repeats |",
             "|---|---|---|---|---|"]
    with (results / "fid_table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scanner", "fid_mean", "fid_std", "kid_mean", "kid_std", "n_real", "n_generated", "repeats"])
        for r in per_scanner:
            w.writerow([r["scanner"], r["fid_mean"], r["fid_std"], r["kid_mean"], r["kid_std"], r["n_real"],
                        r["n_generated"], len(r["repeats"])])
            lines.append(f"| {r['scanner']} | {r['fid_mean']:.2f} ± {r['fid_std']:.2f} | "
                         f"{1e3 * r['kid_mean']:.2f} ± {1e3 * r['kid_std']:.2f} | {r['n_real']} / {r['n_generated']} | "
                         f"{len(r['repeats'])} |")
    notes = sorted({w for r in per_scanner for w in r["warnings"]})
    if notes:
        lines += ["", "Note: " + notes[0].split(":")[0] + " (and similar): FID is biased upwards at these sample "
                  "sizes; compare FIDs only at equal n, or use KID."]
    written = [results / "fid_table.csv", fid_boxplot(per_scanner, results / "fid_boxplot.png")]
    if cond:
        lines += ["", f"Conditioning: a scanner classifier on Inception features recognises real test slices with "
                  f"accuracy {cond['real_test_accuracy']:.3f} and generated slices as the scanner asked for with "
                  f"accuracy {cond['generated_accuracy']:.3f}.", "",
                  "| asked for \\ recognised as | " + " | ".join(cond["scanners"]) + " |",
                  "|---" * (len(cond["scanners"]) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(map(str, row)) + " |" for name, row in zip(cond["scanners"], cond["confusion"])]
        written.append(confusion_matrix(np.array(cond["confusion"]), cond["scanners"], results / "conditioning.png"))
    (results / "fid_table.md").write_text("\n".join(lines) + "\n")
    return [results / "fid_table.md", *written]


def _print_conditioning(cond: dict, out: Path) -> None:
    print(f"conditioning: real test accuracy {cond['real_test_accuracy']:.3f}, generated recognised as asked "
          f"{cond['generated_accuracy']:.3f} -> {out / 'conditioning.json'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        ap = argparse.ArgumentParser(prog="mrgen-fid report", description="FID table and boxplot from mrgen-fid results")
        ap.add_argument("results", type=Path)
        ap.add_argument("--tracker", choices=("none", "clearml"), default="none",
                        help="clearml: attach the table and plots to the pipeline's parent task ($MRGEN_CLEARML_PARENT)")
        args = ap.parse_args(argv[1:])
        try:
            written = write_report(args.results)
        except FileNotFoundError as e:
            print(f"mrgen-fid report: error: {e}", file=sys.stderr)
            return 1
        print((args.results / "fid_table.md").read_text())
        print("wrote " + ", ".join(str(p) for p in written))
        parent = os.environ.get("MRGEN_CLEARML_PARENT")
        if args.tracker == "clearml" and parent:
            from mrgen_dist.tracking import attach_to_parent

            holder = attach_to_parent(parent, os.environ.get("MRGEN_CLEARML_PROJECT", "mrgen-dist"), written)
            print(f"attached to ClearML task {holder} (parent {parent})")
        return 0
    command = "conditioning" if argv[:1] == ["conditioning"] else "fid"
    ap = argparse.ArgumentParser(prog=f"mrgen-fid{' conditioning' if command == 'conditioning' else ''}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True, help="decoder exported by mrgen-export onnx")
    if command == "fid":
        ap.add_argument("--scanner", default="all", help="scanner name or 'all'")
        ap.add_argument("--repeats", type=int, default=20)
        ap.add_argument("--no-conditioning", action="store_true", help="with --scanner all: skip the conditioning check")
        ap.add_argument("--tracker", choices=("none", "clearml"), default="none",
                        help="clearml: one task per scanner, linked to $MRGEN_CLEARML_PARENT when set")
    ap.add_argument("--out", type=Path, default=Path("results/fid"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inception-weights", type=Path, help="FID Inception weights (see mrgen_dist/fid/inception.py)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="for the sampler and Inception")
    args = ap.parse_args(argv[1:] if command == "conditioning" else argv)
    t0 = time.perf_counter()
    try:
        store = SliceStore(args.store)
        sampler = Sampler(args.model, args.device)
        if sampler.scanners != list(store.vocabulary.names):
            raise SampleError(f"the model's scanners {sampler.scanners} are not the store's {list(store.vocabulary.names)}")
        extractor = load_inception(args.inception_weights, None if args.device == "auto" else args.device)
        if command == "conditioning":
            _print_conditioning(conditioning(store, sampler, extractor, args.seed, args.out), args.out)
            return 0
        if args.repeats < 1:
            raise SampleError("--repeats must be >= 1")
        names = store.vocabulary.resolve(args.scanner)
        print(f"FID features: {extractor.kind} ({extractor.weights}) on {extractor.device}; sampler on {sampler.device}",
              file=sys.stderr)
        for name in names:
            tracker = None
            if args.tracker == "clearml":
                from mrgen_dist.tracking import ClearMLTracker

                tracker = ClearMLTracker(os.environ.get("MRGEN_CLEARML_PROJECT", "mrgen-dist"), f"FID {name}",
                                         tags=["fid", name], parent=os.environ.get("MRGEN_CLEARML_PARENT"))
            r = evaluate_scanner(store, sampler, extractor, name, args.repeats, args.seed, args.out, tracker)
            if tracker:
                tracker.close()
            print(f"{name}: FID {r['fid_mean']:.2f} ± {r['fid_std']:.2f}, KID {r['kid_mean']:.4f} ± {r['kid_std']:.4f} "
                  f"(n = {r['n_real']}, {args.repeats} repeats)")
        if args.scanner == "all" and not args.no_conditioning:
            _print_conditioning(conditioning(store, sampler, extractor, args.seed, args.out), args.out)
    except (StoreError, SampleError, WeightsNotFound, ValueError) as e:
        print(f"mrgen-fid: error: {e}", file=sys.stderr)
        return 1
    print(f"results in {args.out} ({time.perf_counter() - t0:.0f} s); `mrgen-fid report {args.out}` writes the table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
