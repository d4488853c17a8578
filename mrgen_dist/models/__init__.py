"""Model families, registered by name in `FAMILIES`; `model.family: <name>` in a run's YAML picks one.

Each family module defines `FAMILY`, an instance of `mrgen_dist.models.base.Family` with its `kind` (what it
exports: a decoder, a translator or a diffusion denoiser). Adding a family is writing its module and one line
here (and a YAML config); the shared parts that families are built from live in `models/parts/`.
"""

from __future__ import annotations

from mrgen_dist.models import (
    atlas,
    atlasgan,
    cvae,
    cvaegan,
    cyclegan,
    dcgan,
    diffusion,
    distilled,
    gmvae,
    refiner,
    stargan,
    vae,
    wgangp,
)
from mrgen_dist.models.base import Family

FAMILIES: dict[str, Family] = {module.FAMILY.name: module.FAMILY for module in (
    cvae, vae, gmvae, atlas,  # variational autoencoders
    dcgan, wgangp, cvaegan, atlasgan,  # adversarial generators
    stargan, cyclegan, distilled,  # translators
    diffusion, refiner,  # denoisers
)}


def family_names() -> list[str]:
    """Every registered family, by name."""
    return sorted(FAMILIES)


def get_family(name: str) -> Family:
    """The family called `name`; a ValueError listing the known ones when there is none."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(family_names())}")
    return FAMILIES[name]
