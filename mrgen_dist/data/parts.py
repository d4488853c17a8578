"""Conversion in parts: `mrgen-convert --part k/N` converts one of N contiguous ranges of the inputs into a part
store, and `mrgen-convert merge` joins the N finished parts into one store (mrgen_dist.data.convert.merge).

Every part screens the whole input list (cheap: no image is read) and takes the k-th of N contiguous ranges of
what screening kept, so the parts concatenated in order are the inputs of a one-process conversion in its
order; part 1 alone carries the screening's rejections (unknown scanner, duplicate subject). A part is a
complete store of its own (verifiable, usable), whose manifest's `inputs.part` says which part it is and of
which input list (`inputs_sha256`, over every input's key): merge takes parts only of one list, one N, one set
of parameters and split settings, each part exactly once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from mrgen_dist.cli import UserError


class PartError(UserError):
    """Parts that cannot be merged into one store; the message names the part and what differs."""


@dataclass(frozen=True)
class Part:
    """Part `index` (1-based) of `of` contiguous ranges of the screened inputs."""

    index: int
    of: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.of:
            raise ValueError(f"part {self.index}/{self.of}: k must be in 1 .. N")

    @classmethod
    def parse(cls, text: str) -> Part:
        """'k/N' -> Part(k, N)."""
        try:
            k, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"expected k/N (e.g. 2/8), got {text!r}") from None
        return cls(k, n)

    def bounds(self, total: int) -> tuple[int, int]:
        """[start, stop) of this part among `total` inputs: N ranges whose sizes differ by at most one."""
        return (self.index - 1) * total // self.of, self.index * total // self.of

    def record(self, input_keys: list[str]) -> dict[str, Any]:
        """What a part store's manifest carries as `inputs.part`."""
        digest = hashlib.sha256(json.dumps(input_keys).encode()).hexdigest()
        return {**asdict(self), "inputs_sha256": digest}


def check_parts(records: dict[str, dict[str, Any]]) -> None:
    """Refuse parts that are not the N parts of one input list, each exactly once: `records` maps each part's
    path to its manifest's `inputs.part` (or None where it was converted whole)."""
    whole = [path for path, rec in records.items() if not isinstance(rec, dict)]
    if whole:
        raise PartError(f"{whole[0]} is not a part store (converted without --part)")
    first_path, first = next(iter(records.items()))
    for path, rec in records.items():
        if rec.get("of") != first.get("of"):
            raise PartError(f"{path} is part {rec.get('index')}/{rec.get('of')}, {first_path} part "
                            f"{first.get('index')}/{first.get('of')}: parts of one conversion have one N")
        if rec.get("inputs_sha256") != first.get("inputs_sha256"):
            raise PartError(f"{path} and {first_path} were converted from different input lists")
    seen: dict[int, str] = {}
    for path, rec in records.items():
        if rec["index"] in seen:
            raise PartError(f"part {rec['index']}/{rec['of']} given twice: {seen[rec['index']]} and {path}")
        seen[rec["index"]] = path
    missing = [str(k) for k in range(1, first["of"] + 1) if k not in seen]
    if missing:
        raise PartError(f"part(s) {', '.join(missing)} of {first['of']} missing: merge needs every part")
