"""The report of `mrgen-fid` results: tables, CSV and figures (`mrgen-fid report RESULTS`).

    RESULTS/fid_table.md    scanner, FID mean ± std (†: n < 2,048, biased upwards), KID × 10³ mean ± std,
                            n real / generated, repeats (the thesis table); when the fid_*.json have them, a
                            second table per scanner: precision, recall, density, coverage, MS-SSIM generated /
                            real, the signature (background noise real / generated, sharpness real / generated,
                            brain-intensity W1); the label effect and sampling speed when generation.json exists;
                            the conditioning summary and its confusion matrix when conditioning.json exists, with
                            the z-probe and the reconstructions' conditioning beside it when diagnostics.json does
    RESULTS/fid_table.csv   the per-scanner numbers, unrounded (empty where a result file lacks a measure)
    RESULTS/fid_boxplot.png FID over repeats, one box per scanner
    RESULTS/quality.png     precision, recall, density, coverage and MS-SSIM (generated vs real) per scanner,
                            when the fid_*.json have them
    RESULTS/conditioning.png the confusion matrix of the conditioning check

Rows follow the model's label order (its `mrgen.scanners` metadata, kept in every fid_<scanner>.json).
A missing generation.json, diagnostics.json or conditioning.json, or results written before a measure
existed, leave that part out. Reads JSON only: no torch, no model, no store.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from mrgen_dist.artifacts import ArtifactError
from mrgen_dist.atomic import atomic_write
from mrgen_dist.cli import UserError
from mrgen_dist.eval.results import (
    Conditioning,
    Diagnostics,
    Generation,
    ResultFile,
    ScannerScore,
    Signature,
    read_folder,
)
from mrgen_dist.eval.table import _rate
from mrgen_dist.scanners import Vocabulary

PRDC = ("precision", "recall", "density", "coverage")
SIGNATURE = ("intensity_w1", "noise_real", "noise_generated", "sharpness_real", "sharpness_generated")
CSV_COLUMNS = ("scanner", "fid_mean", "fid_std", "kid_mean", "kid_std", "n_real", "n_generated", "repeats",
               "fid_biased", *PRDC, "ms_ssim", "ms_ssim_real", *SIGNATURE)
MISSING = "—"  # as in mrgen-compare


class ReportError(UserError):
    """The results folder cannot be reported: no results, or a result file that cannot be read."""


class NoResults(ReportError, FileNotFoundError):
    """No fid_*.json in the results folder."""


def read_results(results: Path) -> tuple[list[ScannerScore], dict[str, ResultFile]]:
    """The per-scanner results in the model's label order, and every result file of the folder by name."""
    try:
        files = read_folder(results)
    except ArtifactError as e:
        raise ReportError(str(e)) from None
    per_scanner = [r for r in files.values() if isinstance(r, ScannerScore)]
    if not per_scanner:
        raise NoResults(f"no fid_*.json in {results}; run mrgen-fid first")
    try:
        order = Vocabulary.from_names(per_scanner[0].scanners)
    except (TypeError, ValueError) as e:
        raise ReportError(f"{results}: the fid_*.json do not name the model's scanners ({e!r}); "
                          "run mrgen-fid again") from None
    per_scanner.sort(key=lambda r: order.index(r.scanner) if r.scanner in order else len(order))
    return per_scanner, files


def _prdc(r: ScannerScore) -> tuple[float | None, ...]:
    return r.precision, r.recall, r.density, r.coverage


def _signature(r: ScannerScore) -> tuple[float | None, ...]:
    """The signature's measures in SIGNATURE order (None: not measured)."""
    sig = r.signature or Signature()
    return sig.intensity_w1, sig.noise_real, sig.noise_generated, sig.sharpness_real, sig.sharpness_generated


def _fmt(value: float | None, digits: int, scale: float = 1.0) -> str:
    return MISSING if value is None else f"{scale * value:.{digits}f}"


def _pair(a: float | None, b: float | None, digits: int) -> str:
    return f"{_fmt(a, digits)} / {_fmt(b, digits)}"


def has_quality(per_scanner: list[ScannerScore]) -> bool:
    """Whether any result carries the measures beyond FID and KID (results of older versions do not)."""
    return any(v is not None for r in per_scanner for v in (*_prdc(r), r.ms_ssim, r.signature))


def table_csv(per_scanner: list[ScannerScore]) -> str:
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for r in per_scanner:
        row = [r.scanner, r.fid_mean, r.fid_std, r.kid_mean, r.kid_std, r.n_real, r.n_generated,
               None if r.repeats is None else len(r.repeats), r.fid_biased, *_prdc(r), r.ms_ssim, r.ms_ssim_real,
               *_signature(r)]
        w.writerow(["" if v is None else v for v in row])
    return text.getvalue()


def _fid_table(per_scanner: list[ScannerScore]) -> list[str]:
    lines = ["| scanner | FID (mean ± std) | KID × 10³ (mean ± std) | n real / generated | repeats |",
             "|---|---|---|---|---|"]
    for r in per_scanner:
        dagger = " †" if r.fid_biased else ""
        lines.append(f"| {r.scanner} | {_fmt(r.fid_mean, 2)} ± {_fmt(r.fid_std, 2)}{dagger} | "
                     f"{_fmt(r.kid_mean, 2, 1e3)} ± {_fmt(r.kid_std, 2, 1e3)} | {r.n_real} / {r.n_generated} | "
                     f"{len(r.repeats or ())} |")
    if any(r.fid_biased for r in per_scanner):
        fid_n = sorted({r.fid_n_generated if r.fid_n_generated is not None else r.n_real for r in per_scanner})
        lines += ["", f"† FID on fewer than 2,048 slices per set (here {', '.join(map(str, fid_n))} generated vs as "
                  "many real test slices): biased upwards; FIDs compare only at equal n. KID uses every generated "
                  "slice."]
    notes = sorted({w for r in per_scanner for w in r.warnings or ()})
    if notes:
        lines += ["", "Note: " + notes[0].split(":")[0] + " (and similar): FID is biased upwards at these sample "
                  "sizes; compare FIDs only at equal n, or use KID."]
    return lines


def _quality_table(per_scanner: list[ScannerScore]) -> list[str]:
    lines = ["", "| scanner | precision | recall | density | coverage | MS-SSIM gen / real | noise real / gen | "
             "sharpness real / gen | intensity W1 |", "|---" * 9 + "|"]
    for r in per_scanner:
        w1, noise_real, noise_generated, sharpness_real, sharpness_generated = _signature(r)
        lines.append(f"| {r.scanner} | " + " | ".join(_fmt(v, 3) for v in _prdc(r)) + " | "
                     f"{_pair(r.ms_ssim, r.ms_ssim_real, 3)} | {_pair(noise_real, noise_generated, 4)} | "
                     f"{_pair(sharpness_real, sharpness_generated, 4)} | {_fmt(w1, 4)} |")
    k = next((r.prdc_k for r in per_scanner if r.prdc_k is not None), 5)
    pairs = next((r.ms_ssim_pairs for r in per_scanner if r.ms_ssim_pairs is not None), 200)
    lines += ["", f"Precision, recall, density, coverage (k = {k}) on Inception features of the first repeat's "
              "generated slices vs the real test slices; MS-SSIM: mean over "
              f"{pairs} random pairs within a set (lower = more diverse); signature in intensity units of [0, 1], "
              "in head masks of the real slices: background noise (std), sharpness (mean gradient in the brain), "
              "Wasserstein-1 of the brain intensities."]
    return lines


def _generation_lines(gen: Generation) -> list[str]:
    lines = []
    effect = gen.label_effect
    if effect is not None:
        draws = "the same" if gen.label_effect_draws is None else gen.label_effect_draws
        lines += ["", f"Label effect: the same {draws} latent draws decoded for every scanner (the decoder's mean) "
                  f"differ by {_fmt(effect.between_scanners, 4)} between scanners and "
                  f"{_fmt(effect.between_draws, 4)} between draws (mean |difference| per pixel; ratio "
                  f"{_fmt(effect.ratio, 3)}; 0 between scanners: the decoder ignores its label)."]
    if gen.sampling_images_per_s is not None:
        noise = ", with the learned observation noise" if gen.noise else ""
        lines += ["", f"Sampling: {_rate(gen.sampling_images_per_s)} images/s (onnxruntime on "
                  f"{gen.sampler_device or '?'}{noise})."]
    return lines


def _conditioning_lines(cond: Conditioning | None, diag: Diagnostics | None) -> list[str]:
    lines = []
    if cond:
        lines += ["", f"Conditioning: a scanner classifier on Inception features recognises real test slices with "
                  f"accuracy {_fmt(cond.real_test_accuracy, 3)} and generated slices as the scanner asked for with "
                  f"accuracy {_fmt(cond.generated_accuracy, 3)}."]
    if diag:
        title = diag.title or diag.family or "the model"
        z, rec = diag.z_probe, diag.reconstruction
        if z is not None and rec is not None:
            lines += ["", f"Diagnostics ({title}): the scanner is read from the posterior means (z-probe) with "
                      f"accuracy {_fmt(z.accuracy, 3)} (chance {_fmt(z.chance, 3)}); reconstructions of "
                      f"the real test slices are recognised as their scanner with accuracy "
                      f"{_fmt(rec.accuracy, 3)} (the decoder's ceiling)."]
        elif rec is not None and rec.refined:
            lines += ["", f"Diagnostics ({title}): the refinements of the real test slices' low-pass are "
                      f"recognised as their scanner with accuracy {_fmt(rec.accuracy, 3)} (the refiner's ceiling: "
                      "a perfect coarse generator)."]
        elif diag.reason:
            lines += ["", f"Diagnostics ({title}): {diag.reason}."]
        if rec is not None and rec.precision is not None:
            lines += ["", "Against the real train slices (Inception, k = 5), per scanner: precision "
                      + ", ".join(_fmt(p, 2) for p in rec.precision) + "; recall "
                      + ", ".join(_fmt(r, 2) for r in rec.recall) + ". Where the generated slices fall far below "
                      "these, the model's own anatomy is what they lack."]
    rows = []
    if cond:
        rows += [("real test slices", cond.real_test_accuracy),
                 ("generated slices, as the scanner asked for", cond.generated_accuracy)]
    if diag and diag.reconstruction is not None:
        what = ("real test slices' low-pass, refined (refiner ceiling)" if diag.reconstruction.refined
                else "reconstructions of real test slices (decoder ceiling)")
        rows.append((what, diag.reconstruction.accuracy))
    if diag and diag.z_probe is not None:
        z = diag.z_probe
        rows.append((f"z-probe: scanner from posterior means (chance {_fmt(z.chance, 3)})", z.accuracy))
    if len(rows) > 1:
        lines += ["", "| recognised as its scanner | accuracy |", "|---|---|"]
        lines += [f"| {what} | {_fmt(value, 3)} |" for what, value in rows]
    if cond and cond.scanners is not None and cond.confusion is not None:
        lines += ["", "| asked for \\ recognised as | " + " | ".join(cond.scanners) + " |",
                  "|---" * (len(cond.scanners) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(map(str, row)) + " |"
                  for name, row in zip(cond.scanners, cond.confusion, strict=True)]
    return lines


def table_markdown(per_scanner: list[ScannerScore], cond: Conditioning | None, generation: Generation | None = None,
                   diagnostics: Diagnostics | None = None) -> str:
    lines = _fid_table(per_scanner)
    if has_quality(per_scanner):
        lines += _quality_table(per_scanner)
    if generation:
        lines += _generation_lines(generation)
    lines += _conditioning_lines(cond, diagnostics)
    return "\n".join(lines) + "\n"


def quality_figure(per_scanner: list[ScannerScore], path: Path) -> Path:
    """Precision, recall, density, coverage per scanner, and MS-SSIM of generated vs real slices."""
    from mrgen_dist.plots import _pyplot, _save

    plt = _pyplot()
    names = [r.scanner for r in per_scanner]
    x = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(names), 3.8),
                                      gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(PRDC)
    prdc = [_prdc(r) for r in per_scanner]
    for i, key in enumerate(PRDC):
        left.bar(x + (i - 1.5) * width, [np.nan if row[i] is None else row[i] for row in prdc], width, label=key)
    left.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("generated vs real (k-NN manifolds)")
    left.axhline(1.0, color="grey", lw=0.8, ls=":")
    left.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    for i, (label, values) in enumerate((("generated", [r.ms_ssim for r in per_scanner]),
                                         ("real", [r.ms_ssim_real for r in per_scanner]))):
        right.bar(x + (i - 0.5) * 0.4, [np.nan if v is None else v for v in values], 0.4, label=label)
    right.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    right.set_ylabel("MS-SSIM within the set (lower: more diverse)")
    right.set_ylim(0, 1)
    right.legend(fontsize=7, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _save(fig, path, dpi=90)


def write_report(results: Path) -> list[Path]:
    """fid_table.md, fid_table.csv, fid_boxplot.png, then quality.png when the results have those measures and
    conditioning.png when conditioning.json is present; returns their paths in that order."""
    from mrgen_dist.plots import confusion_matrix, fid_boxplot

    results = Path(results)
    per_scanner, files = read_results(results)
    cond = files.get(Conditioning.NAME)
    generation, diagnostics = files.get(Generation.NAME), files.get(Diagnostics.NAME)
    written = [atomic_write(results / "fid_table.md", table_markdown(per_scanner, cond, generation, diagnostics)),
               atomic_write(results / "fid_table.csv", table_csv(per_scanner)),
               fid_boxplot([r.to_dict() for r in per_scanner], results / "fid_boxplot.png")]
    if has_quality(per_scanner):
        written.append(quality_figure(per_scanner, results / "quality.png"))
    if cond and cond.confusion is not None:
        written.append(confusion_matrix(np.array(cond.confusion), cond.scanners, results / "conditioning.png"))
    return written
