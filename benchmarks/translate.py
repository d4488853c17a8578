"""Translation benchmark: `mrgen-translate` of one 182 x 218 x 182 volume (its 10 central slices) after the model
is loaded, on the CPU with 2 threads: reading the NIfTI volume and cutting its slices, then the translation in
onnxruntime, fp32 and fp16; best of 5 after a warm-up. Target: under 1 s for the volume.

The translators are the comparison's: the StarGAN (hpc/configs/compare/stargan.yaml: 16-32-64 channels, 4
residual blocks) and the distilled one (hpc/configs/compare/distilled.yaml: 32 maps, 7 dilated layers, the
source head, carry_noise's non-local means), freshly initialised with a fixed seed and their zero-initialised
parameters drawn at random (an untrained translator is the identity, which costs the same but proves nothing),
exported through the real `mrgen-export` path (checks included). The volume is a synthetic subject of the demo
cohort (mrgen_dist.data.demo).

    python benchmarks/translate.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import torch
from safetensors.torch import save_file

from mrgen_dist.artifacts import RunRecord
from mrgen_dist.config import load_config
from mrgen_dist.data.demo import make_volume, template_on_fsl_grid
from mrgen_dist.data.volume import MNI_AFFINE, SLICE_PARAM_KEYS, SliceParams
from mrgen_dist.export.exporter import export_onnx
from mrgen_dist.models import get_family
from mrgen_dist.runtime.session import cpu_description
from mrgen_dist.runtime.translator import Translator, read_volume
from mrgen_dist.scanners import Vocabulary

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 1.0


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mrgen-bench-translate-"))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


#: name: (config, overrides); the distilled translator's teacher is needed to train it, not to run it
TRANSLATORS = {"stargan": (REPO / "hpc/configs/compare/stargan.yaml", []),
               "distilled": (REPO / "hpc/configs/compare/distilled.yaml", ["model.teacher=unused"])}


def _exported(name: str, config_path: Path, overrides: list[str], work: Path) -> Path:
    """A run folder of the translator of `config_path`, its zero-initialised parameters drawn at random."""
    run = work / name
    run.mkdir()
    config = load_config(config_path, ["data.store=benchmark", *overrides])
    family, vocabulary = get_family(config.model.family), Vocabulary.method()
    torch.manual_seed(0)
    model = family.build(config.model, vocabulary, (218, 182))
    for p in model.parameters():
        if not p.detach().any():
            torch.nn.init.normal_(p, std=0.05)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run / "model.safetensors")
    RunRecord(family=config.model.family, model=dataclasses.asdict(config.model), image_shape=[218, 182],
              vocabulary=list(vocabulary.names), intensity="benchmark", store_sha256="benchmark", config={},
              steps=0, package_version="benchmark",
              slice_params={k: v for k, v in SliceParams().to_dict().items() if k in SLICE_PARAM_KEYS},
              ).write(run / RunRecord.NAME)
    return run


def _run(args: argparse.Namespace, work: Path) -> int:
    volume = work / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(make_volume(template_on_fsl_grid(), "Intera", seed=1), MNI_AFFINE), volume)

    print(f"mrgen-translate of one volume (10 slices of 218 x 182), {args.threads} threads, best of {args.repeats}, "
          f"CPU: {cpu_description()}")
    print(f"  {'translator':10s} {'precision':10s} {'read + slice':>13s} {'translate':>10s} {'total':>8s}  "
          f"target < {TARGET_S:.0f} s")
    met = True
    for name, (config_path, overrides) in TRANSLATORS.items():
        run = _exported(name, config_path, overrides, work)
        for precision in ("fp32", "fp16"):
            path = export_onnx(run, precision, work / f"{name}-{precision}.onnx").path
            translator = Translator(path, device="cpu", threads=args.threads)
            slices = read_volume(volume, translator).images
            t_read = _best(lambda translator=translator: read_volume(volume, translator), args.repeats)
            t_translate = _best(lambda translator=translator, slices=slices:
                                translator.translate(slices, "Magnetom TrioTim"), args.repeats)
            total = t_read + t_translate
            met &= total < TARGET_S
            print(f"  {name:10s} {precision:10s} {t_read:12.3f}s {t_translate:9.3f}s {total:7.3f}s  "
                  f"{'met' if total < TARGET_S else 'MISSED'} ({total / TARGET_S:.2f} of the budget)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
