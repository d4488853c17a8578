"""The unconditional VAE: a family added as one module (mrgen_dist/models/vae.py) and one YAML file, trained,
exported and sampled by the same train.py, export.py and sample.py that serve the cVAE."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mrgen_dist.config import load_config
from mrgen_dist.export.exporter import export_onnx
from mrgen_dist.models import family_names, get_family
from mrgen_dist.models.vae import FAMILY
from mrgen_dist.runtime.sampler import Sampler
from mrgen_dist.scanners import Vocabulary

REPO = Path(__file__).resolve().parents[2]


def test_registry_finds_the_family_by_module_name() -> None:
    assert {"cvae", "vae"} <= set(family_names()) and "base" not in family_names()
    assert get_family("vae") is FAMILY
    cfg = load_config(REPO / "hpc/configs/vae.yaml", ["data.store=/s"])
    assert type(cfg.model).__name__ == "VAEConfig" and cfg.model.family == "vae"


def test_the_label_does_not_enter_the_model() -> None:
    torch.manual_seed(0)
    model = FAMILY.build(FAMILY.Config(hidden=[16], latent=4), Vocabulary.method(), (218, 182)).eval()
    assert model.encoder[0].in_features == 218 * 182 and model.decoder_body[0].in_features == 4
    z = torch.randn(2, 4)
    graph = FAMILY.export_graph(model)
    torch.testing.assert_close(graph(z, torch.tensor([0, 0])), graph(z, torch.tensor([3, 2])), rtol=0, atol=0)


def test_trained_exported_and_sampled_with_the_shared_commands(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "vae"
    done = subprocess.run(
        [sys.executable, "-m", "mrgen_dist.commands.train", "--config", str(REPO / "hpc/configs/vae.yaml"),
         f"data.store={store_dir}",
         f"train.out={out}", "model.hidden=[16]", "model.latent=4", "train.max_steps=12", "train.batch_size=4",
         "--tracker", "none"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "VAE (unconditional)" in done.stdout + done.stderr
    onnx_path = export_onnx(out, "fp32", tmp_path / "vae.onnx").path
    sampler = Sampler(onnx_path, device="cpu")
    assert sampler.metadata.family == "vae" and sampler.vocabulary == Vocabulary.method()
    # the graph keeps the (z, scanner) contract and ignores the scanner
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["z", "scanner"]
    z = np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32)
    a, b = (session.run(["image"], {"z": z, "scanner": np.full(3, s, dtype=np.int64)})[0] for s in (0, 3))
    np.testing.assert_array_equal(a, b)
    assert sampler.sample("Intera", 2, seed=0).shape == (2, 218, 182)
