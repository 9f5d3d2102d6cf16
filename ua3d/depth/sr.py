r"""Guided depth super-resolution with the Upsample Anything kernel.

Why not the 2D recipe as it is
------------------------------
Fitting the kernel to reconstruct the RGB guide and rendering the LR depth with it loses to bicubic on
Middlebury: texture edges are not depth edges, large fitted sigmas blur depth edges, and a kernel that
only *interpolates* the LR samples cannot undo the blur the sensor / the downsampling put into the LR
depth. The method (``scripts/ablate_depth_sr.py`` measures each part; figures in ``docs/depth_sr.md``):

1. **Consistency solve.** The output lives in the span of the kernel, ``D = K c`` (``K`` the render
   operator, ``c`` coefficients on the LR grid), and ``c`` is chosen so that downsampling ``D`` gives the
   LR depth back: ``down(K c) = d_lr``, solved by a few (weighted) GMRES or Richardson iterations starting
   from ``c = d_lr``. The number of iterations is the regulariser.
2. **A forward model estimated from the data.** ``down`` is how the LR depth was made from the scene:
   PIL bicubic (the synthetic protocol B), a box average (``"area"``: integrating sensors), every s-th
   pixel (``"point"``, also called ``"interval"``; which pixel of each block was kept is
   ``interval_phase``: ``"end"`` = ``hr[s-1::s]`` as in protocol A, ``"start"`` = ``hr[::s]``), a Gaussian
   blur with a sub-pixel shift (``"gauss"``, parameters ``blur_sigma``, ``blur_shift``) or ``"none"``
   (render ``d_lr`` directly). ``consistency="auto"`` (the default) chooses per image by
   cross-validation: each candidate is solved on one half of the LR cells (a checkerboard) and scored by
   how well ``down(D)`` predicts the other half; the candidates are the named models and a Gaussian whose
   blur and shift are fitted to the plain render (see :func:`estimate_forward_model`).
3. **Robust data term.** The cross-validated residual of every LR cell measures how far the data
   disagree with the rest of the image: with ``robust="tukey"`` cells beyond ``robust_k`` robust sigmas
   whose value is also impossible for their neighbours (flying pixels between two surfaces, spikes) are
   dropped (treated as holes); ``"huber"`` gives rows Huber weights instead. Confidence maps (``confidence=`` of :func:`upsample_depth`, e.g.
   Park et al.'s weights) multiply the row weights; a zero confidence is a hole.
4. **Sharp, range-aware start kernel** (spatial sigma 0.7 LR cells, colour sigma 0.3, window radius 3)
   and a **self-supervised fit on depth**: the first consistent estimate ``D0`` is the target of a short
   Adam fit of the per-cell kernel (``[RGB, D0]`` guide, depth group only a target), then the solve runs
   again with the fitted kernel; ``fit_rounds`` (2) repeats fit + solve, each round fitted to the previous
   round's output.
5. **Noisy input** (``denoise``, ``post_filter``): when the robust LR noise level (:func:`lr_noise`) is
   above ``NOISE_LEVEL`` the start kernel is wider and the HR estimate goes through a guided filter with
   the colour guide (window ``post_radius`` LR cells, regulariser ``post_eps``) before the bound.
6. **Colour-free blend for sensor depth at large scales** (``colour_blend``): when the LR depth has holes
   and the scale is at least ``BLEND_MIN_SCALE`` (12), the output is the mean of this solution and the
   same method without the colour term: a cell straddling a depth edge is a mixed value whose split the
   colour cannot be trusted to place there, and the mean of the two estimates is the safer guess.
7. **Physically possible output** (``bound``): the result is projected onto the range the data allow:
   each HR pixel lies within the [min, max] of the valid LR cells of its window (``"local"``, default)
   or of the whole image (``"global"``), widened by ``overshoot`` times that range only for the averaging
   forward models (a thin peak averaged away by the downsampling), and never below half the smallest
   valid LR depth: the output is never negative or zero.

Holes
-----
An LR cell is valid where it is finite, ``> 0``, ``mask_lr`` is True and its confidence is > 0. Invalid
cells never enter a weighted sum: every render uses the kernel's ``signal_mask`` (weights renormalised
over valid neighbours), the consistency equations are written only for valid cells whose downsampling
footprint is fully supported, and the fitting target's LR channel is filled from valid cells only
(push-pull). HR pixels with no valid LR cell within the window are NaN with ``support = False``;
``fill_holes=True`` fills them from supported pixels (push-pull), keeping the support map for the caller.

Units pass through: depth is normalised internally by the range of the valid LR values and mapped back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.checks import as_guide
from ..core.kernel import init_params, resample_guide
from ..core.ops import BACKENDS, kernel_render
from ..core.tto import FitConfig, fit_params
from .baselines import guided_filter

__all__ = [
    "FAST",
    "DepthSRConfig",
    "ForwardModel",
    "consistency_solve",
    "downsample_depth",
    "edge_mixing",
    "estimate_forward_model",
    "fill_missing",
    "fit_blur_shift",
    "lr_noise",
    "upsample_depth",
]

#: Named forward models (``"interval"`` is ``"point"``; ``"auto"`` chooses per image).
CONSISTENCY_MODES = ("auto", "bicubic", "area", "bilinear", "point", "interval", "gauss", "none")
DOWN_MODES = ("bicubic", "bilinear", "area", "point", "interval", "gauss")
PHASES = ("auto", "end", "start")
SOLVERS = ("gmres", "richardson")
ROBUST = ("none", "huber", "tukey")
BOUNDS = ("local", "global", "none")
#: forward models that average several HR pixels into one LR value (their output may overshoot the LR range)
AVERAGING = ("bicubic", "bilinear", "area", "gauss")
#: final edge-aware smoothing of the HR estimate: "auto" = guided filter for noisy LR depth only
POST_FILTERS = ("auto", "guided", "none")


@dataclass(frozen=True)
class DepthSRConfig:
    """Settings of :func:`upsample_depth`.

    Attributes
    ----------
    sigma_spatial : start spatial sigma in LR cells (0.7; HR pixels = this times the per-axis scale).
    denoise : ``"auto"`` (default): when the LR depth is noisy (:func:`lr_noise` above ``NOISE_LEVEL``)
        the start spatial sigma becomes ``noisy_sigma_spatial``; ``"off"`` keeps ``sigma_spatial``.
    noisy_sigma_spatial : spatial sigma (LR cells) used for noisy LR depth (1.5).
    sigma_range : start colour range sigma, guide units (for RGB in [0, 1]), or ``"auto"`` (default):
        cross-validated per image among :data:`SIGMA_RANGE_CANDIDATES` (how far the colour edges can be
        trusted as depth edges: 0.3 on Middlebury, larger on real sensor frames).
    radius : window radius in LR cells (3: 29 neighbours; 2, 13 neighbours, was the round-2 default: radius 3
        is 2.6-6 % better on Middlebury / NYUv2 protocol B for about 1.2x the time, ``docs/depth_sr.md``).
    range_centre : colour of an LR cell: ``"bilinear"`` (guide sampled at the cell centre) or ``"area"``.
    consistency : forward model ``down`` of the consistency solve: ``"auto"`` (default: chosen per image
        by cross-validation, :func:`estimate_forward_model`), ``"bicubic"`` (antialiased, = PIL ``BICUBIC``:
        protocol B), ``"area"`` (exact box average, any ratio), ``"bilinear"`` (antialiased), ``"point"``
        or its alias ``"interval"`` (one HR pixel per LR cell, which one: ``interval_phase``; protocol A is
        ``"end"``), ``"gauss"`` (Gaussian blur ``blur_sigma`` + shift ``blur_shift``, HR pixels) or
        ``"none"`` (no solve: plain render).
    interval_phase : which pixel of each block a point-sampled LR depth kept: ``"end"`` (``hr[s-1::s]``,
        protocol A), ``"start"`` (``hr[::s]``) or ``"auto"`` (cross-validated like ``consistency``).
    blur_sigma : Gaussian forward model: blur sigma in HR pixels (0 = point sample with interpolation).
    blur_shift : Gaussian forward model: ``(dy, dx)`` offset of the LR sample from the cell centre, HR px.
    robust : ``"none"``, ``"huber"`` (row weights from the cross-validated residuals) or ``"tukey"`` (the
        same with Tukey weights: cells beyond ``robust_k`` robust sigmas are dropped as outliers).
    robust_k : threshold of the robust weights in robust sigmas (1.4826 x MAD of the residuals).
    bound : ``"local"`` (default: window [min, max] of valid LR cells), ``"global"`` or ``"none"``.
    overshoot : widening of the bound, as a share of the local (global) LR range, for averaging models.
    solver : ``"gmres"`` or ``"richardson"`` (iterative back-projection, step 1).
    iters : solver iterations per solve (the regulariser: fewer = smoother); each costs one render.
    fit_steps : Adam steps of the self-supervised depth fit (0 = keep the start kernel, one solve).
    fit_lr : Adam learning rate of the fit.
    fit_rgb_weight : loss weight of the colour channels in the fit (0: depth only).
    fit_target : ``"depth"`` (the self-supervised depth fit above) or ``"rgb"`` (the 2D recipe: fit the
        kernel to reconstruct the colour guide only; kept for the ablation, it loses on Middlebury).
    fit_rounds : rounds of (fit, solve) after the first solve (2: the second self-supervised round, fitted to
        the first round's output, gains 1-5 % on every set for about 1.4x the time; 1 was the round-2 method).
    post_filter : ``"auto"`` (default: a guided filter of the HR estimate when the LR depth is noisy, see
        ``denoise``), ``"guided"`` (always) or ``"none"``; applied before the bound.
    post_radius : window radius of that guided filter in LR cells (0.5: ``round(s / 2)`` HR pixels, >= 1).
    post_eps : its regulariser in squared guide units (1e-3, as the guided-filter baseline).
    colour_blend : share of a colour-free solution averaged into the output, a number in [0, 1] or
        ``"auto"`` (default): :data:`BLEND_SHARE` when the LR depth has holes (raw sensor depth, more than
        0.5 % of the cells) and the larger per-axis scale is at least :data:`BLEND_MIN_SCALE`, else 0. The
        colour-free solution is the same method with colour sigma :data:`NO_COLOUR` (same forward model,
        fit rounds and bound); at x16 a sensor-depth cell that straddles a depth edge (often beside a
        shadow hole) is a mixed value whose split the colour cannot be trusted to place, and RMSE favours
        the mean of the two estimates there (issue 19, ``docs/depth_sr.md``). Costs a second solve.
    backend : kernel engine, ``"auto"``, ``"fast"`` or ``"reference"``.
    """

    sigma_spatial: float = 0.7
    denoise: str = "auto"
    noisy_sigma_spatial: float = 1.5
    sigma_range: float | str = "auto"
    radius: float = 3.0
    range_centre: str = "bilinear"
    consistency: str = "auto"
    interval_phase: str = "auto"
    blur_sigma: float = 0.0
    blur_shift: tuple[float, float] = (0.0, 0.0)
    robust: str = "none"
    robust_k: float = 4.0
    bound: str = "local"
    overshoot: float = 0.1
    solver: str = "gmres"
    iters: int = 4
    fit_steps: int = 5
    fit_lr: float = 0.1
    fit_rgb_weight: float = 0.0
    fit_target: str = "depth"
    fit_rounds: int = 2
    post_filter: str = "auto"
    post_radius: float = 0.5
    post_eps: float = 1e-3
    colour_blend: float | str = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("sigma_spatial", "noisy_sigma_spatial", "sigma_range", "fit_lr", "robust_k", "post_eps"):
            v = getattr(self, name)
            if name == "sigma_range" and v == "auto":
                continue
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        for name in ("radius", "blur_sigma", "overshoot", "fit_rgb_weight", "post_radius"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        shift = self.blur_shift
        if not (
            isinstance(shift, (tuple, list))
            and len(shift) == 2
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in shift
            )
        ):
            raise ValueError(
                f"blur_shift must be a pair of finite numbers (dy, dx) in HR pixels, got {shift!r}"
            )
        cb = self.colour_blend
        if cb != "auto" and (
            isinstance(cb, bool) or not isinstance(cb, (int, float)) or not (0.0 <= cb <= 1.0)
        ):
            raise ValueError(f"colour_blend must be 'auto' or a number in [0, 1], got {cb!r}")
        for name in ("iters", "fit_steps", "fit_rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        _choice("range_centre", self.range_centre, ("bilinear", "area"))
        _choice("denoise", self.denoise, ("auto", "off"))
        _choice("consistency", self.consistency, CONSISTENCY_MODES)
        _choice("interval_phase", self.interval_phase, PHASES)
        _choice("robust", self.robust, ROBUST)
        _choice("bound", self.bound, BOUNDS)
        _choice("solver", self.solver, SOLVERS)
        _choice("fit_target", self.fit_target, ("depth", "rgb"))
        _choice("post_filter", self.post_filter, POST_FILTERS)
        _choice("backend", self.backend, BACKENDS)

    def replace(self, **changes) -> DepthSRConfig:
        """A copy with some fields changed (unknown names raise ``ValueError``)."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise ValueError(f"unknown DepthSRConfig option(s) {bad}; known: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


#: A faster preset (3 solver iterations, 3 fit steps), see ``scripts/bench_depth_sr.py``.
FAST = DepthSRConfig(iters=3, fit_steps=3)


@dataclass(frozen=True)
class ForwardModel:
    """A forward model ``down``: how an LR depth is made from the HR depth (:func:`downsample_depth`).

    ``mode`` is one of ``"bicubic", "bilinear", "area", "point", "gauss", "none"``; ``phase`` matters for
    ``"point"`` (``"end"``: ``hr[s-1::s]``, ``"start"``: ``hr[::s]``); ``sigma`` and ``shift`` (HR pixels)
    for ``"gauss"``. ``score`` is the cross-validated error it was chosen with (normalised depth units),
    NaN when it was not estimated; ``mixing`` the :func:`edge_mixing` share that decided between point
    sampling and an averaging model (NaN when not used); ``sigma_range``, ``noise``, ``sigma_spatial`` the
    chosen colour sigma, the LR noise level and the start spatial sigma; ``blend`` the share of the
    colour-free solution in the output (``colour_blend``; NaN when not run).
    """

    mode: str
    phase: str = "end"
    sigma: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)
    score: float = math.nan
    mixing: float = math.nan
    sigma_range: float = math.nan
    noise: float = math.nan
    sigma_spatial: float = math.nan
    blend: float = math.nan

    @property
    def averaging(self) -> bool:
        return self.mode in AVERAGING

    def describe(self) -> str:
        if self.mode == "point":
            return f"point ({'hr[s-1::s]' if self.phase == 'end' else 'hr[::s]'})"
        if self.mode == "gauss":
            return f"gauss (sigma {self.sigma:.2f} px, shift {self.shift[0]:+.2f}, {self.shift[1]:+.2f} px)"
        return self.mode


# --------------------------------------------------------------------------- small tensor tools
def _point_index(n_hr: int, n_lr: int, phase: str) -> list[int]:
    """HR index kept for each LR cell: end = last pixel of the block, start = first (any ratio)."""
    if phase == "end":
        return [max(0, ((i + 1) * n_hr) // n_lr - 1) for i in range(n_lr)]
    return [(i * n_hr) // n_lr for i in range(n_lr)]


def _axis_matrix(
    n_hr: int,
    n_lr: int,
    mode: str,
    phase: str,
    sigma: float,
    shift: float,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``[n_lr, n_hr]`` weights of one axis of a separable forward model (rows sum to 1)."""
    r = n_hr / n_lr
    if mode == "area":  # exact overlap of pixel [p, p+1) with cell [i r, (i+1) r)
        edges = torch.arange(n_lr + 1, dtype=torch.float64) * r
        p = torch.arange(n_hr, dtype=torch.float64)
        lo = torch.maximum(p[None, :], edges[:-1, None])
        hi = torch.minimum(p[None, :] + 1, edges[1:, None])
        m = (hi - lo).clamp_min(0) / r
    elif mode in ("point", "interval"):
        m = torch.zeros(n_lr, n_hr, dtype=torch.float64)
        m[torch.arange(n_lr), torch.tensor(_point_index(n_hr, n_lr, phase))] = 1.0
    else:  # gauss: sample at the cell centre + shift, blurred by sigma (sigma 0: linear interpolation)
        x = (torch.arange(n_lr, dtype=torch.float64) + 0.5) * r - 0.5 + shift
        x = x.clamp(0, n_hr - 1)
        p = torch.arange(n_hr, dtype=torch.float64)
        d = p[None, :] - x[:, None]
        m = (
            (1 - d.abs()).clamp_min(0)
            if sigma < 0.3
            else torch.exp(-0.5 * (d / sigma) ** 2) * (d.abs() <= 3 * sigma + 1)
        )
        m = m / m.sum(1, keepdim=True)
    return m.to(device=device, dtype=dtype)


def downsample_depth(
    depth: torch.Tensor,
    size: tuple[int, int],
    mode: str | ForwardModel = "bicubic",
    support: torch.Tensor | None = None,
    *,
    phase: str = "end",
    sigma: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward model ``down``: HR depth ``[B, 1, H, W]`` to the LR grid ``size = (h, w)``, any ratio.

    ``"bicubic"`` and ``"bilinear"`` are antialiased (PyTorch's antialiased bicubic uses Pillow's
    ``a = -0.5`` kernel, so ``"bicubic"`` is PIL ``BICUBIC`` resizing); ``"area"`` is the exact box average
    (fractional pixel overlaps for non-integer ratios); ``"point"`` (alias ``"interval"``) keeps one pixel
    per cell: ``phase="end"`` the last of its block (``depth[..., s-1::s, s-1::s]``: protocol A),
    ``"start"`` the first (``depth[..., ::s, ::s]``); ``"gauss"`` samples at the cell centre moved by
    ``shift = (dy, dx)`` HR pixels after a Gaussian blur of ``sigma`` HR pixels. ``mode`` may also be a
    :class:`ForwardModel`. With ``support [B, 1, H, W]`` (bool) the unsupported pixels are left out: the
    result is normalised by the downsampled support, and ``ok`` is True only where the LR footprint is
    (almost) fully supported.

    Returns
    -------
    out : ``[B, 1, h, w]`` (0 where not ``ok``)
    ok : ``[B, 1, h, w]`` bool
    """
    if isinstance(mode, ForwardModel):
        mode, phase, sigma, shift = mode.mode, mode.phase, mode.sigma, mode.shift
    if mode not in DOWN_MODES:
        raise ValueError(f"mode must be one of {DOWN_MODES}, got {mode!r}")
    _choice("phase", phase, ("end", "start"))
    H, W = depth.shape[-2:]
    size = (int(size[0]), int(size[1]))
    if size[0] < 1 or size[1] < 1 or size[0] > H or size[1] > W:
        raise ValueError(f"size must be between (1, 1) and the HR size {(H, W)}, got {size}")

    if mode in ("bicubic", "bilinear"):

        def resize(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    else:
        my = _axis_matrix(H, size[0], mode, phase, sigma, float(shift[0]), depth.device, depth.dtype)
        mx = _axis_matrix(W, size[1], mode, phase, sigma, float(shift[1]), depth.device, depth.dtype)

        def resize(x: torch.Tensor) -> torch.Tensor:
            return torch.matmul(torch.matmul(my, x), mx.T)

    if support is None:
        out = resize(depth)
        return out, torch.ones_like(out, dtype=torch.bool)
    s = support.to(depth.dtype)
    num = resize(torch.where(support, depth, torch.zeros((), dtype=depth.dtype, device=depth.device)))
    den = resize(s)
    ok = den > 0.999
    out = torch.where(ok, num / den.clamp_min(1e-6), torch.zeros((), dtype=depth.dtype, device=depth.device))
    return out, ok


def fill_missing(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Fill ``x [B, C, H, W]`` where ``valid [B, 1, H, W]`` is False by push-pull (masked mean pyramid).

    Valid values are returned unchanged; each missing pixel gets a smooth average of the nearest valid
    ones (coarser levels reach further). Values under ``valid == False`` are never read. An item with no
    valid pixel at all is returned as zeros.
    """
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(valid, x, zero)
    if bool(valid.all()) or x.shape[-1] * x.shape[-2] <= 1:
        return x
    H, W = x.shape[-2:]
    size = (max(1, -(-H // 2)), max(1, -(-W // 2)))
    v = valid.to(x.dtype)
    num = F.adaptive_avg_pool2d(x * v, size)
    den = F.adaptive_avg_pool2d(v, size)
    coarse_valid = den > 0
    coarse = torch.where(coarse_valid, num / den.clamp_min(1e-12), zero)
    coarse = fill_missing(coarse, coarse_valid)
    up = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    return torch.where(valid, x, up)


def _gmres(apply_a, b: torch.Tensor, ax0: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` GMRES steps (no restart, Gram-Schmidt twice) for ``A x = b`` from ``x0`` with ``A x0 = ax0``.

    ``apply_a`` is called on the Krylov basis vectors ``q_0, q_1, ...`` in order. Returns ``y [n]`` with
    the solution ``x = x0 + sum_k y_k q_k`` (``n <= iters``; empty when ``x0`` already solves it), so
    that a caller who keeps what it computed for each ``q_k`` gets the same combination of those too.
    """
    shape, dt = b.shape, b.dtype
    wd = torch.float32 if b.device.type == "mps" else torch.float64
    r0 = b.reshape(-1).to(wd) - ax0.reshape(-1).to(wd)
    beta = r0.norm()
    if float(beta) == 0.0 or iters == 0:
        return torch.zeros(0, dtype=wd, device=b.device)
    basis = [r0 / beta]
    hess = torch.zeros(iters + 1, iters, dtype=wd, device=b.device)
    n = 0
    for k in range(iters):
        v = apply_a(basis[k].reshape(shape).to(dt)).reshape(-1).to(wd)
        for _ in range(2):
            for j in range(k + 1):
                c = basis[j] @ v
                hess[j, k] += c
                v = v - c * basis[j]
        hess[k + 1, k] = v.norm()
        n = k + 1
        if float(hess[k + 1, k]) <= 1e-12 * float(beta):
            break
        basis.append(v / hess[k + 1, k])
    e1 = torch.zeros(n + 1, 1, dtype=wd, device=b.device)
    e1[0, 0] = beta
    return torch.linalg.lstsq(hess[: n + 1, :n].cpu(), e1.cpu()).solution.to(b.device)[:, 0]


def consistency_solve(
    render,
    d_lr: torch.Tensor,
    valid: torch.Tensor,
    mode: str | ForwardModel,
    iters: int,
    solver: str = "gmres",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients ``c`` with ``down(render(c)) ~= d_lr`` on the valid LR cells, and their render.

    Parameters
    ----------
    render : callable ``c [B, 1, h, w] -> (out [B, 1, H, W], support [B, 1, H, W])``, linear in ``c``;
        must exclude the cells where ``valid`` is False (the kernel's ``signal_mask``).
    d_lr : ``[B, 1, h, w]`` LR depth (any value where not valid).
    valid : ``[B, 1, h, w]`` bool.
    mode : forward model of :func:`downsample_depth` (a name or a :class:`ForwardModel`), or ``"none"``
        (no solve: ``c = d_lr``).
    iters : solver iterations (0: ``c = d_lr``). Each costs one render.
    solver : ``"gmres"`` or ``"richardson"`` (``c += w r``: iterative back-projection).
    weights : optional ``[B, 1, h, w]`` row weights in ``[0, 1]`` (robust / confidence weights): GMRES
        minimises the weighted residual ``|| w^(1/2) (d_lr - down(render(c))) ||``.

    Returns
    -------
    c : ``[B, 1, h, w]``, zero at invalid cells
    out : ``[B, 1, H, W]`` ``render(c)`` (for GMRES assembled from the renders of the Krylov basis: no
        extra render)
    support : ``[B, 1, H, W]`` bool
    """
    _choice("solver", solver, SOLVERS)
    zero = torch.zeros((), dtype=d_lr.dtype, device=d_lr.device)
    c0 = torch.where(valid, d_lr, zero)
    out0, sup = render(c0)
    name = mode.mode if isinstance(mode, ForwardModel) else mode
    if name == "none" or iters == 0:
        return c0, out0, sup
    size = tuple(d_lr.shape[-2:])
    sw = None if weights is None else weights.to(d_lr.dtype).clamp(0, 1).sqrt()

    def down(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, ok = downsample_depth(out, size, mode, sup)
        return low, ok & valid

    if solver == "richardson":
        c, out = c0, out0
        for _ in range(iters):
            low, rows = down(out)
            r = torch.where(rows, d_lr - low, zero)
            if sw is not None:
                r = r * sw * sw
            c = c + r
            out = out + render(r)[0]
        return c, out, sup
    # The equations kept are the rows supported by the start; A is linear on the valid cells.
    low0, rows0 = down(out0)
    basis, rendered = [], []

    def rows(x: torch.Tensor) -> torch.Tensor:
        x = torch.where(rows0, x, zero)
        return x if sw is None else x * sw

    def apply_a(q: torch.Tensor) -> torch.Tensor:
        basis.append(torch.where(valid, q, zero))
        rendered.append(render(basis[-1])[0])
        return rows(down(rendered[-1])[0])

    y = _gmres(apply_a, rows(d_lr), rows(low0), iters)
    c, out = c0.to(y.dtype), out0.to(y.dtype)
    for k in range(y.numel()):
        c = c + y[k] * basis[k].to(y.dtype)
        out = out + y[k] * rendered[k].to(y.dtype)
    return c.to(d_lr.dtype), out.to(out0.dtype), sup


# --------------------------------------------------------------------------- input handling
def _as_depth(depth_lr: object) -> torch.Tensor:
    if isinstance(depth_lr, np.ndarray):
        depth_lr = torch.from_numpy(np.ascontiguousarray(depth_lr))
    if not isinstance(depth_lr, torch.Tensor):
        raise ValueError(f"depth_lr must be a torch.Tensor or numpy array, got {type(depth_lr).__name__}")
    d = depth_lr
    if d.ndim == 2:
        d = d[None, None]
    elif d.ndim == 3:
        d = d[:, None]
    if d.ndim != 4 or d.shape[1] != 1:
        raise ValueError(f"depth_lr must be [B, 1, h, w] or [h, w], got shape {tuple(depth_lr.shape)}")
    if d.numel() == 0:
        raise ValueError(f"depth_lr is empty: shape {tuple(depth_lr.shape)}")
    if not d.is_floating_point():
        d = d.to(torch.float32)
    return d


def _check_sizes(d: torch.Tensor, g: torch.Tensor, scale: float | None) -> None:
    h, w = d.shape[-2:]
    H, W = g.shape[-2:]
    if g.shape[0] != d.shape[0]:
        raise ValueError(f"batch size of guide_hr {tuple(g.shape)} does not match depth_lr {tuple(d.shape)}")
    if H < h or W < w:
        raise ValueError(
            f"guide_hr {tuple(g.shape)} is smaller than depth_lr {tuple(d.shape)}: expected an "
            f"HR guide at least as large as the LR depth"
        )
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (1 <= scale < math.inf):
        raise ValueError(f"scale must be a finite number >= 1, got {scale!r}")
    if not (math.isclose(h * scale, H) and math.isclose(w * scale, W)):
        raise ValueError(
            f"depth_lr {tuple(d.shape)} times scale {scale} does not give guide_hr "
            f"{tuple(g.shape)}: expected guide size ({h * scale:g}, {w * scale:g})"
        )


def _valid_lr(d: torch.Tensor, mask_lr: object) -> torch.Tensor:
    valid = torch.isfinite(d) & (d != 0)
    if mask_lr is not None:
        m = torch.as_tensor(mask_lr, device=d.device)
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[:, None]
        if tuple(m.shape) != tuple(d.shape):
            raise ValueError(f"mask_lr must have depth_lr's shape {tuple(d.shape)}, got {tuple(m.shape)}")
        valid = valid & m.bool()
    neg = valid & (d < 0)
    if bool(neg.any()):
        raise ValueError(
            f"depth_lr has {int(neg.sum())} negative value(s) (shape {tuple(d.shape)}); "
            f"depth must be >= 0 with 0 or NaN marking holes"
        )
    for b in range(d.shape[0]):
        if not bool(valid[b].any()):
            raise ValueError(
                f"depth_lr item {b} has no valid value (all 0, NaN or masked out; shape {tuple(d.shape)})"
            )
    return valid


# --------------------------------------------------------------------------- the method
#: relative LR noise (:func:`lr_noise`) above which ``denoise="auto"`` widens the spatial sigma: the Park et
#: al. noisy inputs measure 0.0230-0.0337, the clean and raw-sensor LR depth of the shared data <= 0.0064
#: except one Middlebury scene at x16 (Art, 0.0223: texture, not noise), so the margin is thin; measured
#: in ``docs/depth_sr.md``
NOISE_LEVEL = 0.0226


def lr_noise(d: torch.Tensor, valid: torch.Tensor) -> float:
    """Robust noise level of an LR depth ``[1, 1, h, w]`` relative to its valid range: ``1.4826`` times the
    median absolute difference from the 3x3 median of the valid cells, divided by ``max - min``."""
    x = torch.where(valid, d, torch.full((), math.nan, dtype=d.dtype, device=d.device)).double()
    vals = x[valid]
    span = float(vals.max() - vals.min()) if vals.numel() else 0.0
    if span <= 0 or min(x.shape[-2:]) < 3:
        return 0.0
    med = torch.nanmedian(F.unfold(F.pad(x, (1, 1, 1, 1), value=math.nan), 3), dim=1).values.reshape(x.shape)
    r = (x - med)[valid & torch.isfinite(med)]
    return 1.4826 * float(r.abs().median()) / span if r.numel() else 0.0


#: colour sigmas tried by ``sigma_range="auto"`` (the first is also the one the forward model is chosen with)
SIGMA_RANGE_CANDIDATES = (0.3, 0.6, 1.2)
#: ``colour_blend="auto"``: share of the colour-free solution, and the smallest scale it applies at (LR depth
#: with holes only). TUM x16 (area LR) 18.89 -> 16.0x cm, bicubic 16.44; x8 is not blended (speed target; x8
#: already beats bicubic); measured in ``docs/depth_sr.md``
BLEND_SHARE = 0.5
BLEND_MIN_SCALE = 12.0
#: colour sigma of the colour-free solution (guide units: the range term is ~1 everywhere)
NO_COLOUR = 100.0
#: cross-validation score: mean absolute ("mae") or root-mean-square ("rmse") error of the held-out cells
CV_SCORE = "rmse"
#: how ``interval_phase="auto"`` chooses: "guide" (depth edges vs the colour edges of the guide point-sampled
#: at each phase: 69 of 72 right on the shared data, the 3 misses on TUM whose colour is offset) or "cv"
PHASE_SELECT = "guide"
#: how ``sigma_range="auto"`` chooses: "zoom" (upsample the LR depth from half its size, guide at the LR
#: size), "zoom-hr" (the same with the HR guide, scored on the LR grid through the area model; picks the
#: same sigma as "zoom" on the shared real frames, at 1.3-2x the cost) or "cv"
RANGE_SELECT = "zoom"

#: share of intermediate LR values at clean step edges below which the LR depth counts as point-sampled:
#: for LR depth with holes (raw sensor depth, whose HR edges are sharp: point <= 0.15, box >= 0.39 on the
#: shared real frames) and for hole-free LR depth (hole-filled / in-painted maps with soft edges: point
#: <= 0.53, box >= 0.59 on Middlebury dev and NYUv2); measured in ``docs/depth_sr.md``
POINT_MIXING = {"holes": 0.27, "hole-free": 0.56}


def edge_mixing(d: torch.Tensor, valid: torch.Tensor) -> tuple[float, int]:
    """How often an LR step edge has an intermediate value: ``(share, count)``.

    Looks at runs of five cells ``x0..x4`` along rows and columns that are flat on both sides
    (``|x0 - x1|``, ``|x3 - x4|`` within twice the median cell-to-cell change, at least 0.1 % of the
    depth range) around a jump ``x3 - x1``
    ten times larger, and returns the share whose middle value ``x2`` lies strictly inside the jump
    (15-85 %). An averaging forward model (box, bicubic) puts an intermediate value at most step edges;
    point sampling almost never does. ``count`` is the number of such runs (NaN share when there is none).
    """
    x = torch.where(valid, d, torch.full((), math.nan, dtype=d.dtype, device=d.device))[0, 0].double()
    vals = x[torch.isfinite(x)]
    # cells next to a hole are left out: a block cut by a hole (sensor shadow at an edge) is not mixed
    inner = -F.max_pool2d(-(valid[:1, :1].double()), 3, stride=1, padding=1)[0, 0] > 0.5
    x = torch.where(inner, x, torch.full((), math.nan, dtype=x.dtype, device=x.device))
    floor = 1e-3 * float(vals.max() - vals.min()) if vals.numel() else 0.0
    hits, total = 0, 0
    for a in (x, x.T):
        if a.shape[1] < 5:
            continue
        step = (a[:, 1:] - a[:, :-1]).abs()
        step = step[torch.isfinite(step)]
        if step.numel() == 0:
            continue
        t = max(2 * float(step.median()), floor)
        if t <= 0:
            continue
        x0, x1, x2, x3, x4 = (a[:, i : a.shape[1] - 4 + i] for i in range(5))
        jump = x3 - x1
        ok = (
            (x0 - x1).abs().le(t)
            & (x3 - x4).abs().le(t)
            & jump.abs().gt(10 * t)
            & torch.isfinite(x0 + x1 + x2 + x3 + x4)
        )
        f = (x2 - x1)[ok] / jump[ok]
        hits += int(((f > 0.15) & (f < 0.85)).sum())
        total += int(f.numel())
    return (hits / total if total else math.nan), total


def _checkerboard(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = valid.shape[-2:]
    yy, xx = torch.meshgrid(
        torch.arange(h, device=valid.device), torch.arange(w, device=valid.device), indexing="ij"
    )
    even = ((yy + xx) % 2 == 0)[None, None]
    return valid & even, valid & ~even


def _as_confidence(conf: object, d: torch.Tensor) -> torch.Tensor | None:
    """Confidence ``[B, 1, h, w]`` in [0, 1] from an LR-sized or HR-sized map (area average to LR)."""
    if conf is None:
        return None
    c = torch.as_tensor(np.asarray(conf) if not isinstance(conf, torch.Tensor) else conf, device=d.device)
    if c.ndim == 2:
        c = c[None, None]
    elif c.ndim == 3:
        c = c[:, None]
    if c.ndim != 4 or c.shape[1] != 1 or c.shape[0] != d.shape[0] or c.numel() == 0:
        raise ValueError(
            f"confidence must be [B, 1, h, w] or [h, w] (LR or HR size) matching depth_lr "
            f"{tuple(d.shape)}, got shape {tuple(c.shape)}"
        )
    c = c.to(torch.float64)
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
        raise ValueError("confidence must be finite and >= 0 (0 = ignore the cell)")
    if tuple(c.shape[-2:]) != tuple(d.shape[-2:]):
        if c.shape[-2] < d.shape[-2] or c.shape[-1] < d.shape[-1]:
            raise ValueError(
                f"confidence of size {tuple(c.shape[-2:])} is smaller than depth_lr "
                f"{tuple(d.shape[-2:])}: give it at the LR or at the HR size"
            )
        c = downsample_depth(c, tuple(d.shape[-2:]), "area")[0]
    top = c.flatten(1).amax(1).clamp_min(1e-300)[:, None, None, None]
    return (c / top).to(d.dtype)


class _Problem:
    """One image: guides, normalised LR depth and its validity, the forward model, and a render."""

    def __init__(
        self,
        guide: torch.Tensor,
        d: torch.Tensor,
        valid: torch.Tensor,
        cfg: DepthSRConfig,
        confidence: torch.Tensor | None = None,
    ) -> None:
        self.g = guide
        self.cfg = cfg
        self.size_lr = tuple(d.shape[-2:])
        self.size_hr = tuple(guide.shape[-2:])
        if confidence is not None:
            valid = valid & (confidence > 0)
        self.valid = valid
        self.input_valid = valid
        self.confidence = confidence
        vals = d[valid]
        self.lo = vals.min()
        span = vals.max() - self.lo
        self.span = torch.where(span > 0, span, torch.ones_like(span))
        zero = torch.zeros((), dtype=d.dtype, device=d.device)
        self.t = torch.where(valid, (d - self.lo) / self.span, zero)
        self.g_lr = resample_guide(guide, self.size_lr, cfg.range_centre)
        self.model: ForwardModel | None = None
        self.sigma_range = SIGMA_RANGE_CANDIDATES[0] if cfg.sigma_range == "auto" else float(cfg.sigma_range)
        self.noise = lr_noise(self.t, valid) if cfg.denoise == "auto" else math.nan
        noisy = cfg.denoise == "auto" and self.noise > NOISE_LEVEL
        self.noisy = noisy
        self.sigma_spatial = cfg.noisy_sigma_spatial if noisy else cfg.sigma_spatial
        self.weights: torch.Tensor | None = confidence
        self.n_outliers = 0

    def start_params(self, sigma_range: float | None = None) -> torch.Tensor:
        if sigma_range is not None:
            self.sigma_range = sigma_range
        (h, w), (H, W) = self.size_lr, self.size_hr
        ss = self.sigma_spatial
        sigma = (ss * W / w, ss * H / h)  # LR cells -> HR pixels, per axis
        return init_params(
            1,
            (h, w),
            (H, W),
            sigma_spatial=sigma,
            sigma_range=self.sigma_range,
            device=self.g.device,
            dtype=self.g.dtype,
        )

    def render(
        self, params: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return kernel_render(
            params,
            self.g,
            self.g_lr,
            c,
            self.cfg.radius,
            signal_mask=self.valid if mask is None else mask,
            backend=self.cfg.backend,
        )

    # ---------------------------------------------------------------- forward model
    def _fit_gauss(self, params: torch.Tensor) -> ForwardModel:
        """Gaussian blur + shift with the smallest cross-validated error (coordinate search on a grid)."""
        (h, w), (H, W) = self.size_lr, self.size_hr
        sy, sx = H / h, W / w
        a, b = _checkerboard(self.valid)
        cache: dict[tuple[float, float, float], float] = {}

        def err(sigma: float, shift: tuple[float, float]) -> float:
            key = (round(sigma, 6), round(shift[0], 6), round(shift[1], 6))
            if key not in cache:
                r = self.cross_validate(params, ForwardModel("gauss", sigma=sigma, shift=shift), a, b)
                fin = r[torch.isfinite(r)]
                cache[key] = float(fin.abs().mean()) if fin.numel() else math.inf
            return cache[key]

        s = max(sy, sx)
        sigma, shift = 0.0, [0.0, 0.0]
        for step_s, frac in (
            (0.15 * s, (-1.0, -0.5, 0.0, 0.5, 1.0)),
            (0.075 * s, (-0.5, -0.25, 0.0, 0.25, 0.5)),
        ):
            sigma = min(
                (max(0.0, sigma + k * step_s) for k in (-2, -1, 0, 1, 2)), key=lambda v: err(v, tuple(shift))
            )
            for axis, sc in ((0, sy), (1, sx)):
                half = max((sc - 1) / 2, 0.5)
                cands = [shift[axis] + half * f for f in frac]
                shift[axis] = min(
                    cands,
                    key=lambda v, ax=axis: err(sigma, tuple(v if i == ax else shift[i] for i in range(2))),
                )
        sigma = min((max(0.0, sigma + k * 0.075 * s) for k in (-1, 0, 1)), key=lambda v: err(v, tuple(shift)))
        return ForwardModel(
            "gauss",
            sigma=float(sigma),
            shift=(float(shift[0]), float(shift[1])),
            score=err(sigma, tuple(shift)),
        )

    def guide_phase(self) -> str | None:
        """Phase of point-sampled LR depth from the guide: the depth edges of the LR grid line up with the colour
        edges of the guide point-sampled at the same phase (correlation of gradient magnitudes); None if
        undecided."""

        def grad(x: torch.Tensor) -> torch.Tensor:
            gx = (x[..., :, 1:] - x[..., :, :-1]).abs()[..., :-1, :]
            gy = (x[..., 1:, :] - x[..., :-1, :]).abs()[..., :, :-1]
            return (gx**2 + gy**2).sum(1, keepdim=True).sqrt()

        v = self.valid
        ok = v[..., 1:, 1:] & v[..., :-1, :-1] & v[..., 1:, :-1] & v[..., :-1, 1:]
        if int(ok.sum()) < 16:
            return None
        dg = grad(self.t.double())[ok]
        dg = dg - dg.mean()
        corr = {}
        for phase in ("end", "start"):
            gp = torch.cat(
                [
                    downsample_depth(self.g[:, c : c + 1].double(), self.size_lr, "point", phase=phase)[0]
                    for c in range(self.g.shape[1])
                ],
                1,
            )
            cg = grad(gp)[ok]
            cg = cg - cg.mean()
            den = float(dg.norm() * cg.norm())
            corr[phase] = float((dg * cg).sum()) / den if den > 0 else math.nan
        if not all(math.isfinite(c) for c in corr.values()) or corr["end"] == corr["start"]:
            return None
        return "end" if corr["end"] > corr["start"] else "start"

    def candidates(self, params: torch.Tensor) -> list[ForwardModel]:
        cfg = self.cfg
        phases = ("end", "start") if cfg.interval_phase == "auto" else (cfg.interval_phase,)
        if len(phases) > 1 and PHASE_SELECT == "guide":
            found = self.guide_phase()
            phases = (found,) if found is not None else phases
        if cfg.consistency == "auto":
            mix, n = edge_mixing(self.t, self.valid)
            self.mixing = mix
            holes = float((~self.input_valid).float().mean()) > 0.005
            if n >= 4 and mix < POINT_MIXING["holes" if holes else "hole-free"]:
                return [ForwardModel("point", phase=p, mixing=mix) for p in phases]
            return [ForwardModel("bicubic", mixing=mix), ForwardModel("area", mixing=mix)]
        if cfg.consistency in ("point", "interval"):
            return [ForwardModel("point", phase=p) for p in phases]
        if cfg.consistency == "gauss":
            return [
                ForwardModel(
                    "gauss",
                    sigma=float(cfg.blur_sigma),
                    shift=(float(cfg.blur_shift[0]), float(cfg.blur_shift[1])),
                )
            ]
        return [ForwardModel(cfg.consistency)]

    def cross_validate(
        self, params: torch.Tensor, model: ForwardModel, fit: torch.Tensor, test: torch.Tensor
    ) -> torch.Tensor:
        """Residual ``t - down(D)`` on ``test`` cells, ``D`` solved from the ``fit`` cells only (NaN elsewhere)."""
        zero = torch.zeros((), dtype=self.t.dtype, device=self.t.device)
        _, out, sup = consistency_solve(
            lambda c: self.render(params, c, fit),
            torch.where(fit, self.t, zero),
            fit,
            model,
            self.cfg.iters,
            self.cfg.solver,
        )
        if model.mode == "none":  # predicts the cell-centre value
            low, ok = downsample_depth(out, self.size_lr, "gauss", sup)
        else:
            low, ok = downsample_depth(out, self.size_lr, model, sup)
        keep = ok & test
        return torch.where(keep, self.t - low, torch.full((), math.nan, dtype=low.dtype, device=low.device))

    def choose_model(self, params: torch.Tensor) -> torch.Tensor:
        """Choose the forward model (and with ``sigma_range="auto"`` the colour sigma) by cross-validation;
        returns the start params for the chosen colour sigma."""
        cands = self.candidates(params)
        a, b = _checkerboard(self.valid)
        auto_range = self.cfg.sigma_range == "auto"
        need_cv = len(cands) > 1 or self.cfg.robust != "none" or auto_range
        if not need_cv or int(a.sum()) < 4 or int(b.sum()) < 4:
            self.model = cands[0]
            return params

        def score_of(r: torch.Tensor) -> float:
            fin = r[torch.isfinite(r)]
            if not fin.numel():
                return math.inf
            return float(fin.pow(2).mean().sqrt()) if CV_SCORE == "rmse" else float(fin.abs().mean())

        scored, resid = [], []
        for m in cands:
            r = self.cross_validate(params, m, a, b)
            scored.append(dataclasses.replace(m, score=score_of(r)))
            resid.append(r)
        best = min(range(len(scored)), key=lambda i: scored[i].score)
        self.model, self.scores = scored[best], scored
        r_best, sr_best = resid[best], self.sigma_range
        if auto_range:
            if RANGE_SELECT in ("zoom", "zoom-hr"):
                sr_best = self._zoom_select()
                if sr_best != self.sigma_range:
                    r_best = self.cross_validate(self.start_params(sr_best), self.model, a, b)
            else:
                for sr in SIGMA_RANGE_CANDIDATES[1:]:
                    p = self.start_params(sr)
                    r = self.cross_validate(p, self.model, a, b)
                    if score_of(r) < self.model.score:
                        self.model = dataclasses.replace(self.model, score=score_of(r))
                        r_best, sr_best = r, sr
            params = self.start_params(sr_best)
        self.model = dataclasses.replace(
            self.model, sigma_range=self.sigma_range, noise=self.noise, sigma_spatial=self.sigma_spatial
        )
        if self.cfg.robust != "none":
            r = torch.where(b, r_best, self.cross_validate(params, self.model, b, a))
            self._robust_weights(r)
            if self.cfg.robust == "tukey" and self.n_outliers:  # a second round without the outliers found
                dropped = self.n_outliers
                a, b = _checkerboard(self.valid)
                r = torch.where(
                    b,
                    self.cross_validate(params, self.model, a, b),
                    self.cross_validate(params, self.model, b, a),
                )
                self.weights = self.confidence
                self._robust_weights(r)
                self.n_outliers += dropped
        return params

    def _zoom_select(self) -> float:
        """Colour sigma that best upsamples the LR depth from half its size (the same problem one octave
        down, guided by the colour at the LR size): self-similar across scale, and cheap."""
        (h, w) = self.size_lr
        h2, w2 = max(1, h // 2), max(1, w // 2)
        if min(h2, w2) < 4:
            return self.sigma_range
        hr = RANGE_SELECT == "zoom-hr"
        g = self.g if hr else resample_guide(self.g, (h, w), "area")
        low, ok = downsample_depth(self.t, (h2, w2), "area", self.valid)
        target = self.t
        best, best_err = self.sigma_range, math.inf
        for sr in SIGMA_RANGE_CANDIDATES:
            cfg = self.cfg.replace(sigma_range=sr, fit_steps=0, consistency="area", robust="none")
            sub = _Problem(g, torch.where(ok, low + 1.0, torch.zeros_like(low)), ok, cfg)
            sub.model = ForwardModel("area")
            out, sup = sub.solve(sub.start_params())
            out = out * sub.span + sub.lo - 1.0
            if hr:  # back to the LR grid through the forward model
                out, sup = downsample_depth(torch.nan_to_num(out), (h, w), "area", sup)
            keep = sup & self.valid & torch.isfinite(out)
            if not bool(keep.any()):
                continue
            err = float((out - target)[keep].pow(2).mean())
            if err < best_err:
                best, best_err = sr, err
        return best

    def _robust_weights(self, r: torch.Tensor) -> None:
        """Row weights / outlier cells from the cross-validated residuals ``r`` (see the module docstring).

        The robust sigma is ``1.4826 MAD`` of ``r``, at least 1 % of the depth range. ``"huber"``: weights
        ``min(1, k sigma / |r|)``. ``"tukey"``: a cell with ``|r| >= k sigma`` is dropped (a hole) when its
        value is also structurally impossible for its 8 neighbours: strictly between their min and max (15-85 %
        of the way: a flying pixel) or beyond them by more than 15 % of their range (a spike); other cells
        keep weight 1, so that true edge cells (unpredictable, but equal to one side) are never damped.
        """
        fin = torch.isfinite(r) & self.valid
        if not bool(fin.any()):
            return
        scale = max(float(r[fin].abs().median()) * 1.4826, 0.01) * self.cfg.robust_k
        u = torch.where(fin, r.abs() / scale, torch.zeros_like(r))
        if self.cfg.robust == "huber":
            w = 1.0 / u.clamp_min(1.0)
        else:
            inf = torch.full((), math.inf, dtype=self.t.dtype, device=self.t.device)
            centre = torch.zeros(1, 1, 3, 3, dtype=torch.bool, device=self.t.device)
            centre[..., 1, 1] = True
            hi_in = torch.where(self.valid, self.t, -inf)
            lo_in = torch.where(self.valid, -self.t, -inf)
            pad = (1, 1, 1, 1)
            # max / min over the 8 neighbours (the centre excluded)
            hi = F.unfold(F.pad(hi_in, pad, value=-math.inf), 3)
            lo = F.unfold(F.pad(lo_in, pad, value=-math.inf), 3)
            keep = ~centre.flatten()
            hi = hi[:, keep].amax(1).reshape(self.t.shape)
            lo = -lo[:, keep].amax(1).reshape(self.t.shape)
            rng = hi - lo
            ok = torch.isfinite(rng) & (rng > 0)
            f = torch.where(
                ok, (self.t - lo) / torch.where(ok, rng, torch.ones_like(rng)), torch.zeros_like(rng)
            )
            odd = ok & (((f > 0.15) & (f < 0.85)) | (f < -0.15) | (f > 1.15))
            drop = self.valid & (u >= 1.0) & odd
            if int(drop.sum()) < int(self.valid.sum()) // 4:  # never drop a large share
                self.n_outliers = int(drop.sum())
                self.valid = self.valid & ~drop
            w = torch.ones_like(r)
        w = torch.where(self.valid, w, torch.zeros_like(w))
        self.weights = w if self.weights is None else self.weights * w

    # ---------------------------------------------------------------- solve, fit, bound
    def solve(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        _, out, sup = consistency_solve(
            lambda c: self.render(params, c),
            self.t,
            self.valid,
            self.model,
            cfg.iters,
            cfg.solver,
            self.weights,
        )
        return out, sup

    def fit(self, start: torch.Tensor, target: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Per-cell params ``[1, 4, h, w]`` so that rendering the LR depth reconstructs ``target``.

        The guide is ``[RGB, target]`` (groups ``(C, 1)``); the depth group has no range term (its
        ``valid_lr`` is False), so it is only a target. ``fit_target="rgb"``: the 2D recipe instead.
        """
        cfg = self.cfg
        nc = self.g.shape[1]
        # every pixel in every step (cell_samples=None): the depth fits were tuned on full steps
        fcfg = FitConfig(
            steps=cfg.fit_steps, lr=cfg.fit_lr, radius=cfg.radius, backend=cfg.backend, cell_samples=None
        )
        if cfg.fit_target == "rgb":
            with torch.enable_grad():  # callers (e.g. the evaluation harness) may run under no_grad
                return fit_params(self.g, self.g_lr, fcfg, init=start)[0]
        zero = torch.zeros((), dtype=target.dtype, device=target.device)
        ghr = torch.cat([self.g, torch.where(support, target, zero)], 1)
        glr = torch.cat([self.g_lr, fill_missing(self.t, self.valid)], 1)  # LR holes filled from valid cells
        vhr = torch.cat([torch.ones_like(support), support], 1)
        vlr = torch.ones(1, 2, *self.size_lr, dtype=torch.bool, device=target.device)
        vlr[:, 1] = False
        init = torch.cat([start, torch.zeros_like(start[:, :1])], 1)
        fcfg = fcfg.replace(channel_weights=(cfg.fit_rgb_weight,) * nc + (1.0,))
        with torch.enable_grad():
            params, _ = fit_params(ghr, glr, fcfg, groups=(nc, 1), valid_hr=vhr, valid_lr=vlr, init=init)
        return params[:, :4].contiguous()

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower / upper bound of the normalised output, ``[1, 1, H, W]`` (see the module docstring)."""
        cfg = self.cfg
        grow = cfg.overshoot if self.model is not None and self.model.averaging else 0.0
        floor = -0.5 * self.lo / self.span  # half the smallest valid depth, > 0 in physical units
        if cfg.bound == "global":
            lo = torch.full((1, 1, *self.size_hr), -grow, dtype=self.t.dtype, device=self.t.device)
            return torch.maximum(lo, floor), lo + 1 + 2 * grow
        k = 2 * math.ceil(cfg.radius) + 1
        inf = torch.full((), math.inf, dtype=self.t.dtype, device=self.t.device)
        mx = F.max_pool2d(torch.where(self.valid, self.t, -inf), k, stride=1, padding=k // 2)
        mn = -F.max_pool2d(torch.where(self.valid, -self.t, -inf), k, stride=1, padding=k // 2)
        (h, w), (H, W) = self.size_lr, self.size_hr
        iy = ((torch.arange(H, device=mx.device) + 0.5) * h / H).long().clamp(0, h - 1)
        ix = ((torch.arange(W, device=mx.device) + 0.5) * w / W).long().clamp(0, w - 1)
        mx, mn = mx[..., iy, :][..., ix], mn[..., iy, :][..., ix]
        rng = torch.where(torch.isfinite(mx - mn), mx - mn, torch.zeros_like(mx))
        return torch.maximum(mn - grow * rng, floor), mx + grow * rng

    def post_filter(self, out: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
        """Guided filter (He et al.) of the HR estimate ``[1, 1, H, W]`` with the colour guide: window radius
        ``post_radius`` LR cells (at least 1 HR pixel), regulariser ``post_eps`` (squared guide units)."""
        (h, w), (H, W) = self.size_lr, self.size_hr
        r = max(1, round(self.cfg.post_radius * max(H / h, W / w)))
        g = self.g if self.g.shape[1] in (1, 3) else self.g.mean(1, keepdim=True)
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        q = guided_filter(g.to(out.dtype), torch.where(sup, out, zero), r, self.cfg.post_eps, mask=sup)
        return torch.where(sup & torch.isfinite(q), q, out)

    def blend_share(self) -> float:
        """Share of the colour-free solution in the output (``colour_blend``, see :class:`DepthSRConfig`)."""
        cb = self.cfg.colour_blend
        if cb != "auto":
            return float(cb)
        (h, w), (H, W) = self.size_lr, self.size_hr
        holes = float((~self.input_valid).float().mean()) > 0.005
        return BLEND_SHARE if holes and max(H / h, W / w) >= BLEND_MIN_SCALE else 0.0

    def rounds(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve, then ``fit_rounds`` rounds of (fit to the last output, solve)."""
        out, sup = self.solve(params)
        for _ in range(self.cfg.fit_rounds if self.cfg.fit_steps > 0 else 0):
            params = self.fit(params, out, sup)
            out, sup = self.solve(params)
        return out, sup

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.choose_model(self.start_params())
        out, sup = self.rounds(params)
        share = self.blend_share()
        if share > 0:
            chosen = self.sigma_range
            plain, _ = self.rounds(self.start_params(NO_COLOUR))
            self.sigma_range = chosen
            out = plain if share >= 1 else torch.lerp(out, plain, share)
        if self.model is not None:
            self.model = dataclasses.replace(self.model, blend=share)
        if self.cfg.post_filter == "guided" or (self.cfg.post_filter == "auto" and self.noisy):
            out = self.post_filter(out, sup)
        if self.cfg.bound != "none":
            lo, hi = self.bounds()
            out = torch.minimum(torch.maximum(out, lo), hi)
        return out * self.span + self.lo, sup


def _prepare(
    depth_lr: object,
    guide_hr: object,
    mask_lr: object,
    scale: float | None,
    confidence: object,
    config: DepthSRConfig | None,
    options: dict,
):
    if config is not None and not isinstance(config, DepthSRConfig):
        raise ValueError(f"config must be a DepthSRConfig or None, got {type(config).__name__}")
    cfg = (config or DepthSRConfig()).replace(**options) if options else (config or DepthSRConfig())
    d = _as_depth(depth_lr)
    work = torch.promote_types(d.dtype, torch.float32)  # float16 depth is computed in float32
    g = as_guide(guide_hr, "guide_hr").to(device=d.device, dtype=work)
    _check_sizes(d, g, scale)
    valid = _valid_lr(d, mask_lr)
    conf = _as_confidence(confidence, d)
    if conf is not None:
        conf = conf.to(work)
        for b in range(d.shape[0]):
            if not bool((valid[b] & (conf[b] > 0)).any()):
                raise ValueError(f"depth_lr item {b} has no valid value with a confidence > 0")
    return cfg, d, work, g, valid, conf


def estimate_forward_model(
    depth_lr: object,
    guide_hr: object,
    *,
    mask_lr: object = None,
    confidence: object = None,
    config: DepthSRConfig | None = None,
    **options,
) -> list[ForwardModel]:
    """The forward model :func:`upsample_depth` would use for each batch item (``consistency="auto"``:
    point sampling by :func:`edge_mixing`, its phase from the guide, else bicubic vs area by cross-validation).

    Same inputs as :func:`upsample_depth`. Returns one :class:`ForwardModel` per item, with its score.
    """
    cfg, d, work, g, valid, conf = _prepare(depth_lr, guide_hr, mask_lr, None, confidence, config, options)
    out = []
    for b in range(d.shape[0]):
        prob = _Problem(
            g[b : b + 1],
            d[b : b + 1].to(work),
            valid[b : b + 1],
            cfg,
            None if conf is None else conf[b : b + 1],
        )
        with torch.no_grad():
            prob.choose_model(prob.start_params())
        out.append(prob.model)
    return out


def fit_blur_shift(
    depth_lr: object,
    guide_hr: object,
    *,
    mask_lr: object = None,
    config: DepthSRConfig | None = None,
    **options,
) -> list[ForwardModel]:
    """Gaussian forward model (blur sigma, sub-pixel shift ``(dy, dx)``, HR pixels) that best explains
    ``depth_lr``, per batch item: the cross-validated error of :func:`estimate_forward_model` minimised by a
    coordinate search (sigma in steps of ``0.075 s``, shift in steps of ``(s - 1) / 8``, ``s`` the scale;
    about 30 solves, so meant for calibrating a sensor once, not for every frame). Use the result with
    ``consistency="gauss", blur_sigma=m.sigma, blur_shift=m.shift``.
    """
    cfg, d, work, g, valid, _ = _prepare(depth_lr, guide_hr, mask_lr, None, None, config, options)
    out = []
    for b in range(d.shape[0]):
        prob = _Problem(g[b : b + 1], d[b : b + 1].to(work), valid[b : b + 1], cfg)
        with torch.no_grad():
            out.append(prob._fit_gauss(prob.start_params()))
    return out


def upsample_depth(
    depth_lr: object,
    guide_hr: object,
    *,
    mask_lr: object = None,
    confidence: object = None,
    scale: float | None = None,
    config: DepthSRConfig | None = None,
    fill_holes: bool = False,
    return_support: bool = False,
    return_model: bool = False,
    **options,
):
    """Guided depth super-resolution: LR depth + HR colour guide -> HR depth (module docstring: the method).

    Parameters
    ----------
    depth_lr : ``[B, 1, h, w]``, ``[h, w]`` (tensor or numpy), any units (mm, m, disparity); ``0`` and NaN
        are holes. Integer input (e.g. uint16 mm) is converted to float32.
    guide_hr : ``[B, 3, H, W]`` float in [0, 1] (any channel count), or a numpy ``[H, W, 3]`` uint8 image.
        Any ratio ``H / h``, ``W / w >= 1`` (float, per axis).
    mask_lr : optional ``[B, 1, h, w]`` (or ``[h, w]``) bool, False = invalid LR value (also excluded).
    confidence : optional ``[B, 1, h, w]`` / ``[h, w]`` confidence >= 0 at the LR size, or at the HR size
        (area-averaged to the LR grid; e.g. Park et al.'s weight maps); scaled to a maximum of 1, it
        weights the rows of the consistency solve; 0 marks a hole.
    scale : optional expected factor: when given, ``guide_hr`` must be exactly ``scale`` times ``depth_lr``.
    config : :class:`DepthSRConfig` (default settings if None); ``**options`` override its fields
        (``iters=4``, ``fit_steps=0``, ``consistency="area"``, ``interval_phase="start"``, ...).
    fill_holes : fill the pixels without support (push-pull from supported pixels).
    return_support : also return ``support [B, 1, H, W]`` bool (False where no valid LR cell lies in the
        window).
    return_model : also return the list of :class:`ForwardModel` used per item (last in the tuple).

    Returns
    -------
    depth_hr : ``[B, 1, H, W]`` in depth_lr's units and float dtype; NaN where there was no support unless
        ``fill_holes``; within the bound of ``config.bound`` (never negative). With ``return_support``
        and/or ``return_model``: a tuple ``(depth_hr, support?, models?)``.

    Raises
    ------
    ValueError
        Bad shapes or sizes (guide smaller than the depth, batch mismatch, size not ``scale`` times the
        depth), negative depth, an item with no valid depth, NaN/Inf in the guide, a bad confidence map,
        unknown options.
    """
    cfg, d, work, g, valid, conf = _prepare(depth_lr, guide_hr, mask_lr, scale, confidence, config, options)
    outs, sups, models = [], [], []
    for b in range(d.shape[0]):
        prob = _Problem(
            g[b : b + 1],
            d[b : b + 1].to(work),
            valid[b : b + 1],
            cfg,
            None if conf is None else conf[b : b + 1],
        )
        out, sup = prob.run()
        outs.append(out.to(d.dtype))
        sups.append(sup)
        models.append(prob.model)
    out, sup = torch.cat(outs), torch.cat(sups)
    nan = torch.full((), float("nan"), dtype=out.dtype, device=out.device)
    out = fill_missing(out, sup) if fill_holes else torch.where(sup, out, nan)
    extra = ((sup,) if return_support else ()) + ((models,) if return_model else ())
    return (out, *extra) if extra else out
