"""Console-script entry points: each command checks its extra before importing what needs it.

The base install (`pip install mrgen-dist`) is the torch-free sampler; a command that needs an extra says
which one to install instead of failing with an ImportError.
"""

from __future__ import annotations

import importlib

from mrgen_dist.cli import MissingExtra, report, require_extra


def _launch(prog: str, module: str, extra: str | None) -> int:
    if extra is not None:
        try:
            require_extra(extra, prog)
        except MissingExtra as e:
            return report(prog, e)
    return importlib.import_module(module).main()


def convert() -> int:
    return _launch("mrgen-convert", "mrgen_dist.commands.convert", "train")


def demo_data() -> int:
    return _launch("mrgen-demo-data", "mrgen_dist.commands.demo_data", "train")


def train() -> int:
    return _launch("mrgen-train", "mrgen_dist.commands.train", "train")


def export() -> int:
    return _launch("mrgen-export", "mrgen_dist.commands.export", "train")


def sample() -> int:
    return _launch("mrgen-sample", "mrgen_dist.commands.sample", None)


def translate() -> int:
    return _launch("mrgen-translate", "mrgen_dist.commands.translate", None)


def fid() -> int:
    return _launch("mrgen-fid", "mrgen_dist.commands.fid", "fid")


def compare() -> int:
    return _launch("mrgen-compare", "mrgen_dist.commands.compare", "fid")
