"""The targets a model is judged by, defined once: the verdicts of `mrgen-compare` and the reports of
`mrgen-fid` read them from here."""

from __future__ import annotations

# generators (mrgen-decoder)
GENERATION_CONDITIONING = 0.90  # generated slices recognised as the scanner asked for, at least
Z_PROBE = 0.40  # scanner predicted from the encoder's z, at most
LABEL_EFFECT_FLOOR = 0.1  # between-scanner / between-draw variation below this: the label does nothing
MEMORISATION = 0.9  # median generated->train / test->train nearest-neighbour distance, at least, every scanner
SYNTHETIC_TRAINED = 0.90  # a classifier trained on generated slices only, accuracy on real test slices, at least
PRECISION_RECALL = 0.30  # Inception precision and recall (k = 5), means over scanners, at least
SIGNATURE = 0.25  # background noise and sharpness of generated vs real slices, relative gap, at most, every scanner

# translators (mrgen-translator)
TRANSLATION_CONDITIONING = 0.95  # translated slices recognised as the target scanner, at least
CYCLE_SSIM = 0.90  # SSIM between a slice and its round trip, at least
