"""Scoring a decoder per scanner (`mrgen-fid score`): FID and KID, repeated, with fidelity, diversity and signature
measures, and the generation record (sampling speed, label effect).

Each repeat draws a fresh generated set of `n_generated` slices (default n_real) with its own seed (seed +
repeat) and scores it against the scanner's real test slices (features cached by `features.py`): KID on all
generated vs all real slices, FID (float64 statistics) on the first n_real generated slices vs the real set, so
that FIDs of different models (and of different n_generated) are compared at equal n; below 2,048 slices FID is
biased upwards (`fid_biased`, and the warning recorded). From the first repeat's generated set
(`mrgen_dist.eval.quality`): precision, recall, density and coverage on Inception features (k = 5); MS-SSIM
diversity of the generated and the real set (200 pairs); the scanner signature (background noise, sharpness,
brain-intensity Wasserstein-1) in head masks taken from the real slices.

The result is OUT/fid_<scanner>.json with every repeat, mean and std, the sample sizes and those measures, and
OUT/generation.json: the sampling speed of onnxruntime on the generated sets, and the label effect: the same
16 latent draws decoded (the decoder's mean, no noise) for every scanner, how much the image changes with the
label compared with between draws.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from mrgen_dist import __version__
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.features import MS_SSIM_PAIRS, MS_SSIM_SEED, FidError, cache_dir, real_features, real_ms_ssim
from mrgen_dist.eval.fid import FeatureStats, frechet_distance, kernel_inception_distance
from mrgen_dist.eval.inception import InceptionFeatures
from mrgen_dist.eval.reference import TrainingSlices
from mrgen_dist.eval.results import Generation, LabelEffect, Repeat, ScannerScore, Signature
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.tracking import Tracker

#: Latent draws of the label-effect grid, decoded for every scanner, and the seed stream they come from.
LABEL_EFFECT_DRAWS = 16
LABEL_EFFECT_STREAM = 20_000


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
    against its real test slices (features and images of each), as fields of its `ScannerScore` (a measure
    not computed is left out: None); notes on what could not be computed."""
    from mrgen_dist.eval import quality

    k = quality.PRDC_K
    measures: dict = {"prdc_k": k, "ms_ssim_pairs": MS_SSIM_PAIRS}
    notes = []
    if min(len(real), len(generated)) >= k + 2:  # a k-th neighbour besides itself, and prdc's one more
        measures.update(quality.prdc(real, generated, k=k))
    else:
        notes.append(f"precision, recall, density and coverage need at least k + 2 = {k + 2} real and generated "
                     f"slices; {len(real)} real, {len(generated)} generated")
    measures["ms_ssim"] = quality.ms_ssim_diversity(generated_images, pairs=MS_SSIM_PAIRS, seed=MS_SSIM_SEED)
    measures["ms_ssim_real"] = real_ms_ssim(store, scanner, real_images, cache)
    try:
        brain, background = quality.head_masks(real_images)
        measures["signature"] = Signature(**quality.signature_distances(real_images, generated_images, brain,
                                                                        background))
    except ValueError as e:  # slices without a head or without air around it: no masks to measure in
        notes.append(f"no scanner signature: {e}")
    return measures, notes


def evaluate_scanner(
    store: SliceStore, sampler: Sampler | TrainingSlices, extractor: InceptionFeatures, scanner: str, repeats: int,
    seed: int, out: Path, tracker: Tracker | None = None, n_generated: int | None = None, noise: bool = False,
    first_features: dict[str, np.ndarray] | None = None,
) -> ScannerScore:
    """`repeats` generated sets of `n_generated` slices (default: as many as the real test slices) of one scanner
    scored against its real test slices; writes OUT/fid_<scanner>.json and returns the record, which `mrgen-fid`
    prints from and `generation` sums. `sampler`: a model's, or the store's own training slices (the real
    reference, reference.py). The Inception features of the first repeat's set go into
    `first_features[scanner]` when given (the conditioning check reuses them)."""
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
        rows.append(Repeat(seed=seed + r, fid=fid, kid=kid.mean, kid_std=kid.std))
        if tracker:
            tracker.log_scalars({f"FID/{scanner}": fid, f"KID/{scanner}": kid.mean}, step=r)
    measures, notes = quality_measures(store, scanner, real, real_images, first[1], first[0], cache_dir(out))
    fids = np.array([row.fid for row in rows])
    kids = np.array([row.kid for row in rows])
    record = ScannerScore(
        scanner=scanner,
        n_real=n,
        n_generated=n_gen,
        fid_n_generated=n_fid,
        fid_biased=n_fid < real.shape[1],  # FID biased upwards below 2,048 (the feature dimension)
        noise=noise,
        repeats=rows,
        fid_mean=float(fids.mean()),
        fid_std=float(fids.std(ddof=1)) if repeats > 1 else 0.0,
        kid_mean=float(kids.mean()),
        kid_std=float(kids.std(ddof=1)) if repeats > 1 else 0.0,
        **measures,
        warnings=small + notes,
        sampling_seconds=sampling_seconds,
        sampling_images_per_s=n_gen * repeats / sampling_seconds if sampling_seconds > 0 else None,
        real_features_cached=cached,
        extractor=extractor.identity,
        store_sha256=store.sha256,
        model={k: v for k, v in sampler.metadata.to_props().items() if k != "mrgen.config"},
        package_version=__version__,
    )
    out.mkdir(parents=True, exist_ok=True)
    path = record.write(out / record.file_name)
    if tracker:
        tracker.log_params({"scanner": scanner, "repeats": repeats, "seed": seed, "n": n, "n_generated": n_gen,
                            "noise": noise, "store_sha256": store.sha256})
        scalars = {"FID mean/" + scanner: record.fid_mean, "KID mean/" + scanner: record.kid_mean,
                   "MS-SSIM/" + scanner: record.ms_ssim, "precision/" + scanner: record.precision,
                   "recall/" + scanner: record.recall, "density/" + scanner: record.density,
                   "coverage/" + scanner: record.coverage}
        tracker.log_scalars({key: value for key, value in scalars.items() if value is not None}, step=0)
        tracker.log_artifact(path.name, path, copy=True)
    return record


def label_grid(sampler: Sampler, names: list[str], draws: int = LABEL_EFFECT_DRAWS, seed: int = 0) -> np.ndarray:
    """(K scanners, draws, H, W): the same latent draws (one stream, not the per-scanner streams of
    `Sampler.sample`) decoded for every scanner (at the same levels, for a level-conditioned generator); the
    decoder's mean image, no observation noise."""
    rng = np.random.default_rng([seed, LABEL_EFFECT_STREAM])
    z = rng.standard_normal((draws, sampler.latent), dtype=np.float32)
    levels = sampler.level_inputs(draws, None)
    grid = np.empty((len(names), draws, *sampler.image_shape), dtype=np.float32)
    for k, name in enumerate(names):
        grid[k] = sampler.decode(z, np.full(draws, sampler.scanner_id(name), dtype=np.int64), levels)[:, 0]
    return grid


def generation(store: SliceStore, sampler: Sampler, names: list[str], scores: list[ScannerScore], noise: bool,
               seed: int, out: Path) -> Generation:
    """OUT/generation.json: what the sampler did for the scored sets (speed, device) and the label effect.
    `scores`: what `evaluate_scanner` returned for each scanner; returns the record, which `mrgen-fid` prints
    from."""
    from mrgen_dist.eval.quality import label_effect

    seconds = sum(s.sampling_seconds for s in scores)
    images = sum(s.n_generated * len(s.repeats) for s in scores)
    effect = None
    if len(names) >= 2:
        effect = LabelEffect(**finite_or_none(label_effect(label_grid(sampler, names, LABEL_EFFECT_DRAWS, seed))))
    record = Generation(
        scanners=names,
        store_sha256=store.sha256,
        noise=noise,
        n_generated=[s.n_generated for s in scores],
        repeats=len(scores[0].repeats),
        sampled_images=images,
        sampling_seconds=seconds,
        sampling_images_per_s=images / seconds if seconds > 0 else None,
        sampler_device=sampler.device,
        sampler_provider=sampler.provider,
        label_effect=effect,  # None with one scanner
        label_effect_draws=LABEL_EFFECT_DRAWS,
        label_effect_seed=seed,
        model={k: v for k, v in sampler.metadata.to_props().items() if k != "mrgen.config"},
        package_version=__version__,
    )
    out.mkdir(parents=True, exist_ok=True)
    record.write(out / record.file_name)
    return record


# -- command line ---------------------------------------------------------------------------------------------


