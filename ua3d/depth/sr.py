r"""Guided depth super-resolution with the Upsample Anything kernel.

Why not the 2D recipe as it is
------------------------------
Fitting the kernel to reconstruct the RGB guide and rendering the LR depth with it loses to bicubic on
Middlebury (issue 8): texture edges are not depth edges, large fitted sigmas blur depth edges, and a
kernel that only *interpolates* the LR samples cannot undo the blur the sensor / the downsampling put
into the LR depth (an LR value next to an edge is already a mix of both sides). Three changes make it win
(``scripts/ablate_depth_sr.py`` measures each):

1. **Consistency solve.** The output lives in the span of the kernel, ``D = K c`` (``K`` the render
   operator, ``c`` coefficients on the LR grid), and ``c`` is chosen so that downsampling ``D`` gives the
   LR depth back: ``down(K c) = d_lr``, solved by a few GMRES (or Richardson = iterative back-projection)
   iterations starting from ``c = d_lr`` (4 by default). The number of iterations is the regulariser.
   ``down`` is the forward model of the LR depth (default: antialiased bicubic, i.e. PIL's ``BICUBIC``
   resize; ``"area"`` for box-integrating sensors; ``"none"`` renders ``d_lr`` directly).
2. **Sharp, range-aware start kernel.** Spatial sigma ``0.7`` LR cells, colour sigma ``0.3``, window
   radius 2, colour of an LR cell = the guide sampled at the cell centre (no low-pass).
3. **Self-supervised TTO on depth, not colour.** The first consistent estimate ``D0`` becomes the fitting
   target: the per-cell kernel (``sigma_x, sigma_y, theta, sigma_r``) is fitted so that rendering the LR
   depth reconstructs ``D0`` (guide ``[RGB, D0]`` with range groups ``(3, 1)``; the depth group has no
   range term, it is only the target; colour reconstruction weight 0 by default; 5 Adam steps, learning
   rate 0.1: more steps fit the errors of ``D0`` too). The fitted kernel learns where colour edges are depth
   edges and orients itself along them; the consistency solve is then run again with it.

Measured on the 8 Middlebury development scenes (protocol B, RMSE in 0-255) with the default settings:
1.59 / 3.06 / 4.95 at x4 / x8 / x16, against bicubic 2.42 / 4.27 / 6.59 and the guided filter
2.32 / 4.01 / 6.24 (see ``scripts/ablate_depth_sr.py`` for every variant). ``radius=3`` gains another
2-4 % at about twice the cost.

Holes
-----
An LR cell is valid where it is finite, ``> 0`` and ``mask_lr`` is True. Invalid cells never enter a
weighted sum: every render uses the kernel's ``signal_mask`` (weights renormalised over valid
neighbours), the consistency equations are written only for valid cells whose downsampling footprint is
fully supported, and the fitting target's LR channel is filled from valid cells only (push-pull). HR pixels
with no valid LR cell within the window are NaN with ``support = False``; ``fill_holes=True`` fills them
from supported pixels (push-pull), keeping the support map for the caller.

Units pass through: depth is normalised internally by the range of the valid LR values and mapped back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.checks import as_guide, check_number
from ..core.kernel import init_params, resample_guide
from ..core.ops import BACKENDS, kernel_render
from ..core.tto import FitConfig, fit_params

__all__ = [
    "FAST",
    "DepthSRConfig",
    "consistency_solve",
    "downsample_depth",
    "fill_missing",
    "upsample_depth",
]

CONSISTENCY_MODES = ("bicubic", "area", "bilinear", "interval", "none")
SOLVERS = ("gmres", "richardson")


@dataclass(frozen=True)
class DepthSRConfig:
    """Settings of :func:`upsample_depth`.

    Attributes
    ----------
    sigma_spatial : start spatial sigma in LR cells (0.7; HR pixels = this times the per-axis scale).
    sigma_range : start colour range sigma, guide units (0.3 for RGB in [0, 1]).
    radius : window radius in LR cells (2: 13 neighbours).
    range_centre : colour of an LR cell: ``"bilinear"`` (guide sampled at the cell centre) or ``"area"``.
    consistency : forward model ``down`` of the consistency solve: ``"bicubic"`` (antialiased, = PIL
        ``BICUBIC``: protocol B), ``"area"`` (box average), ``"bilinear"`` (antialiased), ``"interval"``
        (every s-th pixel: protocol A) or ``"none"`` (no solve: plain render). A wrong model costs: under
        protocol A, ``"bicubic"`` loses to bicubic upsampling while ``"interval"`` wins.
    solver : ``"gmres"`` or ``"richardson"`` (iterative back-projection, step 1).
    iters : solver iterations per solve (the regulariser: fewer = smoother); each costs one render.
    fit_steps : Adam steps of the self-supervised depth fit (0 = keep the start kernel, one solve).
    fit_lr : Adam learning rate of the fit.
    fit_rgb_weight : loss weight of the colour channels in the fit (0: depth only).
    fit_target : ``"depth"`` (the self-supervised depth fit above) or ``"rgb"`` (the 2D recipe: fit the
        kernel to reconstruct the colour guide only; kept for the ablation, it loses on Middlebury).
    backend : kernel engine, ``"auto"``, ``"fast"`` or ``"reference"``.
    """

    sigma_spatial: float = 0.7
    sigma_range: float = 0.3
    radius: float = 2.0
    range_centre: str = "bilinear"
    consistency: str = "bicubic"
    solver: str = "gmres"
    iters: int = 4
    fit_steps: int = 5
    fit_lr: float = 0.1
    fit_rgb_weight: float = 0.0
    fit_target: str = "depth"
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("sigma_spatial", "sigma_range", "fit_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        check_number(self.radius, "radius", low=0)
        check_number(self.fit_rgb_weight, "fit_rgb_weight", low=0)
        if not (self.radius >= 0 and math.isfinite(self.radius)):
            raise ValueError(f"radius must be a finite number >= 0, got {self.radius!r}")
        for name in ("iters", "fit_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not (self.fit_rgb_weight >= 0 and math.isfinite(self.fit_rgb_weight)):
            raise ValueError(f"fit_rgb_weight must be >= 0, got {self.fit_rgb_weight!r}")
        _choice("range_centre", self.range_centre, ("bilinear", "area"))
        _choice("consistency", self.consistency, CONSISTENCY_MODES)
        _choice("solver", self.solver, SOLVERS)
        _choice("fit_target", self.fit_target, ("depth", "rgb"))
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
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


#: A faster preset (3 solver iterations, 3 fit steps; ~1 % higher RMSE), see ``scripts/bench_depth_sr.py``.
FAST = DepthSRConfig(iters=3, fit_steps=3)


# --------------------------------------------------------------------------- small tensor tools
def downsample_depth(depth: torch.Tensor, size: tuple[int, int], mode: str = "bicubic",
                     support: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward model ``down``: HR depth ``[B, 1, H, W]`` to the LR grid ``size = (h, w)``.

    ``"bicubic"`` and ``"bilinear"`` are antialiased (PyTorch's antialiased bicubic uses Pillow's
    ``a = -0.5`` kernel, so ``"bicubic"`` is PIL ``BICUBIC`` resizing); ``"area"`` averages boxes;
    ``"interval"`` takes every s-th pixel, ``depth[..., s-1::s, s-1::s]`` (protocol A; integer ratios only).
    With ``support [B, 1, H, W]`` (bool) the unsupported pixels are left out: the result is normalised
    by the downsampled support, and ``ok`` is True only where the LR footprint is (almost) fully supported.

    Returns
    -------
    out : ``[B, 1, h, w]`` (0 where not ``ok``)
    ok : ``[B, 1, h, w]`` bool
    """
    if mode not in ("bicubic", "bilinear", "area", "interval"):
        raise ValueError(f"mode must be 'bicubic', 'bilinear', 'area' or 'interval', got {mode!r}")
    H, W = depth.shape[-2:]
    if mode == "interval" and (H % size[0] or W % size[1]):
        raise ValueError(f"consistency 'interval' needs integer ratios, got HR {(H, W)} and LR {tuple(size)}")

    def resize(x: torch.Tensor) -> torch.Tensor:
        if mode == "interval":
            sy, sx = H // size[0], W // size[1]
            return x[..., sy - 1 :: sy, sx - 1 :: sx]
        if mode == "area":
            return F.adaptive_avg_pool2d(x, size)
        return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)

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


def consistency_solve(render, d_lr: torch.Tensor, valid: torch.Tensor, mode: str, iters: int,
                      solver: str = "gmres") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients ``c`` with ``down(render(c)) ~= d_lr`` on the valid LR cells, and their render.

    Parameters
    ----------
    render : callable ``c [B, 1, h, w] -> (out [B, 1, H, W], support [B, 1, H, W])``, linear in ``c``;
        must exclude the cells where ``valid`` is False (the kernel's ``signal_mask``).
    d_lr : ``[B, 1, h, w]`` LR depth (any value where not valid).
    valid : ``[B, 1, h, w]`` bool.
    mode : forward model of :func:`downsample_depth`, or ``"none"`` (no solve: ``c = d_lr``).
    iters : solver iterations (0: ``c = d_lr``). Each costs one render.
    solver : ``"gmres"`` or ``"richardson"`` (``c += r``: iterative back-projection).

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
    if mode == "none" or iters == 0:
        return c0, out0, sup
    size = tuple(d_lr.shape[-2:])

    def down(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, ok = downsample_depth(out, size, mode, sup)
        return low, ok & valid

    if solver == "richardson":
        c, out = c0, out0
        for _ in range(iters):
            low, rows = down(out)
            r = torch.where(rows, d_lr - low, zero)
            c = c + r
            out = out + render(r)[0]
        return c, out, sup
    # The equations kept are the rows supported by the start; A is linear on the valid cells.
    low0, rows0 = down(out0)
    basis, rendered = [], []

    def apply_a(q: torch.Tensor) -> torch.Tensor:
        basis.append(torch.where(valid, q, zero))
        rendered.append(render(basis[-1])[0])
        return torch.where(rows0, down(rendered[-1])[0], zero)

    b = torch.where(rows0, d_lr, zero)
    y = _gmres(apply_a, b, torch.where(rows0, low0, zero), iters)
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
        raise ValueError(
            f"depth_lr must be a torch.Tensor or numpy array, got {type(depth_lr).__name__}"
        )
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
        raise ValueError(f"guide_hr {tuple(g.shape)} is smaller than depth_lr {tuple(d.shape)}: expected an "
                         f"HR guide at least as large as the LR depth")
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (1 <= scale < math.inf):
        raise ValueError(f"scale must be a finite number >= 1, got {scale!r}")
    if not (math.isclose(h * scale, H) and math.isclose(w * scale, W)):
        raise ValueError(f"depth_lr {tuple(d.shape)} times scale {scale} does not give guide_hr "
                         f"{tuple(g.shape)}: expected guide size ({h * scale:g}, {w * scale:g})")


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
        raise ValueError(f"depth_lr has {int(neg.sum())} negative value(s) (shape {tuple(d.shape)}); "
                         f"depth must be >= 0 with 0 or NaN marking holes")
    for b in range(d.shape[0]):
        if not bool(valid[b].any()):
            raise ValueError(f"depth_lr item {b} has no valid value (all 0, NaN or masked out; shape "
                             f"{tuple(d.shape)})")
    return valid


# --------------------------------------------------------------------------- the method
class _Problem:
    """One image: guides, normalised LR depth and its validity, and a render with given params."""

    def __init__(self, guide: torch.Tensor, d: torch.Tensor, valid: torch.Tensor, cfg: DepthSRConfig) -> None:
        self.g = guide
        self.cfg = cfg
        self.size_lr = tuple(d.shape[-2:])
        self.size_hr = tuple(guide.shape[-2:])
        self.valid = valid
        vals = d[valid]
        self.lo = vals.min()
        span = vals.max() - self.lo
        self.span = torch.where(span > 0, span, torch.ones_like(span))
        zero = torch.zeros((), dtype=d.dtype, device=d.device)
        self.t = torch.where(valid, (d - self.lo) / self.span, zero)
        self.g_lr = resample_guide(guide, self.size_lr, cfg.range_centre)

    def start_params(self) -> torch.Tensor:
        (h, w), (H, W) = self.size_lr, self.size_hr
        c = self.cfg
        sigma = (c.sigma_spatial * W / w, c.sigma_spatial * H / h)  # LR cells -> HR pixels, per axis
        return init_params(1, (h, w), (H, W), sigma_spatial=sigma, sigma_range=c.sigma_range,
                           device=self.g.device, dtype=self.g.dtype)

    def render(self, params: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kernel_render(params, self.g, self.g_lr, c, self.cfg.radius, signal_mask=self.valid,
                             backend=self.cfg.backend)

    def solve(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        _, out, sup = consistency_solve(lambda c: self.render(params, c), self.t, self.valid, cfg.consistency,
                                        cfg.iters, cfg.solver)
        return out, sup

    def fit(self, start: torch.Tensor, target: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Per-cell params ``[1, 4, h, w]`` so that rendering the LR depth reconstructs ``target``.

        The guide is ``[RGB, target]`` (groups ``(C, 1)``); the depth group has no range term (its
        ``valid_lr`` is False), so it is only a target. ``fit_target="rgb"``: the 2D recipe instead.
        """
        cfg = self.cfg
        nc = self.g.shape[1]
        fcfg = FitConfig(steps=cfg.fit_steps, lr=cfg.fit_lr, radius=cfg.radius, backend=cfg.backend)
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

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.start_params()
        out, sup = self.solve(params)
        if self.cfg.fit_steps > 0:
            params = self.fit(params, out, sup)
            out, sup = self.solve(params)
        return out * self.span + self.lo, sup


def upsample_depth(
    depth_lr: object,
    guide_hr: object,
    *,
    mask_lr: object = None,
    scale: float | None = None,
    config: DepthSRConfig | None = None,
    fill_holes: bool = False,
    return_support: bool = False,
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
    scale : optional expected factor: when given, ``guide_hr`` must be exactly ``scale`` times ``depth_lr``.
    config : :class:`DepthSRConfig` (default settings if None); ``**options`` override its fields
        (``iters=4``, ``fit_steps=0``, ``consistency="area"``, ...).
    fill_holes : fill the pixels without support (push-pull from supported pixels).
    return_support : also return ``support [B, 1, H, W]`` bool (False where no valid LR cell lies in the
        window).

    Returns
    -------
    depth_hr : ``[B, 1, H, W]`` in depth_lr's units and float dtype; NaN where there was no support unless
        ``fill_holes``. With ``return_support``: ``(depth_hr, support)``.

    Raises
    ------
    ValueError
        Bad shapes or sizes (guide smaller than the depth, batch mismatch, size not ``scale`` times the
        depth), negative depth, an item with no valid depth, NaN/Inf in the guide, unknown options.
    """
    if config is not None and not isinstance(config, DepthSRConfig):
        raise ValueError(f"config must be a DepthSRConfig or None, got {type(config).__name__}")
    cfg = (config or DepthSRConfig()).replace(**options) if options else (config or DepthSRConfig())
    d = _as_depth(depth_lr)
    work = torch.promote_types(d.dtype, torch.float32)  # float16 depth is computed in float32
    g = as_guide(guide_hr, "guide_hr").to(device=d.device, dtype=work)
    _check_sizes(d, g, scale)
    valid = _valid_lr(d, mask_lr)
    outs, sups = [], []
    for b in range(d.shape[0]):
        out, sup = _Problem(g[b : b + 1], d[b : b + 1].to(work), valid[b : b + 1], cfg).run()
        outs.append(out.to(d.dtype))
        sups.append(sup)
    out, sup = torch.cat(outs), torch.cat(sups)
    nan = torch.full((), float("nan"), dtype=out.dtype, device=out.device)
    out = fill_missing(out, sup) if fill_holes else torch.where(sup, out, nan)
    return (out, sup) if return_support else out
