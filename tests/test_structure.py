"""The package's layers, checked from its imports (every import, including those inside functions): no import
cycle, only commands parse arguments, the runtime runs without torch, models never see a cohort generator."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mrgen_dist"
#: Entry modules above the commands: console-script dispatch and the `python -m mrgen_dist.train` shim.
ENTRIES = {"mrgen_dist.entry", "mrgen_dist.train"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (a `from package import name` counts the submodule `name`)."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def _is_under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_cycle() -> None:
    graph = _imports()
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        seen[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if seen.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            elif target not in seen:
                visit(target)
        stack.pop()
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module)


def test_only_commands_parse_arguments() -> None:
    parsers = sorted(m for m, path in _modules().items()
                     if "import argparse" in path.read_text() and not _is_under(m, "mrgen_dist.commands"))
    assert parsers == []


@pytest.mark.parametrize(("importer", "forbidden"), [
    # nothing below the commands imports them
    (None, ("mrgen_dist.commands",)),
    # the runtime is below everything that trains or evaluates
    ("mrgen_dist.runtime", ("mrgen_dist.models", "mrgen_dist.training", "mrgen_dist.export", "mrgen_dist.eval",
                            "mrgen_dist.runs", "mrgen_dist.config", "mrgen_dist.checkpoint")),
    # a model never reads a cohort generator or what sits above it
    ("mrgen_dist.models", ("mrgen_dist.data.demo", "mrgen_dist.training", "mrgen_dist.export", "mrgen_dist.eval",
                           "mrgen_dist.runs", "mrgen_dist.config")),
    ("mrgen_dist.data", ("mrgen_dist.runtime", "mrgen_dist.models", "mrgen_dist.training", "mrgen_dist.export",
                         "mrgen_dist.eval", "mrgen_dist.runs", "mrgen_dist.config")),
    ("mrgen_dist.eval", ("mrgen_dist.training", "mrgen_dist.export")),
    ("mrgen_dist.export", ("mrgen_dist.training", "mrgen_dist.eval")),
])
def test_layers(importer: str | None, forbidden: tuple[str, ...]) -> None:
    graph = _imports()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                   if (importer is None and m not in ENTRIES and not _is_under(m, *forbidden)
                       or importer is not None and _is_under(m, importer))
                   and _is_under(t, *forbidden))
    assert wrong == []


@pytest.mark.integration
def test_runtime_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import mrgen_dist.runtime.sampler, mrgen_dist.runtime.translator, mrgen_dist.runtime.writers\n"
            "import mrgen_dist.commands.sample, mrgen_dist.commands.translate\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
