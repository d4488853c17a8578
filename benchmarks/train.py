"""Training-step benchmark, per model family: the Accelerate loop's step vs the family's bare PyTorch step, same
model and batch, one process.

The loop step is `Family.train_step` on the model and optimizers prepared by Accelerate, as mrgen-train runs
it; the bare step is the same `train_step` on the unprepared model and plain torch.optim optimizers with
`PlainAccelerator` (loss.backward(), optimizer.step(): no Accelerate in the path). Both execute the family's
own arithmetic, so the ratio is what the loop's machinery costs that family. Prints the step-time ratio (target
<= 1.10x), images/s and the training FLOPs per image (MFU = FLOPs/image x images/s / peak FLOP/s on a GPU).

    python benchmarks/train.py [--config hpc/configs/thesis.yaml hpc/configs/compare/dcgan.yaml ...]
                               [--batch 8 32] [--steps 30] [--mixed-precision no|bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from mrgen_dist.config import RunConfig, load_config
from mrgen_dist.models import get_family
from mrgen_dist.models.base import PlainAccelerator, Step
from mrgen_dist.scanners import Vocabulary
from mrgen_dist.training import make_optimizer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "hpc/configs/thesis.yaml", *(REPO / "hpc/configs/compare" / f"{name}.yaml"
                                               for name in ("dcgan", "wgangp", "cvaegan", "atlasgan"))]
SHAPE = (218, 182)


def _time_steps(step, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def measure(acc, cfg: RunConfig, batch: int, steps: int) -> float:
    """Bare step vs loop step of `cfg`'s family at one batch size, interleaved; prints and returns the ratio."""
    family = get_family(cfg.model.family)
    device = acc.device
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *SHAPE, generator=g).to(device)
    s = torch.randint(0, 4, (batch,), generator=g).to(device)
    noise = torch.randn(batch, family.noise_dim(cfg.model), generator=g).to(device)

    def built():
        torch.manual_seed(0)
        model = family.build(cfg.model, Vocabulary.method(), SHAPE).to(device)
        return model, family.optimizers(model, lambda params: make_optimizer(params, cfg.optim, deepspeed=False))

    bare_model, bare_optimizers = built()
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
    plain = PlainAccelerator(lambda: torch.autocast(device.type, half) if half else nullcontext())
    model, optimizers = built()
    flops = family.flops_per_image(model)
    model, *prepared = acc.prepare(model, *optimizers.values())
    optimizers = dict(zip(optimizers, prepared, strict=True))
    index = iter(range(10**9))  # turns (n_critic) as in a run

    def bare_step() -> None:
        family.train_step(Step(plain, cfg.model, bare_model, bare_optimizers, x, s, noise, index=next(index)))

    def loop_step() -> None:
        family.train_step(Step(acc, cfg.model, model, optimizers, x, s, noise, index=next(index)))

    # interleave to share any drift of the machine between both; whole n_critic cycles in each timing
    n = max(steps // 3 // turns(cfg), 1) * turns(cfg)
    bare, loop = [], []
    for _ in range(3):
        bare.append(_time_steps(bare_step, n, warmup=turns(cfg)))
        loop.append(_time_steps(loop_step, n, warmup=turns(cfg)))
    t_bare, t_loop = min(bare), min(loop)
    n_params = sum(p.numel() for p in bare_model.parameters())
    print(f"{family.title}, batch {batch}: {n_params / 1e6:.1f} M params, {flops / 1e9:.3f} GFLOP per training image")
    print(f"  bare PyTorch step     {t_bare * 1e3:8.1f} ms  ({batch / t_bare:7.1f} img/s)")
    print(f"  Accelerate loop step  {t_loop * 1e3:8.1f} ms  ({batch / t_loop:7.1f} img/s)")
    ratio = t_loop / t_bare
    print(f"  ratio loop / bare     {ratio:8.3f}x  (target <= 1.10x: {'met' if ratio <= 1.10 else 'MISSED'})")
    print(f"  achieved              {flops * batch / t_loop / 1e9:8.1f} GFLOP/s")
    return ratio


def turns(cfg: RunConfig) -> int:
    """Micro-steps per generator update (1 for a single-player family)."""
    return getattr(cfg.model, "n_critic", 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, nargs="+", default=CONFIGS,
                    help="run configs, one family each (default: the thesis cVAE and the comparison's GANs)")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    args = ap.parse_args()
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=args.mixed_precision)
    print(f"device {acc.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"mixed precision {args.mixed_precision}")
    ratios = {}
    for path in args.config:
        cfg = load_config(path, ["data.store=unused"])
        for batch in args.batch:
            ratios[(path.stem, batch)] = measure(acc, cfg, batch, args.steps)
    print("summary: " + ", ".join(f"{name} batch {b} {r:.3f}x" for (name, b), r in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
