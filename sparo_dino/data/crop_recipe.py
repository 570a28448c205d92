"""DINO's multi-crop recipe as numbers: the one table both crop pipelines build from.

augmentation.MultiCropAugmentation (PIL, one image at a time) and batched_augmentation.BatchedMultiCrop (a whole
batch at once) must draw from the same distributions, or the two `--augmentation` choices would train different
things; reading every strength and probability from here keeps them equal by construction. The values are the
official DINO recipe (and the SPARO paper's, which keeps it).
"""
from __future__ import annotations

FLIP_P = 0.5
# ColorJitter(brightness, contrast, saturation, hue) applied with probability JITTER_P.
JITTER_P = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
GRAYSCALE_P = 0.2
# Gaussian blur probability per view: global crop 1 always, global crop 2 rarely, local crops half the time.
GLOBAL1_BLUR_P, GLOBAL2_BLUR_P, LOCAL_BLUR_P = 1.0, 0.1, 0.5
# Solarize only on global crop 2, inverting pixels >= SOLARIZE_THRESHOLD (of 255).
GLOBAL2_SOLARIZE_P = 0.2
SOLARIZE_THRESHOLD = 128
# Blur sigma (PIL's radius) uniform in this range, in pixels of a run with BLUR_REFERENCE_SIZE px global crops
# (augmentation.blur_sigma_range scales it to other global crop sizes).
BLUR_SIGMA_AT_REFERENCE: tuple[float, float] = (0.1, 2.0)
BLUR_REFERENCE_SIZE = 224
