"""`mrgen-convert`: NIfTI volumes (a folder or a CSV manifest) -> a verified slice store (whole, or one part of
it with --part k/N); `mrgen-convert merge PART...` joins the parts; `mrgen-convert verify STORE`.
The conversion itself is `mrgen_dist.data.convert.convert` (and `merge`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrgen_dist.cli import EXIT_ERROR, UserError, run
from mrgen_dist.commands.options import non_negative_int, positive, with_default_command
from mrgen_dist.data.convert import (
    EXIT_OK,
    EXIT_REJECTED,
    ConversionResult,
    ConvertOptions,
    NothingAccepted,
    convert,
    merge,
)
from mrgen_dist.data.demo import MARKER_FILE
from mrgen_dist.data.inputs import InputVolume, Rejection, discover_directory, read_manifest
from mrgen_dist.data.parts import Part
from mrgen_dist.data.split import SPLIT_UNITS
from mrgen_dist.data.store import SliceStore
from mrgen_dist.data.summary import store_summary
from mrgen_dist.data.volume import MNI_SHAPE, SliceParams
from mrgen_dist.scanners import Vocabulary


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


def _part(text: str) -> Part:
    """argparse `type=` for --part k/N."""
    try:
        return Part.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mrgen-convert",
        description="Convert T1 NIfTI volumes on the MNI152 1 mm grid into a sharded HDF5 slice store "
        "(`mrgen-convert INPUT --out STORE` is `mrgen-convert convert INPUT --out STORE`), or re-check one.",
        epilog="Exit status: 0 all converted (verify: sound); 3 store written, some inputs rejected (see "
        "rejected.csv); 1 error, no usable store (verify: problems found); 2 usage error.",
    )
    sub = ap.add_subparsers(dest="command", metavar="{convert,merge,verify}")
    c = sub.add_parser(
        "convert",
        help="NIfTI volumes -> slice store (the default command)",
        description="Convert T1 NIfTI volumes on the MNI152 1 mm grid into a sharded HDF5 slice store.",
        epilog="Exit status: 0 all converted; 3 store written, some inputs rejected (see rejected.csv); "
        "1 error, no new store (the one in --out, if any, is unchanged); 2 usage error.",
    )
    c.add_argument(
        "input", type=Path, help="folder of NIfTI files (IXI/SALD names) or a manifest CSV path,scanner[,subject]"
    )
    c.add_argument("--out", "-o", type=Path, required=True,
                   help="store folder (created; re-running resumes; a finished store from the same inputs and "
                   "parameters is left as it is)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace a finished store in --out made from other inputs or parameters (it is kept "
                   "until the new one is complete)")
    c.add_argument("--workers", type=positive(int), default=1, help="parallel conversion processes (default 1)")
    c.add_argument("--resample", action="store_true", help="resample volumes on other grids onto the MNI grid")
    c.add_argument("--slices", type=_slices, default=SliceParams.slices_per_volume, help="central axial slices per volume")
    c.add_argument("--shard-volumes", type=positive(int), default=ConvertOptions.shard_volumes, help="volumes per shard")
    c.add_argument("--split", choices=SPLIT_UNITS, default="subject", help="split unit (slice = the thesis's protocol)")
    c.add_argument("--test-fraction", type=_fraction, default=0.1, help="share of the test side, in [0, 1) (default 0.1)")
    c.add_argument("--seed", type=non_negative_int, default=0, help="seed of the split (an integer >= 0)")
    c.add_argument(
        "--vocabulary",
        default="method",
        help="scanner labels: 'method' (the four of the method, default), 'manifest' (the labels in the CSV's "
        "scanner column) or a comma-separated list in label order",
    )
    c.add_argument("--part", type=_part, metavar="k/N",
                   help="convert only the k-th of N contiguous parts of the inputs into --out (a Slurm array: "
                   "k = the task id); join the N part stores with `mrgen-convert merge`")
    c.set_defaults(body=run_convert)
    m = sub.add_parser(
        "merge",
        help="join the part stores of `convert --part k/N` into one store",
        description="Join the N finished part stores of one `mrgen-convert --part k/N` conversion into one store "
        "(one manifest, one split by subject across the parts, one store_sha256): the slices of a one-process "
        "conversion, in its order. Each part is verified first; parts of other inputs, parameters or split "
        "settings are refused.",
        epilog="Exit status: 0 merged (3: some inputs were rejected, see rejected.csv); 1 error, no new store; "
        "2 usage error.",
    )
    m.add_argument("parts", type=Path, nargs="+", metavar="PART", help="the part stores, in any order")
    m.add_argument("--out", "-o", type=Path, required=True, help="the merged store's folder")
    m.add_argument("--overwrite", action="store_true",
                   help="replace a finished store in --out that is not this merge (kept until the new one is complete)")
    m.set_defaults(body=run_merge)
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
    try:
        result = convert(
            volumes,
            vocabulary,
            args.out,
            options,
            synthetic=(folder / MARKER_FILE).is_file(),
            description=f"{'manifest' if is_csv else 'folder'} {args.input}",
            overwrite=args.overwrite,
            preview=True,
            part=args.part,
        )
    except NothingAccepted as e:
        _print_rejections(e.rejected)
        raise
    return _report(result)


def run_merge(args: argparse.Namespace) -> int:
    return _report(merge(args.parts, args.out, overwrite=args.overwrite, preview=True))


def _report(result: ConversionResult) -> int:
    """The store's summary, warnings, rejections and what was done; the exit status."""
    store = SliceStore(result.store)
    print(store_summary(store))
    if result.preview:
        print(f"preview: {result.preview}")
    for warning in result.warnings:
        print(f"mrgen-convert: warning: {warning}", file=sys.stderr)
    _print_rejections(result.rejected)
    if result.unchanged:
        print(f"store unchanged: {result.store} already holds this conversion (same inputs and parameters, "
              f"{result.shards_kept} shards checked), {result.seconds:.1f} s")
    else:
        print(
            f"{result.shards_written} shards written, {result.shards_kept} kept from an earlier run"
            + (", previous store replaced" if result.replaced else "")
            + f", {result.seconds:.1f} s"
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
