"""The diffusion family: the numpy schedule and DDIM (runtime/diffusion.py), guidance, the training step's
draws from the loop's noise, the EMA, and the exported denoiser run by `Sampler`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mrgen_dist.artifacts import ModelMetadata, RunRecord
from mrgen_dist.models import FAMILIES
from mrgen_dist.models.base import KINDS, PlainAccelerator, Step
from mrgen_dist.models.diffusion import DiffusionConfig, ema_decay
from mrgen_dist.runtime.block_grid import block_mean_matrix
from mrgen_dist.runtime.diffusion import (
    SamplerSettings,
    alphas_cumprod,
    ddim_step,
    ddim_timesteps,
    dpmpp2m_step,
    guide,
    sample,
    to_slices,
)
from mrgen_dist.scanners import Vocabulary

SHAPE = (218, 182)
VOCABULARY = Vocabulary.from_names(["Gyroscan Intera", "Intera", "Unspecified", "Magnetom TrioTim"])
FAMILY = FAMILIES["diffusion"]


def tiny(**overrides) -> DiffusionConfig:
    config = DiffusionConfig(**{"widths": [8, 8, 16, 16], "size": [224, 192], "timesteps": 100, "sample_steps": 4,
                                **overrides})
    config.validate()
    return config


def settings(**overrides) -> SamplerSettings:
    values = {"steps": 10, "guidance": 3.0, "prediction": "v", "schedule": "cosine", "timesteps": 1000,
              "null_label": 4, **overrides}
    return SamplerSettings(**values)


# -- the schedule and DDIM, numpy -------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_alphas_cumprod_decrease_inside_zero_one(schedule: str) -> None:
    for timesteps in (100, 1000):
        a = alphas_cumprod(schedule, timesteps)
        assert a.shape == (timesteps,) and a.dtype == np.float64
        assert np.all(np.diff(a) < 0) and 0 < a[-1] < a[0] < 1
    assert alphas_cumprod("cosine", 1000)[-1] < 1e-4  # the last step is (almost) pure noise
    with pytest.raises(ValueError, match="schedule"):
        alphas_cumprod("sigmoid", 10)


def test_ddim_timesteps_are_trailing() -> None:
    assert ddim_timesteps(1000, 4).tolist() == [999, 749, 499, 249]
    assert ddim_timesteps(100, 100).tolist() == list(range(99, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(10, 11)


def test_ddim_step_is_the_formula_on_known_numbers() -> None:
    x, out, a, a_prev = np.array([0.3, -1.2, 2.0]), np.array([0.5, 0.1, -0.7]), 0.36, 0.64  # sqrt: 0.6, 0.8
    # v: x0 = 0.6 x - 0.8 v; eps = 0.6 v + 0.8 x; x_prev = 0.8 clip(x0) + 0.6 eps
    x0 = 0.6 * x - 0.8 * out
    eps = 0.6 * out + 0.8 * x
    x_prev, got_x0 = ddim_step(x.astype(np.float32), out.astype(np.float32), a, a_prev, "v")
    np.testing.assert_allclose(got_x0, np.clip(x0, -1, 1), rtol=1e-6)
    np.testing.assert_allclose(x_prev, 0.8 * np.clip(x0, -1, 1) + 0.6 * eps, rtol=1e-6)
    # eps: x0 = (x - 0.8 eps) / 0.6
    x_prev, got_x0 = ddim_step(x.astype(np.float32), out.astype(np.float32), a, a_prev, "eps", clip=False)
    np.testing.assert_allclose(got_x0, (x - 0.8 * out) / 0.6, rtol=1e-6)
    np.testing.assert_allclose(x_prev, 0.8 * (x - 0.8 * out) / 0.6 + 0.6 * out, rtol=1e-6)


def test_ddim_step_matches_diffusers_where_it_is_installed() -> None:
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                        prediction_type="v_prediction", timestep_spacing="trailing",
                                        set_alpha_to_one=True, clip_sample=True)
    scheduler.set_timesteps(10)
    ours = settings(guidance=1.0)
    assert scheduler.timesteps.numpy().tolist() == ddim_timesteps(1000, 10).tolist()
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), alphas_cumprod("cosine", 1000), rtol=1e-5)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    theirs = torch.from_numpy(x)
    a = alphas_cumprod("cosine", 1000)
    ts = ddim_timesteps(1000, ours.steps)
    for i, t in enumerate(ts):
        out = np.tanh(x).astype(np.float32)  # any deterministic function of x
        x, _ = ddim_step(x, out, a[t], a[ts[i + 1]] if i + 1 < len(ts) else 1.0, "v")
        theirs = scheduler.step(torch.from_numpy(np.tanh(theirs.numpy())), int(t), theirs).prev_sample
        np.testing.assert_allclose(x, theirs.numpy(), atol=1e-4)


@pytest.mark.parametrize("spacing", ["trailing", "quadratic"])
@pytest.mark.parametrize("solver", ["ddim", "dpmpp2m", "ancestral"])
@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_an_oracle_denoiser_returns_x0(prediction: str, solver: str, spacing: str) -> None:
    """The denoiser that knows x0 gives the true v / eps of any x_t: every run of every solver ends at x0
    (the ancestral one whatever noise it draws)."""
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (3, 1, 6, 5)).astype(np.float32)
    s = settings(prediction=prediction, guidance=1.0, name=solver, spacing=spacing)
    a_bar = alphas_cumprod(s.schedule, s.timesteps)

    def oracle(x: np.ndarray, t: np.ndarray, scanner: np.ndarray) -> np.ndarray:
        a = a_bar[t.astype(np.int64)][:, None, None, None]
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        return (np.sqrt(a) * eps - np.sqrt(1 - a) * x0 if prediction == "v" else eps).astype(np.float32)

    got = sample(oracle, rng.standard_normal(x0.shape).astype(np.float32), np.zeros(3, np.int64), s)
    np.testing.assert_allclose(got, x0, atol=1e-4)


def gaussian_data_denoiser(mean: float, std: float | np.ndarray, a_bar: np.ndarray):
    """The exact v-prediction for data x0 ~ N(mean, std^2) per pixel (`std` a number, or one per pixel shaped to
    broadcast over x): E[x0 | x_t] in closed form."""

    def denoise(x: np.ndarray, t: np.ndarray, scanner: np.ndarray) -> np.ndarray:
        a = a_bar[t.astype(np.int64)][:, None, None, None]
        x0 = mean + std**2 * np.sqrt(a) / (a * std**2 + 1 - a) * (x - np.sqrt(a) * mean)
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        return (np.sqrt(a) * eps - np.sqrt(1 - a) * x0).astype(np.float32)

    return denoise


def test_dpm_solver_is_second_order_where_ddim_is_first() -> None:
    """On data whose exact denoiser is known (a Gaussian), both solvers approach the probability-flow ODE's
    end point (DDIM at 1,000 steps): doubling the steps divides DPM-Solver++(2M)'s error by more than 4 and
    DDIM's by about 2, and DPM-Solver++ reaches with 20 steps the error of DDIM with 40."""
    s = settings(guidance=1.0)
    denoise = gaussian_data_denoiser(0.1, 0.2, alphas_cumprod(s.schedule, s.timesteps))
    x_t = np.random.default_rng(3).standard_normal((4, 1, 8, 8)).astype(np.float32)
    labels = np.zeros(4, np.int64)
    exact = sample(denoise, x_t, labels, dataclasses.replace(s, steps=1000)).astype(np.float64)

    def error(name: str, steps: int) -> float:
        return float(np.abs(sample(denoise, x_t, labels, dataclasses.replace(s, steps=steps, name=name)) - exact).max())

    ddim20, ddim40, dpm20, dpm40 = error("ddim", 20), error("ddim", 40), error("dpmpp2m", 20), error("dpmpp2m", 40)
    assert dpm40 < dpm20 / 4 and ddim20 / 2.5 < ddim40 < ddim20 / 1.5, (dpm20, dpm40, ddim20, ddim40)
    assert dpm20 < 1.05 * ddim40, (dpm20, ddim40)


def test_dpm_solver_step_is_the_formula_on_known_numbers() -> None:
    x, out = np.array([0.3, -1.2, 2.0]), np.array([0.5, 0.1, -0.7])
    a, a_next = 0.36, 0.64  # lambda = log(0.6 / 0.8), log(0.8 / 0.6): h = 2 log(4 / 3)
    x0 = np.clip(0.6 * x - 0.8 * out, -1, 1)
    h = 2 * math.log(4 / 3)
    first, got_x0, got_h = dpmpp2m_step(x.astype(np.float32), out.astype(np.float32), a, a_next, "v", None)
    np.testing.assert_allclose(got_x0, x0, rtol=1e-6)
    assert got_h == pytest.approx(h)
    np.testing.assert_allclose(first, 0.6 / 0.8 * x - 0.8 * math.expm1(-h) * x0, rtol=1e-6)  # DDIM's step
    x0_prev = np.array([0.1, 0.2, 0.3])
    second, _, _ = dpmpp2m_step(x.astype(np.float32), out.astype(np.float32), a, a_next, "v", (x0_prev, h / 2))
    d = (1 + 1.0) * x0 - 1.0 * x0_prev  # r = 1/2: 1 / 2r = 1
    np.testing.assert_allclose(second, 0.6 / 0.8 * x - 0.8 * math.expm1(-h) * d, rtol=1e-6)
    last, last_x0, _ = dpmpp2m_step(x.astype(np.float32), out.astype(np.float32), a, 1.0, "v", (x0_prev, h))
    np.testing.assert_allclose(last, x0, rtol=1e-6)  # to sigma = 0: x0, first order


def test_dpm_solver_matches_diffusers_where_it_is_installed() -> None:
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", timestep_spacing="trailing",
        lower_order_final=True, final_sigmas_type="zero", thresholding=False)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.numpy().tolist() == ddim_timesteps(1000, 10).tolist()
    s = settings(guidance=1.0, name="dpmpp2m")
    denoise = gaussian_data_denoiser(0.1, 0.2, alphas_cumprod(s.schedule, s.timesteps))
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    theirs = torch.from_numpy(x)
    for t in scheduler.timesteps:
        out = denoise(theirs.numpy(), np.full(2, int(t), np.float32), np.zeros(2, np.int64))
        theirs = scheduler.step(torch.from_numpy(out), t, theirs).prev_sample
    np.testing.assert_allclose(sample(denoise, x, np.zeros(2, np.int64), s), theirs.numpy(), atol=1e-3)


def test_guidance_is_one_call_on_unconditional_then_conditional() -> None:
    """w = 1 is the conditional model, w = 0 the unconditional one; w != 1 asks for [null; labels] at once."""
    calls = []

    def denoise(x: np.ndarray, t: np.ndarray, scanner: np.ndarray) -> np.ndarray:
        calls.append(scanner.copy())
        return np.tanh(x + scanner[:, None, None, None].astype(np.float32) * 0.1 + t[:, None, None, None] * 1e-3)

    x = np.random.default_rng(2).standard_normal((2, 1, 4, 4)).astype(np.float32)
    labels = np.array([1, 3])
    runs = {w: sample(denoise, x, labels, settings(guidance=w, steps=3)) for w in (0.0, 1.0, 2.5)}
    assert [c.tolist() for c in calls[:3]] == [[4, 4, 1, 3]] * 3  # w = 0: 2B per step
    assert [c.tolist() for c in calls[3:6]] == [[1, 3]] * 3  # w = 1: the conditional model alone
    conditional = sample(denoise, x, labels, settings(guidance=1.0, steps=3))
    unconditional = sample(denoise, x, np.full(2, 4), settings(guidance=1.0, steps=3))
    np.testing.assert_allclose(runs[1.0], conditional)
    np.testing.assert_allclose(runs[0.0], unconditional, atol=1e-6)
    u, c = np.float32([0.5, -1.0]), np.float32([1.5, 1.0])
    np.testing.assert_allclose(guide(u, c, 3.0), [3.5, 5.0])


def test_sampler_settings_are_checked() -> None:
    assert SamplerSettings.from_metadata(settings().to_metadata()) == settings()
    with pytest.raises(ValueError, match="lacks steps"):
        SamplerSettings.from_metadata({k: v for k, v in settings().to_metadata().items() if k != "steps"})
    with pytest.raises(ValueError, match="prediction"):
        SamplerSettings.from_metadata({**settings().to_metadata(), "prediction": "x0"})
    dpm = settings(name="dpmpp2m")
    assert SamplerSettings.from_metadata(dpm.to_metadata()) == dpm
    with pytest.raises(ValueError, match="ddim, dpmpp2m"):
        SamplerSettings.from_metadata({**settings().to_metadata(), "name": "euler"})


# -- the family ----------------------------------------------------------------------------------------------


def test_registered_with_the_denoiser_contract() -> None:
    assert FAMILY.kind == "diffusion" and KINDS["diffusion"] == ModelMetadata.DENOISER == FAMILY.contract


@pytest.mark.parametrize(("override", "field"), [
    ({"widths": []}, "model.widths"), ({"size": [218, 182]}, "model.size"), ({"attention": 5}, "model.attention"),
    ({"schedule": "sigmoid"}, "model.schedule"), ({"prediction": "x0"}, "model.prediction"),
    ({"label_dropout": 1.0}, "model.label_dropout"), ({"ema_decay": 1.0}, "model.ema_decay"),
    ({"sample_steps": 101}, "model.sample_steps"), ({"guidance": -1.0}, "model.guidance"),
    ({"label_dropout": 0.0}, "model.guidance"), ({"timesteps": 1, "sample_steps": 1}, "model.timesteps"),
    ({"patch": 0}, "model.patch"), ({"patch": 3}, "model.size"), ({"sampler": "euler"}, "model.sampler"),
])
def test_bad_settings_name_the_field(override: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        dataclasses.replace(tiny(), **override).validate()
    with pytest.raises(ValueError, match="model.size"):
        DiffusionConfig(size=[216, 176]).validate_shape(SHAPE)


@pytest.mark.parametrize("patch", [2, 4])
def test_patch_folds_pixels_into_channels_at_a_fraction_of_the_cost(patch: int) -> None:
    from mrgen_dist.models.parts.networks import multiply_accumulates
    from mrgen_dist.models.parts.unet import ConditionalUNet

    torch.manual_seed(0)
    unets = {p: ConditionalUNet(SHAPE, 5, [8, 16, 16], attention=0, size=(224, 192), patch=p) for p in (1, patch)}
    folded = unets[patch]
    assert folded.stem.in_channels == folded.head.out_channels == patch**2
    torch.nn.init.normal_(folded.head.weight)  # zero at initialisation: make every output channel count
    x, t, label = torch.rand(2, 1, *SHAPE, requires_grad=True), torch.tensor([10.0, 900.0]), torch.tensor([0, 4])
    out = folded(x, t, label)
    assert out.shape == (2, 1, *SHAPE)
    # every pixel of the slice reaches the output and every output pixel is drawn (no position lost in the fold)
    out.abs().sum().backward()
    assert (x.grad != 0).float().mean() > 0.99 and (out != 0).float().mean() > 0.99
    macs = {p: multiply_accumulates(u, x[:1].detach(), t[:1], label[:1]) for p, u in unets.items()}
    assert macs[patch] < 1.5 * macs[1] / patch**2  # the same widths on patch**2 times fewer positions


def make_step(config: DiffusionConfig, model, optimizers=None, seed: int = 0) -> Step:
    g = torch.Generator().manual_seed(seed)
    return Step(PlainAccelerator(), config, model, optimizers or {}, torch.rand(4, *SHAPE, generator=g),
                torch.tensor([0, 1, 2, 3]), torch.randn(4, FAMILY.noise_dim(config), generator=g))


def test_losses_draw_t_and_the_label_drop_from_the_loops_noise() -> None:
    config = tiny()
    torch.manual_seed(0)
    model = FAMILY.build(config, VOCABULARY, SHAPE)
    with torch.no_grad():  # a net whose output depends on x, t and the label
        model.net.head.weight.normal_(0, 0.1)
    assert FAMILY.noise_dim(config) == 224 * 192 + 2
    with torch.no_grad():
        first = FAMILY.losses(make_step(config, model, seed=3))["loss"]
        again = FAMILY.losses(make_step(config, model, seed=3))["loss"]
        other = FAMILY.losses(make_step(config, model, seed=4))["loss"]
    assert torch.equal(first, again) and not torch.equal(first, other)
    step = make_step(config, model, seed=5)
    seen = []
    model.net.register_forward_hook(lambda m, args, out: seen.append((args[1].clone(), args[2].clone())))
    step.noise[:, -2] = torch.tensor([-10.0, 0.0, 10.0, 0.0])  # u -> 0, 1/2, 1, 1/2: t 0, 50, 99, 50
    step.noise[:, -1] = torch.tensor([-10.0, 10.0, -10.0, 10.0])  # u -> 0 (dropped), 1 (kept)
    with torch.no_grad():
        FAMILY.losses(step)
    t, label = seen[0]
    assert t.tolist() == [0.0, 50.0, 99.0, 50.0] and label.tolist() == [4, 1, 4, 3]


def test_a_model_of_block_means_draws_and_learns_them_on_their_grid() -> None:
    """model.block_means 2: the UNet works on the 109 x 91 block means of the slices (x_t near t = 0 is them),
    its size need only hold that grid, and the exported graph's x has that shape."""
    config = tiny(block_means=2, size=[112, 96])
    config.validate_shape(SHAPE)
    with pytest.raises(ValueError, match=r"smaller than the 2 x 2 block means of the store's slices \[109, 91\]"):
        tiny(block_means=2, size=[104, 96]).validate_shape(SHAPE)
    with pytest.raises(ValueError, match=r"smaller than the store's slices \[218, 182\]"):
        tiny(size=[112, 96]).validate_shape(SHAPE)
    torch.manual_seed(0)
    model = FAMILY.build(config, VOCABULARY, SHAPE)
    assert model.drawn_shape == (109, 91) and FAMILY.noise_dim(config) == 112 * 96 + 2
    step = make_step(config, model, seed=1)
    step.noise[:, -2] = -10.0  # u -> 0: t = 0, where x_t is x0 but for sqrt(1 - alpha_bar_0) eps
    seen = []
    model.net.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    with torch.no_grad():
        FAMILY.losses(step)
    rows, columns = (torch.from_numpy(block_mean_matrix(n, 2)).float() for n in SHAPE)
    x0 = 2 * (rows @ step.images @ columns.T) - 1
    assert seen[0].shape == (4, 1, 109, 91)
    assert (seen[0][:, 0] - x0).abs().max() < 6 * (1 - model.alphas_cumprod[0]).sqrt()
    graph = FAMILY.export_graph(model)
    assert graph.latent == 109 * 91 and graph.sampler_metadata()["block_means"] == 2
    assert graph.example_inputs(2, np.random.default_rng(0), 4, SHAPE)["x"].shape == (2, 1, 109, 91)
    assert "block_means" not in FAMILY.export_graph(FAMILY.build(tiny(), VOCABULARY, SHAPE)).sampler_metadata()


def test_ema_moves_toward_the_weights_and_is_in_the_state_dict() -> None:
    config = tiny(ema_decay=0.9)
    torch.manual_seed(0)
    model = FAMILY.build(config, VOCABULARY, SHAPE)
    optimizers = FAMILY.optimizers(model, lambda p: torch.optim.SGD(p, lr=0.1))
    assert all(not p.requires_grad for p in model.ema.parameters())
    assert {id(p) for group in optimizers["model"].param_groups for p in group["params"]} == \
        {id(p) for p in model.net.parameters()}
    model.ema_updates.fill_(1000)  # past the warm-up: the decay is ema_decay
    before = [p.detach().clone() for p in model.ema.parameters()]
    FAMILY.train_step(make_step(config, model, optimizers))
    d = ema_decay(0.9, 1000)
    assert d == 0.9
    for e, e0, w in zip(model.ema.parameters(), before, model.net.parameters(), strict=True):
        torch.testing.assert_close(e, d * e0 + (1 - d) * w.detach(), rtol=1e-5, atol=1e-7)
    assert not all(torch.equal(e, e0) for e, e0 in zip(model.ema.parameters(), before, strict=True))
    assert model.ema_updates.item() == 1001
    state = model.state_dict()  # what checkpoints and model.safetensors hold: a resume restores the EMA
    assert any(k.startswith("ema.") for k in state) and "ema_updates" in state
    fresh = FAMILY.build(config, VOCABULARY, SHAPE)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema.parameters(), model.ema.parameters(), strict=True))
    assert ema_decay(0.999, 0) == 0.1 and math.isclose(ema_decay(0.999, 10), 11 / 20)


# -- export and the runtime -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def denoiser_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny diffusion run (two steps, written as mrgen-train writes one), exported fp32."""
    from safetensors.torch import save_file

    from mrgen_dist.export.exporter import export_onnx

    run = tmp_path_factory.mktemp("diffusion-run")
    config = dataclasses.replace(tiny(), ema_decay=0.5)
    torch.manual_seed(0)
    model = FAMILY.build(config, VOCABULARY, SHAPE)
    optimizers = FAMILY.optimizers(model, lambda p: torch.optim.Adam(p, lr=1e-2))
    for seed in range(2):
        FAMILY.train_step(make_step(config, model, optimizers, seed))
    save_file({k: v.float().contiguous() for k, v in model.state_dict().items()}, run / "model.safetensors")
    RunRecord(family="diffusion", model=dataclasses.asdict(config), image_shape=list(SHAPE),
              vocabulary=list(VOCABULARY.names), intensity="[0, 1]", store_sha256="0" * 64, config={}, steps=2,
              package_version="test").write(run / RunRecord.NAME)
    return export_onnx(run, "fp32", run / "denoiser.onnx").path


@pytest.mark.integration  # the export of the module's fixture takes ~40 s on one thread
def test_export_matches_torch_and_carries_the_sampler(denoiser_file: Path) -> None:
    import onnxruntime as ort

    from mrgen_dist.runs import load_trained

    session = ort.InferenceSession(str(denoiser_file), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, "f", ModelMetadata.DENOISER)
    assert meta.contract == ModelMetadata.DENOISER and meta.latent == 218 * 182
    assert meta.sampler == {"name": "ddim", "steps": 4, "guidance": 3.0, "prediction": "v", "schedule": "cosine",
                            "timesteps": 100, "null_label": 4, "spacing": "trailing", "clip": True,
                            "variance": "posterior"}
    assert meta.parity["max_error"] <= 1e-4
    _, model, _ = load_trained(denoiser_file.parent)
    graph = FAMILY.export_graph(model).eval()
    inputs = graph.example_inputs(5, np.random.default_rng(7), 4, SHAPE)
    assert inputs["scanner"].tolist() == [0, 1, 2, 3, 4]  # the null label too
    (got,) = session.run(["out"], inputs)
    with torch.no_grad():
        want = graph(*(torch.from_numpy(x) for x in inputs.values())).numpy()
        ema = model.ema(*(torch.from_numpy(x) for x in inputs.values())).numpy()
    assert np.abs(got - want).max() < 1e-4 and np.array_equal(want, ema)  # the EMA weights are exported


@pytest.mark.integration  # the export of the module's fixture takes ~40 s on one thread
def test_sampler_runs_the_denoiser_independent_of_batch_size(denoiser_file: Path) -> None:
    from mrgen_dist.runtime.sampler import Sampler

    sampler = Sampler(denoiser_file, device="cpu", threads=1)
    assert sampler.metadata.contract == ModelMetadata.DENOISER and not sampler.has_noise
    assert sampler.image_shape == SHAPE and sampler.latent == 218 * 182
    images = sampler.sample("Intera", n=3, seed=1, batch_size=3)
    assert images.shape == (3, *SHAPE) and images.dtype == np.float32
    assert np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    np.testing.assert_array_equal(images, sampler.sample("Intera", n=3, seed=1, batch_size=2))
    assert not np.array_equal(images, sampler.sample("Unspecified", n=3, seed=1))
    z = sampler.latents("Intera", 3, 1)
    np.testing.assert_array_equal(sampler.decode(z, np.full(3, 1))[:, 0], images)
    assert sampler.sample_on_device("Intera", 2, seed=1).numpy().shape == (2, 1, *SHAPE)
    from mrgen_dist.eval.score import label_grid

    assert label_grid(sampler, ["Intera", "Unspecified"], draws=2).shape == (2, 2, *SHAPE)


@pytest.mark.integration  # the export of the module's fixture takes ~40 s on one thread
def test_denoiser_is_not_a_translator_and_a_broken_sampler_entry_is_refused(denoiser_file: Path, tmp_path: Path
                                                                            ) -> None:
    import onnx

    from mrgen_dist.artifacts import ArtifactError
    from mrgen_dist.runtime.sampler import Sampler
    from mrgen_dist.runtime.translator import Translator

    with pytest.raises(ArtifactError, match="is an mrgen-denoiser model, not an mrgen-translator .*mrgen-sample"):
        Translator(denoiser_file, device="cpu")
    proto = onnx.load(str(denoiser_file))
    for prop in proto.metadata_props:
        if prop.key == "mrgen.sampler":
            prop.value = '{"name": "ddim"}'
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(ArtifactError, match="mrgen.sampler lacks steps"):
        Sampler(broken, device="cpu")


def test_to_slices_maps_model_space_to_unit_range_and_hands_block_means_over() -> None:
    draws = np.float32([-2, -1, 0, 1, 3]).reshape(1, 1, 1, 5)
    np.testing.assert_allclose(to_slices(draws, (1, 5)), [[[0, 0, 0.5, 1, 1]]])
    # 2 x 2 blocks on a 3 x 4 slice: the grid is 2 x 2, edge-padded by one row, the padding centred (none above).
    blocks = np.float32([[-1, 0], [1, 0.5]]).reshape(1, 1, 2, 2)
    slices = to_slices(blocks, (3, 4), 2)
    np.testing.assert_allclose(slices, [[[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5], [1, 1, 0.75, 0.75]]])
    assert slices.dtype == np.float32


@pytest.mark.integration
def test_resumed_run_equals_the_uninterrupted_one_ema_included(store_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    """Through the shared loop: 3 steps straight, or 2 steps, a stop, and `--resume auto` to 3: the same losses
    and the same weights, the EMA copy and its update count included (the SIGUSR1 variant of this for every
    family with its own loop state is tests/test_train.py)."""
    import json

    from safetensors.torch import load_file

    from mrgen_dist.commands.train import main as train_main
    from tests.launch import REPO, TINY_DIFFUSION

    monkeypatch.chdir(REPO)
    config = TINY_DIFFUSION
    common = ["--config", str(config), f"data.store={store_dir}", "train.epochs=1", "train.sample_every=100"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert train_main([*common, f"train.out={straight}", "train.max_steps=3"]) == 0
    assert train_main([*common, f"train.out={interrupted}", "train.max_steps=2"]) == 0
    capsys.readouterr()
    assert train_main([*common, f"train.out={interrupted}", "train.max_steps=3", "--resume", "auto"]) == 0
    assert "resumed from" in "".join(capsys.readouterr())

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    assert losses(straight) == losses(interrupted) and sorted(losses(straight)) == [1, 2, 3]
    a, b = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["ema_updates"].item() == 3 and any(k.startswith("ema.") for k in a)


@pytest.mark.integration
def test_export_sets_the_sampler_and_calibrates_its_variance_on_the_runs_store(store_dir: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained with DDIM, exported with the ancestral sampler at guidance 1 and the calibrated variance:
    the file carries a table of the network's error of x0 (4 scanners x 4 steps x one bin, the whole image: a
    denoiser is given no low-pass level; large at the noisiest step, small at the last), which the
    runtime reads and samples with; a store that cannot be read, a setting that is not the sampler's and a
    calibrated DDIM are refused, naming the fix."""
    import json

    import onnx

    from mrgen_dist.commands.train import main as train_main
    from mrgen_dist.export import ExportError
    from mrgen_dist.export.exporter import export_onnx
    from mrgen_dist.runs import RunError
    from mrgen_dist.runtime.sampler import Sampler
    from tests.launch import REPO, TINY_DIFFUSION

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    assert train_main(["--config", str(TINY_DIFFUSION), f"data.store={store_dir}", "train.epochs=1",
                       "train.sample_every=100", "train.max_steps=2", f"train.out={run}"]) == 0
    ancestral = {"sampler": "ancestral", "guidance": 1.0}
    calibrated = export_onnx(run, "fp32", tmp_path / "calibrated.onnx", {**ancestral, "variance": "calibrated"}).path
    props = {p.key: p.value for p in onnx.load(str(calibrated)).metadata_props}
    sampler = json.loads(props["mrgen.sampler"])
    table = np.array(sampler["x0_error"])
    assert sampler["variance"] == "calibrated" and sampler["name"] == "ancestral" and table.shape == (4, 4, 1)
    assert np.all(table > 0) and np.all(table[:, -1] < table[:, 0]) and "x0_error_levels" not in sampler
    assert json.loads(props["mrgen.config"])["model"]["variance"] == "calibrated"
    file = Sampler(calibrated, device="cpu", threads=1)
    assert np.array_equal(file.diffusion.settings.x0_error, table)
    drawn = file.sample("Intera", n=2, seed=1)
    assert drawn.shape == (2, *SHAPE) and np.isfinite(drawn).all()

    with pytest.raises(ExportError, match="cannot be read .*pass the store with --store"):
        export_onnx(run, "fp32", tmp_path / "x.onnx", {**ancestral, "variance": "calibrated"}, tmp_path / "nowhere")
    with pytest.raises(RunError, match="model.widths is not a sampler setting; these are: model.sampler"):
        export_onnx(run, "fp32", tmp_path / "x.onnx", {"widths": [8]})
    with pytest.raises(RunError, match="model.variance=calibrated is the ancestral sampler's step variance"):
        export_onnx(run, "fp32", tmp_path / "x.onnx", {"variance": "calibrated"})
    assert not (tmp_path / "x.onnx").exists()
