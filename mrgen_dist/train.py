"""Train the conditional VAE: one loop, top to bottom.

    accelerate launch -m mrgen_dist.train --config hpc/configs/thesis.yaml data.store=/scratch/store
    mrgen-train --config hpc/configs/demo.yaml train.epochs=5 --resume auto

The split is read from the store once and kept on the device; every rank draws its batches from it with
seeded per-epoch indices, and the reparameterisation noise is drawn from a generator seeded by (seed, rank,
micro-step), so an interrupted and resumed run makes exactly the steps an uninterrupted one makes.

Exit status: 0 finished; 75 stopped by SIGUSR1/SIGTERM after saving a checkpoint (requeued under Slurm);
3 non-finite loss (the last good checkpoint is kept); 1 a configuration, store or checkpoint error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mrgen_dist import __version__
from mrgen_dist.checkpoint import CheckpointManager, CheckpointMismatch, check_compatible, read_meta
from mrgen_dist.config import ConfigError, RunConfig, load_config
from mrgen_dist.data.store import SliceStore, StoreError, epoch_indices
from mrgen_dist.model import CVAE, vae_loss
from mrgen_dist.preemption import EXIT_PREEMPTED, PreemptionFlag, requeue
from mrgen_dist.tracking import make_tracker

EXIT_OK, EXIT_ERROR, EXIT_NONFINITE = 0, 1, 3
SAMPLES_PER_SCANNER = 6

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU; fp32 runs are compared with the same peak.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mrgen-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="YAML config (hpc/configs/*.yaml)")
    ap.add_argument("--resume", default="none", help="auto (newest complete checkpoint, if any), none, or a checkpoint folder")
    ap.add_argument("--tracker", choices=("clearml", "none"), help="overrides train.tracker")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-4 train.epochs=5")
    return ap.parse_args(argv)


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
            raise ConfigError(f"ZeRO stage {ds.zero_stage} is not supported: the sampler needs whole weights on each rank (use 1 or 2)")
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size  # no DataLoader to infer it from
    return acc


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # ---- configuration, store and checks: all before any work starts ------------------------------------
    try:
        cfg = load_config(args.config, args.overrides)
        if args.tracker:
            cfg.train.tracker = args.tracker
        store = SliceStore(cfg.data.store)
    except (ConfigError, StoreError) as e:
        print(f"mrgen-train: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    acc = make_accelerator(cfg)

    def fail(message: str) -> int:
        if acc.is_main_process:
            print(f"mrgen-train: error: {message}", file=sys.stderr)
        return EXIT_ERROR

    if acc.num_processes > 1 and str(acc.distributed_type).endswith("NO"):
        return fail("the launcher started several processes but Accelerate did not connect them; "
                    "on CPUs launch with ACCELERATE_USE_CPU=1 (see README)")
    if cfg.train.world_size and acc.num_processes != cfg.train.world_size:
        return fail(f"expected {cfg.train.world_size} processes, the launcher started {acc.num_processes}")
    out = Path(cfg.train.out)
    ckpt = CheckpointManager(out, acc, cfg.train.keep_checkpoints)
    distributed_type = str(acc.distributed_type).split(".")[-1]
    identity = {
        "fingerprint": cfg.fingerprint(),
        "vocabulary": list(store.vocabulary.names),
        "store_sha256": store.sha256,
        "world_size": acc.num_processes,
        "distributed_type": distributed_type,
    }
    resume_from = None
    if args.resume == "auto":
        resume_from = ckpt.latest()
    elif args.resume != "none":
        resume_from = Path(args.resume)
    try:
        if resume_from is not None:
            check_compatible(read_meta(resume_from), identity, resume_from)
        # ---- data: the whole split, checksum-checked, resident on the device --------------------------------
        train_set, test_set = store.load_split("train"), store.load_split("test")
    except (CheckpointMismatch, StoreError) as e:
        return fail(str(e))
    device = acc.device
    train_images, train_scanner = train_set.images.to(device), train_set.scanner.to(device)
    test_images, test_scanner = test_set.images.to(device), test_set.scanner.to(device)
    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    per_rank = len(train_set) // acc.num_processes
    micro_per_epoch = (per_rank // bs) // ga * ga  # whole optimizer steps only
    if micro_per_epoch == 0:
        return fail(f"{len(train_set)} training slices over {acc.num_processes} processes "
                    f"make no full step of batch {bs} x accumulation {ga}")
    steps_per_epoch = micro_per_epoch // ga

    # ---- model and optimizer --------------------------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    model = CVAE(tuple(train_set.images.shape[1:]), len(store.vocabulary), cfg.model.hidden, cfg.model.latent)
    flops_per_image = model.flops_per_image()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, cfg, deepspeed=acc.state.deepspeed_plugin is not None)
    model, optimizer = acc.prepare(model, optimizer)
    # DeepSpeed half precision keeps the weights themselves in bf16/fp16: inputs must match by hand
    input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32) \
        if acc.state.deepspeed_plugin is not None else torch.float32

    # ---- state: fresh or resumed ----------------------------------------------------------------------------
    start_epoch, start_micro, global_step, history, resumed_sums = 0, 0, 0, [], [0.0, 0.0, 0.0]
    if resume_from is not None:
        meta = ckpt.load(resume_from)
        start_epoch, start_micro, global_step = meta["epoch"], meta["micro_in_epoch"], meta["step"]
        history, resumed_sums = meta["history"], meta["epoch_sums"]
        acc.print(f"resumed from {resume_from} (epoch {start_epoch}, step {global_step})")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    tracker = make_tracker(cfg, out, enabled=acc.is_main_process)
    tracker.log_params({**cfg.to_dict(), "store_sha256": store.sha256, "world_size": acc.num_processes, "n_params": n_params})
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    acc.print(
        f"cVAE {n_params / 1e6:.1f} M parameters, {flops_per_image / 1e9:.3f} GFLOP per training image; "
        f"{len(train_set)} train / {len(test_set)} test slices; {acc.num_processes} process(es) "
        f"[{distributed_type}, {cfg.train.mixed_precision}], {steps_per_epoch} steps/epoch, {total_steps} steps"
    )

    stop = PreemptionFlag()
    metrics_log = open(out / "metrics.jsonl", "a", buffering=1) if acc.is_main_process else None

    def save_checkpoint(epoch: int, micro: int, epoch_sums: torch.Tensor) -> Path:
        """Collective. `epoch_sums` (this rank's loss sums so far in the epoch) are summed over ranks and kept,
        so that a resumed epoch reports the same mean as an uninterrupted one."""
        total = acc.reduce(epoch_sums.clone(), reduction="sum") if acc.num_processes > 1 else epoch_sums
        meta = {**identity, "step": global_step, "epoch": epoch, "micro_in_epoch": micro, "history": history,
                "epoch_sums": total.tolist(), "package_version": __version__}
        return ckpt.save(meta)

    def noise_for(micro_step: int, n: int) -> torch.Tensor:
        seed = np.random.SeedSequence([cfg.train.seed, acc.process_index, micro_step]).generate_state(1)[0]
        return torch.randn(n, cfg.model.latent, generator=torch.Generator().manual_seed(int(seed))).to(device)

    # ---- the loop ------------------------------------------------------------------------------------------
    from tqdm import tqdm

    status = EXIT_OK
    for epoch in range(start_epoch, cfg.train.epochs):
        if global_step >= total_steps:
            break
        model.train()
        order = torch.from_numpy(epoch_indices(
            len(train_set), rank=acc.process_index, world_size=acc.num_processes, epoch=epoch, seed=cfg.data.seed
        )).to(device)
        first = start_micro if epoch == start_epoch else 0
        sums = torch.tensor(resumed_sums if epoch == start_epoch else [0.0] * 3, dtype=torch.float64, device=device)
        sums /= acc.num_processes  # the kept sums are over all ranks; each rank carries its share
        epoch_done = True
        bar = tqdm(total=steps_per_epoch, initial=first // ga, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   mininterval=0.5 if sys.stderr.isatty() else 30,
                   disable=not acc.is_main_process, file=sys.stderr, dynamic_ncols=True)
        t_epoch, images_seen = time.perf_counter(), 0
        for micro in range(first, micro_per_epoch):
            idx = order[micro * bs : (micro + 1) * bs]
            x = train_images[idx].to(input_dtype)
            s = train_scanner[idx]
            step_losses = train_step(acc, model, optimizer, x, s, noise_for(epoch * micro_per_epoch + micro, len(idx)), cfg)
            sums += step_losses
            images_seen += len(idx) * acc.num_processes
            if not acc.sync_gradients:
                continue
            global_step += 1
            # one small all-reduce per step: mean losses, and whether any rank saw a non-finite loss or a signal
            flags = torch.cat([step_losses, torch.tensor([float(not torch.isfinite(step_losses).all()), float(stop.requested)],
                                                         dtype=torch.float64, device=device)])
            flags = acc.reduce(flags, reduction="sum") if acc.num_processes > 1 else flags
            mean_losses = (flags[:3] / acc.num_processes).tolist()
            bar.update()
            if acc.is_main_process:
                bar.set_postfix(loss=f"{mean_losses[0]:.2f}", refresh=False)
                metrics_log.write(json.dumps({"step": global_step, "epoch": epoch, "loss": mean_losses[0],
                                              "reconstruction": mean_losses[1], "kl": mean_losses[2]}) + "\n")
            if flags[3] > 0:
                bar.close()
                last = ckpt.latest()
                acc.print(f"mrgen-train: non-finite loss at step {global_step} (epoch {epoch + 1}); stopping. "
                          f"Last good checkpoint: {last or 'none'}. Lower optim.lr or set optim.grad_clip.")
                status = EXIT_NONFINITE
                break
            if flags[4] > 0:
                bar.close()
                path = save_checkpoint(epoch, micro + 1, sums)
                acc.print(f"mrgen-train: {stop.received or 'stop signal on another rank'} at step {global_step}: "
                          f"checkpoint {path}")
                if acc.is_main_process:
                    acc.print(f"mrgen-train: {requeue()}")
                status = EXIT_PREEMPTED
                break
            if global_step >= total_steps and micro + 1 < micro_per_epoch:  # max_steps inside the epoch
                save_checkpoint(epoch, micro + 1, sums)
                epoch_done = False
                break
            if cfg.train.checkpoint_every and global_step % cfg.train.checkpoint_every == 0:
                save_checkpoint(epoch, micro + 1, sums)
        bar.close()
        if status != EXIT_OK or not epoch_done:
            break

        # ---- end of epoch: test loss, throughput, curves, samples, checkpoint ------------------------------
        seconds = time.perf_counter() - t_epoch
        train_mean = (acc.reduce(sums, reduction="sum") if acc.num_processes > 1 else sums) \
            / (micro_per_epoch * acc.num_processes)
        test_mean = evaluate(model, test_images, test_scanner, cfg, acc, input_dtype, epoch)
        images_per_s = images_seen / seconds
        record = {"epoch": epoch + 1, "step": global_step, "train_loss": train_mean[0].item(),
                  "train_reconstruction": train_mean[1].item(), "train_kl": train_mean[2].item(),
                  "test_loss": test_mean[0], "test_reconstruction": test_mean[1], "test_kl": test_mean[2],
                  "images_per_s": images_per_s, "seconds": seconds}
        peak = peak_flops(device)
        if peak:
            record["mfu"] = flops_per_image * images_per_s / (peak * acc.num_processes)
        history.append(record)
        acc.print(
            f"epoch {epoch + 1}: train {record['train_loss']:.3f} (rec {record['train_reconstruction']:.3f}, "
            f"kl {record['train_kl']:.3f})  test {record['test_loss']:.3f}  {images_per_s:.0f} img/s"
            + (f"  MFU {record['mfu']:.1%}" if "mfu" in record else "")
        )
        tracker.log_scalars({f"{term}/{side}": record[f"{side}_{term}"] for term in ("loss", "reconstruction", "kl")
                             for side in ("train", "test")} | {"throughput/images_per_s": images_per_s}
                            | ({"throughput/mfu": record["mfu"]} if "mfu" in record else {}), step=epoch + 1)
        if acc.is_main_process:
            from mrgen_dist.plots import loss_curves

            tracker.log_image("loss curves", loss_curves(history, out / "loss_curves.png"), epoch + 1)
            if (epoch + 1) % cfg.train.sample_every == 0 or epoch + 1 == cfg.train.epochs:
                path = write_samples(acc.unwrap_model(model), store, out / f"samples_{epoch + 1:03d}.png", epoch + 1, device)
                tracker.log_image("samples", path, epoch + 1)
        save_checkpoint(epoch + 1, 0, torch.zeros(3, dtype=torch.float64, device=device))

    if metrics_log:
        metrics_log.close()
    if status == EXIT_OK and acc.is_main_process:
        model_path = export_model(acc, model, cfg, store, out, global_step)
        tracker.log_artifact("model", model_path)
        acc.print(f"done: {model_path}")
    elif status == EXIT_OK:
        acc.get_state_dict(model)  # collective under DeepSpeed: every rank takes part
    acc.wait_for_everyone()
    tracker.close()
    acc.end_training()
    return status


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, deepspeed: bool) -> torch.optim.Optimizer:
    """Adam as in the method; the fused kernel (one pass over all parameters) where DeepSpeed does not wrap it."""
    return torch.optim.Adam(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
        fused=(cfg.optim.fused and not deepspeed) or None,
    )


def train_step(acc, model, optimizer, x: torch.Tensor, s: torch.Tensor, noise: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """One micro-step (an optimizer step when gradients sync); returns (loss, reconstruction, kl) as float64."""
    with acc.accumulate(model):
        with acc.autocast():
            recon, mean, logvar = model(x, s, noise)
        losses = vae_loss(recon, x, mean, logvar, cfg.model.loss, cfg.model.kl_weight)
        acc.backward(losses["loss"])
        if acc.sync_gradients and cfg.optim.grad_clip > 0:
            acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return torch.stack([losses[k].detach().double() for k in ("loss", "reconstruction", "kl")])


@torch.no_grad()
def evaluate(model, images, scanner, cfg: RunConfig, acc, input_dtype, epoch: int) -> list[float]:
    """Mean test loss terms over the whole test split (each rank a contiguous share), fixed noise per epoch."""
    model.eval()
    share = np.array_split(np.arange(len(images)), acc.num_processes)[acc.process_index]
    sums = torch.zeros(4, dtype=torch.float64, device=images.device)
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch)
    noise = torch.randn(len(images), cfg.model.latent, generator=g).to(images.device)
    for start in range(0, len(share), 64):
        idx = torch.from_numpy(share[start : start + 64]).to(images.device)
        x = images[idx].to(input_dtype)
        with acc.autocast():
            recon, mean, logvar = model(x, scanner[idx], noise[idx].to(input_dtype))
        losses = vae_loss(recon, x, mean, logvar, cfg.model.loss, cfg.model.kl_weight)
        sums += torch.stack([losses[k].double() * len(idx) for k in ("loss", "reconstruction", "kl")] +
                            [torch.tensor(float(len(idx)), dtype=torch.float64, device=images.device)])
    if acc.num_processes > 1:
        sums = acc.reduce(sums, reduction="sum")
    model.train()
    return (sums[:3] / sums[3].clamp(min=1)).tolist()


@torch.no_grad()
def write_samples(model: CVAE, store: SliceStore, path: Path, epoch: int, device: torch.device) -> Path:
    """A grid of decoded samples, one row per scanner, from the same latent draws in every row."""
    from mrgen_dist.plots import scanner_grid

    dtype = next(model.parameters()).dtype
    z = torch.randn(SAMPLES_PER_SCANNER, model.latent, generator=torch.Generator().manual_seed(1234)).to(device, dtype)
    rows = []
    for sid, name in enumerate(store.vocabulary.names):
        s = torch.full((SAMPLES_PER_SCANNER,), sid, dtype=torch.long, device=device)
        rows.append((name, model.decode(z, s)[:, 0].float().cpu().numpy()))
    return scanner_grid(rows, path, f"cVAE samples after epoch {epoch} (same z in every row)")


def export_model(acc, model, cfg: RunConfig, store: SliceStore, out: Path, step: int) -> Path:
    """model.safetensors (float32) and config.json with what the model needs and what made it."""
    from safetensors.torch import save_file

    state = {k: v.float().contiguous() for k, v in acc.get_state_dict(model).items()}
    save_file(state, out / "model.safetensors")
    meta = {
        "architecture": "CVAE",
        "image_shape": store.manifest["params"]["slice_shape"],
        "vocabulary": list(store.vocabulary.names),
        "hidden": cfg.model.hidden,
        "latent": cfg.model.latent,
        "intensity": "[0, 1], " + store.manifest["params"]["intensity_rule"],
        "store_sha256": store.sha256,
        "config": cfg.to_dict(),
        "steps": step,
        "package_version": __version__,
    }
    (out / "config.json").write_text(json.dumps(meta, indent=1))
    return out / "model.safetensors"


if __name__ == "__main__":
    sys.exit(main())
