"""Conversion in parts (`mrgen-convert --part k/N`) and `mrgen-convert merge`: the merged store is a one-process
conversion slice for slice; parts of another conversion are refused, naming the part."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mrgen_dist.cli import EXIT_ERROR
from mrgen_dist.commands.convert import main
from mrgen_dist.data.convert import EXIT_OK, EXIT_REJECTED, ConvertOptions, convert, merge
from mrgen_dist.data.inputs import discover_directory
from mrgen_dist.data.parts import Part
from mrgen_dist.data.store import SliceStore
from mrgen_dist.scanners import Vocabulary


def test_parts_cover_the_inputs_once_in_order() -> None:
    for total in (0, 1, 7, 12, 40_001):
        for n in (1, 3, 8):
            bounds = [Part(k, n).bounds(total) for k in range(1, n + 1)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    assert Part.parse("2/8") == Part(2, 8)
    for bad in ("0/3", "4/3", "1", "a/b", "1/0"):
        with pytest.raises(ValueError):
            Part.parse(bad)


def _arrays(store: SliceStore, side: str) -> dict[str, np.ndarray]:
    split = store.load_split(side)
    return {"images": split.images.numpy(), "scanner": np.asarray(split.scanner), "subject": np.asarray(split.subject)}


def test_three_parts_merged_equal_one_conversion(cohort_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    volumes = discover_directory(cohort_dir)
    options = ConvertOptions(shard_volumes=2, test_fraction=0.34)
    whole = SliceStore(convert(volumes, Vocabulary.method(), tmp_path / "whole", options).store)
    args = [str(cohort_dir), "--shard-volumes", "2", "--test-fraction", "0.34"]
    for k in (3, 1, 2):  # array tasks finish in any order
        assert main([*args, "--out", str(tmp_path / f"part-{k}"), "--part", f"{k}/3"]) == EXIT_OK
    part_volumes = [SliceStore(tmp_path / f"part-{k}").manifest.counts["volumes"] for k in (1, 2, 3)]
    assert part_volumes == [4, 4, 4]

    parts = [str(tmp_path / f"part-{k}") for k in (2, 3, 1)]
    assert main(["merge", *parts, "--out", str(tmp_path / "merged")]) == EXIT_OK
    assert "6 shards written" in capsys.readouterr().out
    merged = SliceStore(tmp_path / "merged")
    assert merged.verify() == []
    for side in ("train", "test"):
        a, b = _arrays(whole, side), _arrays(merged, side)
        assert all(np.array_equal(a[key], b[key]) for key in a), side
    for key in ("vocabulary", "params", "split", "counts", "split_counts"):
        assert getattr(merged.manifest, key) == getattr(whole.manifest, key), key
    assert [s["sha256"] for s in merged.shards] == [s["sha256"] for s in whole.shards]  # same shard boundaries here
    assert "part" not in merged.manifest.inputs and "3 parts merged" in merged.manifest.inputs["description"]
    assert (tmp_path / "merged" / "preview.png").is_file() and not list((tmp_path / "merged").rglob(".*"))

    # the same merge again leaves the store as it is; another store there is replaced only with --overwrite
    sha = merged.sha256
    assert merge([Path(p) for p in parts], tmp_path / "merged").unchanged
    assert SliceStore(tmp_path / "merged").sha256 == sha
    assert main(["merge", *parts[:2], str(tmp_path / "part-1"), "--out", str(tmp_path / "whole")]) == EXIT_ERROR
    assert "not this merge" in capsys.readouterr().err
    assert SliceStore(tmp_path / "whole").sha256 == whole.sha256


def test_parts_keep_every_rejection_once(cohort_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(cohort_dir, folder)
    (folder / "IXI950-Guys-0950-T1.nii.gz").write_bytes(b"not a nifti")  # rejected when read (by its part)
    (folder / "mystery_T1.nii.gz").write_bytes(b"unknown scanner")  # rejected by screening (part 1 only)
    volumes = discover_directory(folder)
    for k in (1, 2):
        convert(volumes, Vocabulary.method(), tmp_path / f"part-{k}", ConvertOptions(shard_volumes=3), part=Part(k, 2))
    parts = [str(tmp_path / "part-1"), str(tmp_path / "part-2")]
    assert main(["merge", *parts, "--out", str(tmp_path / "merged")]) == EXIT_REJECTED  # as a conversion would
    with (tmp_path / "merged" / "rejected.csv").open() as f:
        rows = sorted(Path(row["source"]).name for row in csv.DictReader(f))
    assert rows == ["IXI950-Guys-0950-T1.nii.gz", "mystery_T1.nii.gz"]
    counts = SliceStore(tmp_path / "merged").manifest.counts
    assert (counts["volumes"], counts["rejected"]) == (12, 2)


@pytest.fixture(scope="module")
def two_parts(cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parts")
    volumes = discover_directory(cohort_dir)
    for k in (1, 2):
        convert(volumes, Vocabulary.method(), root / f"part-{k}", ConvertOptions(shard_volumes=4), part=Part(k, 2))
    return root


@pytest.mark.parametrize(("case", "message"), [
    ("missing", r"part\(s\) 2 of 2 missing"),
    ("twice", "part 1/2 given twice"),
    ("other N", "parts of one conversion have one N"),
    ("other inputs", "different input lists"),
    ("other parameters", "different parameters"),
    ("whole store", "is not a part store"),
    ("damaged", "problem"),
])
def test_merge_refuses_parts_of_another_conversion(two_parts: Path, cohort_dir: Path, tmp_path: Path,
                                                   case: str, message: str, capsys: pytest.CaptureFixture) -> None:
    volumes = discover_directory(cohort_dir)
    parts = [two_parts / "part-1", two_parts / "part-2"]
    odd = tmp_path / "odd"
    if case == "missing":
        parts = parts[:1]
    elif case == "twice":
        shutil.copytree(parts[0], odd)
        parts = [parts[0], odd, parts[1]]
    elif case == "other N":
        convert(volumes, Vocabulary.method(), odd, ConvertOptions(shard_volumes=4), part=Part(2, 3))
        parts[1] = odd
    elif case == "other inputs":
        convert(volumes[1:], Vocabulary.method(), odd, ConvertOptions(shard_volumes=4), part=Part(2, 2))
        parts[1] = odd
    elif case == "other parameters":
        convert(volumes, Vocabulary.method(), odd, ConvertOptions(shard_volumes=3), part=Part(2, 2))
        parts[1] = odd
    elif case == "whole store":
        convert(volumes, Vocabulary.method(), odd, ConvertOptions(shard_volumes=4))
        parts[1] = odd
    else:
        shutil.copytree(parts[1], odd)
        shard = sorted((odd / "shards").glob("*.h5"))[0]
        shard.chmod(0o644)
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        shard.write_bytes(raw)
        parts[1] = odd
    capsys.readouterr()  # the conversions' progress bars
    assert main(["merge", *map(str, parts), "--out", str(tmp_path / "merged")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("mrgen-convert merge: error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "merged").exists()

