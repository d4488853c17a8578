"""The translators' table of `mrgen-compare`: one row per results folder with a `translation.json`
(`mrgen-fid translation`), beside the generators' table.

    OUT/compare.md                 gains a "Translation" section: the table and its footnotes
    OUT/compare-translation.csv    the same numbers unrounded, with the conditioning and KID per target
    OUT/compare-translation.png    per run: conditioning and cycle SSIM against their targets, KID per target

The verdict checks the targets: translated slices recognised as the target scanner >= 0.95, cycle SSIM
>= 0.90, and translating to a slice's own scanner changing it less than translating to any other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mrgen_dist.eval import targets
from mrgen_dist.eval.results import Kid
from mrgen_dist.eval.table import (
    MISSING,
    Number,
    Results,
    Summary,
    _bars,
    _escape,
    _fixed,
    _rate,
    conditioning_per_scanner,
    run_footnote,
)
from mrgen_dist.scanners import slug


def translation_verdict(conditioning: Number, cycle: Number, identity: bool | None, misses: list[str] | None) -> str:
    notes = []
    if conditioning is None:
        notes.append("conditioning not measured")
    elif conditioning < targets.TRANSLATION_CONDITIONING:
        notes.append(f"conditioning {conditioning:.2f} < {targets.TRANSLATION_CONDITIONING:.2f}")
    if cycle is None:
        notes.append("cycle SSIM not measured")
    elif cycle < targets.CYCLE_SSIM:
        notes.append(f"cycle SSIM {cycle:.2f} < {targets.CYCLE_SSIM:.2f}")
    if identity is False:
        notes.append("identity not the smallest change for " + (", ".join(misses) if misses else "some scanner"))
    elif identity is None:
        notes.append("identity not measured")
    return "; ".join(notes) or "meets targets"


def summarise_translation(run: Results, scanners: Sequence[str]) -> Summary:
    """The translators' table row of one run (a folder with translation.json)."""
    t = run.translation
    sizes = list((t.n_per_source or {}).values())
    kid = t.kid or {}
    v: dict[str, Any] = {
        "run": run.name,
        "folder": str(run.folder),
        "family": t.family,
        "targets": ", ".join(t.targets or []) or None,
        "precision": t.precision,
        "n_per_source_min": min(sizes) if sizes else None,
        "n_per_source_max": max(sizes) if sizes else None,
        "translate_images_per_s": t.translate_images_per_s,
        "translator_device": t.translator_device,
        "conditioning": t.conditioning,
        "real_test_accuracy": t.real_test_accuracy,
        "ssim_matched": t.ssim_matched,
        "cycle_ssim": t.cycle_ssim,
        "kid": t.kid_mean,
        "identity_smallest": t.identity_smallest,
    }
    for s, rate in conditioning_per_scanner(t, scanners).items():
        v[f"conditioning_to_{slug(s)}"] = rate
    for s in scanners:
        v[f"kid_to_{slug(s)}"] = kid.get(s, Kid()).mean
    v["verdict"] = translation_verdict(v["conditioning"], v["cycle_ssim"], v["identity_smallest"], t.identity_misses)
    return Summary(run.name, v)


def _n_cell(s: Summary) -> str:
    lo, hi = s.values["n_per_source_min"], s.values["n_per_source_max"]
    return MISSING if lo is None else f"{lo:.0f}" if lo == hi else f"{lo:.0f}–{hi:.0f}"


def _identity_cell(s: Summary) -> str:
    return {True: "smallest", False: "not smallest", None: MISSING}[s.values["identity_smallest"]]


COLUMNS: dict[str, Callable[[Summary], str]] = {
    "run": lambda s: s.name,
    "model": lambda s: s.values["family"] or MISSING,
    "targets": lambda s: s.values["targets"] or MISSING,
    "n / source": _n_cell,
    "translate img/s (ORT)": lambda s: _rate(s.values["translate_images_per_s"]),
    "conditioning": lambda s: _fixed(3)(s.values["conditioning"]),
    "SSIM (matched)": lambda s: _fixed(3)(s.values["ssim_matched"]),
    "cycle SSIM": lambda s: _fixed(3)(s.values["cycle_ssim"]),
    "KID ×10³": lambda s: _fixed(2, 1e3)(s.values["kid"]),
    "identity": _identity_cell,
    "verdict": lambda s: s.values["verdict"],
}


def table_markdown(summaries: Sequence[Summary]) -> str:
    rows = [list(COLUMNS)] + [[fn(s) for fn in COLUMNS.values()] for s in summaries]
    lines = ["## Translation", ""] + ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    lines.insert(3, "|" + "---|" * len(rows[0]))
    notes = [
        f"Conditioning: translated test slices recognised as the target scanner by the conditioning check's "
        f"classifier, over every (source, target ≠ source) pair (target ≥ {targets.TRANSLATION_CONDITIONING:.2f}).",
        "SSIM (matched): SSIM between a slice and its translation after matching the translation's histogram to "
        f"the slice's (anatomy kept). Cycle SSIM: between a slice and its round trip (target ≥ {targets.CYCLE_SSIM:.2f}).",
        "KID ×10³: translated slices against the real test slices of their target, mean over targets.",
        "Identity: whether translating a slice to its own scanner changes it less than translating it to any other.",
    ]
    notes += [note for s in summaries if (note := run_footnote(s, "translator_device", "translated"))]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def figure(summaries: Sequence[Summary], scanners: Sequence[str], path: Path) -> Path:
    """Per run: conditioning, SSIM (matched) and cycle SSIM against their targets; KID ×10³ per target."""
    from mrgen_dist.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(len(summaries), 2, figsize=(10, 0.5 + max(1.8, 0.45 * len(scanners)) * len(summaries)),
                             squeeze=False, sharex="col")
    for row, s in zip(axes, summaries, strict=True):
        v = s.values
        _bars(row[0], ["conditioning", "SSIM (matched)", "cycle SSIM"], [v["conditioning"], v["ssim_matched"],
              v["cycle_ssim"]], ["tab:blue", "tab:green", "tab:olive"])
        row[0].axvline(targets.TRANSLATION_CONDITIONING, color="tab:blue", ls="--", lw=1)
        row[0].axvline(targets.CYCLE_SSIM, color="tab:olive", ls="--", lw=1)
        row[0].set_xlim(0, 1)
        row[0].set_ylabel(f"{s.name}\n{v['family'] or MISSING}", fontsize=9)
        kids = [v[f"kid_to_{slug(n)}"] for n in scanners]
        _bars(row[1], [f"to {n}" for n in scanners], [None if k is None else 1e3 * k for k in kids], "tab:purple")
        for ax in row:
            ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_title(f"dashed: targets (conditioning ≥ {targets.TRANSLATION_CONDITIONING:.2f}, cycle SSIM ≥ "
                         f"{targets.CYCLE_SSIM:.2f})", fontsize=9)
    axes[0, 1].set_title("KID ×10³ per target scanner", fontsize=9)
    return _save(fig, path, dpi=90)
