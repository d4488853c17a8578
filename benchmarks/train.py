"""Training-step benchmark: the Accelerate loop's step vs a bare PyTorch step, same model and batch, one run.

Prints the step-time ratio (target <= 1.10x), images/s for one process, and the model's training FLOPs per
image so that MFU can be read on a GPU (MFU = FLOPs/image x images/s / peak FLOP/s).

    python benchmarks/train.py [--hidden 1024 512] [--batch 8 32] [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from mrgen_dist.config import OptimConfig
from mrgen_dist.models.base import Step
from mrgen_dist.models.cvae import FAMILY, CVAEConfig, vae_loss
from mrgen_dist.scanners import Vocabulary
from mrgen_dist.train import make_optimizer


def _time_steps(step, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def measure(acc, config: CVAEConfig, optim: OptimConfig, batch: int, steps: int) -> None:
    """Bare step vs loop step at one batch size, interleaved; prints the ratio."""
    device = acc.device
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 218, 182, generator=g).to(device)
    s = torch.randint(0, 4, (batch,), generator=g).to(device)
    noise = torch.randn(batch, config.latent, generator=g).to(device)

    torch.manual_seed(0)
    bare_model = FAMILY.build(config, Vocabulary.method(), (218, 182)).to(device)
    bare_opt = make_optimizer(bare_model.parameters(), optim, deepspeed=False)

    def bare_step() -> None:
        loss = vae_loss(bare_model(x, s, noise), x, "logcosh", 1.0)["loss"]
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    model = FAMILY.build(config, Vocabulary.method(), (218, 182))
    flops = FAMILY.flops_per_image(model)
    model, opt = acc.prepare(model, make_optimizer(model.parameters(), optim, deepspeed=False))

    def loop_step() -> None:
        FAMILY.train_step(Step(acc, config, model, {"model": opt}, x, s, noise))

    # interleave to share any drift of the machine between both
    bare, loop = [], []
    for _ in range(3):
        bare.append(_time_steps(bare_step, steps // 3))
        loop.append(_time_steps(loop_step, steps // 3))
    t_bare, t_loop = min(bare), min(loop)
    n_params = sum(p.numel() for p in bare_model.parameters())
    print(f"batch {batch}: model {n_params / 1e6:.1f} M params, {flops / 1e9:.3f} GFLOP per training image")
    print(f"  bare PyTorch step     {t_bare * 1e3:8.1f} ms  ({batch / t_bare:7.1f} img/s)")
    print(f"  Accelerate loop step  {t_loop * 1e3:8.1f} ms  ({batch / t_loop:7.1f} img/s)")
    ratio = t_loop / t_bare
    print(f"  ratio loop / bare     {ratio:8.3f}x  (target <= 1.10x: {'met' if ratio <= 1.10 else 'MISSED'})")
    print(f"  achieved              {flops * batch / t_loop / 1e9:8.1f} GFLOP/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 512], help="thesis-size model by default")
    ap.add_argument("--latent", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    from accelerate import Accelerator

    config, optim = CVAEConfig(hidden=args.hidden, latent=args.latent), OptimConfig()
    acc = Accelerator(mixed_precision="no")
    print(f"device {acc.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for batch in args.batch:
        measure(acc, config, optim, batch, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
