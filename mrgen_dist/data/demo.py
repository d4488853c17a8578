"""A small SYNTHETIC demo cohort: NIfTI volumes on the FSL MNI grid, made from the MNI152 template.

Nothing here is patient data. Every volume is the MNI152 2009 T1 template that nilearn ships, moved onto
the FSL 182 x 218 x 182 grid (an exact re-indexing, both are 1 mm), then:

* per subject: a random smooth deformation (a few millimetres), a global size change of a few per cent,
  a smooth multiplicative bias field and a small tone jitter;
* per scanner: an appearance in the spirit of the method's scanner traits: Gyroscan Intera with higher
  contrast, Intera brighter, Unspecified blurrier, Magnetom TrioTim sharp with low noise; Rician noise
  whose level depends on the field strength, and a vendor-specific raw intensity range.

Files are named like the real datasets (`IXI901-Guys-0901-T1.nii.gz`, `SALD_sub-900001_T1w.nii.gz`) so that
`mrgen-convert` infers their scanners; the NIfTI `descrip` field, a `SYNTHETIC_DEMO_COHORT.txt` file and the
`cohort.csv` manifest all say that the data are synthetic.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np
from scipy import ndimage

from mrgen_dist.atomic import atomic_path, atomic_write
from mrgen_dist.cli import UserError, require
from mrgen_dist.data.volume import MNI_AFFINE, MNI_SHAPE
from mrgen_dist.scanners import METHOD_SCANNERS, Scanner

T = TypeVar("T")

MARKER_FILE = "SYNTHETIC_DEMO_COHORT.txt"
DESCRIP = b"mrgen-dist SYNTHETIC demo volume (MNI152 template)"


@dataclass(frozen=True)
class Appearance:
    gamma: float  # tone curve x -> x**gamma: > 1 darkens grey matter (more contrast), < 1 brightens
    blur_mm: float  # Gaussian sigma of the point-spread function
    noise: float  # Rician noise sigma relative to the white-matter level
    raw_max: float  # vendor-specific raw intensity scale written to the file


APPEARANCE: dict[str, Appearance] = {
    "Gyroscan Intera": Appearance(gamma=1.8, blur_mm=0.5, noise=0.035, raw_max=1200.0),
    "Intera": Appearance(gamma=0.55, blur_mm=0.5, noise=0.02, raw_max=3000.0),
    "Unspecified": Appearance(gamma=1.0, blur_mm=1.6, noise=0.04, raw_max=800.0),
    "Magnetom TrioTim": Appearance(gamma=1.0, blur_mm=0.0, noise=0.012, raw_max=4000.0),
}


#: The nilearn MNI152 2009 images on the template grid that `template_on_fsl_grid` can re-index.
MNI152_IMAGES = {
    "t1": "load_mni152_template",
    "gm": "load_mni152_gm_template",
    "wm": "load_mni152_wm_template",
    "brain_mask": "load_mni152_brain_mask",
}


def template_on_fsl_grid(image: str = "t1") -> np.ndarray:
    """nilearn's MNI152 2009 T1 template (197x233x189, RAS) re-indexed onto the FSL grid, float32 in [0, 1];
    `image` names another MNI152 image on the same grid (`MNI152_IMAGES`: the GM and WM probability templates,
    the brain mask), each divided by its maximum likewise.

    FSL voxel (i, j, k) is world (90 - i, j - 126, k - 72), which is template voxel (188 - i, j + 8, k).
    """
    datasets = require("nilearn.datasets", "the demo cohort (the MNI152 template)")
    tpl = getattr(datasets, MNI152_IMAGES[image])(resolution=1)
    if tpl.shape != (197, 233, 189) or not np.allclose(tpl.affine[:3, 3], (-98, -134, -72)):
        raise RuntimeError(f"unexpected MNI152 template grid {tpl.shape}; nilearn >= 0.10 ships 197x233x189")
    data = tpl.get_fdata(dtype=np.float32)
    out = data[188 - np.arange(MNI_SHAPE[0])][:, 8 : 8 + MNI_SHAPE[1], : MNI_SHAPE[2]]
    return np.ascontiguousarray(out / out.max(), dtype=np.float32)


def _smooth_field(rng: np.random.Generator, amplitude: float, n_terms: int = 6) -> np.ndarray:
    """A smooth random 3-D field: a sum of separable low-frequency cosines, max |value| ~ amplitude.

    The sum of n separable terms is one (i*j, n) @ (n, k) matrix product, which keeps a full-size field
    at a few tens of milliseconds.
    """
    def cosines(n: int) -> np.ndarray:
        freq = rng.uniform(0.5, 2.5, size=(n_terms, 1))
        phase = rng.uniform(0, 2 * np.pi, size=(n_terms, 1))
        return np.cos(freq * np.linspace(0.0, np.pi, n)[None, :] + phase).astype(np.float32)

    x, y, z = (cosines(n) for n in MNI_SHAPE)
    x *= rng.normal(size=(n_terms, 1)).astype(np.float32)
    xy = (x[:, :, None] * y[:, None, :]).reshape(n_terms, -1)
    field = (xy.T @ z).reshape(MNI_SHAPE)
    peak = float(np.abs(field).max()) or 1.0
    return field * np.float32(amplitude / peak)


def subject_anatomy(template: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One synthetic subject before any scanner, float32 >= 0: the template resized by a few per cent, under a
    random smooth deformation (a few millimetres) and a smooth multiplicative bias field."""
    centre = (np.array(MNI_SHAPE, dtype=np.float32) - 1) / 2
    scale = rng.uniform(0.96, 1.04)
    coords = []
    for a, n in enumerate(MNI_SHAPE):
        axis = (np.arange(n, dtype=np.float32) - centre[a]) / np.float32(scale) + centre[a]
        shape = [1, 1, 1]
        shape[a] = n
        coords.append(_smooth_field(rng, amplitude=2.5) + axis.reshape(shape))
    vol = ndimage.map_coordinates(template, coords, order=1, mode="constant", cval=0.0)
    vol *= np.exp(_smooth_field(rng, amplitude=0.12))  # bias field
    np.clip(vol, 0.0, None, out=vol)
    return vol


def acquire(anatomy: np.ndarray, look: Appearance, gamma_jitter: float, noise: np.random.Generator | None
            ) -> np.ndarray:
    """`anatomy` seen by a scanner of appearance `look`, float32 on its raw intensity scale: the tone curve
    x ** (gamma * gamma_jitter), the point-spread function, and Rician noise drawn from `noise` (none: the
    noise-free image). The same generator state gives the same normal draws at any noise level, which is how
    `benchmarks/translation_bounds.py` shows one acquisition on another scanner."""
    vol = anatomy ** np.float32(look.gamma * gamma_jitter)
    if look.blur_mm > 0:
        vol = ndimage.gaussian_filter(vol, look.blur_mm)
    if noise is not None:
        sigma = np.float32(look.noise)
        real = vol + sigma * noise.standard_normal(MNI_SHAPE, dtype=np.float32)
        imag = sigma * noise.standard_normal(MNI_SHAPE, dtype=np.float32)
        vol = np.sqrt(real * real + imag * imag)  # Rician magnitude noise, as in a real magnitude image
    return vol * np.float32(look.raw_max)


def make_volume(template: np.ndarray, scanner: str, seed: int) -> np.ndarray:
    """One synthetic subject seen by one scanner: int16 raw intensities on the FSL grid."""
    rng = np.random.default_rng(seed)
    anatomy = subject_anatomy(template, rng)
    return np.round(acquire(anatomy, APPEARANCE[scanner], rng.uniform(0.95, 1.05), rng)).astype(np.int16)


@dataclass(frozen=True)
class DemoSubject:
    scanner: str
    subject: str
    filename: str
    seed: int


def cohort_plan(subjects_per_scanner: int, seed: int) -> list[DemoSubject]:
    """File names and seeds of the cohort; subject numbers 901+ keep clear of real IXI/SALD ids."""
    plan = []
    for s_idx, sc in enumerate(METHOD_SCANNERS):
        for n in range(subjects_per_scanner):
            number = 901 + s_idx * subjects_per_scanner + n
            plan.append(DemoSubject(sc.name, *_names(sc, number), seed=seed * 100_003 + number))
    return plan


def _names(sc: Scanner, number: int) -> tuple[str, str]:
    if sc.dataset == "IXI":
        return f"IXI{number}", f"IXI{number}-{sc.site}-{number:04d}-T1.nii.gz"
    return f"sub-{900000 + number}", f"SALD_sub-{900000 + number}_T1w.nii.gz"


class DemoError(UserError):
    """The cohort cannot be written (e.g. the output folder cannot be created)."""


_TEMPLATE: np.ndarray | None = None


def _write_subject(args: tuple[DemoSubject, str]) -> str:
    global _TEMPLATE
    subject, out_dir = args
    if _TEMPLATE is None:  # once per worker process
        _TEMPLATE = template_on_fsl_grid()
    img = nib.Nifti1Image(make_volume(_TEMPLATE, subject.scanner, subject.seed), MNI_AFFINE)
    img.header["descrip"] = DESCRIP
    img.header.set_xyzt_units("mm")
    with atomic_path(Path(out_dir) / subject.filename, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)
    return subject.filename


def start_cohort(out_dir: str | Path, subjects_per_scanner: int, seed: int, marker: str
                 ) -> tuple[Path, list[DemoSubject]]:
    """The output folder, created, with its synthetic-data marker (`marker`, the text of MARKER_FILE) written,
    and the cohort's subjects: what every cohort kind does before writing volumes."""
    if subjects_per_scanner < 1:
        raise ValueError("subjects_per_scanner must be >= 1")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    atomic_write(out / MARKER_FILE, marker)
    return out, cohort_plan(subjects_per_scanner, seed)


def write_subjects(write: Callable[[tuple[DemoSubject, str]], T], plan: list[DemoSubject], out: Path, workers: int,
                   desc: str) -> list[T]:
    """`write((subject, out))` for every subject of `plan`, in `workers` processes, with a progress bar; the
    results in the plan's order."""
    from tqdm import tqdm

    jobs = [(s, str(out)) for s in plan]
    results = []
    with tqdm(total=len(jobs), desc=desc, unit="vol", file=sys.stderr) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for result in pool.map(write, jobs):
                    results.append(result)
                    bar.update()
        else:
            for job in jobs:
                results.append(write(job))
                bar.update()
    return results


def write_cohort(out_dir: str | Path, subjects_per_scanner: int = 8, seed: int = 0, workers: int = 1) -> Path:
    """Write the cohort to `out_dir` (NIfTI files, `cohort.csv`, the synthetic-data marker); returns the csv."""
    out, plan = start_cohort(
        out_dir, subjects_per_scanner, seed,
        "SYNTHETIC DATA. These volumes were generated by mrgen-dist from the MNI152 template shipped with\n"
        "nilearn (random deformation, bias field and scanner-like appearance). They are not images of any\n"
        f"person and not acquisitions of any scanner. subjects_per_scanner={subjects_per_scanner} seed={seed}\n")
    write_subjects(_write_subject, plan, out, workers, "demo volumes")
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["path", "scanner", "subject", "synthetic"])
    for s in plan:
        w.writerow([s.filename, s.scanner, s.subject, "yes"])
    return atomic_write(out / "cohort.csv", text.getvalue())


