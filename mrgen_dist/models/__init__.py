"""Model families. Each module here is one family and defines `FAMILY`, an instance of
`mrgen_dist.models.base.Family`; `model.family: <module name>` in a run's YAML picks it.

Adding a family is writing one module (and a YAML config): nothing else names the families.
"""

from __future__ import annotations

import importlib
import pkgutil

from mrgen_dist.models.base import Family

_NOT_FAMILIES = {"base", "networks", "adversarial"}  # shared parts, not families


def family_names() -> list[str]:
    """Every family module of this package, by name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_FAMILIES)


def get_family(name: str) -> Family:
    """The family called `name`; a ValueError listing the known ones when there is none."""
    if name not in family_names():
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(family_names())}")
    family = importlib.import_module(f"{__name__}.{name}").FAMILY
    if family.name != name:
        raise ValueError(f"module mrgen_dist.models.{name} defines family {family.name!r}; the names must agree")
    return family
