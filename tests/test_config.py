"""Config dataclasses from YAML with key=value overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mrgen_dist.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "hpc" / "configs"


def test_thesis_config_is_the_thesis_protocol() -> None:
    cfg = load_config(CONFIGS / "thesis.yaml", ["data.store=/x"])
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.train.epochs, cfg.model.latent, cfg.model.loss) == (
        3e-4, 8, 100, 256, "logcosh"
    )


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    """The configs users run, the comparison's included: each loads and passes its family's checks, with the
    paths a command line gives (a refiner's coarse run, a distilled translator's teacher)."""
    cfg = load_config(path, ["data.store=/s"] + {"refiner": ["model.coarse=/c"], "distilled": ["model.teacher=/t"]}
                      .get(yaml.safe_load(path.read_text())["model"]["family"], []))
    assert cfg.model.family and cfg.train.epochs > 0


def test_overrides_and_saved_copy(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "tiny.yaml",
                      ["data.store=/s", "model.hidden=[16, 8]", "optim.lr=1", "train.mixed_precision=bf16"])
    assert cfg.model.hidden == [16, 8] and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").to_dict() == cfg.to_dict()
    assert load_config(tmp_path / "c.yaml", ["train.epochs=9"]).fingerprint() == cfg.fingerprint()
    assert load_config(tmp_path / "c.yaml", ["optim.lr=2"]).fingerprint() != cfg.fingerprint()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'; valid keys: train.out, train.epochs"),
        ("trian.epochs=3", "unknown config section 'trian'"),
        ("train.epochs=three", "train.epochs: expected int"),
        ("model.hidden=64", "model.hidden: expected a list"),
        ("train.mixed_precision=fp8", "mixed_precision must be no, bf16 or fp16"),
        ("epochs", "is not of the form section.key=value"),
        ("model.family=gan9", "model.family: unknown model family 'gan9'; known families: atlas, atlasgan, cvae,"),
        ("model.loss=l1", "model.loss must be one of logcosh, mse"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("train.max_steps=-3", "train.max_steps must be >= 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("optim.betas=[0.9, 1.5]", "optim.betas must be two numbers b with 0 <= b < 1"),
        ("model.latent=0", "model.latent and model.hidden widths must be >= 1"),
        ("optim.lr=.inf", "optim.lr: expected a finite number, got inf"),
        ("optim.lr=.nan", "optim.lr: expected a finite number, got nan"),
        ("optim.lr=inf", "optim.lr: expected a finite number, got inf"),
        ("optim.weight_decay=.inf", "optim.weight_decay: expected a finite number, got inf"),
        ("optim.grad_clip=.nan", "optim.grad_clip: expected a finite number, got nan"),
        ("optim.betas=[0.9, .nan]", "optim.betas: expected a finite number, got [0.9, nan]"),
        ("model.kl_weight=.inf", "model.kl_weight: expected a finite number, got inf"),
        ("train.seed=-1", "train.seed must be an integer from 0 to 4294967295, got -1"),
        ("data.seed=-1", "data.seed must be an integer from 0 to 4294967295, got -1"),
        ("train.seed=4294967296", "train.seed must be an integer from 0 to 4294967295, got 4294967296"),
        ("optim.schedule=linear", "optim.schedule must be one of constant, cosine, got 'linear'"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio in [0, 1], got 0 and 2.0"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    ],
)
def test_bad_keys_and_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(CONFIGS / "tiny.yaml", ["data.store=/s", override])


def test_a_schedule_enters_the_fingerprint_with_the_runs_length() -> None:
    def fingerprint(*overrides: str) -> str:
        return load_config(CONFIGS / "tiny.yaml", ["data.store=/s", *overrides]).fingerprint()

    # the constant rate hashes as runs from before optim.schedule did, so their checkpoints still resume
    assert fingerprint() == fingerprint("train.epochs=9") == "5bae58461a84cf67"
    cosine = fingerprint("optim.schedule=cosine")
    assert cosine != fingerprint()
    # with a schedule the rate at a step depends on the run's length and on the schedule's settings
    assert len({cosine, fingerprint("optim.schedule=cosine", "train.epochs=9"),
                fingerprint("optim.schedule=cosine", "optim.min_lr_ratio=0.5"), fingerprint("optim.warmup_steps=5"),
                fingerprint("optim.schedule=cosine", "train.max_steps=7")}) == 5


def test_store_is_required() -> None:
    with pytest.raises(ConfigError, match="data.store is required"):
        load_config(CONFIGS / "tiny.yaml")


def test_the_family_picks_the_model_section() -> None:
    cfg = load_config(CONFIGS / "tiny.yaml", ["data.store=/s"])
    assert cfg.model.family == "cvae" and type(cfg.model).__name__ == "CVAEConfig"
    vae = load_config(CONFIGS / "tiny.yaml", ["data.store=/s", "model.family=vae"])
    assert type(vae.model).__name__ == "VAEConfig" and vae.model.hidden == [32]  # the YAML's keys apply to it
    assert vae.fingerprint() != cfg.fingerprint()
