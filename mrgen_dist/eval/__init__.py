"""Scoring generators and translators per scanner: features of the real slices, FID/KID, fidelity and diversity,
the conditioning check, diagnostics, translation, the reports and the comparison table (`targets.py`: the targets)."""
