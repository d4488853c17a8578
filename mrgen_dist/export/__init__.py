"""Exporting a trained run for the torch-free runtime: `exporter.py` (ONNX graph, metadata, parity check against
torch), `quantize.py` (int8 weights and activations)."""

from mrgen_dist.cli import UserError


class ExportError(UserError):
    """The export failed a check; nothing was written."""
