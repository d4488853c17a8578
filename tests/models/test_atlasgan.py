"""The atlas cVAE-GAN (mrgen_dist/models/atlasgan.py): its config, the Rician draws the discriminator judges,
the prior draws it makes from the exported graph's image, and the shared commands on it. The step of both
players is in tests/models/test_adversarial.py, resume in tests/test_train.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mrgen_dist.config import ConfigError, load_config
from mrgen_dist.export.exporter import export_onnx
from mrgen_dist.models.atlas import atlas_objective
from mrgen_dist.models.base import PlainAccelerator, Step
from mrgen_dist.models.parts.noise import rician_draw
from mrgen_dist.runtime.noise import add_noise
from mrgen_dist.runtime.sampler import Sampler
from tests.launch import TINY_GANS, launch, run, train_cmd, two_cpu_processes
from tests.models.players import SHAPE, built

TINY = TINY_GANS["atlasgan"]


def test_rician_draw_is_the_samplers_draw_and_passes_gradients_at_zero() -> None:
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 1, (3, 1, 20, 30)).astype(np.float32)
    clean[0, 0, :5] = 0.0  # background, where the magnitude's root has no derivative without its floor
    sigma = np.float32(0.04)
    reference = add_noise(clean, sigma, "rician", [np.random.default_rng(1), np.random.default_rng(2)])
    real = np.random.default_rng(1).standard_normal(clean.shape, dtype=np.float32)
    imaginary = np.random.default_rng(2).standard_normal(clean.shape, dtype=np.float32)
    x = torch.from_numpy(clean).requires_grad_(True)
    drawn = rician_draw(x, torch.tensor(sigma), torch.from_numpy(real), torch.from_numpy(imaginary))
    np.testing.assert_allclose(drawn.detach().numpy(), reference, atol=1e-6)
    drawn.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() <= 1.0 + 1e-6


def test_prior_draws_are_the_exported_image_with_its_noise() -> None:
    fam, config, model, _ = built("atlasgan")
    model.eval()
    assert fam.noise_dim(config) == 2 * config.latent + 2 * 224 * 192
    g = torch.Generator().manual_seed(0)
    images, scanner = torch.rand(3, *SHAPE, generator=g), torch.tensor([0, 2, 3])
    with torch.no_grad():  # a scanner's blur and tone away from the identity, so that the label shows
        model.generator.psf_param[2] += 0.1
        model.generator.tone[3] -= 0.05
    noise = torch.randn(3, fam.noise_dim(config), generator=g)
    z = noise[:, config.latent : 2 * config.latent]
    graph = fam.export_graph(model)
    assert graph.noise_kind == "rician" and graph.latent == config.latent
    with torch.no_grad():
        clean = graph(z, scanner)
        quiet = noise.clone()
        quiet[:, 2 * config.latent :] = 0
        made = fam.generate(model, Step(PlainAccelerator(), config, model, {}, images, scanner, quiet))
        torch.testing.assert_close(made["fake"], clean, atol=1e-5, rtol=0)  # no noise: the graph's image
        noisy = fam.generate(model, Step(PlainAccelerator(), config, model, {}, images, scanner, noise))["fake"]
    # the pixel noise is the centre of two maps of the networks' size, as sampling's centre of a slice
    maps = noise[:, 2 * config.latent :].view(3, 2, 224, 192)
    sigma = graph.noise_sigma(scanner)
    real, imaginary = maps[:, :1, 3:221, 5:187], maps[:, 1:, 3:221, 5:187]
    torch.testing.assert_close(noisy, rician_draw(clean, sigma, real, imaginary), atol=1e-5, rtol=0)
    assert (clean[0] - clean[1]).abs().mean() > 1e-3  # the label reaches the image through the acquisition


@pytest.mark.parametrize(("override", "field"), [
    ("model.head=projection", "model.head"),
    ("model.n_critic=2", "model.n_critic"),
    ("model.adversarial_weight=-1", "model.adversarial_weight"),
    ("model.warp_grid=[1,10]", "model.warp_grid"),
    ("model.discriminator=[]", "model.discriminator"),
    ("model.adversarial_parts=decoder", "model.adversarial_parts"),
])
def test_bad_settings_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(TINY, ["data.store=/s", override])


def test_trained_exported_and_sampled_with_its_noise(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "atlasgan"
    done = run(train_cmd(store_dir, out, "train.batch_size=8", "train.epochs=1", config=TINY))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "atlas cVAE-GAN" in done.stdout + done.stderr and (out / "samples_001.png").is_file()
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert all(k in records[0] for k in ("discriminator", "reconstruction", "scanner_share", "scanner_accuracy_fake"))
    sampler = Sampler(export_onnx(out, "fp32", tmp_path / "atlasgan.onnx").path, device="cpu")
    assert sampler.metadata.family == "atlasgan" and sampler.metadata.noise == "rician"
    noisy = sampler.sample("Intera", 4, seed=0, noise=True)
    assert noisy.shape == (4, *SHAPE) and 0 <= noisy.min() and noisy.max() <= 1
    assert not np.array_equal(noisy, sampler.sample("Intera", 4, seed=0))


@pytest.mark.slow
def test_both_players_train_on_two_processes(store_dir: Path, tmp_path: Path) -> None:
    done = launch(store_dir, tmp_path / "ddp", two_cpu_processes(), "train.max_steps=4", "train.world_size=2",
                  config=TINY, ACCELERATE_USE_CPU="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) [MULTI_CPU, no]" in done.stdout + done.stderr
    assert "scanner_share" in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0]


#: What the adversary trains beside the anatomy with `adversarial_parts: all`, per acquisition.
ACQUISITION_PARAMETERS = {"fixed": ("tone", "psf_param"),
                          "learned": ("tone", "psf_param", "gain", "noise_map", "noise_kernel", "noise_dof")}


@pytest.mark.parametrize("acquisition", ["fixed", "learned"])
@pytest.mark.parametrize("parts", ["anatomy", "all"])
def test_the_adversary_trains_the_acquisition_only_when_asked(parts: str, acquisition: str) -> None:
    fam, config, model, _ = built("atlasgan", f"model.adversarial_parts={parts}", f"model.acquisition={acquisition}")
    g = torch.Generator().manual_seed(0)
    images, scanner = torch.rand(4, *SHAPE, generator=g), torch.tensor([0, 1, 2, 3])
    step = Step(PlainAccelerator(), config, model, {}, images, scanner,
                torch.randn(4, fam.noise_dim(config), generator=g))
    vae = model.generator
    with torch.no_grad():  # blurs that differ: sampling applies each beyond the sharpest (atlas.py, psf_sigma)
        vae.psf_param += torch.tensor([[0.0, 0.05], [0.1, 0.0], [0.15, 0.1], [0.05, 0.15]])
    parameters = [getattr(vae, name) for name in ACQUISITION_PARAMETERS[acquisition]]

    def grads(with_adversary: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        made = fam.generate(model, step)
        terms = fam.generator_loss(model, step, made, model.discriminator(made["fake"], scanner))
        loss = terms["generator"] if with_adversary else atlas_objective(config, made["out"], images, scanner)["loss"]
        loss.backward()
        return [p.grad.clone() for p in (*parameters, vae.atlas)]

    alone, joint = grads(False), grads(True)
    assert not torch.equal(alone[-1], joint[-1])  # the anatomy takes the adversary's gradient either way
    same = [torch.allclose(a, j, rtol=1e-5, atol=1e-9) for a, j in zip(alone[:-1], joint[:-1], strict=True)]
    assert same == [parts == "anatomy"] * len(parameters)


def test_with_the_learned_acquisition_the_prior_draws_take_the_scanners_chi_noise() -> None:
    fam, config, model, _ = built("atlasgan", "model.acquisition=learned")
    assert fam.noise_dim(config) == 2 * config.latent + 2  # one seed for each of the two chi draws
    g = torch.Generator().manual_seed(0)
    images, scanner = torch.rand(4, *SHAPE, generator=g), torch.tensor([0, 1, 2, 3])
    noise = torch.randn(4, fam.noise_dim(config), generator=g)
    vae = model.generator
    with torch.no_grad():  # the prior draw is the exported image with the scanner's chi noise from its seed
        made = fam.generate(model, Step(PlainAccelerator(), config, model, {}, images, scanner, noise))
        clean = fam.export_graph(model)(noise[:, config.latent + 1 : 2 * config.latent + 1], scanner)
        drawn = vae.observe(clean, scanner, vae.white_from(noise[:, -1]))
    torch.testing.assert_close(made["fake"], drawn, atol=1e-5, rtol=0)
