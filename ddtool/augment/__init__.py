"""Augmentation with explicit, replayable parameters: DSA (DSAConfig, DSA, AugParams) and the
views' crop and CutMix geometry (crops)."""

from ddtool.augment.crops import cutmix_boxes, random_resized_crop_boxes, resized_crop
from ddtool.augment.dsa import FAMILIES, AugParams, DSA, DSAConfig

__all__ = ["FAMILIES", "AugParams", "DSA", "DSAConfig", "cutmix_boxes", "random_resized_crop_boxes", "resized_crop"]
