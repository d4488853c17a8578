"""The translation families (stargan, cyclegan): the translator network, the targets, the losses, the shared
commands (train, export) and `mrgen-translate` on what they export. Resume per family is in tests/test_train.py;
the evaluation (`mrgen-fid translation`) in tests/eval/test_translation.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from mrgen_dist.artifacts import ArtifactError
from mrgen_dist.commands.translate import main as translate_main
from mrgen_dist.config import ConfigError, load_config
from mrgen_dist.data.store import SliceStore
from mrgen_dist.data.volume import SliceParams, central_slices, load_volume
from mrgen_dist.export.exporter import TOLERANCE, ExportError, export_onnx
from mrgen_dist.models import family_names, get_family
from mrgen_dist.models.base import PlainAccelerator, Step
from mrgen_dist.models.parts.networks import ConvTranslator, ScannerNorm
from mrgen_dist.runs import load_trained
from mrgen_dist.runtime.png import PngError, read_png
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.runtime.translator import TranslateError, Translator
from mrgen_dist.scanners import Vocabulary
from tests.launch import TINY_TRANSLATORS, run, train_cmd
from tests.models.players import SHAPE, TINY, built


def step(fam, config, model, optimizers=None, n: int = 8, seed: int = 0, scanner=None) -> Step:
    g = torch.Generator().manual_seed(seed)
    scanner = torch.randint(0, 4, (n,), generator=g) if scanner is None else scanner
    return Step(PlainAccelerator(), config, model, optimizers or {}, torch.rand(n, *SHAPE, generator=g), scanner,
                torch.randn(n, fam.noise_dim(config), generator=g))


def test_registry_lists_the_translators() -> None:
    assert {"stargan", "cyclegan"} <= set(family_names())
    for family in TINY_TRANSLATORS:
        assert get_family(family).contract == "mrgen-translator"


def test_an_untrained_translator_is_the_identity_and_keeps_the_shape() -> None:
    torch.manual_seed(0)
    net = ConvTranslator(4, [8, 16, 32], 2, (224, 192))
    x = torch.rand(3, 1, *SHAPE)
    assert torch.equal(net(x, torch.tensor([0, 1, 3])), x)
    torch.nn.init.normal_(net.to_change.weight, std=1.0)  # as trained: changes, stays in [0, 1], same shape,
    for norm in net.modules():  # and its scanner norms tell the targets apart
        if isinstance(norm, ScannerNorm):
            torch.nn.init.normal_(norm.shift)
    y = net(x, torch.tensor([0, 1, 3]))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and not torch.equal(y, x)
    assert not torch.equal(net(x, torch.tensor([0, 0, 0])), net(x, torch.tensor([2, 2, 2])))  # the target matters


def test_stargan_targets_are_the_other_scanners_uniformly_and_follow_the_noise() -> None:
    fam, config, model, _ = built("stargan")
    scanner = torch.arange(4).repeat(2000)
    s = step(fam, config, model, n=len(scanner), scanner=scanner)
    target = fam.asked(s)
    assert not torch.any(target == scanner)
    for source in range(4):
        counts = torch.bincount(target[scanner == source], minlength=4).float() / 2000
        others = [t for t in range(4) if t != source]
        assert torch.all((counts[others] - 1 / 3).abs() < 0.04), counts
    assert torch.equal(fam.asked(s), target)  # a function of the step's noise: a resumed run draws the same


def test_cyclegan_translates_within_its_pair_with_one_network_per_direction() -> None:
    fam, config, model, _ = built("cyclegan")
    a, b = Vocabulary.method().index("Intera"), Vocabulary.method().index("Magnetom TrioTim")
    assert fam.targets(model) == [a, b]
    s = step(fam, config, model, n=4, scanner=torch.tensor([a, b, a, b]))
    assert fam.asked(s).tolist() == [b, a, b, a]
    torch.nn.init.normal_(model.generator.to_b.to_change.weight, std=1.0)  # only G_AB changes anything
    x = torch.rand(2, 1, *SHAPE)
    to_b = model.generator(x, torch.tensor([b, b]))
    assert not torch.equal(to_b, x) and torch.equal(model.generator(x, torch.tensor([a, a])), x)


@pytest.mark.parametrize("family", list(TINY_TRANSLATORS))
def test_one_step_updates_both_players_and_reports_cycle_and_identity(family: str) -> None:
    fam, config, model, optimizers = built(family)
    scanner = torch.tensor([1, 3, 1, 3]) if family == "cyclegan" else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = fam.train_step(step(fam, config, model, optimizers, n=4, scanner=scanner))
    assert set(losses) == set(fam.reported_losses(config))
    assert {"generator", "discriminator", "cycle", "identity", "real_accuracy"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    # the first step starts from the identity: no cycle or identity error yet
    assert losses["cycle"] == 0 and losses["identity"] == 0
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"generator", "discriminator"}
    after = fam.losses(step(fam, config, model, n=4, scanner=scanner))
    assert after["cycle"] > 0 and after["identity"] > 0


@pytest.mark.parametrize(("family", "override", "field"), [
    ("stargan", "model.blocks=-1", "model.blocks"),
    ("stargan", "model.cycle_weight=-1", "model.cycle_weight"),
    ("stargan", "model.translator=[4,8,8,8,8,8,8]", "model.translator"),
    ("stargan", "model.head=softmax", "model.head"),
    ("cyclegan", "model.pair=[Intera]", "model.pair"),
    ("cyclegan", "model.pair=[Intera,Intera]", "model.pair"),
])
def test_bad_translator_settings_name_the_field(family: str, override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(TINY[family], ["data.store=/s", *override.split()])


def test_runs_on_the_wrong_scanners_are_refused_before_any_work(store_dir: Path, tmp_path: Path) -> None:
    cases = {
        "subset": (TINY["stargan"], ["data.scanners=[Intera,Unspecified]"],
                   "model.family stargan translates between every scanner of the store"),
        "unpaired": (TINY["cyclegan"], ["data.scanners=[]"], "set data.scanners to the pair"),
        "unknown": (TINY["cyclegan"], ["model.pair=[Intera,Skyra]"], "model.pair: 'Skyra' not in the store's"),
        "typo": (TINY["cyclegan"], ["data.scanners=[Intera,Magnetom]"], "data.scanners: 'Magnetom' not in the store's"),
    }
    for name, (config, overrides, message) in cases.items():
        done = run(train_cmd(store_dir, tmp_path / name, *overrides, config=config))
        assert done.returncode == 1 and message in done.stderr, (name, done.stderr[-1500:])
        assert not (tmp_path / name).exists()


def test_trained_exported_with_the_translator_contract(translator_run: Path, translator_onnx: Path, tmp_path: Path) -> None:
    for name in ("samples_001.png", "loss_curves.png", "model.safetensors"):
        assert (translator_run / name).is_file(), name
    first = json.loads((translator_run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"generator", "discriminator", "cycle", "identity", "scanner_accuracy_fake"} <= set(first)
    translator = Translator(translator_onnx, device="cpu")
    assert translator.metadata.format == "mrgen-translator/1" and translator.metadata.family == "stargan"
    assert translator.targets == list(Vocabulary.method().names) and translator.metadata.latent == 0
    assert translator.metadata.slice_params["slices_per_volume"] == 10
    assert translator.metadata.parity["max_error"] <= TOLERANCE["fp32"]
    # onnxruntime's translation equals the trained torch translator's, at any batch size
    family, model, _ = load_trained(translator_run)
    x = np.random.default_rng(1).random((5, *SHAPE), dtype=np.float32)
    got = translator.translate(x, "Unspecified")
    np.testing.assert_array_equal(got, translator.translate(x, "Unspecified", batch_size=2))
    with torch.no_grad():
        want = family.export_graph(model)(torch.from_numpy(x)[:, None], torch.full((5,), 2))[:, 0].numpy()
    assert np.abs(got - want).max() <= TOLERANCE["fp32"]
    # the other contract's tools refuse it, and int8 is refused for a convolutional translator
    with pytest.raises(ArtifactError, match="is an mrgen-translator model, not an mrgen-decoder .*use mrgen-translate"):
        Sampler(translator_onnx, device="cpu")
    with pytest.raises(ExportError, match="int8 is for the fully connected mrgen-decoder graphs"):
        export_onnx(translator_run, "int8", tmp_path / "t8.onnx")
    assert not (tmp_path / "t8.onnx").exists()


def test_translate_a_volume_a_store_split_and_pngs(cohort_dir: Path, store_dir: Path, translator_onnx: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    volume = sorted(cohort_dir.glob("*.nii.gz"))[0]
    out = tmp_path / "volume.nii.gz"
    assert translate_main([str(translator_onnx), str(volume), "--to", "Intera", "--out", str(out), "--device", "cpu"]) == 0
    assert "10 slices translated to Intera on cpu" in capsys.readouterr().out
    stack = np.asarray(nib.load(out).dataobj).transpose(2, 1, 0)[:, ::-1, :]  # back to (slice, row, column)
    expected = Translator(translator_onnx, "cpu").translate(central_slices(load_volume(volume), SliceParams()), "Intera")
    np.testing.assert_allclose(stack, expected, atol=1e-6)

    h5 = tmp_path / "test.h5"
    assert translate_main([str(translator_onnx), str(store_dir), "--from", "Unspecified", "--to", "Magnetom TrioTim",
                           "--out", str(h5), "--device", "cpu"]) == 0
    test = SliceStore(store_dir).read_split("test", "Unspecified")
    with h5py.File(h5) as f:
        np.testing.assert_array_equal(f["input"][:], test.images.astype(np.float32))
        assert f["translated"].shape == (len(test), *SHAPE) and f.attrs["target"] == "Magnetom TrioTim"
        assert set(f["scanner"][:]) == {2} and f.attrs["mrgen.format"] == "mrgen-translator/1"

    pngs = tmp_path / "pngs"
    assert translate_main([str(translator_onnx), str(store_dir), "--to", "Intera", "--out", str(pngs)]) == 0
    names = sorted(p.name for p in (pngs / "input").iterdir())
    assert (pngs / "grid.png").is_file() and names == sorted(p.name for p in (pngs / "translated").iterdir())
    # the written PNGs read back as the 8-bit images of the slices, and translate again from a folder
    first = read_png(pngs / "input" / names[0])
    assert first.shape == SHAPE
    again = tmp_path / "again.h5"
    assert translate_main([str(translator_onnx), str(pngs / "input"), "--to", "Intera", "--out", str(again)]) == 0
    with h5py.File(again) as f:
        assert f["input"].shape == (len(names), *SHAPE) and f["name"][0].decode() == Path(names[0]).stem
        np.testing.assert_array_equal(f["input"][0], first)


def test_translate_refuses_bad_input_and_writes_nothing(cohort_dir: Path, translator_onnx: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    volume = nib.load(sorted(cohort_dir.glob("*.nii.gz"))[0])
    coarse = tmp_path / "2mm.nii.gz"  # another grid: every second voxel, 2 mm
    nib.save(nib.Nifti1Image(np.asarray(volume.dataobj)[::2, ::2, ::2], volume.affine @ np.diag([2, 2, 2, 1])), coarse)
    small = tmp_path / "small.png"
    small.write_bytes(_png(np.zeros((100, 80))))
    cases = [
        ([str(coarse), "--to", "Intera"], "not on the MNI152 1 mm grid", "mrgen-convert DIR --resample"),
        ([str(sorted(cohort_dir.glob("*.nii.gz"))[0]), "--to", "Skyra"], "unknown scanner 'Skyra'", "Intera"),
        ([str(small), "--to", "Intera"], "slices are 100x80; this model translates 218x182 slices", ""),
        ([str(tmp_path / "none.txt"), "--to", "Intera"], "not a NIfTI volume (.nii/.nii.gz), a slice store", ""),
    ]
    for i, (args, message, hint) in enumerate(cases):
        out = tmp_path / f"out{i}.nii.gz"
        assert translate_main([str(translator_onnx), *args, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert message in err and hint in err, err
        assert not out.exists()
    with pytest.raises(TranslateError, match="no such model file"):
        Translator(tmp_path / "missing.onnx")


def test_a_decoder_is_not_a_translator(trained_run: Path, tmp_path: Path) -> None:
    decoder = export_onnx(trained_run, "fp32", tmp_path / "decoder.onnx").path
    with pytest.raises(ArtifactError, match="is an mrgen-decoder model, not an mrgen-translator .*use mrgen-sample"):
        Translator(decoder, device="cpu")


def test_translate_runs_where_torch_cannot_be_imported(cohort_dir: Path, store_dir: Path, translator_onnx: Path,
                                                       tmp_path: Path) -> None:
    volume = sorted(cohort_dir.glob("*.nii.gz"))[0]
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from mrgen_dist.commands.translate import main
assert main([{str(translator_onnx)!r}, {str(volume)!r}, "--to", "Intera", "--out", {str(tmp_path / "v.nii.gz")!r}]) == 0
assert main([{str(translator_onnx)!r}, {str(store_dir)!r}, "--to", "Intera", "--out", {str(tmp_path / "s.h5")!r}]) == 0
assert sys.modules["torch"] is None
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-2000:]


def _png(image: np.ndarray) -> bytes:
    from mrgen_dist.runtime.png import png_bytes

    return png_bytes(image)


def test_png_reader_takes_every_filter_depth_and_colour_type(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    x = (rng.random(SHAPE) * 0.3 + np.linspace(0, 0.7, SHAPE[1])[None]).astype(np.float32)
    u8, u16 = np.round(x * 255).astype(np.uint8), np.round(x * 65535).astype(np.uint16)
    cases = {"grey8": (Image.fromarray(u8), u8 / 255), "grey16": (Image.fromarray(u16), u16 / 65535),
             "rgb": (Image.fromarray(np.stack([u8] * 3, -1)), u8 / 255),
             "rgba": (Image.fromarray(np.stack([u8, u8, u8, np.full_like(u8, 9)], -1)), u8 / 255)}
    for name, (image, want) in cases.items():
        image.save(tmp_path / f"{name}.png", optimize=True)  # Pillow picks Sub, Up, Average and Paeth rows
        np.testing.assert_allclose(read_png(tmp_path / f"{name}.png"), want, atol=1e-6, err_msg=name)
    (tmp_path / "own.png").write_bytes(_png(x))  # the sampler's own writer: filter None
    np.testing.assert_allclose(read_png(tmp_path / "own.png"), u8 / 255, atol=1e-6)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(PngError, match="not a PNG file"):
        read_png(tmp_path / "bad.png")


def test_png_whose_header_and_data_disagree_is_refused_in_one_line(tmp_path: Path) -> None:
    import struct
    import zlib

    small = _png(np.zeros((5, 5), dtype=np.float32))
    ihdr = small.index(b"IHDR")
    header = struct.pack(">IIBBBBB", 10, 10, 8, 0, 0, 0, 0)  # says 10 x 10; its rows hold 5 x 5
    lying = small[: ihdr + 4] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + small[ihdr + 4 + 17 :]
    (tmp_path / "lying.png").write_bytes(lying)
    with pytest.raises(PngError, match=r"lying.png: corrupt PNG \(its header says 10x10, 8-bit, 1 channel"):
        read_png(tmp_path / "lying.png")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(small)
    (tmp_path / "a" / "2.png").write_bytes(_png(np.zeros((6, 5), dtype=np.float32)))
    from mrgen_dist.runtime.translator import read_pngs

    with pytest.raises(TranslateError, match="the PNGs differ in size"):
        read_pngs(tmp_path / "a")
