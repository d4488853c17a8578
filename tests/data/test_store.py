"""The store reader: one-pass split loading, refusal of bad stores, per-rank views, the summary."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrgen_dist.cli import UserError
from mrgen_dist.commands.convert import main as convert_main
from mrgen_dist.data.epochs import epoch_indices
from mrgen_dist.data.store import SliceStore, StoreError
from mrgen_dist.data.summary import store_summary, write_preview
from mrgen_dist.scanners import UnknownScannerError


def test_load_split_by_scanner(store_dir: Path) -> None:
    store = SliceStore(store_dir)
    train = store.load_split("train")
    assert train.images.dtype == torch.float16 and train.images.shape == (80, 218, 182)
    for name in store.vocabulary.names:
        one = store.load_split("train", scanner=name)
        sid = store.vocabulary.index(name)
        assert len(one) == 20 and set(one.scanner.tolist()) == {sid}
        assert torch.equal(one.images, train.images[train.scanner == sid])
    with pytest.raises(UnknownScannerError, match="valid scanners: Gyroscan Intera, Intera, Unspecified, Magnetom TrioTim"):
        store.load_split("train", scanner="Achieva")


def test_refuses_unfinished_edited_or_corrupt_store(store_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(store_dir, copy)
    shard = copy / "shards" / "shard-00000.h5"
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0x10
    shard.write_bytes(raw)
    with pytest.raises(StoreError, match="shard-00000.h5: checksum mismatch.*mrgen-convert verify"):
        SliceStore(copy).load_split("train")

    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["vocabulary"] = manifest["vocabulary"][::-1]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="does not match its store_sha256"):
        SliceStore(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(StoreError, match="no manifest.json .*conversion unfinished"):
        SliceStore(copy)


def test_refuses_a_manifest_of_another_kind_or_a_newer_version(store_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(store_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    with pytest.raises(StoreError, match="version 3 by a newer mrgen-dist"):
        SliceStore(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(StoreError, match="expected 'mrgen-slice-store'"):
        SliceStore(copy)
    (copy / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "counts"}))
    with pytest.raises(StoreError, match="missing field 'counts'"):
        SliceStore(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable"):
        SliceStore(copy)
    assert issubclass(StoreError, UserError)  # commands print it as one line, no traceback


def _as_version_1(manifest: dict) -> dict:
    """`manifest` as format 1 wrote it: store_sha256 over format_version, vocabulary, params, shards, split."""
    old = {**manifest, "format_version": 1}
    identity = {k: old[k] for k in ("format_version", "vocabulary", "params", "shards", "split")}
    old["store_sha256"] = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return old


def test_every_manifest_field_is_covered_and_version_1_stores_still_open(store_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(store_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["counts"]["volumes"] == 12
    for edit in (
        lambda m: m["counts"].update(volumes=13),
        lambda m: m["counts"]["per_scanner"]["Intera"].update(slices=31),
        lambda m: m["split_counts"]["train"].update(Intera=21),
        lambda m: m["inputs"].update(synthetic=True),
        lambda m: m.update(created_utc="2020-01-01T00:00:00+00:00"),
    ):
        edited = json.loads(json.dumps(manifest))
        edit(edited)
        (copy / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(StoreError, match="does not match its store_sha256"):
            SliceStore(copy)
        assert convert_main(["verify", str(copy)]) == 1

    # a store written by format 1 (counts not covered) opens and verifies, with its own store_sha256
    v1 = _as_version_1(manifest)
    (copy / "manifest.json").write_text(json.dumps(v1))
    store = SliceStore(copy)
    assert store.manifest.format_version == 1 and store.sha256 == v1["store_sha256"] != manifest["store_sha256"]
    assert store.verify() == [] and len(store.load_split("train")) == 80
    # format 1 still refuses an edit of what it covers, and an edited version number does not escape the hash
    (copy / "manifest.json").write_text(json.dumps({**v1, "vocabulary": v1["vocabulary"][::-1]}))
    with pytest.raises(StoreError, match="does not match its store_sha256"):
        SliceStore(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(StoreError, match="does not match its store_sha256"):
        SliceStore(copy)
    # a format-1 manifest with edited counts opens (format 1 never covered them), but verify finds them wrong
    loose = _as_version_1({**manifest, "counts": {**manifest["counts"], "slices": 121}})
    (copy / "manifest.json").write_text(json.dumps(loose))
    assert SliceStore(copy).verify() == ["store holds 120 slices, manifest says 121"]


def test_summary_and_preview(store_dir: Path, tmp_path: Path) -> None:
    store = SliceStore(store_dir)
    table = store_summary(store).splitlines()
    assert table[0].startswith(f"store {store_dir}  sha256 {store.sha256[:16]}  (3 shards)")
    assert "split by subject, test fraction 0.34, seed 0" == table[1]
    assert table[-2].split() == ["total", "12", "120", "80", "40"]
    assert table[-1] == "rejected inputs: 0"
    png = write_preview(store, tmp_path / "preview.png", per_scanner=2)
    assert png == tmp_path / "preview.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_epoch_indices_partition() -> None:
    n, world = 103, 4
    views = [epoch_indices(n, rank=r, world_size=world, epoch=3, seed=1) for r in range(world)]
    flat = np.concatenate(views)
    assert all(len(v) == n // world for v in views)
    assert len(set(flat.tolist())) == len(flat) == 100
    assert np.array_equal(views[1], epoch_indices(n, rank=1, world_size=world, epoch=3, seed=1))
    assert not np.array_equal(views[1], epoch_indices(n, rank=1, world_size=world, epoch=4, seed=1))
    with pytest.raises(ValueError, match="rank 4 is not in a world of size 4"):
        epoch_indices(n, rank=4, world_size=world, epoch=0, seed=0)


def _rank_main(rank: int, world: int, store_dir: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = SliceStore(store_dir).load_split("train")
    mine = epoch_indices(len(data), rank=rank, world_size=world, epoch=0, seed=0)
    batch = data.images[torch.from_numpy(mine)].float()
    # every rank sees the same resident split; the views are combined across real processes
    checksum = torch.tensor([batch.sum().item(), float(len(mine))], dtype=torch.float64)
    gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    ids = torch.from_numpy(mine)
    all_ids = [torch.zeros_like(ids) for _ in range(world)]
    dist.all_gather(all_ids, ids)
    if rank == 0:
        torch.save({"sums": torch.stack(gathered), "ids": torch.stack(all_ids)}, out)
    dist.destroy_process_group()


def test_two_ranks_get_disjoint_views_of_the_split(store_dir: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ranks.pt"
    mp.spawn(_rank_main, args=(2, str(store_dir), port, str(out)), nprocs=2, join=True)
    result = torch.load(out)
    ids = result["ids"]
    assert ids.shape == (2, 40)
    assert len(set(ids.flatten().tolist())) == 80  # disjoint and complete (80 train slices, even split)
    train = SliceStore(store_dir).load_split("train")
    for r in range(2):
        assert result["sums"][r, 0].item() == pytest.approx(train.images[ids[r]].float().sum().item())
