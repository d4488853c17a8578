"""`mrgen-convert`: NIfTI volumes -> sharded HDF5 slice store (atomic, resumable, parallel).

    mrgen-convert INPUT_DIR_OR_CSV --out STORE [--workers N] [--resample] [--split subject|slice] ...
    mrgen-convert verify STORE

Exit status of a conversion: 0 every input converted; 3 the store was written but some inputs were
rejected (listed in STORE/rejected.csv and in the summary); 1 an error, no usable store (unusable input,
nothing accepted); 2 a usage error. `verify`: 0 sound, 1 problems found (each printed on its own line).

Shards hold a fixed number of accepted volumes (`--shard-volumes`, the last one fewer). Each shard is
written under a temporary name and renamed, then a small record `shard-NNNNN.json` (its sha256 and the
inputs it consumed) is written the same way. A re-run keeps every shard, from the first on, whose record
matches the inputs and parameters and whose file matches its sha256, and converts from the first one that
does not. The manifest is written last, so a store without one is an unfinished conversion.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from mrgen_dist import __version__
from mrgen_dist.data.demo import MARKER_FILE
from mrgen_dist.data.inputs import InputError, InputVolume, Rejection, discover_directory, read_manifest, screen
from mrgen_dist.data.shards import ShardArrays, file_digests, write_shard
from mrgen_dist.data.split import SPLIT_UNITS, slice_split, subject_split
from mrgen_dist.data.store import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    REJECTED_NAME,
    SliceStore,
    StoreError,
    compute_store_sha256,
    write_preview,
)
from mrgen_dist.data.volume import SliceParams, VolumeRejected, central_slices, load_volume
from mrgen_dist.scanners import Vocabulary

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3
SHARD_DIR = "shards"


@dataclass(frozen=True)
class ConvertOptions:
    params: SliceParams = field(default_factory=SliceParams)
    shard_volumes: int = 100
    split_unit: str = "subject"
    test_fraction: float = 0.1
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        if self.shard_volumes < 1:
            raise ValueError("shard_volumes must be >= 1")
        if self.split_unit not in SPLIT_UNITS:
            raise ValueError(f"split must be one of {SPLIT_UNITS}")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")


@dataclass
class ConversionResult:
    store: Path
    rejected: list[Rejection]
    shards_written: int
    shards_kept: int
    seconds: float


# -- per volume (runs in worker processes) ---------------------------------------------------------------


def _convert_volume(job: tuple[str, SliceParams]) -> np.ndarray | str:
    """Slices of one volume as float16, or the one-line reason it was rejected."""
    path, params = job
    try:
        return central_slices(load_volume(path, params.resample), params).astype(np.float16)
    except VolumeRejected as e:
        return str(e)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure on one file rejects that file, not the run
        return f"unexpected error: {type(e).__name__}: {e}"[:200]


# -- the store -----------------------------------------------------------------------------------------------


def _record_path(shard_path: Path) -> Path:
    return shard_path.with_suffix(".json")


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _resume(shard_dir: Path, volumes: list[InputVolume], params_key: str) -> tuple[list[dict], int]:
    """Records of the leading shards that are complete and current, and how many inputs they consumed."""
    keys = [v.key() for v in volumes]
    records: list[dict] = []
    cursor = 0
    while True:
        path = shard_dir / f"shard-{len(records):05d}.h5"
        rec_path = _record_path(path)
        if not rec_path.is_file() or not path.is_file():
            break
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, json.JSONDecodeError):
            break
        consumed = rec.get("inputs", [])
        if rec.get("params_key") != params_key or consumed != keys[cursor : cursor + len(consumed)]:
            break
        if file_digests(path)["sha256"] != rec.get("sha256"):
            break
        records.append(rec)
        cursor += len(consumed)
    # anything after the kept prefix is stale: a later shard cannot be valid if an earlier one was redone
    for stale in list(shard_dir.glob("shard-*.h5")) + list(shard_dir.glob("shard-*.json")) + list(shard_dir.glob(".shard-*")):
        if stale.name.startswith(".") or int(stale.stem.split("-")[1]) >= len(records):
            stale.unlink()
    return records, cursor


def _results(volumes: list[InputVolume], params: SliceParams, workers: int) -> Iterator[np.ndarray | str]:
    jobs = [(str(v.path), params) for v in volumes]
    if workers == 1:
        yield from map(_convert_volume, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_convert_volume, jobs, chunksize=1)


def convert(
    volumes: list[InputVolume],
    vocabulary: Vocabulary,
    out: Path,
    options: ConvertOptions = ConvertOptions(),
    synthetic: bool = False,
    description: str = "",
) -> ConversionResult:
    """Convert `volumes` into the store at `out`; see the module doc for resume and atomicity."""
    t0 = time.perf_counter()
    if out.exists() and any(out.iterdir()) and not (out / SHARD_DIR).is_dir() and not (out / MANIFEST_NAME).exists():
        raise InputError(f"{out} exists and is not a slice store; choose an empty or new folder")
    shard_dir = out / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # the store is unfinished until the manifest is rewritten

    kept, rejected = screen(volumes, vocabulary)
    params_key = hashlib.sha256(
        json.dumps([options.params.to_dict(), vocabulary.names, options.shard_volumes], sort_keys=True).encode()
    ).hexdigest()
    records, cursor = _resume(shard_dir, kept, params_key)
    shards_kept = len(records)
    for rec in records:
        rejected.extend(Rejection(**r) for r in rec["rejected"])

    todo = kept[cursor:]
    pending: list[tuple[InputVolume, np.ndarray]] = []
    consumed: list[InputVolume] = []
    pending_rejected: list[Rejection] = []

    def flush() -> None:
        path = shard_dir / f"shard-{len(records):05d}.h5"
        k = options.params.slices_per_volume
        arrays = ShardArrays(
            images=np.concatenate([s for _, s in pending]),
            scanner=np.repeat([vocabulary.index(v.scanner) for v, _ in pending], k),
            subject=np.repeat([v.subject for v, _ in pending], k),
            slice_index=np.tile(np.asarray(options.params.slice_indices()), len(pending)),
            source=np.repeat([v.source for v, _ in pending], k),
        )
        digests = write_shard(path, arrays, {"format": FORMAT, "params_key": params_key})
        rec = {
            "file": f"{SHARD_DIR}/{path.name}",
            **digests,
            "bytes": path.stat().st_size,
            "slices": len(arrays),
            "params_key": params_key,
            "volumes": [{"subject": v.subject, "scanner": v.scanner, "source": v.source} for v, _ in pending],
            "inputs": [v.key() for v in consumed],
            "rejected": [r.__dict__ for r in pending_rejected],
        }
        _write_json_atomic(_record_path(path), rec)
        records.append(rec)
        rejected.extend(pending_rejected)
        pending.clear()
        consumed.clear()
        pending_rejected.clear()

    bar = tqdm(total=len(kept), initial=cursor, desc="volumes", unit="vol", file=sys.stderr, dynamic_ncols=True)
    with bar:
        for volume, result in zip(todo, _results(todo, options.params, options.workers)):
            consumed.append(volume)
            if isinstance(result, str):
                pending_rejected.append(Rejection(volume.source, result))
            else:
                pending.append((volume, result))
            if len(pending) == options.shard_volumes:
                flush()
            bar.update()
    if pending:
        flush()
    rejected.extend(pending_rejected)
    shards_written = len(records) - shards_kept

    _write_rejected(out / REJECTED_NAME, rejected)
    if not records:
        raise InputError(f"no volume was accepted ({len(rejected)} rejected; reasons in {out / REJECTED_NAME})")
    manifest = _manifest(records, vocabulary, options, rejected, synthetic, description)
    _write_json_atomic(out / MANIFEST_NAME, manifest)
    return ConversionResult(out, rejected, shards_written, shards_kept, time.perf_counter() - t0)


def _write_rejected(path: Path, rejected: list[Rejection]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "reason"])
        for r in sorted(rejected, key=lambda r: r.source):
            w.writerow([r.source, r.reason])
    tmp.replace(path)


def _manifest(
    records: list[dict],
    vocabulary: Vocabulary,
    options: ConvertOptions,
    rejected: list[Rejection],
    synthetic: bool,
    description: str,
) -> dict:
    k = options.params.slices_per_volume
    volumes = [v for rec in records for v in rec["volumes"]]
    per_scanner = {n: {"volumes": 0, "slices": 0} for n in vocabulary.names}
    for v in volumes:
        per_scanner[v["scanner"]]["volumes"] += 1
        per_scanner[v["scanner"]]["slices"] += k
    if options.split_unit == "subject":
        by_scanner = {n: [v["subject"] for v in volumes if v["scanner"] == n] for n in vocabulary.names}
        test = subject_split(by_scanner, options.test_fraction, options.seed)
        test_set = set(test)
        slice_is_test = np.repeat([v["subject"] in test_set for v in volumes], k)
    else:
        test = slice_split(len(volumes) * k, options.test_fraction, options.seed)
        slice_is_test = np.zeros(len(volumes) * k, dtype=bool)
        slice_is_test[test] = True
    slice_scanner = np.repeat([v["scanner"] for v in volumes], k)
    split_counts = {
        side: {n: int(np.sum((slice_scanner == n) & (slice_is_test == (side == "test")))) for n in vocabulary.names}
        for side in ("train", "test")
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": {"package": "mrgen-dist", "version": __version__},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"description": description, "synthetic": synthetic},
        "vocabulary": list(vocabulary.names),
        "params": {**options.params.to_dict(), "shard_volumes": options.shard_volumes, "image_dtype": "float16"},
        "shards": [{key: rec[key] for key in ("file", "sha256", "xxh3_128", "bytes", "slices")} for rec in records],
        "split": {"unit": options.split_unit, "test_fraction": options.test_fraction, "seed": options.seed, "test": test},
        "counts": {"volumes": len(volumes), "slices": len(volumes) * k, "per_scanner": per_scanner, "rejected": len(rejected)},
        "split_counts": split_counts,
    }
    manifest["store_sha256"] = compute_store_sha256(manifest)
    return manifest


# -- command line ----------------------------------------------------------------------------------------------


def _convert_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mrgen-convert",
        description="Convert T1 NIfTI volumes on the MNI152 1 mm grid into a sharded HDF5 slice store. "
        "`mrgen-convert verify STORE` re-checks a store.",
        epilog="Exit status: 0 all converted; 3 store written, some inputs rejected (see rejected.csv); "
        "1 error, no usable store; 2 usage error.",
    )
    ap.add_argument("input", type=Path, help="folder of NIfTI files (IXI/SALD names) or a manifest CSV path,scanner[,subject]")
    ap.add_argument("--out", "-o", type=Path, required=True, help="store folder (created; re-running resumes)")
    ap.add_argument("--workers", type=int, default=1, help="parallel conversion processes (default 1)")
    ap.add_argument("--resample", action="store_true", help="resample volumes on other grids onto the MNI grid")
    ap.add_argument("--slices", type=int, default=SliceParams.slices_per_volume, help="central axial slices per volume")
    ap.add_argument("--shard-volumes", type=int, default=ConvertOptions.shard_volumes, help="volumes per shard")
    ap.add_argument("--split", choices=SPLIT_UNITS, default="subject", help="split unit (slice = the thesis's protocol)")
    ap.add_argument("--test-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0, help="seed of the split")
    ap.add_argument(
        "--vocabulary",
        default="method",
        help="scanner labels: 'method' (the four of the method, default), 'manifest' (the labels in the CSV's "
        "scanner column) or a comma-separated list in label order",
    )
    return ap


def _vocabulary(spec: str, volumes: list[InputVolume]) -> Vocabulary:
    if spec == "method":
        return Vocabulary.method()
    if spec == "manifest":
        return Vocabulary.from_labels(v.scanner for v in volumes if v.scanner)
    return Vocabulary.from_names(n.strip() for n in spec.split(",") if n.strip())


def _print_rejections(rejected: list[Rejection]) -> None:
    for r in sorted(rejected, key=lambda r: r.source):
        print(f"  rejected {r.source}: {r.reason}")


def run_convert(argv: list[str]) -> int:
    args = _convert_parser().parse_args(argv)
    try:
        options = ConvertOptions(
            params=SliceParams(slices_per_volume=args.slices, resample=args.resample),
            shard_volumes=args.shard_volumes,
            split_unit=args.split,
            test_fraction=args.test_fraction,
            seed=args.seed,
            workers=args.workers,
        )
        is_csv = args.input.suffix.lower() == ".csv"
        volumes = read_manifest(args.input) if is_csv else discover_directory(args.input)
        vocabulary = _vocabulary(args.vocabulary, volumes)
        folder = args.input.parent if is_csv else args.input
        result = convert(
            volumes,
            vocabulary,
            args.out,
            options,
            synthetic=(folder / MARKER_FILE).is_file(),
            description=f"{'manifest' if is_csv else 'folder'} {args.input}",
        )
    except (InputError, ValueError) as e:
        print(f"mrgen-convert: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    store = SliceStore(result.store)
    print(store.summary())
    print(f"preview: {write_preview(store)}")
    _print_rejections(result.rejected)
    print(
        f"{result.shards_written} shards written, {result.shards_kept} kept from an earlier run, "
        f"{result.seconds:.1f} s"
    )
    return EXIT_REJECTED if result.rejected else EXIT_OK


def run_verify(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mrgen-convert verify", description="Re-check every checksum and count of a store.")
    ap.add_argument("store", type=Path)
    args = ap.parse_args(argv)
    try:
        store = SliceStore(args.store)
        problems = store.verify()
    except StoreError as e:
        print(f"mrgen-convert verify: {e}", file=sys.stderr)
        return EXIT_ERROR
    if problems:
        print(f"{args.store}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_ERROR
    print(store.summary())
    print(f"verified: {len(store.shards)} shards, checksums and counts match the manifest")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "verify":
        return run_verify(argv[1:])
    return run_convert(argv)


if __name__ == "__main__":
    sys.exit(main())
