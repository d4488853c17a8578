"""The scanner vocabulary and file-name rules."""

from __future__ import annotations

import pytest

from mrgen_dist.scanners import UnknownScannerError, Vocabulary, infer_from_path


@pytest.mark.parametrize(
    "path, expected",
    [
        ("IXI002-Guys-0828-T1.nii.gz", ("Gyroscan Intera", "IXI002")),
        ("IXI012-HH-1211-T1.nii.gz", ("Intera", "IXI012")),
        ("sub/IXI035-IOP-0873-T1.nii", ("Unspecified", "IXI035")),
        ("SALD_sub-031274_T1w.nii.gz", ("Magnetom TrioTim", "sub-031274")),
        ("SALD/sub-031274/anat/sub-031274_T1w.nii.gz", ("Magnetom TrioTim", "sub-031274")),
        ("sub-031274_T1w.nii.gz", None),  # a BIDS subject without SALD in its path is not guessed
        ("IXI002-Other-0828-T1.nii.gz", None),
    ],
)
def test_infer_from_path(path: str, expected: tuple[str, str] | None) -> None:
    assert infer_from_path(path) == expected


def test_vocabulary() -> None:
    method = Vocabulary.method()
    assert method.names == ("Gyroscan Intera", "Intera", "Unspecified", "Magnetom TrioTim")
    assert method.index("Unspecified") == 2
    assert method.resolve("all") == list(method.names)
    with pytest.raises(UnknownScannerError, match="valid scanners"):
        method.resolve(["Intera", "Skyra"])
    # labels among the method's keep its order; others are sorted
    assert Vocabulary.from_labels(["Magnetom TrioTim", "Intera", "Intera"]).names == ("Intera", "Magnetom TrioTim")
    assert Vocabulary.from_labels(["Skyra", "Achieva"]).names == ("Achieva", "Skyra")
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(("a", "a"))
