"""Depth super-resolution metrics with masks for invalid ground truth, border crop and unit scaling.

All metrics take ``pred`` and ``gt`` of the same shape ``[..., H, W]`` (one image; pass images one at a
time to average per image, as the literature does), as torch tensors or numpy arrays, and return a Python
float computed in float64.

Which pixels count
------------------
A pixel is scored when all of these hold:

* the ground truth is valid: finite and ``> 0`` (0 / NaN / inf are "unknown", never "very close");
* it lies outside a border of ``crop`` pixels on every side (NYUv2 literature: ``crop=6``);
* the optional boolean ``mask`` is True there;
* the prediction is finite (methods return NaN where they had no support). The share of GT-valid pixels
  with a finite prediction is reported as ``coverage`` by :func:`compute_metrics`: compare methods only
  at equal coverage.

``scale`` multiplies both maps before the error is taken (e.g. ``100`` for metres -> cm), and ``clip``
clamps the prediction (the Middlebury literature clips to ``(0, 255)``).

Depth-edge pixels (:func:`depth_edge_mask`)
-------------------------------------------
The local discontinuity of the ground truth at ``p`` is ``jump(p) = max_q |gt(q) - gt(p)|`` over the valid
8-neighbours ``q``. ``p`` is an edge pixel when ``jump(p) > rel_threshold * gt(p)`` (default 5 %: unit
free, works for depth and disparity alike) or, if ``abs_threshold`` is given, ``jump(p) > abs_threshold``
(in the GT units). Both sides of a discontinuity are marked (the jump is symmetric) and the mask is then
dilated by ``dilate`` pixels (default 1) to cover the band where upsampling errors concentrate.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "compute_metrics",
    "delta_accuracy",
    "depth_edge_mask",
    "edge_rmse",
    "evaluation_mask",
    "mae",
    "rmse",
]

ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims [..., H, W], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t.detach()


def evaluation_mask(gt: ArrayLike, *, mask: ArrayLike | None = None, crop: int = 0) -> torch.Tensor:
    """Pixels of ``gt`` that are scored, before looking at the prediction.

    Parameters
    ----------
    gt : torch.Tensor or numpy.ndarray
        ``[..., H, W]`` ground truth; valid where finite and ``> 0``.
    mask : torch.Tensor or numpy.ndarray, optional
        ``[..., H, W]`` (or broadcastable) boolean, True = score this pixel.
    crop : int
        Border width excluded on every side.

    Returns
    -------
    torch.Tensor
        ``[..., H, W]`` bool on ``gt``'s device.
    """
    g = _as_tensor(gt, "gt")
    h, w = g.shape[-2:]
    if crop < 0 or 2 * crop >= min(h, w):
        raise ValueError(
            f"crop must be in [0, {(min(h, w) - 1) // 2}] for gt of shape {tuple(g.shape)}, got {crop}"
        )
    valid = torch.isfinite(g) & (g > 0)
    if crop:
        border = torch.zeros_like(valid)
        border[..., crop : h - crop, crop : w - crop] = True
        valid &= border
    if mask is not None:
        m = _as_tensor(mask, "mask").to(device=g.device, dtype=torch.bool)
        try:
            valid = valid & m
        except RuntimeError as err:
            raise ValueError(
                f"mask of shape {tuple(m.shape)} does not match gt of shape {tuple(g.shape)}"
            ) from err
    return valid


def _prepare(
    pred: ArrayLike,
    gt: ArrayLike,
    mask: ArrayLike | None,
    crop: int,
    scale: float,
    clip: tuple[float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Float64 ``(pred, gt)`` maps times ``scale``, the scored-pixel mask and the GT-valid pixel count."""
    p, g = _as_tensor(pred, "pred"), _as_tensor(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {tuple(p.shape)} and {tuple(g.shape)}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    keep = evaluation_mask(g, mask=mask, crop=crop)
    n_gt = int(keep.sum())
    p = p.to(device=g.device, dtype=torch.float64)
    if clip is not None:
        p = p.clamp(clip[0], clip[1])
    keep &= torch.isfinite(p)
    return p * scale, g.to(torch.float64) * scale, keep, n_gt


def _pairs(
    pred: ArrayLike,
    gt: ArrayLike,
    mask: ArrayLike | None,
    crop: int,
    scale: float,
    clip: tuple[float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scored ``(pred, gt)`` values as 1-D float64, and the number of GT-valid pixels."""
    p, g, keep, n_gt = _prepare(pred, gt, mask, crop, scale, clip)
    return p[keep], g[keep], n_gt


def _rmse(p: torch.Tensor, g: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((p - g) ** 2))) if p.numel() else math.nan


def _mae(p: torch.Tensor, g: torch.Tensor) -> float:
    return float(torch.mean(torch.abs(p - g))) if p.numel() else math.nan


def _delta(p: torch.Tensor, g: torch.Tensor, threshold: float) -> float:
    if not p.numel():
        return math.nan
    ratio = torch.where(p > 0, torch.maximum(p / g, g / p.clamp_min(1e-300)), torch.full_like(p, math.inf))
    return float((ratio < threshold).double().mean())


def rmse(
    pred: ArrayLike,
    gt: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    crop: int = 0,
    scale: float = 1.0,
    clip: tuple[float, float] | None = None,
) -> float:
    """Root-mean-square error over the scored pixels (module docstring), in GT units times ``scale``.

    Parameters
    ----------
    pred, gt : torch.Tensor or numpy.ndarray
        ``[..., H, W]`` of the same shape.
    mask, crop, scale, clip
        See :func:`evaluation_mask` and the module docstring.

    Returns
    -------
    float
        NaN when no pixel is scored.
    """
    p, g, _ = _pairs(pred, gt, mask, crop, scale, clip)
    return _rmse(p, g)


def mae(
    pred: ArrayLike,
    gt: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    crop: int = 0,
    scale: float = 1.0,
    clip: tuple[float, float] | None = None,
) -> float:
    """Mean absolute error over the scored pixels, in GT units times ``scale`` (NaN when none)."""
    p, g, _ = _pairs(pred, gt, mask, crop, scale, clip)
    return _mae(p, g)


def delta_accuracy(
    pred: ArrayLike,
    gt: ArrayLike,
    threshold: float = 1.25,
    *,
    mask: ArrayLike | None = None,
    crop: int = 0,
    clip: tuple[float, float] | None = None,
) -> float:
    """Share of scored pixels with ``max(pred / gt, gt / pred) < threshold`` (non-positive pred fails).

    Unit free. Thresholds used in the literature: ``1.25``, ``1.25**2``, ``1.25**3``.

    Returns
    -------
    float
        In ``[0, 1]``; NaN when no pixel is scored.
    """
    if not threshold > 1:
        raise ValueError(f"threshold must be > 1, got {threshold}")
    p, g, _ = _pairs(pred, gt, mask, crop, 1.0, clip)
    return _delta(p, g, threshold)


def depth_edge_mask(
    gt: ArrayLike, *, rel_threshold: float = 0.05, abs_threshold: float | None = None, dilate: int = 1
) -> torch.Tensor:
    """Depth-discontinuity pixels of the ground truth (definition in the module docstring).

    Parameters
    ----------
    gt : torch.Tensor or numpy.ndarray
        ``[..., H, W]`` ground truth, invalid = non-finite or ``<= 0`` (ignored as neighbours).
    rel_threshold : float
        Jump relative to ``gt(p)`` that makes ``p`` an edge (used when ``abs_threshold`` is None).
    abs_threshold : float, optional
        Absolute jump in GT units instead.
    dilate : int
        Dilation radius in pixels (square structuring element).

    Returns
    -------
    torch.Tensor
        ``[..., H, W]`` bool, only ever True on valid GT pixels.
    """
    g = _as_tensor(gt, "gt")
    if dilate < 0:
        raise ValueError(f"dilate must be >= 0, got {dilate}")
    shape = g.shape
    g = g.reshape(-1, 1, *shape[-2:]).to(torch.float64)
    valid = torch.isfinite(g) & (g > 0)
    g = torch.where(valid, g, torch.full_like(g, math.nan))
    padded = F.pad(g, (1, 1, 1, 1), value=math.nan)
    h, w = shape[-2:]
    jump = torch.zeros_like(g)
    for dy in range(3):
        for dx in range(3):
            diff = (padded[..., dy : dy + h, dx : dx + w] - g).abs()
            jump = torch.maximum(jump, torch.nan_to_num(diff, nan=0.0))
    thresh = torch.full_like(g, abs_threshold) if abs_threshold is not None else rel_threshold * g.abs()
    edge = (jump > thresh) & valid
    if dilate:
        edge = F.max_pool2d(edge.double(), 2 * dilate + 1, stride=1, padding=dilate) > 0
        edge &= valid
    return edge.reshape(shape)


def edge_rmse(
    pred: ArrayLike,
    gt: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    crop: int = 0,
    scale: float = 1.0,
    clip: tuple[float, float] | None = None,
    rel_threshold: float = 0.05,
    abs_threshold: float | None = None,
    dilate: int = 1,
) -> float:
    """RMSE restricted to :func:`depth_edge_mask` pixels of ``gt`` (edges found before the border crop)."""
    edges = depth_edge_mask(gt, rel_threshold=rel_threshold, abs_threshold=abs_threshold, dilate=dilate)
    if mask is not None:
        edges = edges & _as_tensor(mask, "mask").to(device=edges.device, dtype=torch.bool)
    return rmse(pred, gt, mask=edges, crop=crop, scale=scale, clip=clip)


def compute_metrics(
    pred: ArrayLike,
    gt: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    crop: int = 0,
    scale: float = 1.0,
    clip: tuple[float, float] | None = None,
    rel_threshold: float = 0.05,
    abs_threshold: float | None = None,
    dilate: int = 1,
) -> dict[str, float]:
    """All metrics of one image.

    Returns
    -------
    dict
        ``rmse, mae`` (GT units times ``scale``), ``delta1, delta2, delta3`` (thresholds ``1.25**k``),
        ``edge_rmse``, ``coverage`` (share of scored GT pixels where ``pred`` is finite) and ``n_valid``
        (scored GT pixels).
    """
    p, g, keep, n_gt = _prepare(pred, gt, mask, crop, scale, clip)
    edges = depth_edge_mask(gt, rel_threshold=rel_threshold, abs_threshold=abs_threshold, dilate=dilate)
    pv, gv = p[keep], g[keep]
    on_edge = edges.to(keep.device)[keep]
    return {
        "rmse": _rmse(pv, gv),
        "mae": _mae(pv, gv),
        "delta1": _delta(pv, gv, 1.25),
        "delta2": _delta(pv, gv, 1.25**2),
        "delta3": _delta(pv, gv, 1.25**3),
        "edge_rmse": _rmse(pv[on_edge], gv[on_edge]),
        "coverage": pv.numel() / n_gt if n_gt else math.nan,
        "n_valid": float(n_gt),
    }
