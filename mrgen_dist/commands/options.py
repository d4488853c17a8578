"""argparse pieces every command shares: number types that refuse bad values at parse time (a usage error,
exit status 2, before anything is written) and sub-commands with a default one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def with_default_command(argv: Sequence[str] | None, parser: argparse.ArgumentParser, default: str) -> list[str]:
    """`argv` with `default` put in front when its first word is not one of `parser`'s sub-commands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = next(
        (set(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), set()
    )
    if not argv or argv[0] not in commands | {"-h", "--help"}:
        argv.insert(0, default)
    return argv


def positive(kind: type = int) -> Callable[[str], int | float]:
    """argparse `type=` for a number that must be > 0."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def non_negative_int(text: str) -> int:
    """argparse `type=` for an integer that must be >= 0 (a seed, a count that may be zero)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
