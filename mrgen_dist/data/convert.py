"""`mrgen-convert`: NIfTI volumes -> sharded HDF5 slice store (atomic, resumable, parallel).

    mrgen-convert [convert] INPUT_DIR_OR_CSV --out STORE [--workers N] [--resample] [--split subject|slice] ...
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
import io
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mrgen_dist import __version__
from mrgen_dist.artifacts import StoreManifest
from mrgen_dist.atomic import atomic_write
from mrgen_dist.cli import EXIT_ERROR, UserError, positive, run, with_default_command
from mrgen_dist.data.demo import MARKER_FILE
from mrgen_dist.data.inputs import InputError, InputVolume, Rejection, discover_directory, read_manifest, screen
from mrgen_dist.data.shards import ShardArrays, file_digests, write_shard
from mrgen_dist.data.split import SPLIT_UNITS, slice_split, subject_split
from mrgen_dist.data.store import REJECTED_NAME, SliceStore
from mrgen_dist.data.summary import store_summary, write_preview
from mrgen_dist.data.volume import MNI_SHAPE, SliceParams, VolumeRejected, central_slices, load_volume
from mrgen_dist.scanners import Vocabulary

EXIT_OK, EXIT_USAGE, EXIT_REJECTED = 0, 2, 3
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
    # anything after the kept prefix is stale: a later shard cannot be valid if an earlier one was redone;
    # dot files are temporaries of an interrupted run
    for stale in [*shard_dir.glob("shard-*.h5"), *shard_dir.glob("shard-*.json"), *shard_dir.glob(".shard-*")]:
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
    manifest_path = out / StoreManifest.NAME
    if out.exists() and any(out.iterdir()) and not (out / SHARD_DIR).is_dir() and not manifest_path.exists():
        raise InputError(f"{out} exists and is not a slice store; choose an empty or new folder")
    shard_dir = out / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # the store is unfinished until the manifest is rewritten

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
        digests = write_shard(path, arrays, {"format": StoreManifest.FORMAT, "params_key": params_key})
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
        atomic_write(_record_path(path), json.dumps(rec, indent=1))
        records.append(rec)
        rejected.extend(pending_rejected)
        pending.clear()
        consumed.clear()
        pending_rejected.clear()

    bar = tqdm(total=len(kept), initial=cursor, desc="volumes", unit="vol", file=sys.stderr, dynamic_ncols=True)
    with bar:
        for volume, result in zip(todo, _results(todo, options.params, options.workers), strict=True):
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
    _manifest(records, vocabulary, options, rejected, synthetic, description).sealed().write(manifest_path)
    return ConversionResult(out, rejected, shards_written, shards_kept, time.perf_counter() - t0)


def _write_rejected(path: Path, rejected: list[Rejection]) -> None:
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["source", "reason"])
    for r in sorted(rejected, key=lambda r: r.source):
        w.writerow([r.source, r.reason])
    atomic_write(path, text.getvalue())


def _manifest(
    records: list[dict],
    vocabulary: Vocabulary,
    options: ConvertOptions,
    rejected: list[Rejection],
    synthetic: bool,
    description: str,
) -> StoreManifest:
    """The manifest of the store made of `records` (unsealed: `.sealed()` sets its store_sha256)."""
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
    return StoreManifest(
        created_by={"package": "mrgen-dist", "version": __version__},
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        inputs={"description": description, "synthetic": synthetic},
        vocabulary=list(vocabulary.names),
        params={**options.params.to_dict(), "shard_volumes": options.shard_volumes, "image_dtype": "float16"},
        shards=[{key: rec[key] for key in StoreManifest.SHARD_FIELDS} for rec in records],
        split={"unit": options.split_unit, "test_fraction": options.test_fraction, "seed": options.seed, "test": test},
        counts={"volumes": len(volumes), "slices": len(volumes) * k, "per_scanner": per_scanner, "rejected": len(rejected)},
        split_counts=split_counts,
    )


# -- command line ----------------------------------------------------------------------------------------------


class VocabularyError(UserError):
    """A --vocabulary that gives no usable label set."""


def _fraction(text: str) -> float:
    """argparse `type=` for a test fraction in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _slices(text: str) -> int:
    """argparse `type=` for --slices: 1 .. the axial size of the grid."""
    value = positive(int)(text)
    if value > MNI_SHAPE[2]:
        raise argparse.ArgumentTypeError(f"must be at most {MNI_SHAPE[2]} (axial slices of the grid), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mrgen-convert",
        description="Convert T1 NIfTI volumes on the MNI152 1 mm grid into a sharded HDF5 slice store "
        "(`mrgen-convert INPUT --out STORE` is `mrgen-convert convert INPUT --out STORE`), or re-check one.",
        epilog="Exit status: 0 all converted (verify: sound); 3 store written, some inputs rejected (see "
        "rejected.csv); 1 error, no usable store (verify: problems found); 2 usage error.",
    )
    sub = ap.add_subparsers(dest="command", metavar="{convert,verify}")
    c = sub.add_parser(
        "convert",
        help="NIfTI volumes -> slice store (the default command)",
        description="Convert T1 NIfTI volumes on the MNI152 1 mm grid into a sharded HDF5 slice store.",
        epilog="Exit status: 0 all converted; 3 store written, some inputs rejected (see rejected.csv); "
        "1 error, no usable store; 2 usage error.",
    )
    c.add_argument(
        "input", type=Path, help="folder of NIfTI files (IXI/SALD names) or a manifest CSV path,scanner[,subject]"
    )
    c.add_argument("--out", "-o", type=Path, required=True, help="store folder (created; re-running resumes)")
    c.add_argument("--workers", type=positive(int), default=1, help="parallel conversion processes (default 1)")
    c.add_argument("--resample", action="store_true", help="resample volumes on other grids onto the MNI grid")
    c.add_argument("--slices", type=_slices, default=SliceParams.slices_per_volume, help="central axial slices per volume")
    c.add_argument("--shard-volumes", type=positive(int), default=ConvertOptions.shard_volumes, help="volumes per shard")
    c.add_argument("--split", choices=SPLIT_UNITS, default="subject", help="split unit (slice = the thesis's protocol)")
    c.add_argument("--test-fraction", type=_fraction, default=0.1, help="share of the test side, in [0, 1) (default 0.1)")
    c.add_argument("--seed", type=int, default=0, help="seed of the split")
    c.add_argument(
        "--vocabulary",
        default="method",
        help="scanner labels: 'method' (the four of the method, default), 'manifest' (the labels in the CSV's "
        "scanner column) or a comma-separated list in label order",
    )
    c.set_defaults(body=run_convert)
    v = sub.add_parser(
        "verify",
        help="re-check every checksum and count of a store",
        description="Re-check every checksum and count of a store.",
        epilog="Exit status: 0 sound; 1 problems found (each printed on its own line); 2 usage error.",
    )
    v.add_argument("store", type=Path)
    v.set_defaults(body=run_verify)
    return ap


def _vocabulary(spec: str, volumes: list[InputVolume]) -> Vocabulary:
    try:
        if spec == "method":
            return Vocabulary.method()
        if spec == "manifest":
            return Vocabulary.from_labels(v.scanner for v in volumes if v.scanner)
        return Vocabulary.from_names(n.strip() for n in spec.split(",") if n.strip())
    except ValueError as e:
        raise VocabularyError(f"--vocabulary {spec!r}: {e}") from None


def _print_rejections(rejected: list[Rejection]) -> None:
    for r in sorted(rejected, key=lambda r: r.source):
        print(f"  rejected {r.source}: {r.reason}")


def run_convert(args: argparse.Namespace) -> int:
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
    store = SliceStore(result.store)
    print(store_summary(store))
    print(f"preview: {write_preview(store)}")
    _print_rejections(result.rejected)
    print(
        f"{result.shards_written} shards written, {result.shards_kept} kept from an earlier run, "
        f"{result.seconds:.1f} s"
    )
    return EXIT_REJECTED if result.rejected else EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    store = SliceStore(args.store)
    problems = store.verify()
    if problems:
        print(f"{args.store}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_ERROR
    print(store_summary(store))
    print(f"verified: {len(store.shards)} shards, checksums and counts match the manifest")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(with_default_command(argv, ap, "convert"))
    prog = "mrgen-convert" if args.command == "convert" else f"mrgen-convert {args.command}"
    return run(prog, lambda: args.body(args))


if __name__ == "__main__":
    sys.exit(main())
