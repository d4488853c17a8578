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
import json
from pathlib import Path

import numpy as np

from mrgen_dist.atomic import atomic_write
from mrgen_dist.cli import UserError
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


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: unreadable ({e})") from None


def read_side(results: Path, name: str) -> dict | None:
    """One of the files beside the fid_*.json (conditioning.json, generation.json, diagnostics.json), or None."""
    path = Path(results) / name
    return _read(path) if path.is_file() else None


def read_results(results: Path) -> tuple[list[dict], dict | None]:
    """The per-scanner results in the model's label order, and the conditioning result (None when absent)."""
    per_scanner = [_read(p) for p in sorted(results.glob("fid_*.json"))]
    if not per_scanner:
        raise NoResults(f"no fid_*.json in {results}; run mrgen-fid first")
    try:
        order = Vocabulary.from_names(json.loads(per_scanner[0]["model"]["mrgen.scanners"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ReportError(f"{results}: the fid_*.json do not name the model's scanners ({e!r}); "
                          "run mrgen-fid again") from None
    per_scanner.sort(key=lambda r: order.index(r["scanner"]) if r["scanner"] in order else len(order))
    return per_scanner, read_side(results, "conditioning.json")


def _signature(r: dict) -> dict:
    return r.get("signature") if isinstance(r.get("signature"), dict) else {}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _fmt(value: object, digits: int) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number:.{digits}f}"


def _pair(a: object, b: object, digits: int) -> str:
    return f"{_fmt(a, digits)} / {_fmt(b, digits)}"


def has_quality(per_scanner: list[dict]) -> bool:
    """Whether any result carries the measures beyond FID and KID (results of older versions do not)."""
    return any(key in r for r in per_scanner for key in (*PRDC, "ms_ssim", "signature"))


def table_csv(per_scanner: list[dict]) -> str:
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for r in per_scanner:
        sig = _signature(r)
        extra = [r.get("fid_biased"), *(r.get(k) for k in PRDC), r.get("ms_ssim"), r.get("ms_ssim_real"),
                 *(sig.get(k) for k in SIGNATURE)]
        w.writerow([r["scanner"], r["fid_mean"], r["fid_std"], r["kid_mean"], r["kid_std"], r["n_real"],
                    r["n_generated"], len(r["repeats"]), *("" if v is None else v for v in extra)])
    return text.getvalue()


def _fid_table(per_scanner: list[dict]) -> list[str]:
    lines = ["| scanner | FID (mean ± std) | KID × 10³ (mean ± std) | n real / generated | repeats |",
             "|---|---|---|---|---|"]
    for r in per_scanner:
        dagger = " †" if r.get("fid_biased") is True else ""
        lines.append(f"| {r['scanner']} | {r['fid_mean']:.2f} ± {r['fid_std']:.2f}{dagger} | "
                     f"{1e3 * r['kid_mean']:.2f} ± {1e3 * r['kid_std']:.2f} | {r['n_real']} / {r['n_generated']} | "
                     f"{len(r['repeats'])} |")
    if any(r.get("fid_biased") is True for r in per_scanner):
        fid_n = sorted({r.get("fid_n_generated", r["n_real"]) for r in per_scanner})
        lines += ["", f"† FID on fewer than 2,048 slices per set (here {', '.join(map(str, fid_n))} generated vs as "
                  "many real test slices): biased upwards; FIDs compare only at equal n. KID uses every generated "
                  "slice."]
    notes = sorted({w for r in per_scanner for w in r["warnings"]})
    if notes:
        lines += ["", "Note: " + notes[0].split(":")[0] + " (and similar): FID is biased upwards at these sample "
                  "sizes; compare FIDs only at equal n, or use KID."]
    return lines


def _quality_table(per_scanner: list[dict]) -> list[str]:
    lines = ["", "| scanner | precision | recall | density | coverage | MS-SSIM gen / real | noise real / gen | "
             "sharpness real / gen | intensity W1 |", "|---" * 9 + "|"]
    for r in per_scanner:
        sig = _signature(r)
        lines.append(f"| {r['scanner']} | " + " | ".join(_fmt(r.get(k), 3) for k in PRDC) + " | "
                     f"{_pair(r.get('ms_ssim'), r.get('ms_ssim_real'), 3)} | "
                     f"{_pair(sig.get('noise_real'), sig.get('noise_generated'), 4)} | "
                     f"{_pair(sig.get('sharpness_real'), sig.get('sharpness_generated'), 4)} | "
                     f"{_fmt(sig.get('intensity_w1'), 4)} |")
    k = next((r["prdc_k"] for r in per_scanner if "prdc_k" in r), 5)
    pairs = next((r["ms_ssim_pairs"] for r in per_scanner if "ms_ssim_pairs" in r), 200)
    lines += ["", f"Precision, recall, density, coverage (k = {k}) on Inception features of the first repeat's "
              "generated slices vs the real test slices; MS-SSIM: mean over "
              f"{pairs} random pairs within a set (lower = more diverse); signature in intensity units of [0, 1], "
              "in head masks of the real slices: background noise (std), sharpness (mean gradient in the brain), "
              "Wasserstein-1 of the brain intensities."]
    return lines


def _generation_lines(gen: dict) -> list[str]:
    lines = []
    effect = gen.get("label_effect")
    if isinstance(effect, dict):
        draws = gen.get("label_effect_draws", "the same")
        lines += ["", f"Label effect: the same {draws} latent draws decoded for every scanner (the decoder's mean) "
                  f"differ by {_fmt(effect.get('between_scanners'), 4)} between scanners and "
                  f"{_fmt(effect.get('between_draws'), 4)} between draws (mean |difference| per pixel; ratio "
                  f"{_fmt(effect.get('ratio'), 3)}; 0 between scanners: the decoder ignores its label)."]
    speed = _number(gen.get("sampling_images_per_s"))
    if speed is not None:
        noise = ", with the learned observation noise" if gen.get("noise") is True else ""
        lines += ["", f"Sampling: {speed:,.0f} images/s (onnxruntime on {gen.get('sampler_device', '?')}{noise})."]
    return lines


def _conditioning_lines(cond: dict | None, diag: dict | None) -> list[str]:
    lines = []
    if cond:
        lines += ["", f"Conditioning: a scanner classifier on Inception features recognises real test slices with "
                  f"accuracy {cond['real_test_accuracy']:.3f} and generated slices as the scanner asked for with "
                  f"accuracy {cond['generated_accuracy']:.3f}."]
    if diag:
        title = diag.get("title") or diag.get("family") or "the model"
        z, rec = diag.get("z_probe"), diag.get("reconstruction")
        if isinstance(z, dict) and isinstance(rec, dict):
            lines += ["", f"Diagnostics ({title}): the scanner is read from the posterior means (z-probe) with "
                      f"accuracy {_fmt(z.get('accuracy'), 3)} (chance {_fmt(z.get('chance'), 3)}); reconstructions of "
                      f"the real test slices are recognised as their scanner with accuracy "
                      f"{_fmt(rec.get('accuracy'), 3)} (the decoder's ceiling)."]
        elif diag.get("reason"):
            lines += ["", f"Diagnostics ({title}): {diag['reason']}."]
    rows = []
    if cond:
        rows += [("real test slices", cond["real_test_accuracy"]),
                 ("generated slices, as the scanner asked for", cond["generated_accuracy"])]
    if diag and isinstance(diag.get("reconstruction"), dict):
        rows.append(("reconstructions of real test slices (decoder ceiling)", diag["reconstruction"].get("accuracy")))
    if diag and isinstance(diag.get("z_probe"), dict):
        z = diag["z_probe"]
        rows.append((f"z-probe: scanner from posterior means (chance {_fmt(z.get('chance'), 3)})", z.get("accuracy")))
    if len(rows) > 1:
        lines += ["", "| recognised as its scanner | accuracy |", "|---|---|"]
        lines += [f"| {what} | {_fmt(value, 3)} |" for what, value in rows]
    if cond:
        lines += ["", "| asked for \\ recognised as | " + " | ".join(cond["scanners"]) + " |",
                  "|---" * (len(cond["scanners"]) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(map(str, row)) + " |"
                  for name, row in zip(cond["scanners"], cond["confusion"], strict=True)]
    return lines


def table_markdown(per_scanner: list[dict], cond: dict | None, generation: dict | None = None,
                   diagnostics: dict | None = None) -> str:
    lines = _fid_table(per_scanner)
    if has_quality(per_scanner):
        lines += _quality_table(per_scanner)
    if generation:
        lines += _generation_lines(generation)
    lines += _conditioning_lines(cond, diagnostics)
    return "\n".join(lines) + "\n"


def quality_figure(per_scanner: list[dict], path: Path) -> Path:
    """Precision, recall, density, coverage per scanner, and MS-SSIM of generated vs real slices."""
    from mrgen_dist.plots import _pyplot, _save

    plt = _pyplot()
    names = [r["scanner"] for r in per_scanner]
    x = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(names), 3.8),
                                      gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(PRDC)
    for i, key in enumerate(PRDC):
        values = [_number(r.get(key)) for r in per_scanner]
        left.bar(x + (i - 1.5) * width, [np.nan if v is None else v for v in values], width, label=key)
    left.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("generated vs real (k-NN manifolds)")
    left.axhline(1.0, color="grey", lw=0.8, ls=":")
    left.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    for i, (key, label) in enumerate((("ms_ssim", "generated"), ("ms_ssim_real", "real"))):
        values = [_number(r.get(key)) for r in per_scanner]
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
    per_scanner, cond = read_results(results)
    generation, diagnostics = read_side(results, "generation.json"), read_side(results, "diagnostics.json")
    written = [atomic_write(results / "fid_table.md", table_markdown(per_scanner, cond, generation, diagnostics)),
               atomic_write(results / "fid_table.csv", table_csv(per_scanner)),
               fid_boxplot(per_scanner, results / "fid_boxplot.png")]
    if has_quality(per_scanner):
        written.append(quality_figure(per_scanner, results / "quality.png"))
    if cond:
        written.append(confusion_matrix(np.array(cond["confusion"]), cond["scanners"], results / "conditioning.png"))
    return written
