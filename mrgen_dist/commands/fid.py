"""`mrgen-fid`: FID and KID per scanner, repeated, with fidelity, diversity and signature measures; the command
line of the conditioning check, the model diagnostics and the report.

    mrgen-fid --store STORE --model export/decoder.onnx --scanner NAME|all --repeats 20 --out results/fid/
    mrgen-fid --store STORE --model export/decoder.onnx --n-generated 2048 --noise --out results/fid/
    mrgen-fid conditioning --store STORE --model export/decoder.onnx --out results/fid/
    mrgen-fid diagnose --store STORE --run RUN --out results/fid/
    mrgen-fid translation --store STORE --model export/translator.onnx --out results/fid/
    mrgen-fid levels --store STORE --model export/decoder.onnx --out results/fid/
    mrgen-fid reference --store STORE --n-generated 320 --out results/real/
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

From the first repeat's generated set, against the scanner's real test slices (`mrgen_dist.eval.quality`):
precision, recall, density and coverage on Inception features (k = 5); MS-SSIM diversity of the generated set
and of the real set (200 pairs; the real value is cached); the scanner signature (background noise, sharpness,
brain-intensity Wasserstein-1) in head masks taken from the real slices.

The result is OUT/fid_<scanner>.json with every repeat, mean and std, the sample sizes and those measures.
With `--scanner all` also OUT/generation.json: the sampling speed of onnxruntime on the generated sets, and the
label effect: the same 16 latent draws decoded (the decoder's mean, no noise) for every scanner, how much the
image changes with the label compared with between draws.

With `--scanner all` the conditioning check (`mrgen_dist.eval.conditioning`) runs too, unless
`--no-conditioning`; `diagnose` (`mrgen_dist.eval.diagnostics`) probes a trained run's latent space and its
reconstructions; `translation` (`mrgen_dist.eval.translation`) evaluates a translator; `levels`
(`mrgen_dist.eval.levels`) checks that a level-conditioned generator makes the level asked for; `reference`
(`mrgen_dist.eval.reference`) scores the store's own training slices in a model's place, what a perfect
generator would read at this sample size; `report` (`mrgen_dist.eval.report`) turns the results into tables and
figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from mrgen_dist.cli import run
from mrgen_dist.commands.options import non_negative_int, positive, with_default_command
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.features import cache_dir
from mrgen_dist.eval.inception import InceptionFeatures, load_inception
from mrgen_dist.eval.score import check_model_fits_store, check_noise, evaluate_scanner, generation, require_test_slices
from mrgen_dist.eval.table import _rate
from mrgen_dist.runtime.sampler import Sampler

PROG = "mrgen-fid"


DEFAULT_COMMAND = "score"


def _clearml_project() -> str:
    return os.environ.get("MRGEN_CLEARML_PROJECT", "mrgen-dist")


def _common_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("results/fid"))
    ap.add_argument("--inception-weights", type=Path, help="FID Inception weights (see mrgen_dist/eval/inception.py)")


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
    sub = ap.add_subparsers(dest="command", required=True,
                            metavar="{score,conditioning,diagnose,translation,levels,reference,report}")
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
                          "mrgen_dist/eval/conditioning.py).")
    _model_options(cond)
    cond.set_defaults(body=_run_conditioning)
    diag = sub.add_parser("diagnose", help="where a trained run keeps the scanner: latent probe, reconstructions",
                          description="Needs the trained run folder (model.safetensors + config.json) and the "
                          "'train' extra; writes OUT/diagnostics.json (see mrgen_dist/eval/diagnostics.py).")
    _common_options(diag)
    diag.add_argument("--run", type=Path, required=True, help="the mrgen-train run folder")
    diag.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="for the model and Inception")
    diag.add_argument("--noise", action="store_true",
                      help="draw the model's learned observation noise onto the reconstructions, as --noise does "
                      "onto samples")
    diag.add_argument("--swaps", action="store_true",
                      help="also the component-swap probe: the real test slices with one region or band from the "
                      "reconstructions, recognised (mrgen_dist/eval/swaps.py; 9 more Inception passes)")
    diag.set_defaults(body=_diagnose)
    trans = sub.add_parser("translation", help="a translator: target conditioning, anatomy (SSIM), cycle, KID, identity",
                           description="Translates the store's test slices of each scanner to each target and back; "
                           "writes OUT/translation.json, .md and .png (see mrgen_dist/eval/translation.py).")
    _common_options(trans)
    trans.add_argument("--model", type=Path, required=True, help="translator exported by mrgen-export onnx")
    trans.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="for the translator and Inception")
    trans.add_argument("--n-per-scanner", type=positive(), default=None, metavar="N",
                       help="test slices per source scanner (default: all of them)")
    trans.set_defaults(body=_translation)
    levels = sub.add_parser("levels", help="a level-conditioned generator: does it make the axial level asked for?",
                            description="The fraction of the slice inside the head, per asked level, generated vs "
                            "the real test slices; writes OUT/levels.json, levels.png and levels-strip.png (see "
                            "mrgen_dist/eval/levels.py).")
    _common_options(levels)
    levels.add_argument("--model", type=Path, required=True, help="generator exported with a level input")
    levels.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="for the sampler")
    levels.add_argument("--n", type=positive(), default=16, help="generated slices per scanner and level")
    levels.add_argument("--seed", type=non_negative_int, default=0)
    levels.set_defaults(body=_levels)
    ref = sub.add_parser("reference", help="the real reference: the store's training slices scored as a model's",
                         description="The measures of `score` (FID, KID, precision/recall/density/coverage, MS-SSIM, "
                         "the signature) with N training slices per scanner in place of generated ones, against the "
                         "same real test slices; writes OUT/fid_<scanner>.json (see mrgen_dist/eval/reference.py).")
    _common_options(ref)
    ref.add_argument("--n-generated", type=positive(), default=None, metavar="N",
                     help="training slices per scanner and repeat (default: as many as its real test slices)")
    ref.add_argument("--repeats", type=positive(), default=1, help="each repeat another subset of the training slices")
    ref.add_argument("--seed", type=non_negative_int, default=0)
    ref.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="for Inception")
    ref.set_defaults(body=_reference)
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
    from mrgen_dist.eval.conditioning import conditioning, summary

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
        print(f"{name}: FID {r.fid_mean:.2f} ± {r.fid_std:.2f}{' (biased: n < 2048)' if r.fid_biased else ''}"
              f", KID {r.kid_mean:.4f} ± {r.kid_std:.4f} (n = {r.n_real} real, {r.n_generated} generated, "
              f"{args.repeats} repeats); MS-SSIM {r.ms_ssim:.3f} (real {r.ms_ssim_real:.3f})")
    if args.scanner == "all":
        gen = generation(store, sampler, names, results, args.noise, args.seed, args.out)
        effect = gen.label_effect
        print(f"sampling: {_rate(gen.sampling_images_per_s)} images/s on {gen.sampler_device}"
              + (f"; label effect {effect.between_scanners:.4f} between scanners vs {effect.between_draws:.4f} "
                 f"between draws" if effect else ""))
    if args.scanner == "all" and not args.no_conditioning:
        if len(store.vocabulary) > 1:
            # the first repeat's sets, already through Inception: at 500 per scanner that halves the CPU time
            _conditioning(store, sampler, extractor, args, first_features)
        else:
            print("conditioning check skipped: the store has one scanner", file=sys.stderr)
    print(f"results in {args.out} ({time.perf_counter() - t0:.0f} s); `{PROG} report {args.out}` writes the table")


def _reference(args: argparse.Namespace) -> None:
    from mrgen_dist.eval.reference import TrainingSlices

    store = SliceStore(args.store)
    names = list(store.vocabulary.names)
    for name in names:
        require_test_slices(store, name)
    slices = TrainingSlices(store)
    slices.require(args.n_generated)
    extractor = load_inception(args.inception_weights, None if args.device == "auto" else args.device)
    for name in names:
        r = evaluate_scanner(store, slices, extractor, name, args.repeats, args.seed, args.out,
                             n_generated=args.n_generated)
        fidelity = "" if r.precision is None else f", precision {r.precision:.3f}, recall {r.recall:.3f}"
        print(f"{name}: {r.n_generated} training slices vs {r.n_real} test slices: FID {r.fid_mean:.2f}, "
              f"KID {r.kid_mean:.4f}{fidelity}")
    print(f"results in {args.out}; `mrgen-compare` shows them as the reference row")


def _diagnose(args: argparse.Namespace) -> None:
    from mrgen_dist.cli import require_extra

    require_extra("train", f"{PROG} diagnose")  # the run's model: torch, safetensors, the exporter's loader
    from mrgen_dist.eval.diagnostics import diagnose, summary

    store = SliceStore(args.store)
    result = diagnose(store, args.run, args.out, args.inception_weights, args.device, args.noise, args.swaps)
    print(summary(result, args.out))


def _translation(args: argparse.Namespace) -> None:
    from mrgen_dist.eval.translation import evaluate_translation, table_markdown
    from mrgen_dist.runtime.translator import Translator

    store = SliceStore(args.store)
    translator = Translator(args.model, args.device)
    extractor = load_inception(args.inception_weights, None if args.device == "auto" else args.device)
    result = evaluate_translation(store, translator, extractor, args.out, cache_dir(args.out), args.n_per_scanner)
    print(table_markdown(result))
    print(f"wrote {args.out / 'translation.json'}, translation.md, translation.png")


def _levels(args: argparse.Namespace) -> None:
    from mrgen_dist.eval.levels import level_following, summary

    store = SliceStore(args.store)
    sampler = Sampler(args.model, args.device)
    check_model_fits_store(store, sampler)
    print(summary(level_following(store, sampler, args.out, args.n, args.seed)))
    print(f"wrote {args.out / 'levels.json'}, levels.png, levels-strip.png")


def _report(args: argparse.Namespace) -> None:
    from mrgen_dist.eval.report import write_report

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
