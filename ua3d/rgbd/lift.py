r"""The RGB-D lift: the Upsample Anything kernel with a depth axis.

Design
------
The lifted kernel is the 2D kernel of :mod:`ua3d.core.kernel` with a second *range group*
that holds one depth channel. The guide is ``[RGB (3 ch), depth feature (1 ch)]`` with
``groups = (3, 1)``, so an HR pixel ``p`` at depth ``z`` and an LR cell ``q`` get the weight

.. math::

    w(p, q) \propto \underbrace{\exp(-\tfrac12 d^\top \Sigma_q^{-1} d)}_{\text{spatial}}
    \; \exp\!\Big(-\frac{\lVert I(p) - \bar I(q) \rVert^2}{2 \sigma_r(q)^2}\Big)
    \; \exp\!\Big(-\frac{(\phi(z) - \phi(z_q))^2}{2 \sigma_z(q)^2}\Big)

where ``z_q`` is the LR depth of cell ``q`` (the **median** of the valid HR depth under the
cell; the cells are the nearest-anchor partition of the HR grid) and ``sigma_z(q)`` is the
group-1 ``sigma_r`` of the parameter tensor ``params [B, 5, h, w]``.

Depth feature ``phi`` (``depth_mode``)
    * ``"relative"`` (default): ``phi(z) = (log z - lo) / spread`` with ``lo, spread`` the 1st
      percentile and the 1st-99th percentile range of ``log z`` over the valid pixels. A fixed
      ``sigma`` in these units is a fixed *fraction* of depth: ``sigma_z ~ k(q) z(q)`` with
      ``k = sigma * spread`` (:meth:`LiftedKernel.sigma_z` returns ``k z_q`` in metres).
    * ``"absolute"``: ``phi(z) = (z - lo) / spread`` on metres, ``sigma_z = sigma * spread`` metres.

    Both are *scale-free*: the channel is divided by the scene's own spread, so neither the loss
    weight of the depth channel nor the initial ``sigma_range`` depends on the depth unit or the
    scene size. Relative is the default: a depth scale proportional to depth matches sensors whose
    noise grows with depth and keeps near and far objects equally separable (the measurements that
    chose it are in ``docs/transfer.md``).

Holes
    HR pixels without valid depth have ``valid_hr[:, 1] = False``: their depth term is dropped
    and the pixel falls back to the spatial x RGB kernel (the 2D kernel of the same fit), never
    to garbage. LR cells with no valid HR depth have ``valid_lr[:, 1] = False`` (their depth term
    is dropped too) and their ``z_q`` is filled from the nearest valid cell so every reconstruction
    target is defined. The TTO loss ignores the depth channel at HR holes.

TTO
    :func:`fit_rgbd` fits the five parameter maps with :func:`ua3d.core.tto.fit_params` so that
    rendering the LR guide ``[RGB on the LR grid (config.guide_downsample), phi(z_q)]`` reconstructs
    the HR RGB and the HR depth feature (L1; holes excluded), with the channel weights
    ``c (1, 1, 1, depth_weight)``, ``c = 4 / 3`` (so that the colour part equals the 2D kernel's
    loss; default ``depth_weight = 0``, see :func:`fit_rgbd`) unless the
    config gives its own ``channel_weights``. With no valid depth variation (flat depth) the depth
    term is constant and the lift is the 2D kernel of the same config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ua3d.api import Kernel
from ua3d.core.checks import as_guide, as_signal, check_lr_size, check_number, depth_valid_mask
from ua3d.core.kernel import nearest_anchor
from ua3d.core.params import decode_params
from ua3d.core.tto import FitConfig, fit_params, lr_guides, prefilter_guide
from ua3d.rgbd.camera import PinholeCamera

__all__ = [
    "DEPTH_MODES",
    "LiftedKernel",
    "as_depth",
    "cell_gradients",
    "depth_feature",
    "fill_nearest",
    "fit_rgbd",
    "pool_depth",
]

DEPTH_MODES = ("relative", "absolute")


# ---------------------------------------------------------------------- input handling
def as_depth(depth: Any, depth_scale: float = 1.0, name: str = "depth") -> torch.Tensor:
    """Depth in metres as a floating tensor ``[1, 1, H, W]`` (holes stay 0/NaN/Inf).

    Parameters
    ----------
    depth : numpy array or tensor ``[H, W]``, ``[1, H, W]`` or ``[1, 1, H, W]``; integer (raw
        sensor units, e.g. uint16 millimetres) or floating.
    depth_scale : raw units per metre: the result is ``depth / depth_scale`` (1000 for mm,
        5000 for TUM, 1 for depth already in metres).

    Raises
    ------
    ValueError
        bad rank, empty, a batch other than 1, non-positive ``depth_scale`` or negative depth.
    """
    if isinstance(depth_scale, bool) or not (
        isinstance(depth_scale, (int, float, np.integer, np.floating))
        and depth_scale > 0
        and math.isfinite(depth_scale)
    ):
        raise ValueError(f"depth_scale must be a positive finite number, got {depth_scale!r}")
    if isinstance(depth, np.ndarray):
        if depth.dtype.kind not in "fiu":
            raise ValueError(f"{name} must be numeric, got numpy dtype {depth.dtype}")
        depth = torch.from_numpy(np.ascontiguousarray(depth))
    if not isinstance(depth, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch.Tensor, got {type(depth).__name__}")
    shape = tuple(depth.shape)
    if depth.ndim == 2:
        depth = depth[None, None]
    elif depth.ndim == 3 and depth.shape[0] == 1:
        depth = depth[None]
    if depth.ndim != 4 or depth.shape[:2] != (1, 1):
        raise ValueError(f"{name} must have shape [H, W], [1, H, W] or [1, 1, H, W], got {shape}")
    if depth.numel() == 0:
        raise ValueError(f"{name} is empty: shape {shape}")
    if not depth.is_floating_point():
        depth = depth.to(torch.float32)
    if depth.dtype in (torch.float16, torch.bfloat16):
        depth = depth.to(torch.float32)
    depth = depth / depth_scale if depth_scale != 1 else depth
    depth_valid_mask(depth, name)  # the one depth rule: raises on negative values
    return depth


def _as_rgb(rgb: Any) -> torch.Tensor:
    """RGB guide ``[1, C, H, W]`` float (numpy ``[H, W, 3]`` uint8 is divided by 255)."""
    g = as_guide(rgb, "rgb")
    if g.shape[0] != 1:
        raise ValueError(f"rgb must hold one frame (batch 1), got shape {tuple(g.shape)}")
    return g


# ---------------------------------------------------------------------- LR depth
def _cells(H: int, W: int, lr_size: tuple[int, int], device) -> torch.Tensor:
    """Flat LR cell index ``[H * W]`` of every HR pixel (nearest-anchor partition)."""
    h, w = lr_size
    iy = nearest_anchor(H, h, device)
    ix = nearest_anchor(W, w, device)
    return (iy[:, None] * w + ix[None, :]).reshape(-1)


def _segment_median(
    values: torch.Tensor, segment: torch.Tensor, n_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Median of ``values [N]`` per segment id ``segment [N]`` (int64 in ``[0, n_segments)``).

    Even counts average the two middle values. Returns ``median [n_segments]`` (0 for empty
    segments) and ``has [n_segments]`` bool.
    """
    order = torch.argsort(values, stable=True)
    v, s = values[order], segment[order]
    order = torch.argsort(s, stable=True)  # grouped by segment, ascending inside a segment
    v, s = v[order], s[order]
    counts = torch.bincount(s, minlength=n_segments)
    has = counts > 0
    if v.numel() == 0:
        return values.new_zeros(n_segments), has
    starts = torch.cumsum(counts, 0) - counts
    last = v.numel() - 1
    lo = (starts + (counts - 1).clamp_min(0) // 2).clamp(max=last)
    hi = (starts + counts // 2).clamp(max=last)
    return torch.where(has, 0.5 * (v[lo] + v[hi]), values.new_zeros(())), has


def _batched_cells(B: int, H: int, W: int, lr_size: tuple[int, int], device) -> torch.Tensor:
    """Flat (batch, LR cell) index ``[B, H, W]`` of every HR pixel."""
    h, w = lr_size
    cell = _cells(H, W, lr_size, device).reshape(H, W)
    return torch.arange(B, device=device)[:, None, None] * (h * w) + cell[None]


def pool_depth(
    depth: torch.Tensor, valid: torch.Tensor, lr_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Median of the valid HR depth under each LR cell.

    Each HR pixel belongs to the LR cell of its nearest anchor (the kernel's own partition, any
    ratio). For an even count the two middle values are averaged.

    Parameters
    ----------
    depth : ``[B, 1, H, W]`` floating
    valid : ``[B, 1, H, W]`` bool
    lr_size : ``(h, w)``

    Returns
    -------
    z_lr : ``[B, 1, h, w]`` in ``depth``'s dtype, 0 where the cell has no valid pixel
    valid_lr : ``[B, 1, h, w]`` bool, True where the cell has at least one valid pixel
    """
    if depth.ndim != 4 or depth.shape[1] != 1 or valid.shape != depth.shape:
        raise ValueError(
            f"depth and valid must both be [B, 1, H, W], got {tuple(depth.shape)} and {tuple(valid.shape)}"
        )
    B, _, H, W = depth.shape
    h, w = lr_size
    cell = _batched_cells(B, H, W, (h, w), depth.device).reshape(-1)
    v = valid.reshape(-1)
    med, has = _segment_median(depth.reshape(-1)[v], cell[v], B * h * w)
    return med.reshape(B, 1, h, w), has.reshape(B, 1, h, w)


def cell_gradients(feature: torch.Tensor, valid: torch.Tensor, lr_size: tuple[int, int]) -> torch.Tensor:
    """Robust slope of an HR map inside each LR cell: median of in-cell finite differences.

    ``d/dy`` is the median of ``f(y + 1, x) - f(y, x)`` over vertically adjacent valid pixel pairs
    that lie in the same cell (``d/dx`` likewise). The median ignores the minority of pairs that
    cross a depth edge. Cells without such a pair get slope 0.

    Parameters
    ----------
    feature : ``[B, 1, H, W]`` (e.g. the depth feature)
    valid : ``[B, 1, H, W]`` bool
    lr_size : ``(h, w)``

    Returns
    -------
    ``[B, 2, h, w]``: ``(d/dy, d/dx)`` in feature units per HR pixel.
    """
    B, _, H, W = feature.shape
    h, w = lr_size
    cell = _batched_cells(B, H, W, (h, w), feature.device)
    f, v = feature[:, 0], valid[:, 0]
    out = []
    for dim in (1, 2):  # y then x
        n = f.shape[dim] - 1
        a, b = f.narrow(dim, 0, n), f.narrow(dim, 1, n)
        ca, cb = cell.narrow(dim, 0, n), cell.narrow(dim, 1, n)
        ok = v.narrow(dim, 0, n) & v.narrow(dim, 1, n) & (ca == cb)
        med, _ = _segment_median((b - a)[ok], ca[ok], B * h * w)
        out.append(med.reshape(B, h, w))
    return torch.stack(out, 1)


def fill_nearest(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Fill invalid cells with the value of the nearest valid cell (Euclidean, ties: lowest index).

    Parameters
    ----------
    values : ``[B, C, h, w]``
    valid : ``[B, 1, h, w]`` bool, at least one True per batch item

    Returns
    -------
    ``[B, C, h, w]`` equal to ``values`` where ``valid``.
    """
    B, C, h, w = values.shape
    out = values.clone()
    yy, xx = torch.meshgrid(
        torch.arange(h, device=values.device), torch.arange(w, device=values.device), indexing="ij"
    )
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).to(torch.float64)
    for b in range(B):
        m = valid[b, 0].reshape(-1)
        if bool(m.all()):
            continue
        if not bool(m.any()):
            raise ValueError("fill_nearest: a batch item has no valid cell")
        src, dst = torch.nonzero(m)[:, 0], torch.nonzero(~m)[:, 0]
        flat = out[b].reshape(C, -1)
        for s in range(0, dst.numel(), 4096):
            d = dst[s : s + 4096]
            near = torch.cdist(pos[d], pos[src]).argmin(1)
            flat[:, d] = flat[:, src[near]]
    return out


# ---------------------------------------------------------------------- depth feature
def _phi(z: torch.Tensor, mode: str) -> torch.Tensor:
    return torch.log(z) if mode == "relative" else z


def depth_feature(z: torch.Tensor, depth_mode: str, lo: float, spread: float) -> torch.Tensor:
    """Depth channel ``phi(z) = (f(z) - lo) / spread`` of metric depth ``z`` (any shape; ``f = log`` in
    ``"relative"`` mode, the identity in ``"absolute"`` mode; non-positive ``z`` gives NaN/-inf there)."""
    return (_phi(z, depth_mode) - lo) / spread


def _normaliser(z_valid: torch.Tensor, mode: str) -> tuple[float, float]:
    """``(lo, spread)`` of ``phi`` over the valid depth (1st and 99th percentiles)."""
    f = _phi(z_valid.to(torch.float64), mode)
    if f.numel() > 1_000_000:  # quantile has a size limit; a strided subsample is plenty
        f = f[:: math.ceil(f.numel() / 1_000_000)]
    lo, hi = (float(x) for x in torch.quantile(f, torch.tensor([0.01, 0.99], dtype=f.dtype)))
    floor = 0.05 if mode == "relative" else 0.05 * float(z_valid.to(torch.float64).median())
    return lo, max(hi - lo, floor)


# ---------------------------------------------------------------------- the lifted kernel
@dataclass
class LiftedKernel:
    """A fitted RGB-D kernel: a 2-group :class:`~ua3d.api.Kernel` plus the camera and depths.

    Attributes
    ----------
    kernel : the fitted kernel; ``groups = (C, 1)``, guide ``[1, C + 1, H, W]`` (RGB, depth feature),
        ``valid_hr [1, 2, H, W]`` and ``valid_lr [1, 2, h, w]`` (group 0 all True).
    camera : intrinsics for ``W x H`` (and optional camera-to-world pose).
    depth : ``[1, 1, H, W]`` observed depth in metres, 0 at holes.
    depth_valid : ``[1, 1, H, W]`` bool.
    depth_lr : ``[1, 1, h, w]`` LR depth ``z_q`` in metres (median-pooled, holes filled from the nearest
        valid cell).
    depth_lr_valid : ``[1, 1, h, w]`` bool, False for cells that had no valid HR depth.
    depth_mode : ``"relative"`` or ``"absolute"``.
    depth_lo, depth_spread : normaliser of the depth feature ``phi(z) = (f(z) - lo) / spread``.
    depth_lr_grad : ``[1, 2, h, w]`` slope ``(d/dy, d/dx)`` of the depth feature inside each cell
        (depth-feature units per HR pixel, :func:`cell_gradients`); used by the planar depth model of
        :func:`ua3d.rgbd.volume.render_volume`.
    """

    kernel: Kernel
    camera: PinholeCamera
    depth: torch.Tensor
    depth_valid: torch.Tensor
    depth_lr: torch.Tensor
    depth_lr_valid: torch.Tensor
    depth_mode: str
    depth_lo: float
    depth_spread: float
    depth_lr_grad: torch.Tensor

    # ------------------------------------------------------------------ shapes
    @property
    def out_size(self) -> tuple[int, int]:
        return self.kernel.out_size

    @property
    def lr_size(self) -> tuple[int, int]:
        return self.kernel.lr_size

    @property
    def params(self) -> torch.Tensor:
        """``[1, 5, h, w]`` raw parameters (log sigma_x, log sigma_y, theta_raw, log sigma_r, log sigma_z')."""
        return self.kernel.params

    @property
    def rgb(self) -> torch.Tensor:
        """``[1, C, H, W]`` the colour guide."""
        return self.kernel.guide_hr[:, :-1]

    def __repr__(self) -> str:
        return (
            f"LiftedKernel(lr_size={self.lr_size}, out_size={self.out_size}, depth_mode={self.depth_mode!r}, "
            f"valid_depth={float(self.depth_valid.float().mean()):.3f}, camera={self.camera!r})"
        )

    # ------------------------------------------------------------------ depth feature
    def depth_feature(self, z: torch.Tensor) -> torch.Tensor:
        """Depth channel ``phi(z)`` of metric depth ``z`` (any shape; non-positive ``z`` gives NaN/-inf)."""
        return depth_feature(z, self.depth_mode, self.depth_lo, self.depth_spread)

    def sigma_z(self) -> torch.Tensor:
        """Depth scale per LR cell in metres, ``[1, h, w]``.

        Absolute mode: ``sigma * spread``. Relative mode: ``k z_q`` with ``k = sigma * spread``, the
        first-order width of the log-depth Gaussian at the cell's depth.
        """
        s = decode_params(self.params).log_sigma_r[:, 1].exp() * self.depth_spread  # channel 4: log sigma_z'
        return s * self.depth_lr[:, 0] if self.depth_mode == "relative" else s

    # ------------------------------------------------------------------ renders
    def render_2d(
        self,
        features: Any,
        mask: torch.Tensor | None = None,
        *,
        out_dtype: torch.dtype | None = None,
        backend: str | None = None,
        return_support: bool = False,
    ):
        """Depth-aware HR features ``[1, C, H, W]`` from LR features ``[1, C, h, w]`` (or ``[C, h, w]``).

        Each pixel uses its observed depth; where depth is missing the depth term is dropped and the
        pixel gets the spatial x RGB kernel of the same fit. ``mask [1, 1, h, w]`` marks invalid LR
        features (see :meth:`ua3d.api.Kernel.render`).
        """
        return self.kernel.render(
            features, mask, out_dtype=out_dtype, backend=backend, return_support=return_support
        )

    def render_depth(self, backend: str | None = None) -> torch.Tensor:
        """HR depth in metres ``[1, 1, H, W]`` rendered from the valid LR depth (fills holes)."""
        return self.kernel.render(self.depth_lr, self.depth_lr_valid, backend=backend)

    def check_features(self, features: Any) -> torch.Tensor:
        """``features`` as ``[1, C, h, w]`` on the kernel's LR grid (ValueError otherwise)."""
        f = as_signal(features, self.lr_size, "features")
        if f.shape[0] != 1:
            raise ValueError(f"features must hold one frame (batch 1), got shape {tuple(f.shape)}")
        return f


# ---------------------------------------------------------------------- fitting
def _lift_config(config: FitConfig | None, n_rgb: int, depth_weight: float) -> FitConfig:
    cfg = config if config is not None else FitConfig()
    if not isinstance(cfg, FitConfig):
        raise ValueError(f"config must be a FitConfig or None, got {type(cfg).__name__}")
    sr = cfg.sigma_range
    if isinstance(sr, (int, float)):
        sr = (float(sr), float(sr))
    elif len(sr) == 1:
        sr = (float(sr[0]), float(sr[0]))
    elif len(sr) != 2:
        raise ValueError(f"config.sigma_range must be one value or two (RGB, depth), got {sr!r}")
    cw = cfg.channel_weights
    if cw is None:
        # the loss is a mean over n_rgb + 1 channels: colour weighs (n_rgb + 1) / n_rgb so that the
        # colour part of the loss (and of its gradient) is exactly the 2D kernel's
        c = (n_rgb + 1) / n_rgb
        cw = (c,) * n_rgb + (c * float(depth_weight),)
    elif len(cw) != n_rgb + 1:
        raise ValueError(
            f"config.channel_weights must have {n_rgb + 1} values (colour + depth), got {len(cw)}"
        )
    return cfg.replace(sigma_range=tuple(sr), channel_weights=tuple(cw))


def fit_rgbd(
    rgb: Any,
    depth: Any,
    camera: PinholeCamera,
    lr_size: Any,
    config: FitConfig | None = None,
    depth_scale: float = 1.0,
    depth_max: float | None = None,
    depth_mode: str = "relative",
    depth_weight: float = 0.0,
    callback: Any = None,
) -> LiftedKernel:
    """Fit the lifted kernel to one RGB-D frame for features on an ``lr_size`` grid.

    Parameters
    ----------
    rgb : numpy ``[H, W, 3]`` uint8 (or float in [0, 1]), or tensor ``[3, H, W]`` / ``[1, 3, H, W]`` in [0, 1].
    depth : ``[H, W]`` (numpy or tensor, also ``[1, 1, H, W]``); ``depth / depth_scale`` is metres.
        0, NaN, Inf and values beyond ``depth_max`` are holes; negative values are an error.
    camera : :class:`PinholeCamera` for ``W x H``.
    lr_size : ``(h, w)`` of the feature grid.
    config : :class:`FitConfig` (defaults as for the 2D kernel). ``sigma_range`` may give one value
        (both groups) or ``(rgb, depth)``.
    depth_scale : raw depth units per metre (1 = already metres, 1000 = millimetres).
    depth_max : metres; farther depth is a hole.
    depth_mode : ``"relative"`` (log depth, the default) or ``"absolute"`` (metres); see module doc.
    depth_weight : loss weight of the depth channel relative to a colour channel. Default 0: the
        fit has the 2D kernel's objective (the colour reconstruction) and the depth term's width
        ``sigma_z`` is shaped by it alone, so the lift keeps the 2D kernel's behaviour on surfaces and
        only separates pixels across depth jumps. Heavier weights make the kernel copy colour along
        iso-depth lines (floors) and lose to the 2D kernel on label transfer; ``docs/transfer.md``
        has the measurements. Raise it (e.g. 10) when the HR depth itself is to be rendered from
        a coarse grid (volume mass peaks).
    callback : optional ``callback(step, loss)`` after every TTO step (progress bars).

    Returns
    -------
    LiftedKernel

    Raises
    ------
    ValueError
        rgb and depth of different sizes, intrinsics not matching the image size, negative depth,
        depth with no valid pixel, bad ``lr_size`` / ``depth_mode``.
    """
    if depth_mode not in DEPTH_MODES:
        raise ValueError(f"depth_mode must be one of {DEPTH_MODES}, got {depth_mode!r}")
    check_number(depth_weight, "depth_weight", low=0)
    if not isinstance(camera, PinholeCamera):
        raise ValueError(f"camera must be a PinholeCamera, got {type(camera).__name__}")
    g = _as_rgb(rgb)
    z = as_depth(depth, depth_scale).to(device=g.device, dtype=g.dtype)
    H, W = g.shape[-2:]
    if tuple(z.shape[-2:]) != (H, W):
        raise ValueError(
            f"depth has size {tuple(z.shape[-2:])} (HxW) but rgb has size {(H, W)}; they must match pixel for pixel"
        )
    camera.check_image(H, W, "rgb/depth")
    valid = depth_valid_mask(z, "depth", depth_max=depth_max)
    if not bool(valid.any()):
        raise ValueError(
            f"depth of shape {tuple(z.shape[-2:])} has no valid pixel (all holes: 0, NaN, Inf"
            f"{'' if depth_max is None else f' or > depth_max={depth_max}'})"
        )
    hw = check_lr_size(lr_size, (H, W))
    cfg = _lift_config(config, g.shape[1], depth_weight)
    g = prefilter_guide(g, cfg.guide_prefilter)
    z = torch.where(valid, z, torch.zeros((), dtype=z.dtype, device=z.device))

    lo, spread = _normaliser(z[valid], depth_mode)
    z_lr, v_lr = pool_depth(z, valid, hw)
    z_lr = fill_nearest(z_lr, v_lr)
    f_hr = torch.where(valid, depth_feature(z.clamp_min(1e-12), depth_mode, lo, spread), z.new_zeros(()))
    f_lr = depth_feature(z_lr, depth_mode, lo, spread)
    depth_lr_grad = cell_gradients(f_hr, valid, hw)
    guide_hr = torch.cat([g, f_hr.to(g.dtype)], 1)
    centres, values = lr_guides(g, hw, cfg)
    guide_lr = torch.cat([centres, f_lr.to(g.dtype)], 1)
    values_lr = None if values is None else torch.cat([values, f_lr.to(g.dtype)], 1)
    valid_hr = torch.cat([torch.ones_like(valid), valid], 1)
    valid_lr = torch.cat([torch.ones_like(v_lr), v_lr], 1)
    groups = (g.shape[1], 1)
    params, losses = fit_params(
        guide_hr,
        guide_lr,
        cfg,
        groups=groups,
        valid_hr=valid_hr,
        valid_lr=valid_lr,
        values_lr=values_lr,
        callback=callback,
    )
    kernel = Kernel(
        params,
        guide_hr,
        guide_lr,
        cfg.radius,
        groups=groups,
        valid_hr=valid_hr,
        valid_lr=valid_lr,
        config=cfg,
        losses=losses,
    )
    return LiftedKernel(kernel, camera, z, valid, z_lr, v_lr, depth_mode, lo, spread, depth_lr_grad)
