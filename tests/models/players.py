"""The two-player families test-sized, built in this process: shared by the GAN and the translator tests."""

from __future__ import annotations

import torch

from mrgen_dist.config import load_config
from mrgen_dist.models import get_family
from mrgen_dist.scanners import Vocabulary
from tests.launch import TINY_GANS, TINY_TRANSLATORS

SHAPE = (218, 182)
TINY = {**TINY_GANS, **TINY_TRANSLATORS}


def tiny(family: str, *overrides: str):
    """The family's tiny config (tests/assets/tiny_<family>.yaml) with `overrides`: its model section."""
    return load_config(TINY[family], ["data.store=/s", *overrides]).model


def built(family: str, *overrides: str):
    """(family, config, model, optimizers) of the tiny config, seeded, with Adam (lr 1e-3, betas 0.5, 0.999)."""
    config = tiny(family, *overrides)
    fam = get_family(family)
    torch.manual_seed(0)
    model = fam.build(config, Vocabulary.method(), SHAPE)
    optimizers = fam.optimizers(model, lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.999)))
    return fam, config, model, optimizers
