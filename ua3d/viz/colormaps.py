"""Colour maps for depth, error and similarity images (matplotlib colour maps, numpy out).

All functions return float32 RGB in [0, 1] with shape ``[*S, 3]`` for an input of shape ``S``.
"""

from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np

from ua3d.core.checks import depth_valid_mask

__all__ = ["apply_cmap", "colorize_depth", "colorize_error", "colorize_signed", "depth_range"]


def _np(x: Any, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if a.size == 0:
        raise ValueError(f"{name} is empty, shape {a.shape}")
    if a.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    return a.astype(np.float64)


def apply_cmap(values: Any, vmin: float, vmax: float, cmap: str = "turbo") -> np.ndarray:
    """Map ``values`` linearly from ``[vmin, vmax]`` (clipped) through a matplotlib colour map.

    NaN maps to the colour of ``vmin``; use the ``colorize_*`` helpers to paint invalid pixels.
    """
    v = _np(values, "values")
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        raise ValueError(f"vmin and vmax must be finite, got {vmin}, {vmax}")
    span = vmax - vmin if vmax > vmin else 1.0
    t = np.clip(np.nan_to_num((v - vmin) / span, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return matplotlib.colormaps[cmap](t)[..., :3].astype(np.float32)


def depth_range(*depths: Any, percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """Robust common ``(vmin, vmax)`` of the valid pixels of one or more depth maps."""
    vals = [d[depth_valid_mask(d, negative="hole")] for d in (_np(x, "depth") for x in depths)]
    vals = [v for v in vals if v.size]
    if not vals:
        raise ValueError("depth maps have no valid pixel (all holes)")
    lo, hi = np.percentile(np.concatenate(vals), percentiles)
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def colorize_depth(
    depth: Any,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "turbo",
    invalid_color: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Depth ``[H, W]`` to RGB ``[H, W, 3]``: near = blue end of turbo, far = red; holes black.

    Holes are 0, negative, NaN or Inf. ``vmin``/``vmax`` default to the 1st/99th percentile of
    the valid pixels (pass the same values to colour several maps identically).
    """
    d = _np(depth, "depth")
    valid = depth_valid_mask(d, negative="hole")  # a display paints negative pixels as holes
    if vmin is None or vmax is None:
        if not valid.any():
            rgb = np.empty(d.shape + (3,), np.float32)
            rgb[:] = invalid_color
            return rgb
        lo, hi = depth_range(d)
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    rgb = apply_cmap(d, vmin, vmax, cmap)
    rgb[~valid] = invalid_color
    return rgb


def colorize_error(
    error: Any,
    vmax: float | None = None,
    cmap: str = "inferno",
    valid: Any | None = None,
    invalid_color: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> np.ndarray:
    """Non-negative error map (abs. error, 1 - cosine, ...) to RGB; 0 is black, ``vmax`` bright.

    ``vmax`` defaults to the 99th percentile of the finite values. Pixels outside ``valid``
    (bool, same shape) or non-finite are painted ``invalid_color``.
    """
    e = np.abs(_np(error, "error"))
    ok = np.isfinite(e) if valid is None else np.isfinite(e) & np.asarray(valid, bool)
    if vmax is None:
        vmax = float(np.percentile(e[ok], 99)) if ok.any() else 1.0
        vmax = vmax if vmax > 0 else 1.0
    rgb = apply_cmap(e, 0.0, vmax, cmap)
    rgb[~ok] = invalid_color
    return rgb


def colorize_signed(error: Any, vmax: float | None = None, cmap: str = "RdBu_r") -> np.ndarray:
    """Signed error to RGB with a diverging map centred at 0 (white); non-finite -> grey."""
    e = _np(error, "error")
    ok = np.isfinite(e)
    if vmax is None:
        vmax = float(np.percentile(np.abs(e[ok]), 99)) if ok.any() else 1.0
        vmax = vmax if vmax > 0 else 1.0
    rgb = apply_cmap(e, -vmax, vmax, cmap)
    rgb[~ok] = 0.5
    return rgb
