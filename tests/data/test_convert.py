"""mrgen-convert on real NIfTI files: content, split, resume, bad inputs, verify, the command line."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from mrgen_dist.artifacts import StoreManifest
from mrgen_dist.cli import EXIT_ERROR
from mrgen_dist.commands.convert import main
from mrgen_dist.commands.options import with_default_command
from mrgen_dist.data.convert import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, ConvertOptions, convert
from mrgen_dist.data.inputs import discover_directory
from mrgen_dist.data.store import SliceStore
from mrgen_dist.data.volume import MNI_AFFINE, MNI_SHAPE, SliceParams, central_slices
from mrgen_dist.scanners import Vocabulary, infer_from_path


def test_store_slices_equal_nifti_slices(cohort_dir: Path, store_dir: Path) -> None:
    store = SliceStore(store_dir)
    data = store.load_split("all")
    assert len(data) == 12 * 10
    for path in sorted(cohort_dir.glob("*.nii.gz")):
        scanner, subject = infer_from_path(path.name)
        expected = central_slices(nib.load(path).get_fdata(dtype=np.float32), SliceParams())
        rows = np.flatnonzero(data.subject == subject)
        assert data.slice_index[rows].tolist() == list(range(86, 96))
        assert set(data.scanner[rows].tolist()) == {store.vocabulary.index(scanner)}
        got = data.images[rows].float().numpy()
        # float16 keeps 11 significant bits: relative rounding 2**-11, at most 2**-12 absolute near 1
        np.testing.assert_allclose(got, expected, atol=2.0**-12, rtol=0)
        assert got.min() >= 0.0 and got.max() <= 1.0


def test_subject_split_has_no_leakage_and_is_stratified(store_dir: Path) -> None:
    store = SliceStore(store_dir)
    train, test = store.load_split("train"), store.load_split("test")
    assert set(train.subject).isdisjoint(test.subject)
    assert len(train) + len(test) == 120
    for sid in range(4):  # one of three subjects per scanner is test
        assert len(set(test.subject[test.scanner.numpy() == sid])) == 1
        assert len(set(train.subject[train.scanner.numpy() == sid])) == 2
    assert store.manifest.split["unit"] == "subject"


def test_slice_split_reproduces_thesis_protocol(cohort_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    convert(discover_directory(cohort_dir), Vocabulary.method(), out, ConvertOptions(split_unit="slice", shard_volumes=12))
    store = SliceStore(out)
    train, test = store.load_split("train"), store.load_split("test")
    assert (len(train), len(test)) == (108, 12)  # 90/10 of 120 slices
    assert set(train.subject) & set(test.subject)  # slice-level: subjects on both sides, as in the thesis
    # seeded: the same test slices again
    again = tmp_path / "again"
    convert(discover_directory(cohort_dir), Vocabulary.method(), again, ConvertOptions(split_unit="slice", shard_volumes=12))
    assert SliceStore(again).manifest.split["test"] == store.manifest.split["test"]


def _shard_stats(store: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((store / "shards").glob("*.h5"))}


def _content(store: Path) -> dict:
    """The manifest without the fields that say when it was written (store_sha256 covers them too)."""
    raw = json.loads((store / "manifest.json").read_text())
    return {k: v for k, v in raw.items() if k not in ("created_utc", "store_sha256")}


def test_resume_skips_finished_shards(cohort_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    volumes = discover_directory(cohort_dir)
    options = ConvertOptions(shard_volumes=5)
    first = convert(volumes, Vocabulary.method(), out, options)
    assert (first.shards_written, first.shards_kept) == (3, 0)
    before = _shard_stats(out)
    sha = SliceStore(out).sha256

    again = convert(volumes, Vocabulary.method(), out, options)
    assert (again.shards_written, again.shards_kept, again.unchanged) == (3 - 3, 3, True)
    assert _shard_stats(out) == before  # untouched files
    assert SliceStore(out).sha256 == sha
    content = _content(out)

    # an interrupted run: last shard gone, manifest gone; a flipped byte in the middle shard
    (out / "shards" / "shard-00002.h5").unlink()
    (out / "manifest.json").unlink()
    resumed = convert(volumes, Vocabulary.method(), out, options)
    assert (resumed.shards_written, resumed.shards_kept) == (1, 2)
    assert _shard_stats(out)["shard-00000.h5"] == before["shard-00000.h5"]
    assert _content(out) == content  # deterministic: the rewritten shard is byte-identical

    path = out / "shards" / "shard-00001.h5"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(raw)
    redone = convert(volumes, Vocabulary.method(), out, options)
    assert (redone.shards_written, redone.shards_kept, redone.unchanged) == (2, 1, False)
    assert SliceStore(out).verify() == [] and _content(out) == content
    assert not list(out.rglob(".*"))  # no staging folder, no lock file, no temporaries


def _bad_inputs(cohort_dir: Path, folder: Path) -> dict[str, str]:
    """A folder of two good volumes and one file for each kind of bad input; returns name -> expected reason."""
    folder.mkdir()
    good = sorted(cohort_dir.glob("IXI*-Guys-*.nii.gz"))[:1] + sorted(cohort_dir.glob("SALD_*.nii.gz"))[:1]
    for p in good:
        shutil.copy(p, folder / p.name)
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1000, MNI_SHAPE).astype(np.float32)

    def save(name: str, data: np.ndarray, affine: np.ndarray = MNI_AFFINE) -> None:
        nib.save(nib.Nifti1Image(data, affine), folder / name)

    (folder / "IXI950-Guys-0950-T1.nii.gz").write_bytes(rng.bytes(4096))  # corrupt
    full = (folder / good[0].name).read_bytes()
    (folder / "IXI951-HH-0951-T1.nii.gz").write_bytes(full[: len(full) // 3])  # truncated
    save("IXI952-HH-0952-T1.nii.gz", base[..., :2].reshape(182, 218, 2))  # wrong grid / dims kept 3-D
    save("IXI953-IOP-0953-T1.nii.gz", np.stack([base, base], axis=-1))  # 4-D
    save("IXI954-IOP-0954-T1.nii.gz", np.ones((181, 217, 181), np.float32))  # Colin27-like grid
    nan = base.copy()
    nan[90, 100, 90] = np.nan
    save("IXI955-Guys-0955-T1.nii.gz", nan)
    save("IXI956-Guys-0956-T1.nii.gz", np.zeros(MNI_SHAPE, np.float32))
    save("mystery_T1.nii.gz", base)  # unknown scanner
    repeat = good[0].name.replace("-T1", "-T1-repeat").replace(good[0].name.split("-")[2], "9999")
    shutil.copy(folder / good[0].name, folder / repeat)
    return {
        "IXI950-Guys-0950-T1.nii.gz": "unreadable NIfTI header",
        "IXI951-HH-0951-T1.nii.gz": "truncated or corrupt",
        "IXI952-HH-0952-T1.nii.gz": "not on the MNI152 1 mm grid",
        "IXI953-IOP-0953-T1.nii.gz": "expected a 3-D volume",
        "IXI954-IOP-0954-T1.nii.gz": "not on the MNI152 1 mm grid",
        "IXI955-Guys-0955-T1.nii.gz": "non-finite",
        "IXI956-Guys-0956-T1.nii.gz": "all-zero",
        "mystery_T1.nii.gz": "unknown scanner",
        repeat: "duplicate subject",
    }


def test_bad_inputs_are_rejected_with_reasons(cohort_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expected = _bad_inputs(cohort_dir, tmp_path / "in")
    out = tmp_path / "store"
    assert main([str(tmp_path / "in"), "--out", str(out), "--workers", "2", "--shard-volumes", "1"]) == EXIT_REJECTED
    printed = capsys.readouterr().out
    with (out / "rejected.csv").open() as f:
        rejected = {row["source"]: row["reason"] for row in csv.DictReader(f)}
    assert set(rejected) == set(expected)
    for name, reason in expected.items():
        assert reason in rejected[name], (name, rejected[name])
        assert f"rejected {name}: " in printed
        assert "\n" not in rejected[name]
    assert "rejected inputs: 9" in printed
    store = SliceStore(out)
    assert store.manifest.counts["volumes"] == 2 and store.manifest.counts["rejected"] == 9
    # nothing partial: only the good subjects' slices, no temporary files, every shard full
    assert sorted(set(store.index.subject)) == sorted(["IXI901", "sub-900910"])
    assert not list(out.rglob(".*"))
    assert [s["slices"] for s in store.shards] == [10, 10]
    assert store.verify() == []


def test_all_good_exits_zero_and_errors_exit_one(cohort_dir: Path, tmp_path: Path) -> None:
    assert main([str(cohort_dir), "--out", str(tmp_path / "ok"), "--shard-volumes", "12"]) == EXIT_OK
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "s1")]) == EXIT_ERROR
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "s2")]) == EXIT_ERROR
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "IXI960-HH-0960-T1.nii.gz").write_bytes(b"not a nifti")
    assert main([str(only_bad), "--out", str(tmp_path / "s3")]) == EXIT_ERROR
    assert not (tmp_path / "s3").exists()  # a failed conversion into a new folder leaves nothing


def test_manifest_csv_with_own_vocabulary(cohort_dir: Path, tmp_path: Path) -> None:
    files = sorted(cohort_dir.glob("*.nii.gz"))[:4]
    manifest = tmp_path / "cohort.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "scanner", "subject"])
        for i, p in enumerate(files):
            w.writerow([str(p), ["Skyra", "Prisma"][i % 2], f"s{i}"])
        w.writerow([str(files[0]), "Achieva", "s9"])  # not in the vocabulary given below
    out = tmp_path / "store"
    assert main([str(manifest), "--out", str(out), "--vocabulary", "Prisma,Skyra"]) == EXIT_REJECTED
    store = SliceStore(out)
    assert store.vocabulary.names == ("Prisma", "Skyra")
    assert store.manifest.counts["per_scanner"] == {
        "Prisma": {"volumes": 2, "slices": 20}, "Skyra": {"volumes": 2, "slices": 20}
    }
    assert "unknown scanner 'Achieva'" in (out / "rejected.csv").read_text()
    # --vocabulary manifest takes the labels found in the CSV, sorted
    out2 = tmp_path / "store2"
    assert main([str(manifest), "--out", str(out2), "--vocabulary", "manifest"]) == EXIT_OK
    assert SliceStore(out2).vocabulary.names == ("Achieva", "Prisma", "Skyra")


def test_verify_catches_a_flipped_byte(store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(store_dir, copy)
    assert main(["verify", str(copy)]) == EXIT_OK
    shard = copy / "shards" / "shard-00001.h5"
    with h5py.File(shard, "r") as f:
        offset = f["images"].id.get_offset()
    raw = bytearray(shard.read_bytes())
    raw[offset + 1234] ^= 0x01  # one bit of one pixel
    shard.write_bytes(raw)
    capsys.readouterr()
    assert main(["verify", str(copy)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "shards/shard-00001.h5: sha256" in err and "does not match manifest" in err
    assert "shard-00000" not in err and "shard-00002" not in err


def test_verify_reports_count_and_manifest_problems(store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(store_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["split_counts"]["test"]["Intera"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == EXIT_ERROR  # every field is covered by store_sha256
    assert "does not match its store_sha256" in capsys.readouterr().err
    # a manifest whose hash was recomputed after the edit (a forgery, or a bug): the counts still disagree
    resealed = dataclasses.replace(StoreManifest.read(store_dir / "manifest.json"), split_counts=manifest["split_counts"])
    resealed.sealed().write(copy / "manifest.json")
    assert main(["verify", str(copy)]) == EXIT_ERROR
    assert "test split, scanner 'Intera': 10 slices, manifest says 11" in capsys.readouterr().err
    manifest["shards"][0]["slices"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == EXIT_ERROR
    assert "does not match its store_sha256" in capsys.readouterr().err
    (copy / "shards" / "shard-00002.h5").unlink()
    manifest = json.loads((store_dir / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == EXIT_ERROR
    assert "shards/shard-00002.h5: missing" in capsys.readouterr().err


def test_cli_default_and_verify_sub_commands(cohort_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mrgen_dist.commands.convert import build_parser

    ap = build_parser()
    implicit = ap.parse_args(with_default_command([str(cohort_dir), "--out", "s"], ap, "convert"))
    explicit = ap.parse_args(["convert", str(cohort_dir), "--out", "s"])
    assert vars(implicit) == vars(explicit) and explicit.command == "convert"
    assert ap.parse_args(with_default_command(["verify", "s"], ap, "convert")).command == "verify"

    out = tmp_path / "store"
    assert main(["convert", str(cohort_dir), "--out", str(out), "--shard-volumes", "12"]) == EXIT_OK
    assert SliceStore(out).verify() == []
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "nowhere")]) == EXIT_ERROR
    assert capsys.readouterr().err.strip() == f"mrgen-convert verify: error: {tmp_path / 'nowhere'}: no manifest.json"
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "s2")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mrgen-convert: error: input folder") and "does not exist" in err
    assert main([str(cohort_dir), "--out", str(tmp_path / "s3"), "--vocabulary", "Intera,Intera"]) == EXIT_ERROR
    assert "--vocabulary 'Intera,Intera': duplicate names" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--workers", "0", "must be > 0"),
        ("--shard-volumes", "-1", "must be > 0"),
        ("--slices", "0", "must be > 0"),
        ("--slices", "183", "must be at most 182"),
        ("--workers", "two", "expected an integer"),
        ("--test-fraction", "1", r"must be in \[0, 1\)"),
        ("--test-fraction", "-0.1", r"must be in \[0, 1\)"),
        ("--seed", "-1", "must be >= 0"),
        ("--seed", "1.5", "expected an integer"),
    ],
)
def test_cli_rejects_bad_numbers_at_parse_time(
    option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--out", str(tmp_path / "s"), option, value])
    assert exit_.value.code == EXIT_USAGE
    assert re.search(f"argument {option}: .*{message}", capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


def test_demo_data_seed_must_be_non_negative(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`mrgen-demo-data --seed -1` is a usage error at parse time (numpy would refuse it mid-run)."""
    from mrgen_dist.commands.demo_data import main as demo_main

    with pytest.raises(SystemExit) as exit_:
        demo_main([str(tmp_path / "cohort"), "--seed", "-1"])
    assert exit_.value.code == EXIT_USAGE
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == ["mrgen-demo-data write: error: argument --seed: must be >= 0, got -1"]
    assert not (tmp_path / "cohort").exists()


def test_store_hash_and_file_modes(store_dir: Path) -> None:
    """store_sha256 is the sha256 of the canonical JSON of every other field of the manifest (format 2), and
    every file is created like any other file (0o666 less the umask), not owner-only."""
    raw = json.loads((store_dir / "manifest.json").read_text())
    assert raw["format"] == "mrgen-slice-store" and raw["format_version"] == 2
    identity = {k: v for k, v in raw.items() if k != "store_sha256"}
    assert set(identity) == set(StoreManifest.IDENTITY) and "counts" in identity
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    assert raw["store_sha256"] == hashlib.sha256(canonical).hexdigest() == SliceStore(store_dir).sha256
    umask = os.umask(0o022)
    os.umask(umask)
    files = [p for p in store_dir.rglob("*") if p.is_file()]
    assert len(files) == 2 + 2 * 3  # manifest, rejected.csv, three shards and their records
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}
