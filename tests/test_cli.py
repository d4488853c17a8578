"""One CLI convention: default sub-commands, one-line errors, extras named, atomic files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from mrgen_dist.atomic import atomic_path, atomic_write
from mrgen_dist.cli import EXTRAS, MissingExtra, UserError, require, require_extra, run
from mrgen_dist.commands.options import positive, with_default_command


def test_default_sub_command() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("convert").add_argument("input")
    sub.add_parser("verify").add_argument("store")
    assert with_default_command(["in/", "--x"], ap, "convert") == ["convert", "in/", "--x"]
    assert with_default_command(["verify", "s"], ap, "convert") == ["verify", "s"]
    assert with_default_command(["--help"], ap, "convert") == ["--help"]
    assert with_default_command([], ap, "convert") == ["convert"]


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def fails() -> int:
        raise UserError("store s: no manifest.json")

    assert run("mrgen-x", fails) == 1
    assert capsys.readouterr().err == "mrgen-x: error: store s: no manifest.json\n"
    monkeypatch.setenv("RANK", "1")  # other ranks of a multi-process launch stay silent
    assert run("mrgen-x", fails) == 1 and capsys.readouterr().err == ""
    with pytest.raises(ZeroDivisionError):
        run("mrgen-x", lambda: 1 // 0)


def test_missing_extras_are_named() -> None:
    with pytest.raises(MissingExtra, match=r"needs 'not_a_module_xyz'.*pip install 'mrgen-dist\[all\]'"):
        require("not_a_module_xyz", "this command")
    EXTRAS["probe"] = ("json", "not_a_module_xyz")
    try:
        with pytest.raises(MissingExtra, match=r"needs the 'probe' extra \(not_a_module_xyz not installed\)"):
            require_extra("probe", "mrgen-probe")
    finally:
        del EXTRAS["probe"]
    require_extra("train", "mrgen-train")  # the test environment has everything


def test_positive() -> None:
    assert positive()("3") == 3 and positive(float)("0.5") == 0.5
    for bad in ("0", "-2", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive()(bad)


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]
    with atomic_path(tmp_path / "b.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path  # libraries pick formats by suffix
        tmp.write_bytes(b"x")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.nii.gz"]
