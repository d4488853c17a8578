"""Cascade probe: a learned low-resolution coarse stage in the atlas cVAE's place under an exported refiner.

On the physics cohort the refiner's ceiling (real slices' low-pass, refined) meets the precision target at every
site while its samples over the atlas cVAE stay near 0: the coarse anatomy is the limit, and the atlas's slices
are too alike (docs/results/cohorts.md). A cascade (Ho et al. 2021) draws the coarse stage with a diffusion model
too. This probe trains one outside the package and scores the pair with the package's measures, before a family
is built for it:

* `base`: a conditional UNet (models/parts/unet.py; widths 32/64/128, attention at the lowest level, patch 2:
  each 2 x 2 block of the grid folded into channels, or --patch 1, the grid itself at the top level) fitted
  to the v-prediction of the train slices' --factor x --factor block means (the slice edge-padded, centred,
  as runtime/block_grid.py cuts it: 55 x 46 on 218 x 182 at 4, 109 x 91 at 2), cosine schedule,
  scanner dropped with probability 0.15, EMA 0.999 with warm-up; OUT/base.pt every 250 steps (and
  OUT/base-<step>.pt every --keep steps, for the probes of training length). --precision bf16
  runs the forward pass under CPU bf16 autocast (the loss and the weights stay fp32): faster only on a CPU with
  native bf16 (avx512_bf16 or AMX; docs/benchmarks.md), slower than fp32 elsewhere. --init BASE.pt
  goes on from a base: its weights and Adam state where it holds them, else its EMA weights with a fresh Adam
  (learning-rate warm-up again), counting steps on from its step.
* `score`: per scanner, N low-resolution images by the runtime's guided sampler (--solver, default DDIM, at
  --steps trailing steps, default 50, guidance --guidance), handed to the refiner file at full size
  (--handover: `repeat`, each block repeated, exact for a refiner whose model.condition_block is the base's
  factor, which takes the block means back itself; `cubic`, Keys' cubic interpolation, what such a refiner
  sees of them, for a refiner that sees the slice itself), refined by the runtime's sampling loop. With --real
  the real test slices' own block means are handed over instead of the base's draws: what the refiner makes
  of a perfect coarse stage at that grid (--factor: its block side; a base's own factor is in its base.pt).
  Scored: recognised as asked (`mrgen-fid`'s conditioning classifier), train-on-synthetic/test-on-real,
  precision/recall/density/coverage (k = 5, against the real test slices, or the train slices with --real,
  whose sources are the test slices), memorisation ratio, background noise and sharpness / real, MS-SSIM
  among generated and among real slices.
  Writes OUT/probe.json, OUT/samples-<scanner id>.npy and OUT/samples.png (real and refined, per scanner).

    python benchmarks/cascade_probe.py base STORE OUT [--steps 4000] [--factor 4] [--batch 32] [--init BASE.pt]
        [--precision fp32|bf16] [--keep 2500] [--patch 2]
    python benchmarks/cascade_probe.py score STORE --base OUT/base.pt --refiner refiner.onnx --out DIR \\
        [--n 60] [--guidance 1.5] [--steps 50] [--solver ddim] [--handover repeat|cubic] [--real [--factor 4]]
        [--seed 0] [--threads N] [--cache DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mrgen_dist import plots
from mrgen_dist.atomic import atomic_path
from mrgen_dist.commands.options import non_negative_int, positive
from mrgen_dist.data.store import SliceStore
from mrgen_dist.eval.conditioning import scanner_classifier, synthetic_trained_accuracy
from mrgen_dist.eval.features import real_features
from mrgen_dist.eval.inception import load_inception
from mrgen_dist.eval.quality import head_masks, memorisation_ratio, ms_ssim_diversity, prdc, signature
from mrgen_dist.models.parts.unet import ConditionalUNet
from mrgen_dist.runtime import block_grid
from mrgen_dist.runtime.block_grid import cubic_upsampling_matrix
from mrgen_dist.runtime.diffusion import SOLVERS, SamplerSettings, alphas_cumprod, sample, to_slices
from mrgen_dist.runtime.sampler import Sampler

BASE = {"widths": [32, 64, 128], "blocks": 1, "attention": 1, "patch": 2, "timesteps": 1000, "lr": 5e-4,
        "batch": 32, "dropout": 0.15, "ema": 0.999, "warmup": 200}


def block_means(images: np.ndarray, factor: int = 4) -> np.ndarray:
    """(N, H, W) in [0, 1] -> (N, h, w) factor x factor block means of the edge-padded slices, in [-1, 1]."""
    return 2 * block_grid.block_means(images, factor) - 1


def hand_over(low: np.ndarray, shape: tuple[int, int], how: str, factor: int = 4) -> np.ndarray:
    """Low-resolution images (N, h, w) in [-1, 1] -> (N, 1, H, W) in [0, 1] for the refiner (module doc)."""
    if how == "repeat":  # what the runtime hands a cascade's refiner
        return to_slices(low[:, None], shape, factor)[:, None]
    x = (low.astype(np.float64) + 1) / 2
    x = cubic_upsampling_matrix(shape[0], factor) @ x @ cubic_upsampling_matrix(shape[1], factor).T
    return x[:, None].astype(np.float32)


def build(n_scanners: int, low_shape: tuple[int, int], patch: int) -> ConditionalUNet:
    return ConditionalUNet(low_shape, n_scanners + 1, BASE["widths"], BASE["blocks"], BASE["attention"],
                           patch=patch)


def load_base(path: Path) -> tuple[dict, Callable[..., np.ndarray]]:
    """A base.pt of `base`: its checkpoint and its EMA network as the runtime's denoise (x, t, scanner) -> out."""
    checkpoint = torch.load(path)
    net = build(checkpoint["n_scanners"], tuple(checkpoint["low_shape"]), checkpoint["config"]["patch"])
    net.load_state_dict(checkpoint["ema"])
    net.eval()

    def denoise(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()

    return checkpoint, denoise


def base_settings(checkpoint: dict, steps: int, guidance: float, solver: str = "ancestral",
                  spacing: str = "trailing") -> SamplerSettings:
    """The runtime's sampler settings for a base.pt of `base` (v-prediction, cosine schedule, x0 clipped)."""
    return SamplerSettings(steps, guidance, "v", "cosine", BASE["timesteps"], checkpoint["n_scanners"], solver,
                           spacing, True)


def base_noise(checkpoint: dict, n: int, sid: int, seed: int = 0) -> np.ndarray:
    """x_T (n, 1, h, w) of scanner `sid`'s draws from a base; seed 0 keeps the streams every recorded result
    was drawn from."""
    stream = np.random.default_rng([seed, sid] if seed else sid)
    return stream.standard_normal((n, 1, *checkpoint["low_shape"]), dtype=np.float32)


def train_base(store: SliceStore, out: Path, steps: int, factor: int, batch: int, init: Path | None = None,
               precision: str = "fp32", keep: int = 0, patch: int = BASE["patch"]) -> None:
    start, warmup_from = 0, 0
    previous = torch.load(init) if init else None
    if previous:
        if previous.get("factor", 4) != factor:
            raise SystemExit(f"{init} is a base at factor {previous.get('factor', 4)}, not {factor}")
        if previous["config"]["patch"] != patch:
            raise SystemExit(f"{init} is a base of patch {previous['config']['patch']}, not {patch}")
        start = previous["step"]
    # A continued run draws new batches and noise: the seed is the step it starts from.
    torch.manual_seed(start)
    rng = np.random.default_rng(start)
    train = store.read_split("train")
    x_all = torch.from_numpy(block_means(train.images, factor))[:, None]
    y_all = torch.as_tensor(np.asarray(train.scanner), dtype=torch.long)
    n_scanners = len(store.vocabulary.names)
    net = build(n_scanners, tuple(x_all.shape[-2:]), patch)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=BASE["lr"])
    if previous:
        ema.load_state_dict(previous["ema"])
        net.load_state_dict(previous.get("net", previous["ema"]))
        if "optimizer" in previous:
            opt.load_state_dict(previous["optimizer"])
        else:
            warmup_from = start
    a_bar = torch.from_numpy(alphas_cumprod("cosine", BASE["timesteps"])).float()
    print(f"base: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, {len(x_all)} slices at "
          f"{list(x_all.shape[-2:])}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    t0, losses = time.time(), []
    for step in range(start + 1, start + steps + 1):
        i = torch.from_numpy(rng.choice(len(x_all), batch, replace=False))
        x0, y = x_all[i], y_all[i].clone()
        y[torch.rand(len(y)) < BASE["dropout"]] = n_scanners
        t = torch.randint(0, BASE["timesteps"], (len(x0),))
        a = a_bar[t].view(-1, 1, 1, 1)
        eps = torch.randn_like(x0)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            v = net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float(), y)
        loss = F.mse_loss(v.float(), a.sqrt() * eps - (1 - a).sqrt() * x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = BASE["lr"] * min(1.0, (step - warmup_from) / BASE["warmup"])
        opt.step()
        losses.append(loss.item())
        decay = min(BASE["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        if step % 250 == 0 or step == start + steps:
            elapsed = time.time() - t0
            print(f"step {step} loss {np.mean(losses[-250:]):.4f} {(step - start) * batch / elapsed:.0f} img/s "
                  f"{elapsed / 60:.1f} min", flush=True)
            state = {"ema": ema.state_dict(), "net": net.state_dict(), "optimizer": opt.state_dict(),
                     "config": {**BASE, "batch": batch, "precision": precision, "patch": patch}, "n_scanners": n_scanners,
                     "step": step, "low_shape": list(x_all.shape[-2:]), "factor": factor}
            for name in ("base.pt", f"base-{step}.pt") if keep and step % keep == 0 else ("base.pt",):
                with atomic_path(out / name, suffix=".pt") as tmp:  # a run stopped mid-write keeps its last base
                    torch.save(state, tmp)


def score(args: argparse.Namespace) -> dict:
    store = SliceStore(args.store)
    names = list(store.vocabulary.names)
    test, train = store.read_split("test"), store.read_split("train")
    refiner = Sampler(args.refiner, device="cpu", threads=args.threads)
    draw = refiner.diffusion
    shape = refiner.image_shape
    if not args.real:
        checkpoint, denoise = load_base(args.base)
        args.factor = checkpoint.get("factor", 4)  # bases written before the option were 4 x 4
        settings = base_settings(checkpoint, args.steps, args.guidance, args.solver)

    extractor = load_inception(device="cpu")
    classifier = scanner_classifier(store, extractor, args.cache)
    brain, background = head_masks(train.images)
    generated, tests, rows, grid = [], [], {}, []
    t0 = time.time()
    for name in names:
        sid = store.vocabulary.index(name)
        real = test.images[np.asarray(test.scanner) == sid].astype(np.float32)
        if args.real:
            low = block_means(real[: args.n], args.factor)
        else:
            x_t = base_noise(checkpoint, args.n, sid, args.seed)
            low = sample(denoise, x_t, np.full(args.n, sid, dtype=np.int64), settings)[:, 0]
        coarse = hand_over(low, shape, args.handover, args.factor)
        z = refiner.latents(name, len(low), args.seed)
        refined = []
        for start in range(0, len(low), 16):
            c = coarse[start : start + 16]
            x = np.ascontiguousarray(z[start : start + 16, draw.coarse.latent :]).reshape(len(c), 1, *shape)
            refined.append(draw.refined(c, x, np.full(len(c), sid, dtype=np.int64), "cascade probe", start))
        images = np.concatenate(refined)
        np.save(args.out / f"samples-{sid}.npy", images)
        grid += [(f"{name} (real)", real[:4]), (name, images[:4])]
        features = extractor(images)
        read = classifier.predict(features)
        real_test = real_features(store, name, "test", extractor, args.cache)[0]
        real_train = real_features(store, name, "train", extractor, args.cache)[0]
        generated.append(features)
        tests.append(real_test)
        g, r = signature(images, brain, background), signature(real, brain, background)
        rows[name] = {
            "recognised": float((read == sid).mean()),
            "read_as": np.bincount(read, minlength=len(names)).tolist(),
            **{k: float(v) for k, v in prdc(real_train if args.real else real_test, features).items()},
            "memorisation_ratio": memorisation_ratio(features, real_test, real_train),
            "noise_ratio": g["noise"] / r["noise"], "sharpness_ratio": g["sharpness"] / r["sharpness"],
            "ms_ssim_generated": ms_ssim_diversity(images), "ms_ssim_real": ms_ssim_diversity(real),
        }
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in rows[name].items()) + f" ({time.time() - t0:.0f} s)", flush=True)
    result = {"store": str(args.store), "refiner": str(args.refiner), "base": None if args.real else str(args.base),
              "real": args.real, "factor": args.factor, "n": args.n, "guidance": args.guidance,
              "steps": args.steps, "solver": args.solver, "handover": args.handover, "seed": args.seed,
              "tstr": synthetic_trained_accuracy(generated, tests, [store.vocabulary.index(n) for n in names]),
              "recognised": float(np.mean([row["recognised"] for row in rows.values()])), "scanners": rows}
    print(f"recognised {result['recognised']:.3f}, TSTR {result['tstr']:.3f}")
    (args.out / "probe.json").write_text(json.dumps(result, indent=1))
    source = "real test slices' block means" if args.real else f"the base's draws (guidance {args.guidance:g})"
    plots.scanner_grid(grid, args.out / "samples.png", f"refined: {source}, {args.handover} hand-over")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("base", help="train the low-resolution base")
    b.add_argument("store", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--steps", type=positive(int), default=4000)
    b.add_argument("--factor", type=positive(int), default=4, help="the block side of the base's grid")
    b.add_argument("--batch", type=positive(int), default=BASE["batch"])
    b.add_argument("--init", type=Path, help="a base.pt to go on from (module doc)")
    b.add_argument("--keep", type=non_negative_int, default=0,
                   help="also keep OUT/base-<step>.pt every KEEP steps (0: never)")
    b.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the forward pass under CPU bf16 autocast (fast only where the CPU has native bf16)")
    b.add_argument("--patch", type=positive(int), default=BASE["patch"],
                   help="pixels folded per side before the UNet's first level (1: none, no patch grid)")
    s = sub.add_parser("score", help="sample the base, refine, score")
    s.add_argument("store", type=Path)
    s.add_argument("--base", type=Path, help="OUT/base.pt of `base` (not with --real)")
    s.add_argument("--refiner", type=Path, required=True, help="an exported refiner (mrgen-export onnx)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n", type=positive(int), default=60, help="slices per scanner")
    s.add_argument("--guidance", type=float, default=1.5, help="the base's classifier-free guidance")
    s.add_argument("--steps", type=positive(int), default=50, help="the base's sampling steps")
    s.add_argument("--solver", choices=SOLVERS, default="ddim", help="the base's sampler")
    s.add_argument("--handover", choices=("repeat", "cubic"), default="repeat")
    s.add_argument("--seed", type=int, default=0, help="the draws' seed (the base's noise and the refiner's)")
    s.add_argument("--real", action="store_true", help="hand over the real test slices' block means")
    s.add_argument("--factor", type=positive(int), default=4, help="the block side of --real (a base's is its own)")
    s.add_argument("--threads", type=int, default=0, help="onnxruntime's threads (0: its choice; 1 beside a training)")
    s.add_argument("--cache", type=Path, default=Path("bench-output/fid-cache"), help="Inception feature cache")
    args = ap.parse_args()
    if args.command == "base":
        train_base(SliceStore(args.store), args.out, args.steps, args.factor, args.batch, args.init,
                   args.precision, args.keep, args.patch)
        return 0
    if args.real == (args.base is not None):
        ap.error("score needs --base or --real, not both")
    args.out.mkdir(parents=True, exist_ok=True)
    score(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
