"""DSA augmentation with explicit, replayable parameters: DSAConfig, DSA, AugParams."""

from ddtool.augment.dsa import FAMILIES, AugParams, DSA, DSAConfig

__all__ = ["FAMILIES", "AugParams", "DSA", "DSAConfig"]
