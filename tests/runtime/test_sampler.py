"""The onnxruntime sampler: reproducible, torch-free, clear errors, atomic outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import onnx
import pytest

from mrgen_dist.artifacts import ArtifactError
from mrgen_dist.commands.sample import main
from mrgen_dist.export.exporter import export_onnx
from mrgen_dist.runtime import sampler as sample
from mrgen_dist.runtime.parity import decode_draws, encode_draws
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.runtime.session import SampleError


@pytest.fixture(scope="module")
def decoder(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(trained_run, "fp32", tmp_path_factory.mktemp("dec") / "decoder.onnx").path


def test_reproducible_and_independent_of_batch_size(decoder: Path) -> None:
    sampler = Sampler(decoder, device="cpu")
    a = sampler.sample("Intera", n=10, seed=3, batch_size=3)
    b = sampler.sample("Intera", n=10, seed=3, batch_size=256)
    assert a.shape == (10, 218, 182) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sampler.sample("Intera", n=10, seed=4))
    assert not np.array_equal(a, sampler.sample("Unspecified", n=10, seed=3))
    np.testing.assert_array_equal(a[:4], sampler.sample("Intera", n=4, seed=3))  # a prefix of the same stream


def test_cli_outputs(decoder: Path, tmp_path: Path) -> None:
    assert main([str(decoder), "--scanner", "all", "--n", "3", "--out", str(tmp_path / "pngs")]) == 0
    pngs = sorted((tmp_path / "pngs").glob("*/*.png"))
    assert len(pngs) == 12 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "pngs" / "grid.png").is_file()
    assert main([str(decoder), "--scanner", "all", "--n", "5", "--seed", "1", "--out", str(tmp_path / "s.h5")]) == 0
    sampler = Sampler(decoder)
    with h5py.File(tmp_path / "s.h5") as f:
        assert sorted(f) == sorted(sampler.vocabulary.names)
        np.testing.assert_array_equal(f["Intera"][...], sampler.sample("Intera", 5, seed=1))
    assert main([str(decoder), "--scanner", "Intera", "--n", "4", "--out", str(tmp_path / "s.nii.gz")]) == 0
    assert nib.load(tmp_path / "s.nii.gz").shape == (182, 218, 4)


def test_errors_are_clear_and_write_nothing(decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x.h5"
    assert main([str(decoder), "--scanner", "Achieva", "--n", "2", "--out", str(out)]) == 1
    assert ("this model: unknown scanner 'Achieva'; valid scanners: Gyroscan Intera, Intera, Unspecified, Magnetom TrioTim"
            in capsys.readouterr().err)
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_info:
            main([str(decoder), "--scanner", "Intera", "--n", bad, "--out", str(out)])
        assert exit_info.value.code == 2 and f"--n: must be > 0, got {bad}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"keep")
    assert main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", str(out), "--overwrite"]) == 1
    assert "is not an earlier output of mrgen-sample" in capsys.readouterr().err and out.read_bytes() == b"keep"
    out.unlink()
    assert main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", str(out)]) == 0
    assert main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", str(out), "--overwrite"]) == 0
    assert h5py.is_hdf5(out)
    bare = onnx.load(str(decoder))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ArtifactError, match="is not an mrgen-dist model"):
        Sampler(tmp_path / "bare.onnx")
    capsys.readouterr()
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", str(tmp_path / "y.h5"), "--batch-size", bad])
        assert exit_info.value.code == 2 and f"--batch-size: must be > 0, got {bad}" in capsys.readouterr().err
    assert not (tmp_path / "y.h5").exists()


@pytest.fixture(scope="module")
def int8(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(trained_run, "int8", tmp_path_factory.mktemp("dec8") / "decoder-int8.onnx").path


def _with_metadata(src: Path, dst: Path, change) -> Path:
    """A copy of `src` whose metadata dict went through `change` (in place)."""
    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    change(meta)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(dst))
    return dst


def test_int8_parity_checked_once_and_refused_when_off(int8: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    sampler = Sampler(int8, device="cpu")
    assert 0 < sampler.parity_error <= 1 / 255
    key = next(k for k in sample._PARITY_ERRORS if k[0] == str(int8.resolve()))
    sample._PARITY_ERRORS[key] = 0.5  # a second Sampler of the same file uses the measured value: no re-run
    with pytest.raises(SampleError, match="5.00e-01"):
        Sampler(int8, device="cpu")
    del sample._PARITY_ERRORS[key]
    assert Sampler(int8, device="cpu").parity_error == sampler.parity_error

    def tamper(meta: dict) -> None:  # the stored references no longer match what the file computes
        parity = json.loads(meta["mrgen.parity"])
        z, scanner, images = decode_draws(parity["draws"], 8, (218, 182), "test")
        parity["draws"] = encode_draws(z, scanner, np.clip(images + 0.05, 0, 1))
        meta["mrgen.parity"] = json.dumps(parity)

    tampered = _with_metadata(int8, tmp_path / "tampered.onnx", tamper)
    with pytest.raises(SampleError) as e:
        Sampler(tampered, device="cpu")
    message = str(e.value)
    assert "inaccurate on this machine" in message and "over the tolerance 3.9e-03" in message
    measured = float(re.search(r"= (\S+) on the 4 draws stored in the file", message).group(1))
    assert measured == pytest.approx(0.05, abs=3e-3) and "--precision fp16" in message
    with pytest.warns(UserWarning, match="inaccurate on this machine"):
        assert Sampler(tampered, device="cpu", inaccurate="warn").parity_error == pytest.approx(0.05, abs=3e-3)
    assert main([str(tampered), "--scanner", "Intera", "--n", "2", "--out", str(tmp_path / "o.h5")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--precision fp16" in err and not (tmp_path / "o.h5").exists()

    corrupt = _with_metadata(int8, tmp_path / "corrupt.onnx", lambda m: m.update(
        {"mrgen.parity": m["mrgen.parity"].replace('"image": "', '"image": "!')}))
    with pytest.raises(ArtifactError, match="mrgen.parity is corrupt"):
        Sampler(corrupt, device="cpu")
    old = _with_metadata(int8, tmp_path / "old.onnx", lambda m: m.pop("mrgen.parity"))
    with pytest.warns(UserWarning, match="without parity draws"):
        unchecked = Sampler(old, device="cpu")
    assert unchecked.parity_error is None and unchecked.layout == "u8u8"  # no draws: no other layout is tried


def test_int8_images_do_not_depend_on_the_batch(int8: Path, decoder: Path) -> None:
    """Static quantization: fixed activation ranges, so an image is the same in any batch."""
    sampler = Sampler(int8, device="cpu")
    a = sampler.sample("Intera", n=9, seed=5, batch_size=2)
    np.testing.assert_array_equal(a, sampler.sample("Intera", n=9, seed=5, batch_size=256))
    assert np.abs(a - Sampler(decoder).sample("Intera", n=9, seed=5)).max() <= 1 / 255


def _cli_fails(capsys: pytest.CaptureFixture, model: Path, out: Path, *extra: str) -> str:
    """Runs mrgen-sample, which must fail in one line with exit status 1 and write nothing; returns the line."""
    assert main([str(model), "--scanner", "all", "--n", "2", "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("mrgen-sample: error: "), err
    assert not out.exists()
    return err


def test_unusable_model_files(decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o.h5"
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "noise.onnx: not an ONNX model that onnxruntime can load" in _cli_fails(capsys, noise, out)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "empty.onnx: not an ONNX model" in _cli_fails(capsys, empty, out)
    no_scanners = _with_metadata(decoder, tmp_path / "no-scanners.onnx", lambda m: m.pop("mrgen.scanners"))
    assert "missing field 'mrgen.scanners'" in _cli_fails(capsys, no_scanners, out)

    foreign = onnx.load(str(decoder))  # valid ONNX, mrgen metadata, but its label input has another name
    for node in foreign.graph.node:
        node.input[:] = ["label" if i == "scanner" else i for i in node.input]
    next(i for i in foreign.graph.input if i.name == "scanner").name = "label"
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(SampleError, match=r"no input 'scanner' \(inputs: z, label\)"):
        Sampler(tmp_path / "foreign.onnx")
    assert "no input 'scanner'" in _cli_fails(capsys, tmp_path / "foreign.onnx", out)
    wrong_latent = _with_metadata(decoder, tmp_path / "latent.onnx", lambda m: m.update({"mrgen.latent": "9"}))
    assert "its input 'z' is tensor(float)" in _cli_fails(capsys, wrong_latent, out)
    wrong_shape = _with_metadata(decoder, tmp_path / "shape.onnx", lambda m: m.update({"mrgen.image_shape": "[64, 64]"}))
    assert "its output 'image'" in _cli_fails(capsys, wrong_shape, out)


def test_unwritable_output_found_before_sampling(decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled although the output cannot be written")

    monkeypatch.setattr(Sampler, "sample", no_sampling)
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    assert "is not a folder" in _cli_fails(capsys, decoder, blocker / "sub" / "o.h5")
    assert blocker.read_bytes() == b"x"
    if sys.platform == "linux":  # /proc takes no new files, not even from root
        assert "/proc is not writable" in _cli_fails(capsys, decoder, Path("/proc/mrgen-sample-test.h5"))
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            assert "locked is not writable" in _cli_fails(capsys, decoder, locked / "pngs")
            assert list(locked.iterdir()) == []
        finally:
            locked.chmod(0o755)


def test_cuda_requested_on_a_machine_without_it(decoder: Path) -> None:
    with pytest.raises(SampleError, match=r"--device cuda needs onnxruntime's CUDAExecutionProvider.*mrgen-dist\[gpu\]"):
        Sampler(decoder, device="cuda")
    assert Sampler(decoder, device="auto").device == "cpu"


def test_sampler_runs_where_torch_cannot_be_imported(decoder: Path, tmp_path: Path) -> None:
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.commands.sample import main
assert main([{str(decoder)!r}, "--scanner", "all", "--n", "2", "--out", {str(tmp_path / "o.h5")!r}]) == 0
images = Sampler({str(decoder)!r}).sample("Intera", 3, seed=0)
assert images.shape == (3, 218, 182)
assert sys.modules["torch"] is None
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-2000:]


def test_overwrite_never_empties_the_working_folder(decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    """The defect: `cd d; mrgen-sample ... --out . --overwrite` deleted the user's files."""
    work = tmp_path / "d"
    work.mkdir()
    (work / "keep").write_text("x")
    monkeypatch.chdir(work)
    assert main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", ".", "--overwrite"]) == 1
    assert "never replaces the current directory" in capsys.readouterr().err
    assert main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", str(work), "--overwrite"]) == 1
    assert sorted(p.name for p in work.iterdir()) == ["keep"]
    monkeypatch.chdir(tmp_path)
    assert main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", "d", "--overwrite"]) == 1
    assert "d holds keep, which mrgen-sample did not write" in capsys.readouterr().err
    assert (work / "keep").read_text() == "x"
    assert main([str(decoder), "--scanner", "Intera", "--n", "2", "--out", "pngs"]) == 0
    assert main([str(decoder), "--scanner", "Intera", "--n", "3", "--out", "pngs", "--overwrite"]) == 0
    assert len(list((tmp_path / "pngs" / "Intera").glob("*.png"))) == 3


def test_negative_seed_is_a_usage_error(decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(decoder), "--scanner", "Intera", "--n", "2", "--seed", "-1", "--out", str(tmp_path / "x.h5")])
    assert exit_info.value.code == 2 and "--seed: must be >= 0, got -1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_non_finite_output_is_named_and_nothing_is_written(decoder: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    proto = onnx.load(str(decoder))
    bias = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 1)
    broken = onnx.numpy_helper.to_array(bias).copy()
    broken[:] = np.nan
    bias.CopyFrom(onnx.numpy_helper.from_array(broken, bias.name))
    onnx.save(proto, str(tmp_path / "nan.onnx"))
    assert main([str(tmp_path / "nan.onnx"), "--scanner", "all", "--n", "3", "--out", str(tmp_path / "s.h5")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"mrgen-sample: error: .*nan\.onnx: the model's output 'image' is not finite "
                        r"\(first at Gyroscan Intera draw 0\).*", err[-1])
    assert not (tmp_path / "s.h5").exists()
