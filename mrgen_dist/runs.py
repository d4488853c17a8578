"""Reading a finished training run (model.safetensors + config.json): the family, the model and its record.
Used by export, the diagnostics, fine-tuning (`train.init_from`) and families that start from another run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from mrgen_dist.artifacts import RunRecord
from mrgen_dist.cli import UserError
from mrgen_dist.config import model_config
from mrgen_dist.data.store import SliceStore
from mrgen_dist.models import get_family
from mrgen_dist.models.base import Family
from mrgen_dist.scanners import Vocabulary


class RunError(UserError):
    """A run folder that cannot be read; the message names the file."""


#: The keys of a diffusion run's model section that say how it is sampled, not what was trained: the ones
#: `load_trained` may set (mrgen-export onnx ... model.guidance=1).
SAMPLER_KEYS = ("sampler", "sample_steps", "spacing", "guidance", "variance")


def store_mismatch(store: SliceStore, record: RunRecord) -> str | None:
    """Where the run of `record` was trained instead of on `store` ("trained on the store with ..., not on ...":
    its store_sha256 or scanners, names and order, differ), or None where it was trained on it."""
    names, trained = list(store.vocabulary.names), list(record.vocabulary)
    if record.store_sha256 == store.sha256 and trained == names:
        return None
    return (f"trained on the store with store_sha256 {record.store_sha256} and scanners {trained}, "
            f"not on {store.root} (store_sha256 {store.sha256}, scanners {names})")


def load_trained(run_dir: str | Path, sampler: dict | None = None) -> tuple[Family, nn.Module, RunRecord]:
    """The family, trained model (eval mode) and record of a run folder (model.safetensors + config.json);
    a RunError naming the file when either cannot be read or they do not fit together. `sampler` sets
    SAMPLER_KEYS of a diffusion run's model section (the record returned says so)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    record_path, weights = run_dir / RunRecord.NAME, run_dir / "model.safetensors"
    if not record_path.is_file() or not weights.is_file():
        raise RunError(f"{run_dir} has no config.json and model.safetensors (a finished mrgen-train run)")
    record = RunRecord.read(record_path)
    family = _family_of(record, record_path)
    if sampler:
        record = _with_sampler(record, family, sampler, record_path)
    model = family.build(model_config(record.model), Vocabulary.from_names(record.vocabulary), tuple(record.image_shape))
    family.connect(model, load_trained)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{weights}: not a readable safetensors file, truncated or corrupt ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{weights}: does not hold the model that {record_path} describes ({first})") from None
    return family, model.eval(), record


def _with_sampler(record: RunRecord, family: Family, sampler: dict, source: Path) -> RunRecord:
    """The record with its model section's sampler keys set, validated as a config is."""
    if family.kind not in ("diffusion", "refiner"):
        raise RunError(f"{source}: a {family.name} run has no sampler to set ({', '.join(sorted(sampler))})")
    unknown = sorted(set(sampler) - set(SAMPLER_KEYS))
    if unknown:
        raise RunError(f"{source}: model.{unknown[0]} is not a sampler setting; these are: "
                       + ", ".join(f"model.{k}" for k in SAMPLER_KEYS))
    model = {**record.model, **sampler}
    try:
        model_config(model).validate()
    except ValueError as e:  # ConfigError is one
        raise RunError(f"{source} with {', '.join(f'model.{k}={v}' for k, v in sampler.items())}: {e}") from None
    return dataclasses.replace(record, model=model, config={**record.config, "model": model})


def _family_of(record: RunRecord, source: Path) -> Family:
    try:
        return get_family(record.family)
    except ValueError as e:
        raise RunError(f"{source}: {e}") from None


def run_family(run_dir: str | Path) -> Family:
    """The family of a run folder, from its record alone (the weights are not read)."""
    record_path = Path(run_dir) / RunRecord.NAME
    if not record_path.is_file():
        raise RunError(f"{run_dir} has no config.json (a finished mrgen-train run)")
    return _family_of(RunRecord.read(record_path), record_path)


def load_model(run_dir: str | Path) -> nn.Module:
    """The trained model (eval mode) of a run folder; see `load_trained`."""
    return load_trained(run_dir)[1]
