"""`mrgen-fid translation`: does a translator (contract `mrgen-translator`) do its job on the real test slices?

For every source scanner s of the store and every target t of the model, the test slices x of s are translated
to t (onnxruntime, `mrgen_dist.translate.Translator`) and back to s:

* **conditioning**: the conditioning check's scanner classifier (mrgen_dist.eval.conditioning: Inception
  features of the real train slices) reads G(x, t) as t; the rate over every pair t != s, with the confusion
  matrix (rows: target, columns: recognised) and the rate per pair;
* **anatomy kept**: SSIM (Gaussian window 11, sigma 1.5, data range 1) between x and G(x, t) after per-image
  histogram matching (G(x, t)'s intensities mapped onto x's by rank, so that the contrast change a translation
  should make is not counted as lost anatomy), and the **cycle SSIM** between x and G(G(x, t), s), unmatched;
* **realism**: KID of the slices translated to t (from every other scanner) against the real test slices of t,
  on the same Inception features as `mrgen-fid score`;
* **identity**: the mean absolute change |G(x, t) - x| per (s, t); translating to the slice's own scanner
  (t = s) should change it less than translating to any other.

Writes OUT/translation.json (read by mrgen-compare), OUT/translation.md, and OUT/translation.png: one real
test subject of each scanner (a central slice) translated to every scanner.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from mrgen_dist.atomic import atomic_write
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval import targets
from mrgen_dist.eval.conditioning import CLASSIFIER, scanner_classifier
from mrgen_dist.eval.features import FidError, real_features
from mrgen_dist.eval.fid import kernel_inception_distance
from mrgen_dist.eval.inception import InceptionFeatures
from mrgen_dist.eval.results import Kid, TranslationScore
from mrgen_dist.runtime.translator import Translator

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def match_histograms(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Each image's intensities replaced by its reference's, rank for rank: the image's structure with the
    reference's intensity histogram (both (n, H, W))."""
    flat, ref = images.reshape(len(images), -1), references.reshape(len(references), -1)
    order = np.argsort(flat, axis=1, kind="stable")
    out = np.empty_like(flat)
    np.put_along_axis(out, order, np.sort(ref, axis=1), axis=1)
    return out.reshape(images.shape)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of each pair of images (n, H, W) in [0, 1] (Wang et al. 2004: Gaussian window 11, sigma 1.5,
    K1 0.01, K2 0.03, data range 1), float64 (n,)."""
    from pytorch_msssim import ssim as pair_ssim

    x, y = (torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[:, None] for v in (a, b))
    return pair_ssim(x, y, data_range=1.0, size_average=False, win_size=SSIM_WINDOW,
                     win_sigma=SSIM_SIGMA).double().numpy()


def _figure_subjects(subject: np.ndarray, slice_index: np.ndarray, scanner: np.ndarray, n_scanners: int) -> list[int]:
    """Per scanner, the row of the central slice of its first test subject (store order)."""
    rows = []
    for sid in range(n_scanners):
        mine = np.flatnonzero(scanner == sid)
        if len(mine):
            own = mine[subject[mine] == subject[mine[0]]]
            rows.append(int(own[np.argsort(slice_index[own])[len(own) // 2]]))
    return rows


def evaluate_translation(store: SliceStore, translator: Translator, extractor: InceptionFeatures, out: Path,
                         cache: Path, n_per_scanner: int | None = None) -> TranslationScore:
    """Translate the test slices of each scanner to each target; the measures of the module docstring, written
    to OUT/translation.json (with translation.md and translation.png) and returned."""
    from tqdm import tqdm

    names = list(store.vocabulary.names)
    if names != list(translator.vocabulary.names):
        raise FidError(f"the model's scanners {list(translator.vocabulary.names)} are not the store's {names}")
    test = store.read_split("test")
    targets = [translator.target_id(t) for t in translator.targets]
    sources = [s for s in targets if np.any(test.scanner == s)]
    if len(sources) < 2:
        raise FidError(f"{store.root}: test slices of at least two of the model's targets are needed")
    classifier = scanner_classifier(store, extractor, cache)
    k = len(names)
    rate = np.full((k, k), np.nan)
    ssim_matched, ssim_cycle, change = (np.full((k, k), np.nan) for _ in range(3))
    counts = np.zeros((k, k), dtype=np.int64)  # target x recognised, over pairs t != s
    translated_features: dict[int, list[np.ndarray]] = {t: [] for t in targets}
    n_source: dict[str, int] = {}
    seconds, translated_count = 0.0, 0
    pairs = [(s, t) for s in sources for t in targets]
    bar = tqdm(total=len(pairs), desc="translate", unit="pair", file=sys.stderr)
    for s in sources:
        rows = np.flatnonzero(test.scanner == s)[:n_per_scanner]
        x = test.images[rows].astype(np.float32)
        n_source[names[s]] = len(x)
        for t in targets:
            t0 = time.perf_counter()
            y = translator.translate_ids(x, np.full(len(x), t, dtype=np.int64))
            seconds += time.perf_counter() - t0
            translated_count += len(x)
            change[s, t] = float(np.abs(y - x).mean())
            if t != s:
                back = translator.translate_ids(y, np.full(len(x), s, dtype=np.int64))
                ssim_matched[s, t] = float(ssim(x, match_histograms(y, x)).mean())
                ssim_cycle[s, t] = float(ssim(x, back).mean())
                features = extractor(y)
                translated_features[t].append(features)
                predicted = classifier.predict(features)
                rate[s, t] = float(np.mean(predicted == t))
                counts[t] += np.bincount(predicted, minlength=k)
            bar.update()
    bar.close()
    off = ~np.eye(k, dtype=bool) & ~np.isnan(rate)
    real = {s: real_features(store, names[s], "test", extractor, cache)[0] for s in sources}
    kid = {}
    for t in targets:
        if translated_features[t] and t in real:  # a target without test slices has nothing to compare with
            value = kernel_inception_distance(np.concatenate(translated_features[t]), real[t])
            kid[names[t]] = Kid(mean=value.mean, std=value.std, subset_size=value.subset_size)
    identity_misses = [names[s] for s in sources
                       if not all(change[s, s] < change[s, t] for t in targets if t != s)]
    truth = np.concatenate([np.full(len(f), s) for s, f in real.items()])
    real_test_accuracy = float(np.mean(classifier.predict(np.concatenate(list(real.values()))) == truth))

    def matrix(m: np.ndarray) -> list[list[float | None]]:
        return [[None if np.isnan(v) else float(v) for v in row] for row in m]

    result = TranslationScore(
        store_sha256=store.sha256,
        scanners=names,
        model=str(translator.path),
        family=translator.metadata.family,
        precision=translator.metadata.precision,
        targets=[names[t] for t in targets],
        n_per_source=n_source,
        classifier=CLASSIFIER,
        real_test_accuracy=real_test_accuracy,
        conditioning=float(rate[off].mean()),
        conditioning_per_pair=matrix(rate),
        confusion=counts.tolist(),
        ssim_matched=float(np.nanmean(ssim_matched[off])),
        ssim_matched_per_pair=matrix(ssim_matched),
        cycle_ssim=float(np.nanmean(ssim_cycle[off])),
        cycle_ssim_per_pair=matrix(ssim_cycle),
        kid=kid,
        kid_mean=float(np.mean([v.mean for v in kid.values()])) if kid else None,
        change=matrix(change),
        identity_smallest=not identity_misses,
        identity_misses=identity_misses,
        translate_images_per_s=translated_count / seconds if seconds else None,
        translator_device=f"{translator.device} ({translator.provider})",
        rows_columns="per-pair matrices: rows source scanner, columns target scanner (vocabulary order)",
    )
    out.mkdir(parents=True, exist_ok=True)
    result.write(out / result.file_name)
    atomic_write(out / "translation.md", table_markdown(result))
    figure(store, translator, test, out / "translation.png")
    return result


def figure(store: SliceStore, translator: Translator, test, path: Path) -> Path:
    """One real test subject of each scanner (rows; a central slice), as it is and translated to each target."""
    from mrgen_dist.plots import scanner_grid

    names = list(store.vocabulary.names)
    rows, captions = [], []
    for r in _figure_subjects(test.subject, test.slice_index, test.scanner, len(names)):
        x = test.images[r : r + 1].astype(np.float32)
        images = [x[0]] + [translator.translate(x, t)[0] for t in translator.targets]
        rows.append((f"{names[test.scanner[r]]}\n{test.subject[r]}", np.stack(images)))
        captions.append(["input"] + [f"to {t}" for t in translator.targets])
    return scanner_grid(rows, path, f"{translator.metadata.family}: one test subject per scanner, translated to "
                        "each scanner", captions)


def table_markdown(result: TranslationScore) -> str:
    """Per (source, target): conditioning, SSIM after histogram matching, cycle SSIM, change; and the summary."""
    names = result.scanners
    lines = [f"# Translation: {result.family} ({result.model})", "",
             f"- translated slices recognised as the target: **{result.conditioning:.3f}** "
             f"(target ≥ {targets.TRANSLATION_CONDITIONING}); the classifier reads real test slices right "
             f"{result.real_test_accuracy:.3f} of the time",
             f"- SSIM input vs translation (histogram-matched): {result.ssim_matched:.3f}; cycle SSIM: "
             f"**{result.cycle_ssim:.3f}** (target ≥ {targets.CYCLE_SSIM})",
             f"- KID ×10³ vs real slices of the target, mean over targets: {1e3 * result.kid_mean:.2f}"
             if result.kid_mean is not None else "- KID: —",
             "- identity: translating to the own scanner changes least for "
             + ("every scanner" if result.identity_smallest else "all but " + ", ".join(result.identity_misses)),
             "", "| source → target | conditioning | SSIM (matched) | cycle SSIM | mean abs. change |",
             "|---|---|---|---|---|"]

    def cell(m: list, s: int, t: int) -> str:
        v = m[s][t]
        return "—" if v is None else f"{v:.3f}"

    for s, source in enumerate(names):
        if source not in result.n_per_source:
            continue
        for t, target in enumerate(names):
            if target not in result.targets:
                continue
            lines.append(f"| {source} → {target}{' (identity)' if s == t else ''} | "
                         f"{cell(result.conditioning_per_pair, s, t)} | {cell(result.ssim_matched_per_pair, s, t)} "
                         f"| {cell(result.cycle_ssim_per_pair, s, t)} | {cell(result.change, s, t)} |")
    return "\n".join(lines) + "\n"
