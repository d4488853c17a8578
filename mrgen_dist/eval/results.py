"""The result files of `mrgen-fid` as typed records: one writer and one reader per file, in the style of
`mrgen_dist.artifacts`.

    ScannerScore      OUT/fid_<scanner>.json  mrgen-fid score, one per scanner (eval/score.py)
    Generation        OUT/generation.json     mrgen-fid score --scanner all: sampling, label effect (eval/score.py)
    Conditioning      OUT/conditioning.json   the conditioning check (eval/conditioning.py)
    Diagnostics       OUT/diagnostics.json    mrgen-fid diagnose: z-probe, reconstructions, swaps (eval/diagnostics.py)
    TranslationScore  OUT/translation.json    mrgen-fid translation (eval/translation.py)

    record.write(out / record.file_name)
    record = Conditioning.read(out / "conditioning.json")
    files = read_folder(out)   # every result file of a results folder, by file name

A file is one JSON object: the record's `kind` and `version`, then one key per field, nested where the record
nests (a per-repeat row, the signature, the z-probe). A reader refuses a file of another kind, of a newer
version, or with a value of the wrong type, with an ArtifactError naming the file (and the field). A file
without `kind` and `version` was written by a release before them: it is read as version 0 of the kind its file
name says, so older results folders still report and compare. A field the file lacks reads as None (a file
of an older release, a measure not taken): the tables show "—". Keys the record does not know are ignored.

A new measure is a field with default None on the record of the file it belongs in, set by the module that
computes it; it needs no new version. A field whose meaning or type changes needs VERSION + 1 (and the reader
of the old version, as `StoreManifest` has).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mrgen_dist.artifacts import ArtifactError, ModelMetadata, _read_json
from mrgen_dist.atomic import atomic_write
from mrgen_dist.scanners import slug


def _wrong_type(source: str, key: str, want: str, value: Any) -> ArtifactError:
    return ArtifactError(f"{source}: field {key!r} should be {want}, found {type(value).__name__}")


def _typed(value: Any, hint: Any, source: str, key: str) -> Any:
    """`value` of a JSON file as the type `hint` of a field (`key` names it in errors): a nested record from its
    object, lists and dicts element by element, an integer where a float is declared as that float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is types.UnionType:  # X | None
        return None if value is None else _typed(value, args[0], source, key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _wrong_type(source, key, "an object", value)
        return hint._from_fields(value, source, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise _wrong_type(source, key, "a list", value)
        return [_typed(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong_type(source, key, "an object", value)
        return {k: _typed(v, args[1], source, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise _wrong_type(source, key, hint.__name__, value)
    return value


@dataclass(frozen=True)
class Part:
    """A record, or an object nested in one: its fields are the JSON keys."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def _from_fields(cls, values: dict[str, Any], source: str, prefix: str = "") -> Any:
        """The record of the JSON object `values`, each field checked against its type; a missing field is its
        default (None), or an error naming the field where it has none."""
        hints = typing.get_type_hints(cls)
        fields = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                fields[f.name] = _typed(values[f.name], hints[f.name], source, prefix + f.name)
            elif f.default is dataclasses.MISSING:
                raise ArtifactError(f"{source}: missing field {prefix + f.name!r}")
        return cls(**fields)


@dataclass(frozen=True)
class ResultFile(Part):
    """A record stored as one JSON file with its `kind` and `version`."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int]
    #: The file's name in a results folder (a glob pattern where it names a scanner); a file without `kind`
    #: (version 0) is taken for this record when its name matches.
    NAME: ClassVar[str]

    @property
    def file_name(self) -> str:
        return self.NAME

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "version": self.VERSION, **dataclasses.asdict(self)}

    def write(self, path: str | os.PathLike) -> Path:
        """Write the file atomically; returns `path`."""
        return atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> Any:
        """The record of the JSON object `data` read from `source` (a path: its name tells a version-0 file's
        kind); refuses another kind, a newer version or a field of the wrong type."""
        kind, version = data.get("kind"), data.get("version")
        if kind is None and version is None:
            if not Path(source).match(cls.NAME):
                raise ArtifactError(f"{source}: no 'kind', and not named {cls.NAME}: not a {cls.KIND} file")
        elif kind != cls.KIND:
            raise ArtifactError(f"{source}: a {kind!r} file, expected {cls.KIND!r} (not this kind of file)")
        elif not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ArtifactError(f"{source}: 'version' should be a whole number from 1, found {version!r}")
        elif version > cls.VERSION:
            raise ArtifactError(f"{source}: written as {cls.KIND} version {version} by a newer mrgen-dist; this "
                                f"version reads up to {cls.VERSION}: upgrade mrgen-dist")
        return cls._from_fields(data, source)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Any:
        return cls.from_dict(_read_json(path), str(path))


# -- fid_<scanner>.json ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Repeat(Part):
    """One repeat: a fresh generated set (its seed) scored against the real test slices."""

    seed: int | None = None
    fid: float | None = None
    kid: float | None = None
    kid_std: float | None = None


@dataclass(frozen=True)
class Signature(Part):
    """The scanner signature of real and generated slices in head masks of the real ones (eval/quality.py), in
    intensity units of [0, 1]."""

    intensity_w1: float | None = None  # Wasserstein-1 of the brain intensities
    noise_real: float | None = None  # background noise (std)
    noise_generated: float | None = None
    sharpness_real: float | None = None  # mean gradient in the brain
    sharpness_generated: float | None = None


#: The family a `ScannerScore.model` names when the scored slices are the store's own training slices (the
#: real reference, eval/reference.py), and what the comparison table calls that row.
REFERENCE_FAMILY = "real"
REFERENCE_TITLE = "real training slices"


@dataclass(frozen=True)
class ScannerScore(ResultFile):
    """OUT/fid_<scanner>.json: one scanner's generated sets scored against its real test slices (eval/score.py)."""

    KIND: ClassVar[str] = "mrgen-scanner-score"
    VERSION: ClassVar[int] = 1
    NAME: ClassVar[str] = "fid_*.json"

    scanner: str
    n_real: int | None = None
    n_generated: int | None = None
    fid_n_generated: int | None = None  # FID on the first n_real generated slices
    fid_biased: bool | None = None  # FID on fewer than 2,048 slices: biased upwards
    noise: bool | None = None  # drawn with the model's learned observation noise
    repeats: list[Repeat] | None = None
    fid_mean: float | None = None
    fid_std: float | None = None
    kid_mean: float | None = None
    kid_std: float | None = None
    # the quality measures of the first repeat's set (score.quality_measures)
    prdc_k: int | None = None
    ms_ssim_pairs: int | None = None
    precision: float | None = None
    recall: float | None = None
    density: float | None = None
    coverage: float | None = None
    ms_ssim: float | None = None
    ms_ssim_real: float | None = None
    signature: Signature | None = None
    warnings: list[str] | None = None
    sampling_seconds: float | None = None
    sampling_images_per_s: float | None = None
    real_features_cached: bool | None = None
    extractor: str | None = None
    store_sha256: str | None = None
    model: dict[str, str] | None = None  # the decoder's ONNX metadata (ModelMetadata.to_props), less its config
    package_version: str | None = None

    @property
    def file_name(self) -> str:
        return f"fid_{slug(self.scanner)}.json"

    @property
    def family(self) -> str | None:
        """The scored model's family, from its metadata."""
        return (self.model or {}).get(ModelMetadata.PREFIX + "family")

    @property
    def scanners(self) -> list[str] | None:
        """The scored model's scanner list (its labels in order), from its metadata; None when absent."""
        text = (self.model or {}).get(ModelMetadata.PREFIX + "scanners")
        try:
            names = json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            return None
        return [str(s) for s in names] if isinstance(names, list) else None


# -- generation.json --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelEffect(Part):
    """The same latent draws decoded for every scanner (eval/quality.label_effect): mean |difference| per pixel
    between scanners and between draws, and their ratio (None where it is 0 / 0 or x / 0)."""

    between_scanners: float | None = None
    between_draws: float | None = None
    ratio: float | None = None


@dataclass(frozen=True)
class Generation(ResultFile):
    """OUT/generation.json: what the sampler did for the scored sets, and the label effect (eval/score.py)."""

    KIND: ClassVar[str] = "mrgen-generation"
    VERSION: ClassVar[int] = 1
    NAME: ClassVar[str] = "generation.json"

    scanners: list[str] | None = None
    store_sha256: str | None = None
    noise: bool | None = None
    n_generated: list[int] | None = None  # per scanner
    repeats: int | None = None
    sampled_images: int | None = None
    sampling_seconds: float | None = None
    sampling_images_per_s: float | None = None
    sampler_device: str | None = None
    sampler_provider: str | None = None
    label_effect: LabelEffect | None = None  # None with one scanner
    label_effect_draws: int | None = None
    label_effect_seed: int | None = None
    model: dict[str, str] | None = None
    package_version: str | None = None


# -- conditioning.json ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditioning(ResultFile):
    """OUT/conditioning.json: generated slices recognised as the scanner asked for (eval/conditioning.py)."""

    KIND: ClassVar[str] = "mrgen-conditioning"
    VERSION: ClassVar[int] = 1
    NAME: ClassVar[str] = "conditioning.json"

    scanners: list[str] | None = None
    n_train: list[int] | None = None
    n_test: list[int] | None = None
    n_generated: list[int] | None = None
    generated_seed: int | None = None
    noise: bool | None = None
    real_test_accuracy: float | None = None
    generated_accuracy: float | None = None
    confusion: list[list[int]] | None = None  # rows: scanner asked for, columns: scanner recognised
    #: train on synthetic, test on real: a classifier fitted on the generated slices only (labelled with the
    #: scanner asked for), scored on the real test slices; None before it was measured
    synthetic_trained_accuracy: float | None = None
    #: per scanner: median nearest-neighbour distance (Inception features) of the generated slices to the real
    #: training slices over that of the real test slices (eval/quality.memorisation_ratio); below 1: closer to
    #: the training slices than new real slices are
    memorisation_ratio: list[float] | None = None
    classifier: str | None = None
    extractor: str | None = None
    store_sha256: str | None = None


# -- diagnostics.json -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZProbe(Part):
    """A scanner classifier on the posterior means of the real slices (eval/diagnostics.py)."""

    accuracy: float | None = None
    chance: float | None = None
    confusion: list[list[int]] | None = None  # rows: true scanner, columns: predicted from z
    n_train: list[int] | None = None
    n_test: list[int] | None = None
    latent: int | None = None
    classifier: str | None = None


#: What `Reconstruction.source` says the slices scored are.
DECODED_SOURCE = "the real test slices' posterior means, decoded with their labels"
REFINED_SOURCE = "the real test slices' low-pass, refined with their labels"


@dataclass(frozen=True)
class Reconstruction(Part):
    """The conditioning check's classifier on reconstructions of the real test slices (eval/diagnostics.py): a
    decoder's of their posterior means, a refiner's of their low-pass."""

    accuracy: float | None = None
    confusion: list[list[int]] | None = None  # rows: true scanner (decoded with its label), columns: recognised
    real_test_accuracy: float | None = None
    n_test: int | None = None
    noise: bool | None = None  # whether the reconstructions drew the model's learned noise
    classifier: str | None = None
    source: str | None = None  # what was reconstructed: DECODED_SOURCE or REFINED_SOURCE (None: written before)
    # per scanner, the reconstructions against the real train slices (Inception, k = 5): what the model reaches
    # with the real anatomy given
    precision: list[float] | None = None
    recall: list[float] | None = None

    @property
    def refined(self) -> bool:
        """Whether these are a refiner's refinements of the real low-pass (its ceiling), not decoded means."""
        return self.source == REFINED_SOURCE


@dataclass(frozen=True)
class Swap(Part):
    """The real test slices with one component replaced by their reconstructions', as the conditioning check
    reads them (eval/swaps.py)."""

    region: str | None = None  # background | rim | interior
    band: str | None = None  # all | coarse | fine
    pixels: int | None = None  # in the region
    accuracy: float | None = None
    confusion: list[list[int]] | None = None  # rows: true scanner, columns: recognised


@dataclass(frozen=True)
class Diagnostics(ResultFile):
    """OUT/diagnostics.json: where a trained run keeps the scanner, and its decoder's ceiling (eval/diagnostics.py)."""

    KIND: ClassVar[str] = "mrgen-diagnostics"
    VERSION: ClassVar[int] = 1
    NAME: ClassVar[str] = "diagnostics.json"

    scanners: list[str] | None = None
    store_sha256: str | None = None
    run: str | None = None
    family: str | None = None
    title: str | None = None
    parameters: int | None = None
    #: the run's record of its training (`RunRecord.training`, free-form there: seconds, images_per_s, ...)
    training: dict[str, Any] | None = None
    encoder: bool | None = None  # whether the family has an encoder (posterior means to probe)
    z_probe: ZProbe | None = None
    reconstruction: Reconstruction | None = None
    swaps: list[Swap] | None = None  # the component-swap probe (--swaps)
    reason: str | None = None  # why there is no z-probe or reconstruction
    extractor: str | None = None
    device: str | None = None
    package_version: str | None = None


# -- translation.json -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kid(Part):
    """KID of the slices translated to one target against its real test slices."""

    mean: float | None = None
    std: float | None = None
    subset_size: int | None = None


@dataclass(frozen=True)
class TranslationScore(ResultFile):
    """OUT/translation.json: a translator's conditioning, SSIM, cycle SSIM, KID and identity
    (eval/translation.py). Per-pair matrices: rows source scanner, columns target (vocabulary order)."""

    KIND: ClassVar[str] = "mrgen-translation-score"
    VERSION: ClassVar[int] = 1
    NAME: ClassVar[str] = "translation.json"

    store_sha256: str | None = None
    scanners: list[str] | None = None
    model: str | None = None  # the ONNX file
    family: str | None = None
    precision: str | None = None  # of the ONNX file (fp32, ...)
    targets: list[str] | None = None
    n_per_source: dict[str, int] | None = None
    classifier: str | None = None
    real_test_accuracy: float | None = None
    conditioning: float | None = None
    conditioning_per_pair: list[list[float | None]] | None = None
    confusion: list[list[int]] | None = None  # rows: target, columns: recognised
    ssim_matched: float | None = None
    ssim_matched_per_pair: list[list[float | None]] | None = None
    cycle_ssim: float | None = None
    cycle_ssim_per_pair: list[list[float | None]] | None = None
    kid: dict[str, Kid] | None = None  # per target scanner
    kid_mean: float | None = None
    change: list[list[float | None]] | None = None  # mean |G(x, t) - x|
    identity_smallest: bool | None = None
    identity_misses: list[str] | None = None
    translate_images_per_s: float | None = None
    translator_device: str | None = None
    rows_columns: str | None = None


# -- levels.json ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelCurve(Part):
    """One scanner's head fraction per asked level, real and generated, and how closely they agree."""

    scanner: str | None = None
    real: list[float] | None = None
    generated: list[float] | None = None
    correlation: float | None = None  # Pearson, over the levels
    mean_abs_difference: float | None = None


@dataclass(frozen=True)
class LevelFollowing(ResultFile):
    """OUT/levels.json: does a level-conditioned generator make the level it is asked for (eval/levels.py)?"""

    KIND: ClassVar[str] = "mrgen-level-following"
    VERSION: ClassVar[int] = 1
    NAME: ClassVar[str] = "levels.json"

    levels: list[int] | None = None
    n_generated: int | None = None  # per scanner and level
    head_threshold: float | None = None
    curves: list[LevelCurve] | None = None
    store_sha256: str | None = None
    package_version: str | None = None


#: Every result file, fid_*.json first.
RECORDS: tuple[type[ResultFile], ...] = (ScannerScore, Conditioning, Generation, Diagnostics, TranslationScore,
                                         LevelFollowing)


def read_folder(folder: str | os.PathLike) -> dict[str, ResultFile]:
    """Every result file in `folder`, by file name: the fid_*.json in name order, then the others present."""
    return {path.name: record.read(path) for record in RECORDS for path in sorted(Path(folder).glob(record.NAME))
            if path.is_file()}
