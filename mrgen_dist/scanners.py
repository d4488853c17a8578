"""The scanner vocabulary: the one place where scanner labels, their order and their file-name rules live.

Every artefact (store manifest, checkpoint, ONNX metadata) carries the vocabulary it was made with, so
nothing downstream hard-codes the four names of the method or their order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePath

from mrgen_dist.cli import UserError


@dataclass(frozen=True)
class Scanner:
    """A scanner label of the method and where its volumes come from."""

    name: str
    dataset: str
    site: str  # IXI site code in file names, or the dataset name where the dataset has one scanner
    description: str


#: The four labels of the method, in the label order used by every model trained on them.
METHOD_SCANNERS: tuple[Scanner, ...] = (
    Scanner("Gyroscan Intera", "IXI", "Guys", "Philips Gyroscan Intera 1.5 T (Guy's Hospital)"),
    Scanner("Intera", "IXI", "HH", "Philips Intera 3 T (Hammersmith Hospital)"),
    Scanner("Unspecified", "IXI", "IOP", "GE 1.5 T (Institute of Psychiatry)"),
    Scanner("Magnetom TrioTim", "SALD", "SALD", "Siemens Magnetom TrioTim 3 T (SALD)"),
)

_IXI_SITE_TO_NAME = {s.site: s.name for s in METHOD_SCANNERS if s.dataset == "IXI"}
#: The IXI site codes that file names carry, in the method's order (Guys, HH, IOP).
IXI_SITES: tuple[str, ...] = tuple(_IXI_SITE_TO_NAME)
_SALD = next(s for s in METHOD_SCANNERS if s.dataset == "SALD")

# IXI: IXI002-Guys-0828-T1.nii.gz -> subject IXI002, site Guys (the sites of METHOD_SCANNERS, any case)
_IXI_RE = re.compile(rf"^(IXI\d+)-({'|'.join(map(re.escape, IXI_SITES))})-\d+", re.IGNORECASE)
# SALD: a `sub-<digits>` subject inside a path that names SALD (file name or a parent folder)
_SALD_SUBJECT_RE = re.compile(r"sub-?(\d+)", re.IGNORECASE)


class UnknownScannerError(UserError, ValueError):
    """A scanner name that is not in the vocabulary in use."""


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of scanner names; a label's id is its position."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a scanner vocabulary needs at least one name")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate names in scanner vocabulary: {list(self.names)}")
        if any(not n.strip() for n in self.names):
            raise ValueError("scanner names must be non-empty")

    @classmethod
    def method(cls) -> Vocabulary:
        """The four labels of the method, in the method's order."""
        return cls(tuple(s.name for s in METHOD_SCANNERS))

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Vocabulary:
        return cls(tuple(names))

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> Vocabulary:
        """A user's own label set, from the `scanner` column of a manifest.

        Labels that are all among the method's four keep the method's order (so ids stay comparable
        across stores); any other set is sorted by name, which makes the ids independent of row order.
        """
        unique = set(labels)
        method = cls.method()
        if unique <= set(method.names):
            return cls(tuple(n for n in method.names if n in unique))
        return cls(tuple(sorted(unique)))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UnknownScannerError(
                f"unknown scanner {name!r}; valid scanners: {', '.join(self.names)}"
            ) from None

    def resolve(self, selection: str | Sequence[str]) -> list[str]:
        """`"all"`, one name, or several names -> the list of names, checked against the vocabulary."""
        if isinstance(selection, str):
            selection = list(self.names) if selection == "all" else [selection]
        for name in selection:
            self.index(name)
        return list(selection)


def slug(name: str) -> str:
    """A scanner name as a part of a file or column name: every character that is not a letter or digit
    becomes `_` (`Magnetom TrioTim` -> `Magnetom_TrioTim`)."""
    return "".join(c if c.isalnum() else "_" for c in name)


def infer_from_path(path: str | PurePath) -> tuple[str, str] | None:
    """(scanner name, subject id) from an IXI or SALD file path, or None when the path matches neither.

    IXI names carry the site (`IXI002-Guys-0828-T1.nii.gz` -> Gyroscan Intera, IXI002). SALD has one
    scanner, so a `sub-<digits>` file counts as SALD when the file name or a parent folder says SALD
    (`SALD_sub-031274_T1w.nii.gz`, `SALD/sub-031274/anat/sub-031274_T1w.nii.gz`).
    """
    p = PurePath(path)
    m = _IXI_RE.match(p.name)
    if m:
        site = next(s for s in IXI_SITES if s.lower() == m.group(2).lower())
        return _IXI_SITE_TO_NAME[site], m.group(1).upper()
    if any(_SALD.site.lower() in part.lower() for part in p.parts):
        m = _SALD_SUBJECT_RE.search(p.name)
        if m:
            return _SALD.name, f"sub-{m.group(1)}"
    return None
