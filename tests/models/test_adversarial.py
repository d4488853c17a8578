"""The adversarial families (dcgan, wgangp, cvaegan, atlasgan): networks, objectives, the two-player step (with the
translators' where it is shared: NaN stop, 2-process DDP), and the shared commands (train, export, sample) on
them. Resume per family is in tests/test_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mrgen_dist.commands.fid import main as fid_main
from mrgen_dist.config import ConfigError, load_config
from mrgen_dist.export.exporter import export_onnx
from mrgen_dist.models import family_names, get_family
from mrgen_dist.models.base import PlainAccelerator, Step
from mrgen_dist.models.parts.adversarial import average_gradients, uniform_from_normal
from mrgen_dist.models.parts.networks import ConvDiscriminator, centre_crop, centre_pad, multiply_accumulates
from mrgen_dist.models.wgangp import gradient_penalty
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.scanners import Vocabulary
from tests.launch import REPO, TINY_GANS, TINY_TRANSLATORS, launch, run, train_cmd, two_cpu_processes
from tests.models.players import SHAPE, TINY, built, tiny

GANS = tuple(TINY_GANS)
CONV_GANS = ("dcgan", "wgangp", "cvaegan")  # the families with the convolutional generator of networks.py


def batch(fam, config, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *SHAPE, generator=g), torch.randint(0, 4, (n,), generator=g),
            torch.randn(n, fam.noise_dim(config), generator=g))


def test_registry_lists_the_families_and_not_their_shared_parts() -> None:
    assert set(GANS) <= set(family_names())
    assert not {"networks", "adversarial", "base"} & set(family_names())
    for family in GANS:
        assert type(tiny(family)).__name__.endswith("Config") and get_family(family).name == family


def test_generator_makes_slices_cropped_from_its_power_of_two_size_and_follows_the_label() -> None:
    for family in CONV_GANS:
        fam, config, model, _ = built(family)
        graph = fam.export_graph(model).eval()
        z = torch.randn(3, config.latent)
        a, b = graph(z, torch.tensor([0, 0, 0])), graph(z, torch.tensor([3, 3, 3]))
        assert a.shape == (3, 1, *SHAPE) and a.dtype == torch.float32
        assert 0 <= a.min() and a.max() <= 1
        assert (a - b).abs().mean() > 1e-4  # the scanner norms make the label matter from the first step
    x = torch.arange(2 * 224 * 192, dtype=torch.float32).view(2, 1, 224, 192)
    assert torch.equal(centre_crop(x, SHAPE), x[:, :, 3:221, 5:187])
    assert torch.equal(centre_crop(centre_pad(centre_crop(x, SHAPE), (224, 192)), SHAPE), centre_crop(x, SHAPE))


def test_noise_map_is_part_of_z_and_scaled_per_scanner() -> None:
    fam, config, model, _ = built("dcgan", "model.noise_map=true")
    generator = model.generator
    assert generator.latent == config.latent + 224 * 192 == fam.noise_dim(config)
    graph = fam.export_graph(model).eval()
    assert graph.latent == generator.latent  # the exported z: the code, then the noise map
    z = torch.randn(2, generator.latent, generator=torch.Generator().manual_seed(0))
    other = z.clone()
    other[:, config.latent :] = torch.randn(2, 224 * 192, generator=torch.Generator().manual_seed(1))
    scanner = torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(graph(z, scanner), graph(other, scanner), rtol=0, atol=0)  # scale 0 at start
        generator.noise_scale[1] = 1.0
        a, b = graph(z, scanner), graph(other, scanner)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # scanner 0 still draws no noise
    assert (a[1] - b[1]).abs().mean() > 1e-3


@pytest.mark.parametrize("noise_map", [False, True])
def test_hybrid_posterior_means_decode_to_its_reconstructions(noise_map: bool) -> None:
    fam, config, model, _ = built("cvaegan", f"model.noise_map={str(noise_map).lower()}")
    model.eval()
    images, scanner, _ = batch(fam, config)
    z = fam.encode_mean(model, images, scanner)
    assert z.shape == (4, model.generator.latent)  # the sampling graph's z, noise map included
    noise = torch.zeros(4, fam.noise_dim(config))  # no reparameterisation noise: the reconstruction of the mean
    step = Step(PlainAccelerator(), config, model, {}, images, scanner, noise)
    with torch.no_grad():
        torch.testing.assert_close(fam.export_graph(model)(z, scanner), fam.generate(model, step)["recon"])


def test_projection_logits_are_the_scores_each_scanner_would_give() -> None:
    torch.manual_seed(0)
    d = ConvDiscriminator(4, [4, 8, 8, 16, 16], (224, 192), "projection").eval()
    images = torch.rand(2, 1, *SHAPE)
    scores = torch.stack([d(images, torch.full((2,), k)).score for k in range(4)], dim=1)
    logits = d(images, torch.zeros(2, dtype=torch.long)).scanner_logits
    torch.testing.assert_close(scores - scores[:, :1], logits - logits[:, :1])  # equal up to the shared part
    aux = ConvDiscriminator(4, [4, 8, 8, 16, 16], (224, 192), "auxiliary", patch=True).eval()
    out = aux(images, torch.zeros(2, dtype=torch.long))
    assert out.scanner_logits.shape == (2, 4) and out.score.shape == (2, 7 * 6)  # one score per patch


def test_gradient_penalty_is_float32_under_bf16_autocast_and_matches_float64() -> None:
    torch.manual_seed(0)
    critic = ConvDiscriminator(4, [4, 8, 8, 16, 16], (224, 192), "projection")
    real, fake = torch.rand(3, 1, *SHAPE), torch.rand(3, 1, *SHAPE)
    scanner, mix = torch.tensor([0, 2, 3]), torch.tensor([0.1, 0.5, 0.9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = gradient_penalty(critic, real.bfloat16(), fake.bfloat16(), scanner, mix)
    assert penalty.dtype == torch.float32 and penalty.requires_grad
    critic64 = ConvDiscriminator(4, [4, 8, 8, 16, 16], (224, 192), "projection").double()
    critic64.load_state_dict(critic.state_dict())
    x = (mix.double().view(-1, 1, 1, 1) * real.bfloat16().double()
         + (1 - mix.double().view(-1, 1, 1, 1)) * fake.bfloat16().double()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic64(x, scanner).score.sum(), x)
    reference = (grad.flatten(1).norm(dim=1) - 1).square().mean()
    np.testing.assert_allclose(penalty.item(), reference.item(), rtol=1e-4)
    u = uniform_from_normal(torch.randn(100_000, generator=torch.Generator().manual_seed(0)))
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.002


@pytest.mark.parametrize("family", GANS)
def test_one_step_updates_each_player_with_its_own_optimizer(family: str) -> None:
    fam, config, model, optimizers = built(family)
    assert set(optimizers) == {"generator", "discriminator"}
    assert {id(p) for g in optimizers["generator"].param_groups for p in g["params"]}.isdisjoint(
        id(p) for g in optimizers["discriminator"].param_groups for p in g["params"])
    images, scanner, noise = batch(fam, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    turn = config.n_critic - 1  # a micro-step on which the generator takes its turn too
    losses = fam.train_step(Step(PlainAccelerator(), config, model, optimizers, images, scanner, noise, index=turn))
    assert tuple(losses) != () and set(losses) == set(fam.reported_losses(config))
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("discriminator.") for k in changed) and any(k.startswith("generator.") for k in changed)
    if family in ("cvaegan", "atlasgan"):
        assert any(k.startswith(("encoder.", "generator.encoder.")) for k in changed)
    for name in ("real_accuracy", "fake_accuracy", "scanner_accuracy_real", "scanner_accuracy_fake"):
        assert 0 <= losses[name] <= 1


def test_the_critic_takes_n_critic_turns_per_generator_turn() -> None:
    fam, config, model, optimizers = built("wgangp", "model.n_critic=3")
    changed_generator = []
    for index in range(6):
        images, scanner, noise = batch(fam, config, seed=index)
        g_before = [p.clone() for p in model.generator.parameters()]
        fam.train_step(Step(PlainAccelerator(), config, model, optimizers, images, scanner, noise, index=index))
        after = model.generator.parameters()
        changed_generator.append(any(not torch.equal(a, b) for a, b in zip(g_before, after, strict=True)))
    assert changed_generator == [False, False, True, False, False, True]


def _average_in_two_processes(rank: int, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}.init", rank=rank, world_size=2)
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad = torch.full((3,), float(rank + 1))
    params[1].grad = torch.full((2, 2), 10.0 * rank)
    average_gradients(params, 2)  # params[2] has no gradient: skipped on both ranks
    torch.save([p.grad for p in params], f"{path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.integration
def test_average_gradients_over_two_real_processes(tmp_path: Path) -> None:
    mp.spawn(_average_in_two_processes, args=(str(tmp_path / "avg"),), nprocs=2)
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"avg.{rank}")
        torch.testing.assert_close(grads[0], torch.full((3,), 1.5))
        torch.testing.assert_close(grads[1], torch.full((2, 2), 5.0))
        assert grads[2] is None


def test_flops_count_convolutions_and_linear_layers() -> None:
    conv = torch.nn.Conv2d(2, 3, 4, stride=2, padding=1)  # 8 x 8 -> 4 x 4
    assert multiply_accumulates(conv, torch.zeros(1, 2, 8, 8)) == 16 * 3 * 2 * 16
    assert multiply_accumulates(torch.nn.Linear(5, 7), torch.zeros(1, 5)) == 35
    fam, _, model, _ = built("dcgan")
    spectral_state = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    assert fam.flops_per_image(model) > 6 * multiply_accumulates(model.generator, torch.zeros(1, 8),
                                                                 torch.zeros(1, dtype=torch.long))
    assert model.training and all(torch.equal(v, spectral_state[k]) for k, v in model.discriminator.state_dict().items())


@pytest.mark.parametrize(("override", "field"), [
    ("model.head=softmax", "model.head"),
    ("model.n_critic=0", "model.n_critic"),
    ("model.size=[220,192]", "model.size"),
    ("model.generator=[16]", "model.generator"),
    ("model.gradient_penalty=-1", "model.gradient_penalty"),
])
def test_bad_gan_settings_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(TINY["wgangp"], ["data.store=/s", override])


def test_hybrid_refuses_critic_turns() -> None:
    with pytest.raises(ConfigError, match=r"model\.n_critic must be 1 for the cvaegan"):
        load_config(TINY["cvaegan"], ["data.store=/s", "model.n_critic=2"])


def test_runs_that_cannot_work_are_refused_before_any_work(store_dir: Path, tmp_path: Path) -> None:
    small = run(train_cmd(store_dir, tmp_path / "small", "model.size=[128,128]", config=TINY["dcgan"]))
    assert small.returncode == 1 and "model.size [128, 128] is smaller than the store's slices [218, 182]" in small.stderr
    accumulate = run(train_cmd(store_dir, tmp_path / "accumulate", "train.grad_accum=2", config=TINY["dcgan"]))
    assert accumulate.returncode == 1 and "train.grad_accum must be 1 for model family 'dcgan'" in accumulate.stderr
    assert not (tmp_path / "small").exists() and not (tmp_path / "accumulate").exists()


def test_trained_exported_and_sampled_with_the_shared_commands(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dcgan"
    done = run(train_cmd(store_dir, out, "train.epochs=2", config=TINY["dcgan"]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "conditional DCGAN" in done.stdout + done.stderr
    for name in ("samples_001.png", "samples_002.png", "loss_curves.png"):
        assert (out / name).is_file(), name
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"generator", "discriminator", "real_accuracy", "scanner_accuracy_fake"} <= set(first)
    history = json.loads(sorted((out / "checkpoints").glob("step-*"))[-1].joinpath("meta.json").read_text())["history"]
    assert {"test_generator", "test_scanner_accuracy_real"} <= set(history[-1])
    onnx_path = export_onnx(out, "fp32", tmp_path / "dcgan.onnx").path
    sampler = Sampler(onnx_path, device="cpu")
    assert sampler.metadata.family == "dcgan" and sampler.vocabulary == Vocabulary.method()
    images = sampler.sample("Intera", 5, seed=0)
    assert images.shape == (5, *SHAPE) and 0 <= images.min() and images.max() <= 1
    np.testing.assert_array_equal(images, sampler.sample("Intera", 5, seed=0, batch_size=2))
    # mrgen-fid diagnose: no encoder, so no z to probe, said in the file that mrgen-compare reads
    assert fid_main(["diagnose", "--store", str(store_dir), "--run", str(out), "--out", str(tmp_path / "d"),
                     "--device", "cpu"]) == 0
    diagnostics = json.loads((tmp_path / "d" / "diagnostics.json").read_text())
    assert diagnostics["encoder"] is False and diagnostics["z_probe"] is None and "no encoder" in diagnostics["reason"]


@pytest.mark.parametrize(("config", "lr"), [(TINY["wgangp"], "1e12"), (TINY_TRANSLATORS["stargan"], "1e300")],
                         ids=["wgangp", "stargan"])
def test_nonfinite_losses_stop_two_players(config: Path, lr: str, store_dir: Path, tmp_path: Path) -> None:
    # spectral norm keeps the translator's discriminator finite at moderate step sizes: one beyond float32 does not
    done = run(train_cmd(store_dir, tmp_path / "nan", f"optim.lr={lr}", "train.checkpoint_every=1", config=config))
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "non-finite loss at step" in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("config", "term"), [(TINY["wgangp"], "gradient_penalty"),
                                              (TINY_TRANSLATORS["stargan"], "cycle")], ids=["wgangp", "stargan"])
def test_two_players_train_on_two_processes_in_bf16(config: Path, term: str, store_dir: Path, tmp_path: Path) -> None:
    """Two players (and WGAN-GP's double backward, the translator's three passes) with bf16 autocast, over gloo
    with gradients averaged per player."""
    out = tmp_path / "ddp"
    done = launch(store_dir, out, two_cpu_processes("bf16"), "train.mixed_precision=bf16", "train.max_steps=6",
                  "train.world_size=2", config=config, ACCELERATE_USE_CPU="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) [MULTI_CPU, bf16]" in done.stdout + done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(np.isfinite(r[term]) and r[term] >= 0 for r in records)
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}


@pytest.mark.slow
def test_deepspeed_is_refused_for_two_players_naming_the_launch_config(store_dir: Path, tmp_path: Path) -> None:
    done = launch(store_dir, tmp_path / "ds",
                  ["--config_file", str(REPO / "hpc/accelerate/deepspeed-zero2.yaml"), "--num_processes", "1"],
                  config=TINY["dcgan"])
    assert done.returncode == 1, done.stderr[-3000:]
    assert ("model family 'dcgan' trains 2 optimizers (generator, discriminator); DeepSpeed wraps one: launch it "
            "with hpc/accelerate/ddp.yaml") in done.stderr
    assert not (tmp_path / "ds" / "metrics.jsonl").exists()
