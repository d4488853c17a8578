"""The comparison of models (`mrgen-compare`): one row per results folder of `mrgen-fid`, the verdict against
`targets.py`, written as OUT/compare.md (table and footnotes), OUT/compare.csv (unrounded) and OUT/compare.png.

A folder with `translation.json` is a translator's and gets a row in the translators' table
(`compare_translation.py`). Values averaged over scanners are plain means over the scanners that have them;
"(k/n)" marks a mean over k of the n scanners. Results from different stores (`store_sha256`) or scanner lists
are refused, unless each names its cohort: rows of one cohort share a store, and every cohort the scanners;
a run (by name) then "meets targets" only where it meets them on every cohort. Reads JSON only: no torch, no
model, no store.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mrgen_dist.atomic import atomic_write
from mrgen_dist.eval import targets
from mrgen_dist.eval.results import (
    REFERENCE_FAMILY,
    REFERENCE_TITLE,
    Conditioning,
    Diagnostics,
    Generation,
    LabelEffect,
    Reconstruction,
    ResultFile,
    ScannerScore,
    Signature,
    ZProbe,
)
from mrgen_dist.eval.table import (
    MISSING,
    SIDE_FILES,
    CompareError,
    MismatchError,
    Number,
    Results,
    Summary,
    _bars,
    _escape,
    _fixed,
    _rate,
    _sig,
    conditioning_per_scanner,
    human_count,
    read_results,
    run_footnote,
)
from mrgen_dist.scanners import slug

UNBIASED_N = 2048  # FID needs at least this many samples per set (the feature dimension)


# -- reading ----------------------------------------------------------------------------------------------------


def _one_value(labelled: Iterable[tuple[Any, Any]], mismatch: Callable[[Any, Any, Any, Any], str]) -> tuple[Any, Any]:
    """The one value of the (label, value) pairs whose value is not None, and the first label that has it
    ((None, None) when none has one); two values that differ raise MismatchError(mismatch(first label, first
    value, label, value))."""
    found: tuple[Any, Any] | None = None
    for label, value in labelled:
        if value is None:
            continue
        if found is None:
            found = (value, label)
        elif value != found[0]:
            raise MismatchError(mismatch(found[1], found[0], label, value))
    return found if found is not None else (None, None)


def _agreed(results: Results, what: str, value_of: Callable[[ResultFile], Any]) -> tuple[Any, str | None]:
    """The one value of `what` that the files of a folder record (None when none does), and the file it came
    from; two files that disagree are refused."""
    return _one_value(((name, value_of(record)) for name, record in results.files.items()),
                      lambda first, v0, name, v: f"{results.folder}: {first} has {what} {v0!r} but {name} has {v!r}")


def store_of(results: Results) -> str | None:
    return _agreed(results, "store_sha256", lambda r: r.store_sha256)[0]


def scanners_of(results: Results) -> list[str] | None:
    """The scanner list the files record: `scanners`, or in fid_*.json the model's (ScannerScore.scanners)."""
    return _agreed(results, "scanners", lambda r: r.scanners)[0]


def _common(runs: Sequence[Results], what: str, value_of: Callable[[Results], Any], hint: str) -> Any:
    """The value every run that has one agrees on (None when none has it); a disagreement is refused."""
    return _one_value(((r, value_of(r)) for r in runs),
                      lambda first, v0, r, v: f"{first.folder} and {r.folder} come from different {what}: "
                                              f"{v0!r} vs {v!r}; {hint}")[0]


def check_comparable(runs: Sequence[Results], cohorts: Sequence[str] | None = None
                     ) -> tuple[dict[str | None, str | None], list[str]]:
    """Each cohort's store sha256 (one cohort, None, without `cohorts`) and the common scanner list; runs of
    one cohort from different stores, or different scanner lists, are refused."""
    cohorts = list(cohorts) if cohorts is not None else [None] * len(runs)
    hint = "compare results of one store per cohort" if any(cohorts) else \
        "compare results of one store (or name each one's cohort: --cohorts)"
    stores = {c: _common([r for r, rc in zip(runs, cohorts, strict=True) if rc == c], "store_sha256", store_of, hint)
              for c in dict.fromkeys(cohorts)}
    common_scanners = _common(runs, "scanners", scanners_of, "compare results of one scanner list")
    if common_scanners:
        scanners = list(common_scanners)
    else:  # no file names the list: the scanners that have FID results, in name order
        scanners = sorted({s for r in runs for s in r.per_scanner})
    return stores, scanners


def default_names(folders: Sequence[Path]) -> list[str]:
    """Each folder's name; names that two folders share get their parent folders until they differ
    (`cvae/results`, `vae/results`, `other`)."""
    parts = [Path(f).resolve().parts for f in folders]
    if len(set(parts)) < len(parts):
        dup = next(f for f, p in zip(folders, parts, strict=True) if parts.count(p) > 1)
        raise CompareError(f"results folder {dup} is given twice")
    depth = [1] * len(parts)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        shared = [i for i, n in enumerate(names) if names.count(n) > 1]
        if not shared:
            return names
        for i in shared:
            depth[i] = min(depth[i] + 1, len(parts[i]))


# -- values -----------------------------------------------------------------------------------------------------


def _gap(generated: Number, real: Number) -> Number:
    """|generated - real| of a signature measure of one scanner."""
    return None if generated is None or real is None else abs(generated - real)


def _signature(r: ScannerScore) -> Signature:
    return r.signature or Signature()  # all None: not measured


def _signature_gap(r: ScannerScore) -> Number:
    """The larger relative gap |generated - real| / real of one scanner's background noise and sharpness."""
    s = _signature(r)
    gaps = [abs(g - real) / real for g, real in ((s.noise_generated, s.noise_real),
                                                  (s.sharpness_generated, s.sharpness_real))
            if g is not None and real is not None and real > 0]
    return max(gaps) if len(gaps) == 2 else None


#: Per-scanner measures averaged over scanners: column -> value of one fid_<scanner>.json.
SCANNER_MEANS: dict[str, Callable[[ScannerScore], Number]] = {
    "fid": lambda r: r.fid_mean,
    "kid": lambda r: r.kid_mean,
    "precision": lambda r: r.precision,
    "recall": lambda r: r.recall,
    "density": lambda r: r.density,
    "coverage": lambda r: r.coverage,
    "ms_ssim": lambda r: r.ms_ssim,
    "ms_ssim_real": lambda r: r.ms_ssim_real,
    "intensity_w1": lambda r: _signature(r).intensity_w1,
    "noise_gap": lambda r: _gap(_signature(r).noise_generated, _signature(r).noise_real),
    "sharpness_gap": lambda r: _gap(_signature(r).sharpness_generated, _signature(r).sharpness_real),
}


def _biased(record: ScannerScore) -> bool:
    """FID at n < 2048: the file's `fid_biased`, or from its sample sizes when it lacks it."""
    if record.fid_biased is not None:
        return record.fid_biased
    return any(n is not None and n < UNBIASED_N for n in (record.n_real, record.n_generated))


def _n_generated(run: Results, scanners: Sequence[str]) -> list[int]:
    """Generated slices per scanner: generation.json's list, else the fid_*.json's `n_generated`."""
    if run.generation is not None and run.generation.n_generated is not None:
        return run.generation.n_generated
    return [r.n_generated for s in scanners if (r := run.per_scanner.get(s)) and r.n_generated is not None]


def _family(run: Results) -> str | None:
    """The model's family: diagnostics.json's, else the one in the fid_*.json's model metadata."""
    if run.diagnostics is not None and run.diagnostics.family:
        return run.diagnostics.family
    return next((r.family for r in run.per_scanner.values() if r.family), None)


def _model_title(run: Results) -> str | None:
    if _family(run) == REFERENCE_FAMILY:
        return REFERENCE_TITLE
    return (run.diagnostics.title if run.diagnostics is not None else None) or _family(run)


def verdict(conditioning: Number, z_probe: Number, reconstruction: Number, label_ratio: Number,
            z_reason: str | None = None, encoder: bool | None = None, synthetic_trained: Number = None,
            memorisation: Number = None, signature_gap: Number = None, precision: Number = None,
            recall: Number = None) -> str:
    """Whether a model meets the targets (targets.py: conditioning, z-probe and, where they were measured,
    train-on-synthetic-test-on-real, memorisation, precision and recall, and the noise/sharpness signature) and,
    if not, why. A model
    without an encoder (`encoder` False: a GAN) has no posterior that could carry the scanner into z: its z is
    N(0, I) by construction, so the z-probe target holds without a probe. Results written before TSTR and
    memorisation were measured are judged without them."""
    notes = []
    if conditioning is None:
        notes.append("conditioning not measured")
    elif conditioning < targets.GENERATION_CONDITIONING:
        if reconstruction is not None and reconstruction < targets.GENERATION_CONDITIONING:
            notes.append(f"reconstruction ceiling {reconstruction:.2f}")
        else:
            notes.append(f"conditioning {conditioning:.2f} < {targets.GENERATION_CONDITIONING:.2f}")
    z_holds = False
    if encoder is False and z_probe is None:
        z_holds = True
        notes.append("no encoder: z carries no scanner")
    elif z_probe is None:
        notes.append("z-probe not measured" + (f" ({z_reason})" if z_reason else ""))
    elif z_probe > targets.Z_PROBE:
        notes.append(f"scanner in z (probe {z_probe:.2f})")
    else:
        z_holds = True
    if label_ratio is not None and label_ratio < targets.LABEL_EFFECT_FLOOR:
        notes.append("decoder ignores the label")
    useful = synthetic_trained is None or synthetic_trained >= targets.SYNTHETIC_TRAINED
    if not useful:
        notes.append(f"TSTR {synthetic_trained:.2f} < {targets.SYNTHETIC_TRAINED:.2f}")
    if memorisation is not None and memorisation < targets.MEMORISATION:
        useful = False
        notes.append(f"near the training slices (NN ratio {memorisation:.2f})")
    low = [f"{name} {value:.2f}" for name, value in (("precision", precision), ("recall", recall))
           if value is not None and value < targets.PRECISION_RECALL]
    if low:
        useful = False
        notes.append(f"{' and '.join(low)} < {targets.PRECISION_RECALL:.2f}")
    if signature_gap is not None and signature_gap > targets.SIGNATURE:
        useful = False
        notes.append(f"noise/sharpness off by {signature_gap:.0%} (> {targets.SIGNATURE:.0%})")
    if conditioning is not None and conditioning >= targets.GENERATION_CONDITIONING:
        notes.insert(0, "meets targets" if z_holds and useful else f"conditioning ≥ {targets.GENERATION_CONDITIONING:.2f}")
    return "; ".join(notes)


def _scanner_means(run: Results, scanners: Sequence[str], summary: Summary) -> None:
    for column, value_of in SCANNER_MEANS.items():
        values = [v for s in scanners if s in run.per_scanner and (v := value_of(run.per_scanner[s])) is not None]
        summary.values[column] = sum(values) / len(values) if values else None
        if values and len(values) < len(scanners):
            summary.partial[column] = len(values)
    scored = [run.per_scanner[s] for s in scanners if s in run.per_scanner]
    summary.values["fid_biased"] = any(_biased(r) for r in scored if r.fid_mean is not None)
    for s in scanners:
        r = run.per_scanner.get(s)
        summary.values[f"fid_{slug(s)}"] = r.fid_mean if r else None
        summary.values[f"kid_{slug(s)}"] = r.kid_mean if r else None
    gaps = [g for s in scanners if s in run.per_scanner and (g := _signature_gap(run.per_scanner[s])) is not None]
    summary.values["signature_gap"] = max(gaps) if gaps and len(gaps) == len(scanners) else None
    for s, rate in conditioning_per_scanner(run.conditioning, scanners).items():
        summary.values[f"conditioning_{slug(s)}"] = rate


def _run_notes(run: Results, scanners: Sequence[str], summary: Summary) -> None:
    unscored = [s for s in scanners if s not in run.per_scanner]
    if unscored:
        summary.notes.append("no fid_*.json" + ("" if len(unscored) == len(scanners) else " for " + ", ".join(unscored)))
    missing = [f for f in SIDE_FILES if f not in run.files]
    if missing:
        summary.notes.append("no " + ", ".join(missing))
    diag = run.diagnostics
    if diag is not None and diag.reason:
        absent = [what for what, part in (("z-probe", diag.z_probe), ("reconstruction", diag.reconstruction))
                  if part is None]
        if absent:
            summary.notes.append(f"{absent[0]} n/a: {diag.reason}")


def _training(diag: Diagnostics, key: str) -> Number:
    """A number of the run's training record (RunRecord.training, a free-form dict); None when absent."""
    value = (diag.training or {}).get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def summarise(run: Results, scanners: Sequence[str], cohort: str | None = None) -> Summary:
    """The comparison row of one run (on `cohort`, when named); a file the folder lacks counts as one with
    nothing measured."""
    diag, gen, cond = run.diagnostics or Diagnostics(), run.generation or Generation(), run.conditioning or Conditioning()
    z, rec, effect = diag.z_probe or ZProbe(), diag.reconstruction or Reconstruction(), gen.label_effect or LabelEffect()
    n_gen = _n_generated(run, scanners)
    v: dict[str, Any] = {
        "run": run.name,
        "cohort": cohort,
        "folder": str(run.folder),
        "model": _model_title(run),
        "family": _family(run),
        "parameters": diag.parameters,
        "train_seconds": _training(diag, "seconds"),
        "train_images_per_s": _training(diag, "images_per_s"),
        "train_steps": _training(diag, "steps"),
        "train_epochs": _training(diag, "epochs"),
        "sample_images_per_s": gen.sampling_images_per_s,
        "sampler_device": gen.sampler_device,
        "noise": gen.noise,
        "n_generated_min": min(n_gen) if n_gen else None,
        "n_generated_max": max(n_gen) if n_gen else None,
        "scanners_scored": sum(s in run.per_scanner for s in scanners),
        "conditioning": cond.generated_accuracy,
        "real_test_accuracy": cond.real_test_accuracy,
        "synthetic_trained": cond.synthetic_trained_accuracy,
        "memorisation": min(cond.memorisation_ratio) if cond.memorisation_ratio else None,
        "z_probe": z.accuracy,
        "z_probe_chance": z.chance,
        "reconstruction": rec.accuracy,
        "label_effect_ratio": effect.ratio,
        "label_between_scanners": effect.between_scanners,
        "label_between_draws": effect.between_draws,
    }
    summary = Summary(run.name, v)
    _scanner_means(run, scanners, summary)
    if v["family"] == REFERENCE_FAMILY:  # no model, so no model's files: what a perfect generator would read
        v["verdict"] = "reference: real training slices in a model's place (mrgen-fid reference)"
        return summary
    _run_notes(run, scanners, summary)
    z_reason = diag.reason if v["z_probe"] is None else None
    v["verdict"] = verdict(v["conditioning"], v["z_probe"], v["reconstruction"], v["label_effect_ratio"], z_reason,
                           diag.encoder, v["synthetic_trained"], v["memorisation"], v["signature_gap"],
                           v["precision"], v["recall"])
    return summary


def judge_across_cohorts(summaries: Sequence[Summary]) -> None:
    """A run (by name) meets the targets only where it meets them on every cohort of the comparison: each row
    of a run that misses them on another cohort, or was not scored there, says so in its verdict."""
    cohorts = list(dict.fromkeys(s.values["cohort"] for s in summaries))
    if len(cohorts) < 2:
        return
    for s in summaries:
        if not s.values["verdict"].startswith("meets targets"):
            continue
        others = {o.values["cohort"]: o.values["verdict"] for o in summaries if o.name == s.name and o is not s}
        misses = [f"{c}: {others[c].split('; ')[0]}" if c in others else f"{c}: not scored"
                  for c in cohorts if c != s.values["cohort"] and not others.get(c, "").startswith("meets targets")]
        if misses:
            s.values["verdict"] = "meets targets here, not on every cohort (" + "; ".join(misses) + ")"


# -- formatting -------------------------------------------------------------------------------------------------


def _mean_cell(s: Summary, column: str, fmt: Callable[[Number], str], n_scanners: int) -> str:
    text = fmt(s.values[column])
    return f"{text} ({s.partial[column]}/{n_scanners})" if column in s.partial else text


def _model_cell(s: Summary) -> str:
    title = s.values["model"] or MISSING
    return f"{title} + noise" if s.values["noise"] else title


def _n_cell(s: Summary) -> str:
    lo, hi = s.values["n_generated_min"], s.values["n_generated_max"]
    return MISSING if lo is None else str(lo) if lo == hi else f"{lo}–{hi}"


def _z_cell(s: Summary) -> str:
    z, chance = s.values["z_probe"], s.values["z_probe_chance"]
    if z is None:
        return MISSING
    return f"{z:.2f} ({chance:.2f})" if chance is not None else f"{z:.2f}"


def _ms_ssim_cell(s: Summary, n: int) -> str:
    return f"{_mean_cell(s, 'ms_ssim', _fixed(3), n)} / {_mean_cell(s, 'ms_ssim_real', _fixed(3), n)}"


def _percent(value: Number) -> str:
    return MISSING if value is None else f"{value:.0%}"


def _fid_cell(s: Summary, n: int) -> str:
    text = _mean_cell(s, "fid", _fixed(2), n)
    return text + " †" if s.values["fid_biased"] else text


#: The markdown table: header -> cell of a run's Summary (given the number of scanners).
COLUMNS: dict[str, Callable[[Summary, int], str]] = {
    "run": lambda s, n: s.name,
    "cohort": lambda s, n: s.values["cohort"] or MISSING,
    "model": lambda s, n: _model_cell(s),
    "parameters": lambda s, n: human_count(s.values["parameters"]),
    "train s": lambda s, n: _rate(s.values["train_seconds"]),
    "train img/s": lambda s, n: _rate(s.values["train_images_per_s"]),
    "sample img/s (ORT)": lambda s, n: _rate(s.values["sample_images_per_s"]),
    "n gen/scanner": lambda s, n: _n_cell(s),
    "FID": _fid_cell,
    "KID ×10³": lambda s, n: _mean_cell(s, "kid", _fixed(2, 1e3), n),
    "precision": lambda s, n: _mean_cell(s, "precision", _fixed(3), n),
    "recall": lambda s, n: _mean_cell(s, "recall", _fixed(3), n),
    "density": lambda s, n: _mean_cell(s, "density", _fixed(3), n),
    "coverage": lambda s, n: _mean_cell(s, "coverage", _fixed(3), n),
    "MS-SSIM gen / real": _ms_ssim_cell,
    "conditioning": lambda s, n: _fixed(2)(s.values["conditioning"]),
    "TSTR": lambda s, n: _fixed(2)(s.values["synthetic_trained"]),
    "NN ratio (min)": lambda s, n: _fixed(2)(s.values["memorisation"]),
    "z-probe (chance)": lambda s, n: _z_cell(s),
    "recon. conditioning": lambda s, n: _fixed(2)(s.values["reconstruction"]),
    "label effect": lambda s, n: _sig(s.values["label_effect_ratio"]),
    "intensity W1": lambda s, n: _mean_cell(s, "intensity_w1", _sig, n),
    "Δ noise": lambda s, n: _mean_cell(s, "noise_gap", _sig, n),
    "Δ sharpness": lambda s, n: _mean_cell(s, "sharpness_gap", _sig, n),
    "noise/sharpness off (max)": lambda s, n: _percent(s.values["signature_gap"]),
    "verdict": lambda s, n: s.values["verdict"],
}


def table_rows(summaries: Sequence[Summary], n_scanners: int) -> list[list[str]]:
    """The markdown table's cells, header first; the cohort column where any row names its cohort."""
    columns = {k: fn for k, fn in COLUMNS.items() if k != "cohort" or any(s.values["cohort"] for s in summaries)}
    return [list(columns)] + [[fn(s, n_scanners) for fn in columns.values()] for s in summaries]


def _stores_note(stores: dict[str | None, str | None]) -> str:
    def short(sha: str | None) -> str:
        return sha[:16] if sha else "unknown (no store_sha256 in the results)"
    if list(stores) == [None]:
        return f"Store {short(stores[None])}"
    return "Stores: " + ", ".join(f"{cohort} {short(sha)}" for cohort, sha in stores.items())


def _footnotes(summaries: Sequence[Summary], stores: dict[str | None, str | None], scanners: Sequence[str]
               ) -> list[str]:
    n = len(scanners)
    notes = []
    if any(s.values["fid_biased"] for s in summaries):
        notes.append(f"† FID at n < {UNBIASED_N} is biased upwards; compare at equal n (or use KID, which is unbiased).")
    notes += [
        f"FID, KID, precision, recall, density, coverage, MS-SSIM and the signature are means over the {n} scanners; "
        f"(k/{n}) marks a mean over the k scanners that have the value. {MISSING}: not measured (file or key missing).",
        "KID ×10³: KID times 1000. MS-SSIM gen / real: mean pairwise MS-SSIM of generated slices / of real slices "
        "within a scanner (diversity; lower is more diverse).",
        f"Targets: conditioning ≥ {targets.GENERATION_CONDITIONING:.2f} (generated slices recognised as the scanner "
        "asked for), "
        f"z-probe ≤ {targets.Z_PROBE:.2f} (accuracy of a scanner classifier on the encoder's z; chance in brackets). "
        "Recon. conditioning: the same classifier on reconstructions of real slices, the ceiling of conditioning.",
        f"TSTR: train on synthetic, test on real: the classifier fitted on the generated slices alone, its accuracy on "
        f"the real test slices (target ≥ {targets.SYNTHETIC_TRAINED:.2f}; — where not measured). NN ratio: per "
        "scanner, median nearest-neighbour distance of generated to real training slices over that of real test "
        f"slices (Inception features), the lowest scanner's (target ≥ {targets.MEMORISATION}: no memorisation). "
        f"Precision and recall: target ≥ {targets.PRECISION_RECALL:.2f} each (means over scanners).",
        "Label effect: decoder output variation between scanners / between latent draws; below "
        f"{targets.LABEL_EFFECT_FLOOR} "
        "the decoder ignores the label.",
        "Signature: intensity W1 = Wasserstein-1 distance of real and generated intensity histograms; Δ noise and "
        "Δ sharpness = |generated − real| of the noise level and sharpness; noise/sharpness off (max): the larger "
        f"of their relative gaps |generated − real| / real, the worst scanner's (target ≤ {targets.SIGNATURE:.0%}).",
        "+ noise: the samples drew the learned observation noise.",
    ]
    notes += [note for s in summaries if (note := run_footnote(s, "sampler_device", "sampled"))]
    if len({s.values["cohort"] for s in summaries}) > 1:
        notes.append("Cohorts: a run meets the targets only where it meets them on every cohort it is compared on.")
    notes.append(f"{_stores_note(stores)}; scanners (vocabulary order): {', '.join(scanners)}.")
    return notes


def table_markdown(summaries: Sequence[Summary], stores: dict[str | None, str | None], scanners: Sequence[str]
                   ) -> str:
    rows = table_rows(summaries, len(scanners))
    lines = ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines + [""] + [f"- {note}" for note in _footnotes(summaries, stores, scanners)]) + "\n"


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and not math.isinf(value):
        return int(value) if abs(value) < 2**53 else value
    return value


def table_csv(summaries: Sequence[Summary]) -> str:
    """One row per run, every value unrounded ('' = not measured); per-scanner columns last."""
    columns = list(summaries[0].values)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(columns)
    for s in summaries:
        writer.writerow([_csv_value(s.values.get(c)) for c in columns])
    return text.getvalue()


# -- figure -----------------------------------------------------------------------------------------------------


def compare_figure(summaries: Sequence[Summary], scanners: Sequence[str], path: Path) -> Path:
    """One row per run: conditioning / z-probe / reconstruction with the targets and chance, KID ×10³ per scanner,
    precision / recall / density / coverage."""
    from mrgen_dist.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(len(summaries), 3, figsize=(14, 0.5 + max(2.0, 0.45 * len(scanners)) * len(summaries)),
                             squeeze=False, sharex="col")
    for row, s in zip(axes, summaries, strict=True):
        v = s.values
        _bars(row[0], ["conditioning", "z-probe", "recon. cond."], [v["conditioning"], v["z_probe"], v["reconstruction"]],
              ["tab:blue", "tab:orange", "tab:green"])
        row[0].axvline(targets.GENERATION_CONDITIONING, color="tab:blue", ls="--", lw=1)
        row[0].axvline(targets.Z_PROBE, color="tab:orange", ls="--", lw=1)
        chance = v["z_probe_chance"] if v["z_probe_chance"] is not None else 1 / max(1, len(scanners))
        row[0].axvline(chance, color="grey", ls=":", lw=1)
        row[0].set_xlim(0, 1)
        cohort = f" ({v['cohort']})" if v["cohort"] else ""  # a run's rows on several cohorts share its name
        row[0].set_ylabel(f"{s.name}{cohort}\n{_model_cell(s)}", fontsize=9)
        kids = [v[f"kid_{slug(n)}"] for n in scanners]
        _bars(row[1], list(scanners), [None if k is None else 1e3 * k for k in kids], "tab:purple")
        _bars(row[2], ["precision", "recall", "density", "coverage"],
              [v["precision"], v["recall"], v["density"], v["coverage"]], "tab:cyan")
        for ax in row:
            ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_title("conditioning, z-probe, reconstruction\ndashed: targets (conditioning ≥ "
                         f"{targets.GENERATION_CONDITIONING:.2f}, z-probe ≤ {targets.Z_PROBE:.2f}); dotted: chance",
                         fontsize=9)
    axes[0, 1].set_title("KID ×10³ per scanner", fontsize=9)
    axes[0, 2].set_title("precision / recall / density / coverage (means)", fontsize=9)
    return _save(fig, path, dpi=90)


# -- command line -----------------------------------------------------------------------------------------------


def compare(folders: Sequence[Path], out: Path, names: Sequence[str] | None = None,
            cohorts: Sequence[str] | None = None) -> list[Path]:
    """Read, check and compare the results folders (each of its `cohorts` entry, when given); writes
    OUT/compare.md with the generators' table (and compare.csv, compare.png) and the translators'
    (compare-translation.csv, .png); returns the paths."""
    from mrgen_dist.eval import compare_translation

    folders = [Path(f) for f in folders]
    names = list(names) if names is not None else default_names(folders)
    cohort_of = list(cohorts) if cohorts is not None else [None] * len(folders)
    runs = [read_results(folder, name) for folder, name in zip(folders, names, strict=True)]
    stores, scanners = check_comparable(runs, cohort_of)
    store = next(iter(stores.values()))
    generators = [summarise(r, scanners, c) for r, c in zip(runs, cohort_of, strict=True) if r.translation is None]
    judge_across_cohorts(generators)
    translators = [compare_translation.summarise_translation(r, scanners) for r in runs if r.translation is not None]
    out.mkdir(parents=True, exist_ok=True)
    text = table_markdown(generators, stores, scanners) if generators else ""
    if translators:
        text += ("\n" if text else "") + compare_translation.table_markdown(translators)
        if not generators:
            text += f"\n- Store {store[:16] if store else 'unknown'}; scanners (vocabulary order): {', '.join(scanners)}.\n"
    written = [atomic_write(out / "compare.md", text)]
    if generators:
        written += [atomic_write(out / "compare.csv", table_csv(generators)),
                    compare_figure(generators, scanners, out / "compare.png")]
    if translators:
        written += [atomic_write(out / "compare-translation.csv", table_csv(translators)),
                    compare_translation.figure(translators, scanners, out / "compare-translation.png")]
    return written


