"""The physics kind of the demo cohort: on the FSL grid in a raw range; sites that differ as the physics says (SNR
with the field, noise floors of magnitude combinations, resolution along the thick axis, atrophy with age); the
command; the documented table; and no model reading a cohort generator."""

from __future__ import annotations

import ast
import csv
import math
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mrgen_dist.commands.demo_data import main
from mrgen_dist.data import physics
from mrgen_dist.data.demo import MARKER_FILE
from mrgen_dist.data.inputs import discover_directory
from mrgen_dist.data.physics import (
    DESCRIP,
    PROTOCOLS,
    TISSUES,
    acquire,
    acquired_axes,
    coil_array,
    coil_images,
    make_subject,
    receive,
    rss_of_coils,
    signal_polynomials,
    spgr_signal,
    tissue_signal,
)
from mrgen_dist.data.volume import MNI_AFFINE, MNI_SHAPE
from mrgen_dist.scanners import METHOD_SCANNERS

REPO = Path(__file__).resolve().parents[2]
THREE_T = [s for s, p in PROTOCOLS.items() if p.field_t == 3.0]
ONE_FIVE_T = [s for s, p in PROTOCOLS.items() if p.field_t == 1.5]


@pytest.fixture(scope="module")
def maps() -> physics.TissueMaps:
    return physics._maps()  # the process's cached maps, which the command below reuses


@pytest.fixture(scope="module")
def cohort(maps: physics.TissueMaps, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mrgen-demo-data OUT --kind physics --subjects-per-scanner 1`, in process."""
    out = tmp_path_factory.mktemp("physics") / "cohort"
    assert main([str(out), "--kind", "physics", "--subjects-per-scanner", "1", "--seed", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def scans(maps: physics.TissueMaps) -> dict:
    """One 40-year-old subject scanned at every site, noise-free and noisy, with masks of its tissues."""
    subject = make_subject(maps, np.random.default_rng(5), age=40.0)

    def tissue(name: str) -> np.ndarray:
        return ndimage.map_coordinates(maps.full(name, subject.fractions), subject.coords, order=1)

    head = ndimage.map_coordinates(maps.head.astype(np.float32), subject.coords, order=1)
    out = {"wm": ndimage.binary_erosion(tissue("wm") > 0.95, iterations=2),
           "air": ndimage.distance_transform_edt(head < 0.01) > 5}
    for scanner, p in PROTOCOLS.items():
        clean = acquire(maps, subject, p, np.random.default_rng(1), None)
        noisy = acquire(maps, subject, p, np.random.default_rng(1), np.random.default_rng(2))
        out[scanner] = (clean, noisy)
    return out


def test_protocols_cover_the_method_scanners() -> None:
    assert list(PROTOCOLS) == [s.name for s in METHOD_SCANNERS]
    assert {s for s in THREE_T} == {"Intera", "Magnetom TrioTim"}
    assert PROTOCOLS["Magnetom TrioTim"].sequence == "mprage"
    assert any(max(p.voxel_mm) / min(p.voxel_mm) > 1.4 and p.apodisation == 0 for p in PROTOCOLS.values())
    assert {p.coils for p in PROTOCOLS.values()} >= {1, 8, 12}
    with pytest.raises(ValueError, match="MPRAGE timing"):
        replace(PROTOCOLS["Magnetom TrioTim"], ti_ms=300.0)


@pytest.mark.integration  # writes a cohort
def test_cohort_through_the_command(cohort: Path) -> None:
    files = sorted(cohort.glob("*.nii.gz"))
    assert len(files) == 4
    assert {v.scanner for v in discover_directory(cohort)} == {s.name for s in METHOD_SCANNERS}
    marker = (cohort / MARKER_FILE).read_text()
    assert "SYNTHETIC" in marker and "kind=physics" in marker
    rows = list(csv.DictReader((cohort / "cohort.csv").open()))
    assert [r["kind"] for r in rows] == ["physics"] * 4 and all(r["synthetic"] == "yes" for r in rows)
    for p in files:
        img = nib.load(p)
        assert img.shape == MNI_SHAPE and np.allclose(img.affine, MNI_AFFINE)
        assert img.header["descrip"].tobytes().rstrip(b"\0") == DESCRIP
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.int16 and data.min() >= 0
        assert 100 < np.percentile(data, 99.5) < 5000  # a raw scanner range, nothing saturated
        assert (data == np.iinfo(np.int16).max).mean() < 1e-5


def test_volumes_are_deterministic(maps: physics.TissueMaps) -> None:
    a, age = physics.make_volume(maps, "Unspecified", seed=11)
    b, same_age = physics.make_volume(maps, "Unspecified", seed=11)
    assert np.array_equal(a, b) and age == same_age
    lo, hi = PROTOCOLS["Unspecified"].age_range
    assert lo <= age <= hi


def _snr(scans: dict, scanner: str) -> float:
    clean, noisy = scans[scanner]
    return float(clean[scans["wm"]].mean() / (noisy - clean)[scans["wm"]].std())


@pytest.mark.integration  # `scans` simulates 8 volumes (~13 s)
def test_three_tesla_sites_have_higher_white_matter_snr(scans: dict) -> None:
    snr = {s: _snr(scans, s) for s in PROTOCOLS}
    assert min(snr[s] for s in THREE_T) > 1.2 * max(snr[s] for s in ONE_FIVE_T), snr
    assert all(10 < v < 80 for v in snr.values()), snr


def test_same_protocol_at_three_tesla() -> None:
    """Field alone changes the relaxation times: at 3 T, where T1 is longer, a spoiled gradient echo at 8 degrees
    is more T1-weighted (more GM/WM contrast) and gives less signal."""
    p15 = PROTOCOLS["Gyroscan Intera"]
    p3 = replace(p15, field_t=3.0)
    flip = np.float32([math.radians(p15.flip_deg)])
    ratio = {p.field_t: float(tissue_signal(p, "gm", flip)[0] / tissue_signal(p, "wm", flip)[0]) for p in (p15, p3)}
    assert ratio[3.0] < ratio[1.5] < 1
    assert tissue_signal(p3, "wm", flip)[0] < tissue_signal(p15, "wm", flip)[0]


@pytest.mark.integration
def test_background_is_not_zero_mean(scans: dict) -> None:
    """Magnitude combinations put a floor under the air: Rician for one coil, non-central chi for several."""
    floor = {}
    for scanner in PROTOCOLS:
        air = scans[scanner][1][scans["air"]]
        floor[scanner] = air.mean() / air.std()
        assert air.mean() > 0.01 * scans[scanner][0][scans["wm"]].mean()
    assert min(floor.values()) > 1.8, floor  # a zero-mean noise gives ~0
    assert floor["Magnetom TrioTim"] > 2 * floor["Unspecified"], floor  # 12 channels against one


@pytest.mark.parametrize("scanner", ["Unspecified", "Magnetom TrioTim"])
def test_noise_floor_follows_the_chi_distribution(scanner: str) -> None:
    """On the acquired grid (before registration smooths it), air is sd * chi with 2N degrees of freedom."""
    p = replace(PROTOCOLS[scanner], g_max=1.0)
    obj = np.zeros(physics.acquired_shape(p), dtype=np.float32)
    out = receive(obj, p, np.random.default_rng(0), np.random.default_rng(1), np.array([90.0, 109.0, 80.0]))
    sd = p.noise * math.sqrt(p.acceleration) / p.voxel_volume
    n = p.coils
    mean = sd * math.sqrt(2) * math.exp(math.lgamma(n + 0.5) - math.lgamma(n))
    assert out.mean() == pytest.approx(mean, rel=0.005)
    assert out.std() == pytest.approx(math.sqrt(2 * n * sd * sd - mean * mean), rel=0.01)


def test_receive_matches_the_coil_by_coil_combination() -> None:
    """`receive` draws what the root-sum-of-squares of the complex coil images gives, noise-free and noisy."""
    p = PROTOCOLS["Intera"]
    centre = np.array([90.0, 109.0, 80.0])
    axes = acquired_axes(p)
    shape = physics.acquired_shape(p)
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    obj = (0.01 + 0.02 * (np.hypot(grid[0] - 90, grid[1] - 109) < 60) * np.ones(shape)).astype(np.float32)
    coils = coil_array(p, np.random.default_rng(3), centre)
    sd = np.float32(p.noise / p.voxel_volume)
    explicit_clean = rss_of_coils(coil_images(obj, coils, axes), None, None)
    fast_clean = receive(obj, p, np.random.default_rng(3), None, centre)
    np.testing.assert_allclose(fast_clean, explicit_clean, rtol=0.01)
    assert fast_clean[tuple(int(np.argmin(np.abs(ax - c))) for ax, c in zip(axes, centre, strict=True))] == (
        pytest.approx(0.03, rel=0.02))  # the array's RSS sensitivity is 1 at the head centre
    explicit = rss_of_coils(coil_images(obj, coils, axes), sd, np.random.default_rng(4))
    fast = receive(obj, p, np.random.default_rng(3), np.random.default_rng(4), centre)
    for region in (obj < 0.02, obj > 0.02):
        assert fast[region].mean() == pytest.approx(explicit[region].mean(), rel=0.003)
        assert fast[region].std() == pytest.approx(explicit[region].std(), rel=0.01)


def _high_frequency_share(vol: np.ndarray, axis: int, cutoff: float = 0.3) -> float:
    """The share of the spectrum's energy along `axis` above `cutoff` cycles/mm (1 mm voxels), in the head."""
    power = np.abs(np.fft.rfft(vol[60:120, 60:160, 60:120], axis=axis)) ** 2
    freq = np.fft.rfftfreq(vol[60:120, 60:160, 60:120].shape[axis])
    high = np.take(power, np.flatnonzero(freq > cutoff), axis=axis).sum()
    return float(high / np.take(power, np.flatnonzero(freq > 0), axis=axis).sum())


@pytest.mark.integration
def test_thick_axis_has_less_high_frequency_energy(scans: dict) -> None:
    """The GE site acquires 1.8 mm along x and 1.2 mm along y: its noise, white on the acquired grid, keeps little
    energy above 0.3 cycles/mm along x after registration to 1 mm, unlike along y or the Philips 1.5 T site's
    1.2 mm x. (The anatomy itself is not isotropic, so the noise, not the image, is compared.)"""
    share = {s: [_high_frequency_share(scans[s][1] - scans[s][0], a) for a in range(2)]
             for s in ("Unspecified", "Gyroscan Intera")}
    assert share["Unspecified"][0] < 0.4 * share["Unspecified"][1], share
    assert share["Unspecified"][0] < 0.4 * share["Gyroscan Intera"][0], share


def test_atrophy_with_age(maps: physics.TissueMaps) -> None:
    """The same person at 25 and at 80: more CSF, less grey matter, larger ventricles."""
    young = make_subject(maps, np.random.default_rng(9), age=25.0)
    old = make_subject(maps, np.random.default_rng(9), age=80.0)
    gm, csf = TISSUES.index("gm"), TISSUES.index("csf")
    assert old.fractions[csf].sum() > 1.1 * young.fractions[csf].sum()
    assert old.fractions[gm].sum() < 0.9 * young.fractions[gm].sum()

    csf_map = maps.full("csf")
    grid = np.indices(MNI_SHAPE, dtype=np.float32)
    near = ((grid - maps.ventricle_centre[:, None, None, None]) ** 2).sum(axis=0) < 35.0**2
    parts, n = ndimage.label((csf_map > 0.5) & near)
    sizes = ndimage.sum(np.ones_like(parts), parts, range(1, n + 1))
    template_ventricles = np.isin(parts, 1 + np.flatnonzero(sizes > 1000)).astype(np.float32)  # the large CSF spaces

    def ventricles(subject: physics.Subject) -> int:
        return int((ndimage.map_coordinates(template_ventricles, subject.coords, order=1) > 0.5).sum())

    assert ventricles(old) > 1.5 * ventricles(young)
    ages = {s: np.mean(p.age_range) for s, p in PROTOCOLS.items()}
    assert max(ages.values()) - min(ages.values()) > 10  # the site populations differ


def test_signal_equations() -> None:
    """The spoiled gradient echo peaks at the Ernst angle; the polynomial stand-in matches the equations."""
    tr, t1 = 10.0, 800.0
    flips = np.radians(np.arange(1, 40, 0.25)).astype(np.float32)
    best = flips[np.argmax(spgr_signal(1.0, t1, 50.0, tr, 4.0, flips))]
    assert math.degrees(best) == pytest.approx(math.degrees(math.acos(math.exp(-tr / t1))), abs=0.3)
    mprage = PROTOCOLS["Magnetom TrioTim"]
    nominal = np.float32([math.radians(mprage.flip_deg)])
    s = {t: float(tissue_signal(mprage, t, nominal)[0]) for t in ("wm", "gm", "csf")}
    assert s["wm"] > s["gm"] > abs(s["csf"])
    for p in PROTOCOLS.values():
        coef = signal_polynomials(p, (0.8, 1.25))
        b1 = np.linspace(0.8, 1.25, 101)
        x = (b1 - 1.025) / 0.225
        for t, tissue in enumerate(TISSUES):
            exact = tissue_signal(p, tissue, b1 * math.radians(p.flip_deg))
            assert np.abs(np.polyval(coef[t], x) - exact).max() < 1e-4 * max(np.abs(exact).max(), 1e-3)


def test_transmit_field_is_centre_bright_at_three_tesla(maps: physics.TissueMaps) -> None:
    c = maps.head_centre.round().astype(int)
    for scanner, p in PROTOCOLS.items():
        b1 = physics.transmit_field(replace(p, b1_random=0.0), np.random.default_rng(0), maps.head_centre)
        excess = b1[tuple(c)] - b1[c[0], c[1] + 80, c[2]]  # the head centre against the frontal cortex
        assert (excess > 0.1) if p.field_t == 3.0 else (excess < 0.03), (scanner, excess)


def test_documented_tables_match_the_code() -> None:
    doc = (REPO / "docs" / "cohorts.md").read_text()
    assert physics.protocol_table() in doc
    assert physics.tissue_table() in doc
    for p in PROTOCOLS.values():
        assert p.source in doc


def test_no_model_imports_a_cohort_generator() -> None:
    """A cohort generator is data, not a model prior: nothing under mrgen_dist/models imports it."""
    cohort_modules = {"mrgen_dist.data.demo", "mrgen_dist.data.physics"}
    wrong = []
    for path in sorted((REPO / "mrgen_dist" / "models").rglob("*.py")):
        package = path.relative_to(REPO).with_suffix("").parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] if node.level else ())
                module = ".".join(m for m in (base, node.module or "") if m)
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            wrong += [f"{path.relative_to(REPO)}: {n}" for n in names
                      if any(n == m or n.startswith(m + ".") for m in cohort_modules)]
    assert wrong == []
