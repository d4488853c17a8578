"""The real reference (`mrgen-fid reference`): the store's own training slices scored as if a model had
generated them, against the same real test slices, with the same measures.

What a perfect generator of the store's distribution would read at this sample size: precision and recall near
1, FID and KID near their floor at n real test slices, the signature gaps near 0. It tells a target that no model
can reach on a cohort (too few test slices, subjects too unlike each other) from one the models miss. It is
written as `fid_<scanner>.json` records like a model's, with the family `REFERENCE_FAMILY`, so that
`mrgen-compare` shows it as a row of its own (and judges it as the reference, not as a model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from mrgen_dist.artifacts import ModelMetadata
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.features import FidError
from mrgen_dist.eval.results import REFERENCE_FAMILY


@dataclass(frozen=True)
class ReferenceMetadata:
    """The `model` field of the reference's records: its family and the store's scanners, as a model's
    metadata would say them."""

    scanners: list[str]

    def to_props(self) -> dict[str, str]:
        return {ModelMetadata.PREFIX + "family": REFERENCE_FAMILY,
                ModelMetadata.PREFIX + "scanners": json.dumps(self.scanners)}


class TrainingSlices:
    """The store's real training slices in a sampler's place (`score.evaluate_scanner`): `sample` draws n
    distinct slices of one scanner's training split, seeded, so a repeat is another subset."""

    def __init__(self, store: SliceStore):
        self.store = store
        self.metadata = ReferenceMetadata(list(store.vocabulary.names))
        self._loaded: dict[str, np.ndarray] = {}

    def require(self, n: int | None) -> None:
        """Refuse, before any work, a scanner with fewer than `n` training slices (None: as many as its test
        slices)."""
        for scanner in self.store.vocabulary.names:
            have = self.store.expected_count("train", scanner)
            need = self.store.expected_count("test", scanner) if n is None else n
            if need > have:
                raise FidError(f"the reference needs {need} training slices of {scanner!r}; {self.store.root} has "
                               f"{have} (ask for fewer with --n-generated)")

    def sample(self, scanner: str, n: int, seed: int = 0, noise: bool = False) -> np.ndarray:
        """float32 (n, H, W): n distinct training slices of `scanner`, chosen by `seed`. `noise` is accepted
        for the sampler's signature; real slices carry their own."""
        if scanner not in self._loaded:
            self._loaded[scanner] = self.store.read_split("train", scanner).images
        slices = self._loaded[scanner]
        if n > len(slices):
            raise FidError(f"the reference needs {n} training slices of {scanner!r}; {self.store.root} has "
                           f"{len(slices)}")
        pick = np.sort(np.random.default_rng([seed, self.store.vocabulary.index(scanner)]).choice(
            len(slices), n, replace=False))
        return slices[pick].astype(np.float32)
