"""Typed hand-offs between stages: the store manifest, a run's config.json and an exported model's metadata.

Each artefact is a dataclass with one reader and one writer. Each carries its format name and version;
a reader refuses a file of another kind or of a newer version, and names the file and the field when one
is missing or of the wrong type. Stdlib only, so the torch-free sampler reads ONNX metadata with it.

    manifest = StoreManifest.read(store / "manifest.json")
    record = RunRecord.read(run / "config.json")
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, source="decoder.onnx")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mrgen_dist.atomic import atomic_write
from mrgen_dist.cli import UserError


class ArtifactError(UserError):
    """An artefact that cannot be read: not found, not the expected kind, too new, or a field missing."""


def _check_fields(cls: type, values: dict[str, Any], source: str, shown_prefix: str = "") -> dict[str, Any]:
    """The values of `cls`'s fields found in `values` (keyed by field name), each present unless it has a
    default and of its declared type; errors name the field as `shown_prefix + name`."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        key = shown_prefix + f.name
        if f.name not in values:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ArtifactError(f"{source}: missing field {key!r}")
        value, want = values[f.name], typing.get_origin(hints[f.name]) or hints[f.name]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ArtifactError(f"{source}: field {key!r} should be {want.__name__}, found {type(value).__name__}")
        out[f.name] = value
    return out


def _check_version(source: str, kind: str, expected_kind: str, version: Any, supported: int, key: str) -> None:
    if kind != expected_kind:
        raise ArtifactError(f"{source}: field {key!r} is {kind!r}, expected {expected_kind!r} (not this kind of file)")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{source}: field {key!r} has no integer version ({version!r})")
    if version > supported:
        raise ArtifactError(
            f"{source}: written as {expected_kind} version {version} by a newer mrgen-dist; this version reads up "
            f"to {supported}: upgrade mrgen-dist"
        )


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class JsonArtifact:
    """A dataclass artefact stored as one JSON object with its `format` name and `format_version`."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, **dataclasses.asdict(self)}

    def write(self, path: str | os.PathLike) -> Path:
        return atomic_write(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def _read_fields(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The checked field values of the file: its kind, a version this code reads, every field typed."""
        d = _read_json(path)
        _check_version(str(path), d.get("format"), cls.FORMAT, d.get("format_version"), cls.VERSION, "format")
        if d["format_version"] < 1:
            raise ArtifactError(f"{path}: field 'format_version' is {d['format_version']}; versions start at 1")
        return _check_fields(cls, d, str(path))

    @classmethod
    def read(cls, path: str | os.PathLike) -> JsonArtifact:
        return cls(**cls._read_fields(path))


@dataclass
class StoreManifest(JsonArtifact):
    """`STORE/manifest.json`: what a slice store holds and how it was made (see mrgen_dist.data.store)."""

    NAME: ClassVar[str] = "manifest.json"
    FORMAT: ClassVar[str] = "mrgen-slice-store"
    VERSION: ClassVar[int] = 2
    #: What `store_sha256` covers: every field of the manifest but itself, so that no part of it (counts
    #: included) can be edited unnoticed. It is the store's identity, recorded by checkpoints, models and FID
    #: caches. Version 1 covered only IDENTITY_V1; manifests written as version 1 are read with that rule.
    IDENTITY: ClassVar[tuple[str, ...]] = (
        "format", "format_version", "vocabulary", "params", "shards", "split", "counts", "split_counts",
        "created_by", "created_utc", "inputs",
    )
    IDENTITY_V1: ClassVar[tuple[str, ...]] = ("format_version", "vocabulary", "params", "shards", "split")
    SHARD_FIELDS: ClassVar[tuple[str, ...]] = ("file", "sha256", "xxh3_128", "bytes", "slices")

    vocabulary: list
    params: dict
    shards: list
    split: dict
    counts: dict
    split_counts: dict
    created_by: dict = field(default_factory=dict)
    created_utc: str = ""
    inputs: dict = field(default_factory=dict)
    format_version: int = VERSION
    store_sha256: str = ""

    def identity_sha256(self) -> str:
        """The hash `store_sha256` must equal, by the rule of this manifest's format_version."""
        d = self.to_dict()
        identity = {k: d[k] for k in (self.IDENTITY_V1 if self.format_version == 1 else self.IDENTITY)}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def sealed(self) -> StoreManifest:
        """This manifest with `store_sha256` set from its identity fields (all of them but store_sha256 from
        version 2 on)."""
        return dataclasses.replace(self, store_sha256=self.identity_sha256())

    @classmethod
    def read(cls, path: str | os.PathLike) -> StoreManifest:
        """Read and check: kind, version, fields, shard entries, and that `store_sha256` matches."""
        manifest = cls(**cls._read_fields(path))
        for i, shard in enumerate(manifest.shards):
            if not isinstance(shard, dict):
                raise ArtifactError(f"{path}: shards[{i}] should be an object, found {type(shard).__name__}")
            missing = [k for k in cls.SHARD_FIELDS if k not in shard]
            if missing:
                raise ArtifactError(f"{path}: shards[{i}] lacks {', '.join(missing)} (convert again with this version)")
        if not manifest.store_sha256:
            raise ArtifactError(f"{path}: missing field 'store_sha256'")
        if manifest.identity_sha256() != manifest.store_sha256:
            raise ArtifactError(f"{path}: manifest does not match its store_sha256 (edited or corrupt)")
        return manifest


@dataclass
class RunRecord(JsonArtifact):
    """`RUN/config.json`, written by mrgen-train beside model.safetensors: everything needed to rebuild the
    model (family, its config, image shape, vocabulary) and what made it."""

    NAME: ClassVar[str] = "config.json"
    FORMAT: ClassVar[str] = "mrgen-run"
    VERSION: ClassVar[int] = 1

    family: str
    model: dict  # the family's config section, as in the run's config.yaml
    image_shape: list
    vocabulary: list
    intensity: str
    store_sha256: str
    config: dict  # the whole run config
    steps: int
    package_version: str
    #: how the run went: seconds and images/s over its epochs, processes, parameters (empty in older records)
    training: dict = field(default_factory=dict)
    #: how the store cut and scaled its slices (mrgen_dist.data.volume.SliceParams), and its `axial_indices`
    #: (empty in older records)
    slice_params: dict = field(default_factory=dict)
    format_version: int = VERSION


@dataclass
class ModelMetadata:
    """The `metadata_props` of an exported ONNX model, keys `mrgen.<field>` (documented in export/README.md).

    `format` is `<contract>/<version>`; the contract `mrgen-decoder` is (z float32 [B, latent], scanner
    int64 [B]) -> image float32 [B, 1, H, W] in [0, 1] (and sigma float32 [B, 1, H, W] where `noise` is set);
    `mrgen-translator` is (image float32 [B, 1, H, W] in [0, 1], scanner int64 [B], the target) -> image
    float32 [B, 1, H, W] in [0, 1], with `latent` 0 and the scanners it translates to in `targets`;
    `mrgen-denoiser` is (x float32 [B, 1, H, W], t float32 [B], scanner int64 [B], the null label allowed) ->
    out float32 [B, 1, H, W], a diffusion model's prediction, sampled as `sampler` says (a DDIM run), with
    `latent` H * W (the initial noise that the deterministic DDIM run maps to a slice). `mrgen-refiner` is
    (x, t, scanner as for the denoiser, coarse float32 [B, 1, H, W], a coarse generator's slice in [0, 1]) ->
    (out, the prediction of the scaled fine band's diffusion; base float32 [B, 1, H, W], the coarse slice's
    low-pass), sampled around the `mrgen-decoder` file that `coarse` names, with `latent` that file's latent
    + H * W (models/refiner.py).
    """

    PREFIX: ClassVar[str] = "mrgen."
    DECODER: ClassVar[str] = "mrgen-decoder"
    TRANSLATOR: ClassVar[str] = "mrgen-translator"
    DENOISER: ClassVar[str] = "mrgen-denoiser"
    REFINER: ClassVar[str] = "mrgen-refiner"
    GAUSSIAN_NOISE: ClassVar[str] = "gaussian"  # image + sigma * n
    RICIAN_NOISE: ClassVar[str] = "rician"  # |image + sigma * (n1 + i n2)|, the noise of a magnitude MR image
    CHI_NOISE: ClassVar[str] = "chi"  # a multi-coil magnitude with correlated noise (mrgen_dist.runtime.noise)
    NOISE_KINDS: ClassVar[tuple[str, ...]] = (GAUSSIAN_NOISE, RICIAN_NOISE, CHI_NOISE)
    VERSION: ClassVar[int] = 1
    #: (key, value) pairs stored as JSON text; the rest are plain strings (or str(int)).
    _JSON: ClassVar[tuple[str, ...]] = ("scanners", "image_shape", "config", "parity", "targets", "slice_params",
                                        "sampler", "noise_texture", "variants", "coarse")

    format: str
    scanners: list
    latent: int
    image_shape: list
    intensity: str
    precision: str
    store_sha256: str
    config: dict
    package_version: str
    family: str = "cvae"
    #: The parity check made at export: max |onnxruntime - torch fp32| over the check batches (`max_error`),
    #: its limit (`tolerance`), the CPU and onnxruntime that measured it, and for int8 files `draws`: a few
    #: prior draws with their float32 reference images, which the sampler re-checks on the CPU it runs on
    #: (mrgen_dist.runtime.sampler). Absent (empty) in files exported before it existed.
    parity: dict = field(default_factory=dict)
    #: one of NOISE_KINDS when the graph has the second output `sigma`, the learned observation noise around
    #: `image` that `mrgen-sample --noise` draws ("gaussian": image + sigma n; "rician": the magnitude
    #: |image + sigma (n1 + i n2)|, with `image` the noise-free magnitude; "chi": the magnitude of a multi-coil
    #: chain with correlated noise, shaped per scanner by `noise_texture`); empty for a graph without noise.
    noise: str = ""
    #: "chi" noise: each scanner's extra degrees of freedom and correlation kernel
    #: (mrgen_dist.runtime.noise.NoiseTexture); empty for the other kinds.
    noise_texture: dict = field(default_factory=dict)
    #: mrgen-translator: the scanner names it translates to (all of `scanners`, or a CycleGAN's pair)
    targets: list = field(default_factory=list)
    #: how the training store cut and scaled its slices (mrgen_dist.data.volume.SliceParams): mrgen-translate
    #: takes a NIfTI volume's slices by the same rule; its `axial_indices` are the levels a level-conditioned
    #: generator was trained on. Empty in files exported before it existed.
    slice_params: dict = field(default_factory=dict)
    #: mrgen-denoiser: how to sample it (mrgen_dist.runtime.diffusion.SamplerSettings), e.g. {"name": "ddim",
    #: "steps": 50, "guidance": 3.0, "prediction": "v", "schedule": "cosine", "timesteps": 1000,
    #: "null_label": 4}; empty for the other contracts (and in files exported before it existed).
    sampler: dict = field(default_factory=dict)
    #: int8: files beside this one with the same model in another weight layout, each {"file": name in this
    #: file's folder, "layout": "u8s8", "sha256": of that file}; the sampler runs the fastest one that passes
    #: this file's parity draws on the CPU it runs on (mrgen_dist.runtime.sampler). Empty for the others.
    variants: list = field(default_factory=list)
    #: mrgen-refiner: the coarse generator's file beside this one, {"file": name in this file's folder,
    #: "sha256": of that file}; empty for the other contracts.
    coarse: dict = field(default_factory=dict)

    @property
    def contract(self) -> str:
        return self.format.rsplit("/", 1)[0]

    def to_props(self) -> dict[str, str]:
        props = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            props[self.PREFIX + f.name] = json.dumps(value) if f.name in self._JSON else str(value)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], source: str, contract: str | tuple[str, ...] = DECODER
                   ) -> ModelMetadata:
        """Parse and check the metadata of `source`; refuses another contract (`contract`: the one the reader
        takes, or a tuple of those it takes, e.g. the sampler's decoder and denoiser) or a newer version."""
        key = cls.PREFIX + "format"
        if key not in props:
            raise ArtifactError(f"{source} is not an mrgen-dist model (no {key} metadata); export one with "
                                "`mrgen-export onnx`")
        kind, _, version = props[key].rpartition("/")
        tools = {cls.DECODER: "it samples slices from z: use mrgen-sample",
                 cls.DENOISER: "it samples slices by denoising: use mrgen-sample",
                 cls.REFINER: "it samples slices by refining a coarse generator's: use mrgen-sample",
                 cls.TRANSLATOR: "it translates real slices: use mrgen-translate"}
        accepted = (contract,) if isinstance(contract, str) else tuple(contract)
        if kind in accepted:
            contract = kind
        elif kind in tools and all(c in tools for c in accepted):
            raise ArtifactError(f"{source} is an {kind} model, not an {' or '.join(accepted)} ({tools[kind]})")
        else:
            contract = accepted[0]
        _check_version(source, kind, contract, int(version) if version.isdigit() else version, cls.VERSION, key)
        values: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            text = props.get(cls.PREFIX + f.name)
            if text is None:
                continue
            try:
                values[f.name] = (json.loads(text) if f.name in cls._JSON
                                  else int(text) if hints[f.name] is int else text)
            except ValueError:
                raise ArtifactError(f"{source}: metadata {cls.PREFIX + f.name} is not a valid "
                                    f"{hints[f.name].__name__}: {text[:60]!r}") from None
        return cls(**_check_fields(cls, values, source, shown_prefix=cls.PREFIX))
