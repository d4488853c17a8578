"""Which volumes go into a store: from a folder (scanner inferred from IXI/SALD names) or a manifest CSV."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from mrgen_dist.cli import UserError
from mrgen_dist.scanners import IXI_SITES, Vocabulary, infer_from_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_NO_SCANNER = f"unknown scanner: name matches no IXI site ({', '.join(IXI_SITES)}) or SALD"


class InputError(UserError):
    """The input as a whole is unusable (missing, empty, unreadable, malformed manifest)."""


@dataclass(frozen=True)
class InputVolume:
    path: Path
    source: str  # path as given, relative to the input folder or manifest; recorded in the store
    scanner: str | None  # None: could not be inferred
    subject: str

    def key(self) -> str:
        """Identity of this input for resume: a changed, moved or relabelled file is new input."""
        try:
            st = self.path.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        return f"{self.source}|{self.scanner}|{self.subject}|{stamp}"


@dataclass(frozen=True)
class Rejection:
    source: str
    reason: str


def _subject_from_name(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def discover_directory(root: Path) -> list[InputVolume]:
    """All NIfTI files under `root` (recursively), scanner and subject inferred from their names."""
    if not root.exists():
        raise InputError(f"input folder {root} does not exist")
    if not root.is_dir():
        raise InputError(f"input {root} is not a folder (give a folder of NIfTI files or a manifest .csv)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise InputError(f"input folder {root} is not readable")
    files = sorted(p for p in root.rglob("*") if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise InputError(f"no NIfTI files (*.nii, *.nii.gz) under {root}")
    volumes = []
    for p in files:
        rel = p.relative_to(root)
        inferred = infer_from_path(rel)
        scanner, subject = inferred if inferred else (None, _subject_from_name(p))
        volumes.append(InputVolume(p, str(rel), scanner, subject))
    return volumes


def read_manifest(csv_path: Path) -> list[InputVolume]:
    """Rows `path,scanner[,subject]`; relative paths are relative to the CSV's folder."""
    if not csv_path.is_file():
        raise InputError(f"manifest {csv_path} does not exist")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        if "path" not in fields or "scanner" not in fields:
            raise InputError(f"manifest {csv_path} needs a header with columns path,scanner[,subject]; got {fields}")
        volumes = []
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if not row.get("path"):
                continue
            p = Path(row["path"])
            full = p if p.is_absolute() else csv_path.parent / p
            subject = row.get("subject") or _subject_from_name(p)
            volumes.append(InputVolume(full, row["path"], row["scanner"] or None, subject))
    if not volumes:
        raise InputError(f"manifest {csv_path} lists no volumes")
    return volumes


def screen(volumes: list[InputVolume], vocabulary: Vocabulary) -> tuple[list[InputVolume], list[Rejection]]:
    """Reject what can be told without reading the image: unknown scanners and duplicate subjects.

    Inputs are taken in sorted order of their source path; of several files with one subject the first is
    kept and the others are rejected naming it, so the outcome does not depend on listing order.
    """
    kept: list[InputVolume] = []
    rejected: list[Rejection] = []
    first_of: dict[str, str] = {}
    for v in sorted(volumes, key=lambda v: v.source):
        if v.scanner is None:
            rejected.append(Rejection(v.source, _NO_SCANNER))
        elif v.scanner not in vocabulary:
            names = ", ".join(vocabulary.names)
            rejected.append(Rejection(v.source, f"unknown scanner {v.scanner!r} (vocabulary: {names})"))
        elif v.subject in first_of:
            rejected.append(Rejection(v.source, f"duplicate subject {v.subject} (already in {first_of[v.subject]})"))
        else:
            first_of[v.subject] = v.source
            kept.append(v)
    return kept, rejected
