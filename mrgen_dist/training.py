"""The training loop: one loop, top to bottom, over the `Family` interface (mrgen_dist/models/base.py), that
knows no family. `train(TrainRequest)` is what `mrgen-train` (mrgen_dist/commands/train.py) runs.

The family builds the networks and their optimizers and makes one micro-step, returning named losses; this loop
feeds it batches, keeps the books (metrics.jsonl, loss curves, sample grids, MFU) and checkpoints
(mrgen_dist/checkpoint.py). The split is kept on the device or the host, or streamed from the shards
(`data.residency`, mrgen_dist/data/residency.py); every rank draws its batches with seeded per-epoch indices,
and the family's noise comes from a generator seeded by (seed, rank, micro-step), so that an interrupted and
resumed run makes exactly the steps of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrgen_dist import __version__
from mrgen_dist.artifacts import RunRecord
from mrgen_dist.atomic import atomic_path
from mrgen_dist.checkpoint import CheckpointManager, WriteFailed, disk_errno, writing
from mrgen_dist.cli import UserError
from mrgen_dist.config import ConfigError, OptimConfig, RunConfig, load_config
from mrgen_dist.data.epochs import epoch_indices
from mrgen_dist.data.residency import (
    Batch,
    ResidentSplit,
    StreamedSplit,
    choose_residency,
    first_of_each_scanner,
    open_split,
    split_bytes,
)
from mrgen_dist.data.store import SliceStore
from mrgen_dist.data.volume import SLICE_PARAM_KEYS, SLICE_SHAPE
from mrgen_dist.lr_schedule import lr_factor, set_learning_rates
from mrgen_dist.models import get_family
from mrgen_dist.models.base import Family, Step
from mrgen_dist.preemption import EXIT_PREEMPTED, PreemptionFlag, requeue
from mrgen_dist.runs import load_trained
from mrgen_dist.tracking import make_tracker

EXIT_OK, EXIT_NONFINITE = 0, 3

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU; fp32 runs are compared with the same peak.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}



@dataclass
class TrainRequest:
    """What a training run is asked for, besides its config: the YAML, its `section.key=value` overrides, where to
    resume from (auto, none or a checkpoint folder), whether to move an earlier run aside, a tracker override."""

    config: Path | None
    overrides: list[str]
    resume: str = "none"
    overwrite: bool = False
    tracker: str | None = None

@dataclass
class TrainState:
    """Where the run is, saved with every checkpoint (in its meta.json) and restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    micro_in_epoch: int = 0  # micro-batches of that epoch done
    history: list[dict[str, float]] = field(default_factory=list)  # one record per finished epoch
    epoch_sums: dict[str, float] = field(default_factory=dict)  # loss sums of the epoch so far, over all ranks

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # Without CUDA, every process group must be gloo: DeepSpeed otherwise asks for NCCL and each rank runs alone.
    launched_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched_distributed and not torch.cuda.is_available() else []
    acc = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    if acc.state.deepspeed_plugin is not None:
        ds = acc.state.deepspeed_plugin
        if ds.zero_stage not in (0, 1, 2):
            raise ConfigError(f"ZeRO stage {ds.zero_stage} is not supported: the sampler needs whole weights on each "
                              "rank (use 1 or 2)")
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size  # no DataLoader to infer it from
    return acc


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def make_optimizer(params, optim: OptimConfig, deepspeed: bool) -> torch.optim.Optimizer:
    """Adam as in the method; the fused kernel (one pass over all parameters) where DeepSpeed does not wrap it."""
    return torch.optim.Adam(
        params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
        fused=(optim.fused and not deepspeed) or None,
    )


def initialise_from(model: torch.nn.Module, run_dir: Path, family: Family, vocabulary: list[str],
                    image_shape: tuple[int, int]) -> None:
    """Load a finished run's weights into `model` (train.init_from: a fine-tune); a UserError naming the run
    when it is of another family, scanners or slice shape, or its weights do not fit the model. Optimizer
    state, step and data position start afresh; a resumed run takes all of them from its checkpoint."""


    _, trained, record = load_trained(run_dir)
    theirs = (record.family, list(record.vocabulary), list(record.image_shape))
    ours = (family.name, list(vocabulary), list(image_shape))
    if theirs != ours:
        raise UserError(f"train.init_from {run_dir} was trained as family {theirs[0]}, scanners {theirs[1]}, slices "
                        f"{theirs[2]}; this run is family {ours[0]}, scanners {ours[1]}, slices {ours[2]}")
    try:
        model.load_state_dict(trained.state_dict())
    except RuntimeError as e:  # its second line names the first key that is missing, extra or of another size
        why = [line.strip() for line in str(e).strip().splitlines()]
        raise UserError(f"train.init_from {run_dir}: its weights do not fit this run's model settings "
                        f"({why[1] if len(why) > 1 else why[0]})") from None


def reduce_sum(acc, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named float64 scalars summed over ranks in one all-reduce."""
    packed = torch.stack([v.double() for v in values.values()])
    if acc.num_processes > 1:
        packed = acc.reduce(packed, reduction="sum")
    return dict(zip(values, packed, strict=True))


#: What a run writes before its first checkpoint: `--resume auto` starts afresh over a folder that holds no more.
BEFORE_FIRST_CHECKPOINT = frozenset({"config.yaml", "metrics.jsonl"})


def refuse_unresumable(out: Path) -> None:
    """`--resume auto` found no checkpoint in `out`: a UserError unless `out` is absent, empty or holds only what
    a start stopped before its first checkpoint wrote (its metrics.jsonl is then replaced)."""
    if not out.is_dir():
        return
    ckpts = out / "checkpoints"
    held = sorted(p.name for p in out.iterdir() if p.name not in BEFORE_FIRST_CHECKPOINT and not (
        p == ckpts and p.is_dir() and all(c.name.startswith(".tmp-") for c in p.iterdir())))
    if held:
        raise UserError(f"train.out {out} holds a run with no checkpoint to resume ({', '.join(held[:4])}"
                        f"{', ...' if len(held) > 4 else ''}); start afresh with --overwrite (the old run is moved "
                        "aside)")


class MetricsLog:
    """metrics.jsonl, one whole JSON line per optimizer step. A line that cannot be written whole (disk full) is
    cut off again, so the file never ends in half a record, and the failure is a WriteFailed naming the file."""

    def __init__(self, path: Path, append: bool) -> None:
        self.path = path
        with writing(path):
            self.file = open(path, "ab" if append else "wb", buffering=0)  # noqa: SIM115 - closed by close()

    def write(self, record: dict[str, Any]) -> None:
        data = memoryview((json.dumps(record) + "\n").encode())
        end = os.fstat(self.file.fileno()).st_size
        try:
            while data:
                data = data[self.file.write(data):]
        except OSError as e:
            if disk_errno(e) is None:
                raise
            os.ftruncate(self.file.fileno(), end)
            raise WriteFailed(f"cannot write {self.path}: {e.strerror}") from None

    def close(self) -> None:
        self.file.close()


def train(args: TrainRequest) -> int:
    """`_train`, with a write that fails for lack of space, quota or a failing disk (anywhere that the write
    sites did not name it already) as one line naming the file."""
    try:
        return _train(args)
    except OSError as e:
        code = disk_errno(e)
        if code is None:
            raise
        raise WriteFailed(f"cannot write {e.filename or 'a file of the run'}: {os.strerror(code)}") from None


def _train(args: TrainRequest) -> int:
    # ---- configuration, store and checks: all before any work starts ------------------------------------
    cfg = load_config(args.config, args.overrides)
    if args.tracker:
        cfg.train.tracker = args.tracker
    store = SliceStore(cfg.data.store)
    family = get_family(cfg.model.family)
    unknown = [name for name in cfg.data.scanners if name not in store.vocabulary.names]
    if unknown:
        raise ConfigError(f"data.scanners: {', '.join(map(repr, unknown))} not in the store's vocabulary "
                          f"({', '.join(store.vocabulary.names)})")
    trained = list(cfg.data.scanners) or list(store.vocabulary.names)
    try:
        cfg.model.validate_shape(tuple(store.manifest.params["slice_shape"]))
        cfg.model.validate_data(store.vocabulary, trained)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.grad_accum > 1 and not family.accumulates:
        raise ConfigError(f"train.grad_accum must be 1 for model family {family.name!r}: its players take turns "
                          "every micro-step; raise train.batch_size instead")
    acc = make_accelerator(cfg)
    if acc.num_processes > 1 and str(acc.distributed_type).endswith("NO"):
        raise UserError("the launcher started several processes but Accelerate did not connect them; "
                        "on CPUs launch with ACCELERATE_USE_CPU=1 (see docs/cluster.md)")
    if cfg.train.world_size and acc.num_processes != cfg.train.world_size:
        raise UserError(f"expected {cfg.train.world_size} processes, the launcher started {acc.num_processes}")
    out = Path(cfg.train.out)
    if args.resume == "none" and not args.overwrite and out.is_dir() and any(out.iterdir()):
        raise UserError(f"train.out {out} already holds a run; continue it with --resume auto, or start afresh "
                        "with --overwrite (the old run is moved aside)")
    distributed_type = str(acc.distributed_type).split(".")[-1]
    state = TrainState()
    ckpt = CheckpointManager(out, acc, cfg.train.keep_checkpoints, state=state, identity={
        "fingerprint": cfg.fingerprint(),
        "vocabulary": list(store.vocabulary.names),
        "store_sha256": store.sha256,
        "world_size": acc.num_processes,
        "distributed_type": distributed_type,
    })
    resume_from = None if args.overwrite else ckpt.resume_point(args.resume)
    if args.resume == "auto" and resume_from is None and not args.overwrite:
        refuse_unresumable(out)
        if out.is_dir() and any(out.iterdir()) and acc.is_main_process:
            print(f"mrgen-train: no checkpoint in {out} (a start stopped before its first one): starting afresh",
                  file=sys.stderr)
    # ---- data: resident on the device or the host, or streamed from the shards -----------------------------
    device = acc.device
    nbytes = sum(split_bytes(store, side, trained) for side in ("train", "test"))
    residency = choose_residency(cfg.data.residency, nbytes, device,
                                 int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)))
    ids = [store.vocabulary.index(n) for n in trained]
    train_set, test_set = (open_split(store, side, ids, residency, device, cfg.data.prefetch) for side in ("train", "test"))
    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    per_rank = len(train_set) // acc.num_processes
    micro_per_epoch = (per_rank // bs) // ga * ga  # whole optimizer steps only
    if micro_per_epoch == 0:
        raise UserError(f"{len(train_set)} training slices over {acc.num_processes} processes "
                        f"make no full step of batch {bs} x accumulation {ga}")
    steps_per_epoch = micro_per_epoch // ga

    # ---- model and optimizers -------------------------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    image_shape = SLICE_SHAPE
    model = family.build(cfg.model, store.vocabulary, image_shape)
    family.connect(model, load_trained)
    if cfg.train.init_from:
        initialise_from(model, Path(cfg.train.init_from), family, list(store.vocabulary.names), image_shape)
        acc.print(f"weights from {cfg.train.init_from}")
    flops_per_image = family.flops_per_image(model)
    n_params = sum(p.numel() for p in model.parameters())
    deepspeed = acc.state.deepspeed_plugin is not None
    optimizers = family.optimizers(model, lambda params: make_optimizer(params, cfg.optim, deepspeed))
    if deepspeed and len(optimizers) > 1:
        raise UserError(f"model family {family.name!r} trains {len(optimizers)} optimizers "
                        f"({', '.join(optimizers)}); DeepSpeed wraps one: launch it with hpc/accelerate/ddp.yaml")
    model, *prepared = acc.prepare(model, *optimizers.values())
    optimizers = dict(zip(optimizers, prepared, strict=True))
    # DeepSpeed half precision keeps the weights themselves in bf16/fp16: inputs must match by hand
    input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32) \
        if deepspeed else torch.float32
    noise_dim = family.noise_dim(cfg.model)
    names = family.reported_losses(cfg.model)

    def batch_step(batch: Batch, noise: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer], index: int = 0
                   ) -> Step:
        return Step(acc, cfg.model, model, optimizers, batch.images.to(input_dtype), batch.scanner, noise,
                    cfg.optim.grad_clip, index, batch.level)

    # ---- state: fresh or resumed ----------------------------------------------------------------------------
    if resume_from is not None:
        ckpt.load(resume_from)
        acc.print(f"resumed from {resume_from} (epoch {state.epoch}, step {state.step})")
    if acc.is_main_process:
        if args.overwrite and out.is_dir() and any(out.iterdir()):
            aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(aside)
            acc.print(f"mrgen-train: --overwrite: the run that was in {out} is now in {aside}")
        out.mkdir(parents=True, exist_ok=True)
        with writing(out / "config.yaml"):
            cfg.save(out / "config.yaml")
    acc.wait_for_everyone()
    tracker = make_tracker(cfg, out, enabled=acc.is_main_process)
    tracker.log_params({**cfg.to_dict(), "store_sha256": store.sha256, "world_size": acc.num_processes,
                        "n_params": n_params})
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    acc.print(
        f"{family.title} {n_params / 1e6:.1f} M parameters, {flops_per_image / 1e9:.3f} GFLOP per training image; "
        f"{len(train_set)} train / {len(test_set)} test slices ({residency}); {acc.num_processes} process(es) "
        f"[{distributed_type}, {cfg.train.mixed_precision}], {steps_per_epoch} steps/epoch, {total_steps} steps"
    )

    stop = PreemptionFlag()
    # one line per optimizer step; a resumed run appends (and re-logs the steps after its checkpoint)
    metrics_log = MetricsLog(out / "metrics.jsonl", append=resume_from is not None) if acc.is_main_process else None

    def checkpoint(sums: torch.Tensor) -> Path:
        """Collective. This rank's loss sums of the epoch so far are summed over ranks and kept, so that a
        resumed epoch reports the same mean as an uninterrupted one."""
        state.epoch_sums = {k: v.item() for k, v in reduce_sum(acc, dict(zip(names, sums, strict=True))).items()}
        return ckpt.save(state.step)

    def noise_for(micro_step: int, n: int) -> torch.Tensor:
        seed = np.random.SeedSequence([cfg.train.seed, acc.process_index, micro_step]).generate_state(1)[0]
        return torch.randn(n, noise_dim, generator=torch.Generator().manual_seed(int(seed))).to(device)

    # ---- the loop ------------------------------------------------------------------------------------------
    from tqdm import tqdm

    status = EXIT_OK
    for epoch in range(state.epoch, cfg.train.epochs):
        if state.step >= total_steps:
            break
        model.train()
        state.epoch, first = epoch, state.micro_in_epoch
        order = epoch_indices(len(train_set), rank=acc.process_index, world_size=acc.num_processes, epoch=epoch,
                              seed=cfg.data.seed)
        batches = train_set.batches(order[micro * bs : (micro + 1) * bs] for micro in range(first, micro_per_epoch))
        # the kept sums are over all ranks; each rank carries its share
        sums = torch.tensor([state.epoch_sums.get(k, 0.0) for k in names], dtype=torch.float64, device=device)
        sums /= acc.num_processes
        epoch_done = True
        bar = tqdm(total=steps_per_epoch, initial=first // ga, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   mininterval=0.5 if sys.stderr.isatty() else 30,
                   disable=not acc.is_main_process, file=sys.stderr, dynamic_ncols=True)
        t_epoch, images_seen = time.perf_counter(), 0
        try:  # the bar is closed on an error too, so that the error's line is the last one on stderr
            for micro, batch in zip(range(first, micro_per_epoch), batches, strict=True):
                index = epoch * micro_per_epoch + micro
                if cfg.optim.scheduled:  # the rate of the optimizer step this micro-step belongs to
                    rate = lr_factor(state.step, total_steps, cfg.optim.schedule, cfg.optim.warmup_steps,
                                     cfg.optim.min_lr_ratio)
                    set_learning_rates(optimizers.values(), rate)
                losses = family.train_step(batch_step(batch, noise_for(index, len(batch.images)), optimizers, index))
                step_losses = torch.stack([losses[k].double() for k in names])
                sums += step_losses
                state.micro_in_epoch = micro + 1
                images_seen += len(batch.images) * acc.num_processes
                if not acc.sync_gradients:
                    continue
                state.step += 1
                # one small all-reduce per step: the losses, and whether any rank saw a non-finite loss or a signal
                totals = reduce_sum(acc, {**dict(zip(names, step_losses, strict=True)),
                                          "nonfinite": (~torch.isfinite(step_losses).all()).double(),
                                          "stop": torch.tensor(float(stop.requested), device=device)})
                mean_losses = {k: (totals[k] / acc.num_processes).item() for k in names}
                bar.update()
                if acc.is_main_process:
                    bar.set_postfix(loss=f"{mean_losses[names[0]]:.2f}", refresh=False)
                    metrics_log.write({"step": state.step, "epoch": epoch, **mean_losses,
                                       **({"lr": cfg.optim.lr * rate} if cfg.optim.scheduled else {})})
                if totals["nonfinite"] > 0:
                    bar.close()
                    last = ckpt.latest()
                    if acc.is_main_process:
                        print(f"mrgen-train: non-finite loss at step {state.step} (epoch {epoch + 1}); stopping. "
                              f"Last good checkpoint: {last or 'none'}. Lower optim.lr or set optim.grad_clip.",
                              file=sys.stderr)
                    status = EXIT_NONFINITE
                    break
                if totals["stop"] > 0:
                    bar.close()
                    path = checkpoint(sums)
                    acc.print(f"mrgen-train: {stop.received or 'stop signal on another rank'} at step {state.step}: "
                              f"checkpoint {path}")
                    if acc.is_main_process:
                        acc.print(f"mrgen-train: {requeue()}")
                    status = EXIT_PREEMPTED
                    break
                if state.step >= total_steps and micro + 1 < micro_per_epoch:  # max_steps inside the epoch
                    checkpoint(sums)
                    epoch_done = False
                    break
                if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                    checkpoint(sums)
        finally:
            bar.close()
            batches.close()  # a stop inside the epoch: the reads ahead are cancelled
        if status != EXIT_OK or not epoch_done:
            break

        # ---- end of epoch: test loss, throughput, curves, samples, checkpoint ------------------------------
        seconds = time.perf_counter() - t_epoch
        train_sums = reduce_sum(acc, dict(zip(names, sums, strict=True)))
        train_mean = {k: (v / (micro_per_epoch * acc.num_processes)).item() for k, v in train_sums.items()}
        test_mean = evaluate(family, names, model, batch_step, test_set, noise_dim, cfg.train.seed, acc, input_dtype,
                             epoch)
        images_per_s = images_seen / seconds
        record = {"epoch": epoch + 1, "step": state.step, **{f"train_{k}": v for k, v in train_mean.items()},
                  **{f"test_{k}": v for k, v in test_mean.items()}, "images_per_s": images_per_s, "seconds": seconds}
        peak = peak_flops(device)
        if peak:
            record["mfu"] = flops_per_image * images_per_s / (peak * acc.num_processes)
        state.history.append(record)
        acc.print(
            f"epoch {epoch + 1}: train {train_mean[names[0]]:.3f}"
            + (" (" + ", ".join(f"{k} {train_mean[k]:.3f}" for k in names[1:]) + ")" if names[1:] else "")
            + f"  test {test_mean[names[0]]:.3f}  "
            f"{images_per_s:.0f} img/s" + (f"  MFU {record['mfu']:.1%}" if "mfu" in record else "")
        )
        tracker.log_scalars({f"{term}/{side}": record[f"{side}_{term}"] for term in names for side in ("train", "test")}
                            | {"throughput/images_per_s": images_per_s}
                            | ({"throughput/mfu": record["mfu"]} if "mfu" in record else {}), step=epoch + 1)
        if acc.is_main_process:
            from mrgen_dist.plots import loss_curves

            with writing(out / "loss_curves.png"):
                curves = loss_curves(state.history, names, out / "loss_curves.png")
            tracker.log_image("loss curves", curves, epoch + 1)
            if (epoch + 1) % cfg.train.sample_every == 0 or epoch + 1 == cfg.train.epochs:
                from mrgen_dist.plots import scanner_grid

                shown_slices = first_of_each_scanner(test_set)
                rows, shown = family.preview(acc.unwrap_model(model), shown_slices.images, shown_slices.scanner,
                                             store.vocabulary, shown_slices.level)
                with writing(out / f"samples_{epoch + 1:03d}.png"):
                    path = scanner_grid(rows, out / f"samples_{epoch + 1:03d}.png",
                                        f"{family.title} {shown} after epoch {epoch + 1}")
                tracker.log_image("samples", path, epoch + 1)
        state.epoch, state.micro_in_epoch = epoch + 1, 0
        checkpoint(torch.zeros(len(names), dtype=torch.float64, device=device))

    if metrics_log:
        metrics_log.close()
    if status == EXIT_OK and acc.is_main_process:
        model_path = export_model(acc, model, family, cfg, store, out, state.step, training_summary(state, model, acc))
        tracker.log_artifact("model", model_path)
        acc.print(f"done: {model_path}")
    elif status == EXIT_OK:
        acc.get_state_dict(model)  # collective under DeepSpeed: every rank takes part
    acc.wait_for_everyone()
    tracker.close()
    acc.end_training()
    return status


@torch.no_grad()
def evaluate(family: Family, names: tuple[str, ...], model: torch.nn.Module, batch_step,
             test_set: ResidentSplit | StreamedSplit, noise_dim: int, seed: int, acc, input_dtype: torch.dtype,
             epoch: int) -> dict[str, float]:
    """Mean test losses over the whole test split (each rank a contiguous share), fixed noise per epoch;
    `batch_step(batch, noise, optimizers)` makes the Step of a batch of `model`."""
    model.eval()
    device = acc.device
    share = np.array_split(np.arange(len(test_set)), acc.num_processes)[acc.process_index]
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    noise = torch.randn(len(test_set), noise_dim, generator=g).to(device)
    chunks = [share[start : start + 64] for start in range(0, len(share), 64)]
    for idx, batch in zip(chunks, test_set.batches(chunks), strict=True):
        rows = torch.from_numpy(idx).to(device)
        losses = family.losses(batch_step(batch, noise[rows].to(input_dtype), {}))
        sums += torch.stack([losses[k].double() * len(idx) for k in names])
        count += len(idx)
    totals = reduce_sum(acc, {**dict(zip(names, sums, strict=True)), "count": count})
    model.train()
    return {k: (totals[k] / totals["count"].clamp(min=1)).item() for k in names}


def training_summary(state: TrainState, model: torch.nn.Module, acc) -> dict:
    """Wall time and throughput over the epochs of this run (a resumed run counts every epoch it has records
    of), for the run record and the comparison table."""
    seconds = sum(r["seconds"] for r in state.history)
    images = sum(r["seconds"] * r["images_per_s"] for r in state.history)
    return {"seconds": seconds, "images_per_s": images / seconds if seconds else 0.0, "epochs": len(state.history),
            "steps": state.step, "processes": acc.num_processes,
            # ZeRO-3 leaves partitioned parameters empty; ds_numel is their full size
            "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in acc.unwrap_model(model).parameters())}


def export_model(acc, model, family: Family, cfg: RunConfig, store: SliceStore, out: Path, step: int,
                 training: dict) -> Path:
    """model.safetensors (float32) and config.json (a RunRecord: what rebuilds the model and what made it)."""
    from safetensors.torch import save_file

    state = {k: v.float().contiguous() for k, v in acc.get_state_dict(model).items()}
    with writing(out / "model.safetensors"), atomic_path(out / "model.safetensors") as tmp:
        save_file(state, tmp)
    record = RunRecord(
        family=family.name,
        model=dataclasses.asdict(cfg.model),
        image_shape=list(store.manifest.params["slice_shape"]),
        vocabulary=list(store.vocabulary.names),
        intensity="[0, 1], " + store.manifest.params["intensity_rule"],
        store_sha256=store.sha256,
        config=cfg.to_dict(),
        steps=step,
        package_version=__version__,
        training=training,
        # with the axial levels the model saw: what a level-conditioned generator can be asked for
        slice_params={k: store.manifest.params[k] for k in (*SLICE_PARAM_KEYS, "axial_indices")
                      if k in store.manifest.params},
    )
    with writing(out / RunRecord.NAME):
        record.write(out / RunRecord.NAME)
    return out / "model.safetensors"


