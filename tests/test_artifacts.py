"""Typed artefacts: one writer and one reader each, versioned, errors that name the file and the field."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mrgen_dist.artifacts import ArtifactError, ModelMetadata, RunRecord, StoreManifest


def _record() -> RunRecord:
    return RunRecord(family="cvae", model={"family": "cvae", "latent": 8}, image_shape=[218, 182],
                     vocabulary=["A", "B"], intensity="[0, 1]", store_sha256="ab" * 32, config={"x": 1}, steps=3,
                     package_version="0.1.0")


def test_run_record_round_trip_and_errors(tmp_path: Path) -> None:
    path = _record().write(tmp_path / "config.json")
    assert RunRecord.read(path) == _record()
    raw = json.loads(path.read_text())
    assert (raw["format"], raw["format_version"]) == ("mrgen-run", 1)
    for edit, message in (
        (lambda d: d.pop("vocabulary"), "config.json: missing field 'vocabulary'"),
        (lambda d: d.update(steps="3"), "config.json: field 'steps' should be int, found str"),
        (lambda d: d.update(format_version=2),
         "written as mrgen-run version 2 by a newer mrgen-dist; this version reads up to 1"),
        (lambda d: d.update(format="mrgen-slice-store"), "field 'format' is 'mrgen-slice-store', expected 'mrgen-run'"),
    ):
        bad = dict(raw)
        edit(bad)
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ArtifactError, match=message.replace("(", r"\(")):
            RunRecord.read(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="config.json: unreadable"):
        RunRecord.read(tmp_path / "config.json")
    with pytest.raises(ArtifactError, match="nothing.json: no such file"):
        RunRecord.read(tmp_path / "nothing.json")


def test_store_manifest_is_sealed_by_its_identity(store_dir: Path, tmp_path: Path) -> None:
    manifest = StoreManifest.read(store_dir / StoreManifest.NAME)
    assert manifest.identity_sha256() == manifest.store_sha256 and manifest.vocabulary
    copy = manifest.write(tmp_path / "manifest.json")
    assert StoreManifest.read(copy) == manifest
    edited = dataclasses.replace(manifest, vocabulary=manifest.vocabulary[::-1])
    edited.write(copy)
    with pytest.raises(ArtifactError, match="does not match its store_sha256"):
        StoreManifest.read(copy)
    assert StoreManifest.read(edited.sealed().write(copy)).vocabulary == manifest.vocabulary[::-1]
    # format 2: store_sha256 covers every other field, counts included
    assert set(StoreManifest.IDENTITY) == set(manifest.to_dict()) - {"store_sha256"}
    for name in StoreManifest.IDENTITY:
        if name in ("format", "format_version"):
            continue
        value = getattr(manifest, name)
        changed = value + "x" if isinstance(value, str) else {**value, "x": 1} if isinstance(value, dict) else value * 2
        dataclasses.replace(manifest, **{name: changed}).write(copy)
        with pytest.raises(ArtifactError, match="does not match its store_sha256"):
            StoreManifest.read(copy)


def test_store_manifest_version_1_keeps_its_identity_rule(store_dir: Path, tmp_path: Path) -> None:
    manifest = StoreManifest.read(store_dir / StoreManifest.NAME)
    v1 = dataclasses.replace(manifest, format_version=1).sealed()
    assert v1.store_sha256 != manifest.store_sha256
    path = v1.write(tmp_path / "manifest.json")
    assert StoreManifest.read(path) == v1  # read back as written: version 1, its own hash
    loose = dataclasses.replace(v1, counts={**v1.counts, "volumes": 99})  # not covered by format 1
    assert StoreManifest.read(loose.write(path)).counts["volumes"] == 99
    with pytest.raises(ArtifactError, match=r"shards\[0\] should be an object, found int"):
        StoreManifest.read(dataclasses.replace(manifest, shards=[1]).sealed().write(path))
    with pytest.raises(ArtifactError, match="versions start at 1"):
        StoreManifest.read(dataclasses.replace(manifest, format_version=0).sealed().write(path))


def test_model_metadata_round_trip_and_errors() -> None:
    meta = ModelMetadata(format="mrgen-decoder/1", scanners=["A", "B"], latent=8, image_shape=[218, 182],
                         intensity="[0, 1]", precision="fp32", store_sha256="0" * 64, config={"a": [1]},
                         package_version="0.1.0", family="vae")
    props = meta.to_props()
    assert props["mrgen.latent"] == "8" and json.loads(props["mrgen.scanners"]) == ["A", "B"]
    assert ModelMetadata.from_props(props, "m.onnx") == meta
    assert meta.contract == ModelMetadata.DECODER
    with pytest.raises(ArtifactError, match="m.onnx: missing field 'mrgen.scanners'"):
        ModelMetadata.from_props({k: v for k, v in props.items() if k != "mrgen.scanners"}, "m.onnx")
    with pytest.raises(ArtifactError, match="m.onnx: metadata mrgen.latent is not a valid int"):
        ModelMetadata.from_props({**props, "mrgen.latent": "eight"}, "m.onnx")
    with pytest.raises(ArtifactError, match="by a newer mrgen-dist"):
        ModelMetadata.from_props({**props, "mrgen.format": "mrgen-decoder/7"}, "m.onnx")
    with pytest.raises(ArtifactError, match="is not an mrgen-dist model"):
        ModelMetadata.from_props({}, "m.onnx")
    old = {k: v for k, v in props.items() if k != "mrgen.family"}  # files exported before families existed
    assert ModelMetadata.from_props(old, "m.onnx").family == "cvae"


@pytest.mark.integration
def test_stdlib_only() -> None:
    """The sampler reads these without torch, yaml or any other third-party package."""
    code = ("import sys; import mrgen_dist.artifacts, mrgen_dist.cli, mrgen_dist.atomic, mrgen_dist.scanners; "
            "print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'numpy', 'yaml', 'h5py', 'onnxruntime'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
