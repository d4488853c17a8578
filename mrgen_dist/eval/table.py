"""What the comparison tables share: a model's results folder as read (`Results`), its row (`Summary`), and the
formatting of cells and bars. Used by eval/compare.py (generators) and eval/compare_translation.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrgen_dist.artifacts import ArtifactError
from mrgen_dist.cli import UserError
from mrgen_dist.eval.results import (
    Conditioning,
    Diagnostics,
    Generation,
    ResultFile,
    ScannerScore,
    TranslationScore,
    read_folder,
)

MISSING = "—"


SIDE_FILES = (Conditioning.NAME, Generation.NAME, Diagnostics.NAME)


TRANSLATION_FILE = TranslationScore.NAME


Number = float | None


class CompareError(UserError):
    """The results cannot be compared: a folder is missing or empty, or a result file cannot be read."""


class MismatchError(CompareError):
    """Two results folders (or two files of one folder) were made from different stores or scanner lists."""


@dataclass
class Results:
    """One model's results folder, its files read through `mrgen_dist.eval.results`."""

    name: str
    folder: Path
    files: dict[str, ResultFile]  # file name -> record: the fid_*.json and the side files
    per_scanner: dict[str, ScannerScore]  # scanner -> its fid_<slug>.json

    @property
    def conditioning(self) -> Conditioning | None:
        return self.files.get(Conditioning.NAME)

    @property
    def generation(self) -> Generation | None:
        return self.files.get(Generation.NAME)

    @property
    def diagnostics(self) -> Diagnostics | None:
        return self.files.get(Diagnostics.NAME)

    @property
    def translation(self) -> TranslationScore | None:
        return self.files.get(TranslationScore.NAME)


def read_results(folder: Path, name: str) -> Results:
    """The result files of one folder; a folder that is missing or holds none of them is an error, and so is a
    result file that cannot be read."""
    if not folder.is_dir():
        raise CompareError(f"results folder {folder} does not exist" if not folder.exists()
                           else f"results folder {folder} is not a folder")
    try:
        files = read_folder(folder)
    except ArtifactError as e:
        raise CompareError(str(e)) from None
    if not files:
        raise CompareError(f"results folder {folder} holds no result file (fid_*.json, {', '.join(SIDE_FILES)}, "
                           f"{TRANSLATION_FILE}); run mrgen-fid score / diagnose / translation into it first")
    per_scanner = {r.scanner: r for r in files.values() if isinstance(r, ScannerScore)}
    return Results(name, folder, files, per_scanner)


def conditioning_per_scanner(record: Conditioning | TranslationScore | None, scanners: Sequence[str]
                             ) -> dict[str, Number]:
    """Per scanner asked for (of a translator: per target): the fraction of its slices recognised as it (the
    confusion matrix's diagonal / its row); None where the record has no such row."""
    out: dict[str, Number] = dict.fromkeys(scanners)
    if record is None or record.scanners is None or record.confusion is None:
        return out
    names, confusion = record.scanners, record.confusion
    if len(confusion) != len(names):
        return out
    for i, (name, row) in enumerate(zip(names, confusion, strict=True)):
        if len(row) == len(names) and sum(row) > 0 and name in out:
            out[name] = row[i] / sum(row)
    return out


@dataclass
class Summary:
    """One run's row: `values` by CSV column (None = not measured), how many scanners each mean covers when
    not all of them (`partial`), and footnotes about the run."""

    name: str
    values: dict[str, Any]
    partial: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def human_count(n: Number) -> str:
    """1234567 -> '1.2 M', 8200 -> '8.2 k', 950 -> '950'."""
    if n is None:
        return MISSING
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f}"


def _fixed(digits: int, scale: float = 1.0) -> Callable[[Number], str]:
    return lambda x: MISSING if x is None else f"{scale * x:.{digits}f}"


def _rate(x: Number) -> str:
    """Seconds and images/s: whole numbers with thousands separators from 100 up, 3 significant digits below."""
    if x is None:
        return MISSING
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:#.3g}"


def _sig(x: Number) -> str:
    return MISSING if x is None else f"{x:#.3g}"  # 3 significant digits, trailing zeros kept


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def run_footnote(s: Summary, device_key: str, done: str) -> str | None:
    """`run: its notes; the classifier's accuracy on real test slices; <done> on <device>.`, or None when there
    is nothing to say about the run."""
    extra = list(s.notes)
    if s.values["real_test_accuracy"] is not None:
        extra.append(f"classifier accuracy on real test slices {s.values['real_test_accuracy']:.2f}")
    if s.values[device_key]:
        extra.append(f"{done} on {s.values[device_key]}")
    return f"{s.name}: " + "; ".join(extra) + "." if extra else None


def _bars(ax: Any, labels: Sequence[str], values: Sequence[Number], color: str | Sequence[str]) -> None:
    """Horizontal bars, top to bottom in `labels` order; a missing value is written as '—'."""
    ys = list(range(len(labels)))[::-1]
    ax.barh(ys, [0.0 if v is None else v for v in values], color=color)
    for y, v in zip(ys, values, strict=True):
        if v is None:
            ax.text(0.0, y, f" {MISSING}", va="center", fontsize=8)
    ax.set_yticks(ys, labels, fontsize=8)
