"""Baselines with the call shape ``method(guide, signal, output_size=None, **kw)``."""

from .classic import bicubic, bilinear, jbu, nearest

__all__ = ["bicubic", "bilinear", "jbu", "nearest"]
