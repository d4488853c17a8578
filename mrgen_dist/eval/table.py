"""What the comparison tables share: a model's results folder as read (`Results`), its row (`Summary`), and the
formatting of cells and bars. Used by eval/compare.py (generators) and eval/compare_translation.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrgen_dist.cli import UserError

MISSING = "—"


SIDE_FILES = ("conditioning.json", "generation.json", "diagnostics.json")


TRANSLATION_FILE = "translation.json"


Number = float | None


class CompareError(UserError):
    """The results cannot be compared: a folder is missing or empty, or a result file cannot be read."""


class MismatchError(CompareError):
    """Two results folders (or two files of one folder) were made from different stores or scanner lists."""


@dataclass
class Results:
    """One model's results folder."""

    name: str
    folder: Path
    per_scanner: dict[str, dict] = field(default_factory=dict)  # scanner -> its fid_<slug>.json
    files: dict[str, dict] = field(default_factory=dict)  # file name -> content, fid_*.json and the side files

    @property
    def conditioning(self) -> dict | None:
        return self.files.get("conditioning.json")

    @property
    def generation(self) -> dict | None:
        return self.files.get("generation.json")

    @property
    def diagnostics(self) -> dict | None:
        return self.files.get("diagnostics.json")


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: unreadable ({e})") from None
    if not isinstance(content, dict):
        raise CompareError(f"{path}: not a JSON object")
    return content


def read_results(folder: Path, name: str) -> Results:
    """The result files of one folder; a folder that is missing or holds none of them is an error."""
    if not folder.is_dir():
        raise CompareError(f"results folder {folder} does not exist" if not folder.exists()
                           else f"results folder {folder} is not a folder")
    results = Results(name, folder)
    for path in sorted(folder.glob("fid_*.json")):
        record = _read_json(path)
        results.files[path.name] = record
        results.per_scanner[str(record.get("scanner", path.stem.removeprefix("fid_")))] = record
    for file_name in (*SIDE_FILES, TRANSLATION_FILE):
        if (folder / file_name).is_file():
            results.files[file_name] = _read_json(folder / file_name)
    if not results.files:
        raise CompareError(f"results folder {folder} holds no result file (fid_*.json, {', '.join(SIDE_FILES)}, "
                           f"{TRANSLATION_FILE}); run mrgen-fid score / diagnose / translation into it first")
    return results


def _get(content: dict | None, *keys: str) -> Any:
    """content[k1][k2]...; None when a level is missing or not a dict."""
    value: Any = content
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _num(value: Any) -> Number:
    """A JSON number as float; None for anything else (missing, null, text, booleans)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def conditioning_per_scanner(cond: dict | None, scanners: Sequence[str]) -> dict[str, Number]:
    """Per scanner asked for: the fraction of its generated slices recognised as it (confusion diagonal / row)."""
    names, confusion = _get(cond, "scanners"), _get(cond, "confusion")
    out: dict[str, Number] = dict.fromkeys(scanners)
    if not isinstance(names, list) or not isinstance(confusion, list) or len(confusion) != len(names):
        return out
    for i, (name, row) in enumerate(zip(names, confusion, strict=True)):
        counts = [_num(c) for c in row] if isinstance(row, list) and len(row) == len(names) else []
        if counts and None not in counts and sum(counts) > 0 and name in out:
            out[name] = counts[i] / sum(counts)
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
