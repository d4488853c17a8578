"""`--overwrite` replaces only an earlier output of the same command; outputs are written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest

from mrgen_dist.runtime.outputs import MARKER, OutputError, OutputRecord, check_output, folder_output, h5_bytes, write_file

TOOL = "mrgen-sample"


def _folder(out: Path, files: dict[str, bytes], tool: str = TOOL) -> None:
    with folder_output(out, tool) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)


def test_a_folder_output_is_recorded_and_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    _folder(out, {"grid.png": b"a", "Intera/00000.png": b"b", "Intera/00001.png": b"c"})
    assert OutputRecord.read(out) == OutputRecord(TOOL, ("Intera/00000.png", "Intera/00001.png", "grid.png"))
    check_output(out, TOOL, overwrite=True)
    _folder(out, {"grid.png": b"new"})
    assert sorted(p.name for p in out.rglob("*")) == [MARKER, "grid.png"] and (out / "grid.png").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]  # no temporary or replaced folder left beside it


@pytest.mark.parametrize(("foreign", "named"), [("keep.txt", "keep.txt"), ("Intera/mine.png", "Intera/mine.png"),
                                               ("Intera/sub/x", "Intera/sub")])
def test_a_folder_with_anything_the_command_did_not_write_is_refused(tmp_path: Path, foreign: str, named: str) -> None:
    out = tmp_path / "samples"
    _folder(out, {"grid.png": b"a", "Intera/00000.png": b"b"})
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_bytes(b"user data")
    with pytest.raises(OutputError, match=f"holds {named}, which {TOOL} did not write"):
        check_output(out, TOOL, overwrite=True)


def test_folders_of_other_commands_or_without_a_record_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.png").write_bytes(b"x")
    with pytest.raises(OutputError, match="holds a.png, which mrgen-sample did not write"):
        check_output(plain, TOOL, overwrite=True)
    other = tmp_path / "other"
    _folder(other, {"grid.png": b"a"}, tool="mrgen-translate")
    with pytest.raises(OutputError, match="holds grid.png, which mrgen-sample did not write"):
        check_output(other, TOOL, overwrite=True)
    (other / MARKER).write_text("{not json")
    with pytest.raises(OutputError, match="which mrgen-translate did not write"):
        check_output(other, "mrgen-translate", overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty, TOOL, overwrite=True)  # nothing to lose


def test_without_overwrite_anything_existing_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    _folder(out, {"grid.png": b"a"})
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        check_output(out, TOOL, overwrite=False)
    check_output(tmp_path / "new", TOOL, overwrite=False)


def test_never_the_working_folder_home_root_or_an_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    _folder(work, {"grid.png": b"a"})  # even an earlier output of the command, once it is the working folder
    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match="never replaces the current directory"):
        check_output(Path("."), TOOL, overwrite=True)
    monkeypatch.setenv("HOME", str(work))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="never replaces the home folder"):
        check_output(work, TOOL, overwrite=True)
    with pytest.raises(OutputError, match="never replaces the root folder"):
        check_output(Path("/"), TOOL, overwrite=True)
    monkeypatch.setenv("HOME", "/nonexistent")
    with pytest.raises(OutputError, match="would replace the input"):
        check_output(work, TOOL, overwrite=True, inputs=[work / "grid.png"])
    model = tmp_path / "model.h5"
    model.write_bytes(h5_bytes(lambda f: None, TOOL))
    with pytest.raises(OutputError, match="would replace the input"):
        check_output(model, TOOL, overwrite=True, inputs=[model])


def test_a_file_is_replaced_only_when_it_carries_the_commands_mark(tmp_path: Path) -> None:
    ours = tmp_path / "s.h5"
    write_file(ours, lambda tmp: tmp.write_bytes(h5_bytes(lambda f: f.create_dataset("x", data=[1, 2]), TOOL)))
    with h5py.File(ours) as f:
        assert list(f["x"][...]) == [1, 2] and f.attrs["mrgen.tool"] == TOOL
    check_output(ours, TOOL, overwrite=True)
    with pytest.raises(OutputError, match="is not an earlier output of mrgen-translate"):
        check_output(ours, "mrgen-translate", overwrite=True)
    foreign = tmp_path / "data.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1]
    with pytest.raises(OutputError, match="is not an earlier output of mrgen-sample"):
        check_output(foreign, TOOL, overwrite=True)


def test_a_failed_folder_write_leaves_the_earlier_output_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    _folder(out, {"grid.png": b"old"})
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputError, match=r"cannot write .*samples"), folder_output(out, TOOL) as tmp:
        (tmp / "grid.png").write_bytes(b"new")
        raise OSError(28, os.strerror(28))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]
