"""Run configuration: dataclasses loaded from YAML, with `section.key=value` overrides from the command line.

    cfg = load_config("hpc/configs/thesis.yaml", ["optim.lr=1e-4", "train.epochs=5"])

Unknown keys are errors (a typo must not silently fall back to a default). Values are parsed as YAML
scalars, so `model.hidden=[512,256]`, `train.mixed_precision=bf16` and `data.scanner=null` all work.
The `model:` section belongs to the family that `model.family` names (default `cvae`); its keys are that
family's config dataclass (mrgen_dist/models/).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from mrgen_dist.atomic import atomic_write
from mrgen_dist.cli import UserError
from mrgen_dist.data.residency import RESIDENCIES
from mrgen_dist.lr_schedule import SCHEDULES
from mrgen_dist.models import get_family
from mrgen_dist.models.base import ModelConfig
from mrgen_dist.models.cvae import CVAEConfig


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    store: str = ""  # path of the slice store (required)
    seed: int = 0  # seeds the per-epoch shuffle and the per-rank partition
    # train (and test) on the slices of these scanners only; empty: every scanner of the store. The model keeps
    # the store's whole vocabulary, so its scanner ids are the store's.
    scanners: list[str] = field(default_factory=list)
    # where the split lives while training: auto | device | host | stream (mrgen_dist/data/residency.py); the
    # batches are the same in each, so neither key is part of the checkpoint's fingerprint
    residency: str = "auto"
    prefetch: int = 4  # stream: batches read ahead of the loop by a background thread


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0: no clipping
    fused: bool = True  # fused Adam kernel where torch has one (CPU and CUDA): ~7x faster optimizer step
    schedule: str = "constant"  # the rate over the run: constant | cosine (to min_lr_ratio x lr; lr_schedule.py)
    warmup_steps: int = 0  # optimizer steps of a linear warm-up from lr / warmup_steps to lr
    min_lr_ratio: float = 0.1  # cosine: the last step's rate, a fraction of lr

    @property
    def scheduled(self) -> bool:
        """Whether the rate changes over the run (a schedule or a warm-up): then the run's length matters."""
        return self.schedule != "constant" or self.warmup_steps > 0


@dataclass
class TrainConfig:
    out: str = "runs/cvae"
    epochs: int = 100
    max_steps: int = 0  # 0: epochs decide; >0: stop after this many optimizer steps
    batch_size: int = 8  # per process
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: at the end of each epoch only
    keep_checkpoints: int = 2
    seed: int = 0  # model init and reparameterisation noise
    init_from: str = ""  # a finished run of the same family, model and store shape: its weights start this run
    world_size: int = 0  # expected number of processes; 0: accept what the launcher gives
    sample_every: int = 10  # epochs between sample grids (and the last epoch)
    tracker: str = "clearml"  # clearml | none
    project: str = "mrgen-dist"
    run_name: str = ""


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=CVAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of what a checkpoint depends on: data, model and optimizer (not run length or logging)."""
        d = self.to_dict()
        data = {k: v for k, v in d["data"].items() if k not in ("residency", "prefetch")}
        keep = {"data": data, "model": d["model"], "optim": d["optim"], "train": {
            k: d["train"][k] for k in ("batch_size", "grad_accum", "mixed_precision", "seed")
        }}
        if d["train"]["init_from"]:  # only when set: the checkpoints of runs from before the option still resume
            keep["train"]["init_from"] = d["train"]["init_from"]
        if self.optim.scheduled:  # the rate at a step depends on the run's length
            keep["train"].update({k: d["train"][k] for k in ("epochs", "max_steps")})
        else:
            for key in ("schedule", "warmup_steps", "min_lr_ratio"):  # as runs from before the option hashed
                del keep["optim"][key]
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = getattr(typ, "__origin__", None)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typ.__args__
        return [_coerce(v, inner, key) for v in value]
    if typ is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ in (int, float, str) and not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
    return value


def _apply(section_obj: Any, values: dict[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            valid = ", ".join(f"{prefix}{k}" for k in hints)
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys: {valid}")
        setattr(section_obj, key, _coerce(value, hints[key], f"{prefix}{key}"))


def model_config(values: dict[str, Any]) -> ModelConfig:
    """The `model:` section as its family's config dataclass."""
    name = values.get("family", ModelConfig.family)
    try:
        config = get_family(str(name)).Config()
    except ValueError as e:
        raise ConfigError(f"model.family: {e}") from None
    _apply(config, values, "model.")
    return config


def from_dict(d: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    for section, values in (d or {}).items():
        if section not in {f.name for f in dataclasses.fields(RunConfig)}:
            raise ConfigError(f"unknown config section {section!r}; valid sections: data, model, optim, train")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        if section == "model":
            cfg.model = model_config(values)
        else:
            _apply(getattr(cfg, section), values, f"{section}.")
    return cfg


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = yaml.safe_load(raw)
    return nested


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    base: dict[str, Any] = {}
    if path is not None:
        try:
            base = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    for section, values in parse_overrides(list(overrides)).items():
        base.setdefault(section, {}).update(values)
    cfg = from_dict(base)
    validate(cfg)
    return cfg


#: Seeds are used as unsigned 32-bit integers (numpy's SeedSequence, torch's generators).
SEED_LIMIT = 2**32


def _non_finite(section: str, obj: Any) -> str | None:
    """The first float field (or float in a list field) of a config dataclass that is NaN or infinite, as
    `section.key: expected a finite number, got value`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                return f"{section}.{f.name}: expected a finite number, got {value}"
    return None


def validate(cfg: RunConfig) -> None:
    for section in ("data", "model", "optim", "train"):  # every float of every section, before any range check
        bad = _non_finite(section, getattr(cfg, section))
        if bad:
            raise ConfigError(bad)
    for key in ("data.seed", "train.seed"):
        section, name = key.split(".")
        seed = getattr(getattr(cfg, section), name)
        if not 0 <= seed < SEED_LIMIT:
            raise ConfigError(f"{key} must be an integer from 0 to {SEED_LIMIT - 1}, got {seed}")
    if not cfg.data.store:
        raise ConfigError("data.store is required (path of a slice store made by mrgen-convert)")
    if cfg.data.residency not in RESIDENCIES:
        raise ConfigError(f"data.residency must be one of {', '.join(RESIDENCIES)}, got {cfg.data.residency!r}")
    if cfg.data.prefetch < 1:
        raise ConfigError(f"data.prefetch must be >= 1, got {cfg.data.prefetch}")
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16, got {cfg.train.mixed_precision!r}")
    if cfg.train.tracker not in ("clearml", "none"):
        raise ConfigError(f"train.tracker must be clearml or none, got {cfg.train.tracker!r}")
    for key in ("batch_size", "grad_accum", "keep_checkpoints", "sample_every", "epochs"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1")
    for key in ("max_steps", "checkpoint_every", "world_size"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {getattr(cfg.train, key)}")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.optim.grad_clip < 0 or cfg.optim.weight_decay < 0:
        raise ConfigError("optim.grad_clip and optim.weight_decay must be >= 0")
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.optim.schedule!r}")
    if cfg.optim.warmup_steps < 0 or not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1], got "
                          f"{cfg.optim.warmup_steps} and {cfg.optim.min_lr_ratio}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers b with 0 <= b < 1, got {cfg.optim.betas}")
