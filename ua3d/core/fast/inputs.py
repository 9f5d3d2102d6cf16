"""Input checks and per-LR-cell records of the fused engine (host side, numpy): the Python side of
the parameter decoding (:func:`_coefficients`, through :func:`ua3d.core.params.decode_params`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..kernel import check_support_sigmas
from ..params import decode_params
from ._jit import AVAILABLE
from .pool import Geometry, _geometry, _padded_block

#: a neighbour whose weight is below ``e^-gap`` of the largest at every pixel of a block is dropped from that
#: block (weight 0, per compute dtype): ``e^-20 = 2e-9`` against float32's resolution ``6e-8``, ``e^-40 =
#: 4e-18`` against float64's ``1.1e-16``; even 197 dropped neighbours move a normalised weight by at most
#: ``4e-7`` (float32) or ``8e-16`` (float64), relative.
SKIP_GAP = {torch.float32: 20.0, torch.float64: 40.0}
#: False: keep every neighbour (exactly the reference's sums, for tests and measurements)
SKIP = True


#: False: fits with range-group layouts other than RGB take the direct form, not the expanded one
#: (:mod:`~ua3d.core.fast.expanded`; for tests and measurements)
EXPANDED = True


def _use_expanded() -> bool:
    """Whether non-RGB fits take the expanded form (:data:`EXPANDED`)."""
    return EXPANDED


def _skip_gap(cdt: torch.dtype) -> float:
    """The logit gap beyond which neighbours are dropped (:data:`SKIP_GAP`), 0 when :data:`SKIP` is off."""
    return SKIP_GAP[cdt] if SKIP else 0.0


class Frame(NamedTuple):
    """The fixed arrays of one fit or render call, passed to the numba kernels as one argument
    (numpy, compute dtype unless stated)."""

    ghr: np.ndarray  # [B, Cg, H, W] HR guide
    glr: np.ndarray  # [B, Cg, h, w] LR guide (fit: [B, 2 Cg, h, w] with separate LR values after it)
    coef: np.ndarray  # [B, h, w, nrec] per-cell records (:func:`_coefficients`)
    vhr: np.ndarray  # [B, G, H, W] uint8 range validity (a dummy when use_vhr is False)
    vlr: np.ndarray  # [B, G, h, w] uint8 (a dummy when use_vlr is False)
    gstart: np.ndarray  # [G + 1] int64 first channel of each range group
    cut: float  # support cut in sigmas, 0 for none
    use_vhr: bool
    use_vlr: bool


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError("ua3d.core.fast needs numba (pip install numba); use backend='reference'")


def _groups(groups: Sequence[int] | None, n_channels: int) -> tuple[int, ...]:
    g = (n_channels,) if groups is None else tuple(int(v) for v in groups)
    if sum(g) != n_channels or any(v <= 0 for v in g):
        raise ValueError(
            f"groups {g} must be positive channel counts summing to {n_channels} (guide channels)"
        )
    return g


def _compute_dtype(params: torch.Tensor) -> torch.dtype:
    return torch.float64 if params.dtype == torch.float64 else torch.float32


def _np(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """Contiguous CPU numpy view (a copy only when the dtype or layout must change)."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.detach().contiguous().numpy()


def _mask_u8(m: torch.Tensor | None, shape: tuple[int, ...], name: str) -> tuple[np.ndarray, bool]:
    if m is None:
        return np.ones((1,) * len(shape), np.uint8), False
    if tuple(m.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(m.shape)}")
    if m.dtype == torch.uint8:
        return _np(m), True
    # numpy, not torch: a threaded torch comparison leaves OpenMP threads spinning against the engine's
    return np.ascontiguousarray(m.detach().cpu().numpy() != 0).view(np.uint8), True


def _coefficients(params: torch.Tensor, guide_lr: np.ndarray, cdt: torch.dtype, cut: float) -> np.ndarray:
    """Per-LR-cell record ``[B, h, w, 4 + G + Cg (+2)]``, cell-major so that a neighbour's values
    are one contiguous read: ``cos, sin, 1/(2 sx^2), 1/(2 sy^2), 1/(2 sr_g^2)``, the LR guide
    values and, with a support cut, the half extents of the cut ellipse's box.

    numpy, not torch: these arrays are tiny and torch's threaded elementwise kernels can cost
    milliseconds each on a busy machine.
    """
    p = _np(params, cdt)
    lsx, lsy, th, lsr = decode_params(p)
    c, s = np.cos(th), np.sin(th)
    parts = [c, s, 0.5 * np.exp(-2 * lsx), 0.5 * np.exp(-2 * lsy)]
    parts += [0.5 * np.exp(-2 * lsr[:, g]) for g in range(lsr.shape[1])]
    parts += list(guide_lr.transpose(1, 0, 2, 3))
    if cut > 0:
        vx, vy = np.exp(2 * lsx), np.exp(2 * lsy)
        parts += [cut * np.sqrt(c * c * vx + s * s * vy), cut * np.sqrt(s * s * vx + c * c * vy)]
    return np.ascontiguousarray(np.stack(parts, -1), dtype=p.dtype)


def _check_common(params, guide_hr, guide_lr, groups, valid_hr, valid_lr, radius):
    for name, t in (("params", params), ("guide_hr", guide_hr), ("guide_lr", guide_lr)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor for the fast engine, got device {t.device}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    B, P, h, w = params.shape
    Bg, Cg, H, W = guide_hr.shape
    gs = _groups(groups, Cg)
    if P != 3 + len(gs):
        raise ValueError(
            f"params has {P} channels, expected 3 + {len(gs)} range groups (shape {tuple(params.shape)})"
        )
    if Bg != B or tuple(guide_lr.shape) != (B, Cg, h, w):
        raise ValueError(
            f"guide_hr {tuple(guide_hr.shape)} and guide_lr {tuple(guide_lr.shape)} do not match "
            f"params {tuple(params.shape)}"
        )
    if not (radius >= 0) or not math.isfinite(radius):
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    G = len(gs)
    vhr, use_vhr = _mask_u8(valid_hr, (B, G, H, W), "valid_hr")
    vlr, use_vlr = _mask_u8(valid_lr, (B, G, h, w), "valid_lr")
    gstart = np.concatenate([[0], np.cumsum(gs)]).astype(np.int64)
    return gs, gstart, vhr, use_vhr, vlr, use_vlr


class Setup(NamedTuple):
    """What :func:`_setup` derives from the inputs of a fit or render call."""

    fr: Frame
    geo: Geometry
    gs: tuple[int, ...]  # channel counts of the range groups
    cdt: torch.dtype  # compute dtype
    ndt: type[np.floating]  # its numpy scalar type
    pmax: int  # padded largest block (:func:`~ua3d.core.fast.pool._padded_block`)


def _setup(
    params, guide_hr, guide_lr, groups, valid_hr, valid_lr, radius, support_sigmas, values_lr=None
) -> Setup:
    """Checks, compute dtype, block geometry and the :class:`Frame` of a fit or render call.
    ``values_lr`` (fit only) rides in the per-cell record after the range centres (``glr [B, 2 Cg, h, w]``)."""
    gs, gstart, vhr, use_vhr, vlr, use_vlr = _check_common(
        params, guide_hr, guide_lr, groups, valid_hr, valid_lr, radius
    )
    cut = check_support_sigmas(support_sigmas)
    h, w = params.shape[2:]
    H, W = guide_hr.shape[2:]
    cdt = _compute_dtype(params)
    ndt = np.float64 if cdt == torch.float64 else np.float32
    geo = _geometry(H, W, h, w, float(radius), np.dtype(ndt).name)
    ghr = _np(guide_hr, cdt)
    glr = _np(guide_lr, cdt)
    if values_lr is not None:
        if tuple(values_lr.shape) != tuple(guide_lr.shape):
            raise ValueError(
                f"values_lr must have the shape of guide_lr {tuple(guide_lr.shape)}, "
                f"got {tuple(values_lr.shape)}"
            )
        glr = np.ascontiguousarray(np.concatenate([glr, _np(values_lr, cdt)], 1))
    coef = _coefficients(params, glr, cdt, cut)
    fr = Frame(ghr, glr, coef, vhr, vlr, gstart, cut, use_vhr, use_vlr)
    return Setup(fr, geo, gs, cdt, ndt, _padded_block(geo.ry0, geo.ry1, geo.cx0, geo.cx1))
