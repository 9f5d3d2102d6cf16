r"""The RGB-D lift: the Upsample Anything kernel with a depth axis.

Design
------
The lifted kernel is the 2D kernel of :mod:`ua3d.core.kernel` with a second *range group*
that holds one depth channel. The guide is ``[RGB (3 ch), normals (2 ch), depth feature (1 ch)]``
with ``groups = (5, 1)`` (normals: see below; ``I`` is RGB + normals), so an HR pixel ``p`` at depth
``z`` and an LR cell ``q`` get the weight

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

Surface normals (issue 13)
    By default the colour group carries two more channels, ``NORMAL_SCALE x (n_x, n_y)`` of the
    camera-frame surface normal computed from the depth (:func:`surface_normals`; holes take the
    nearest valid pixel's normal), so the guide is ``[RGB, normals (2 ch), depth feature]`` with
    ``groups = (C + 2, 1)``. They enter the colour term's distance only (loss weight 0): a pixel
    does not borrow from cells of a differently oriented surface even when the colours match (an
    object standing on a floor of its colour), while a slanted floor, whose normal is constant, stays
    one surface -- the piecewise-constant depth term cannot tell a slanted floor from a step, which
    is why a heavier depth loss loses on label transfer. The volume (:mod:`ua3d.rgbd.volume`) treats
    the normal channels as colour channels (they are the HR pixel's own, at every bin).

Depth-edge gate (``normal_gate``, off by default)
    With ``normal_gate = r > 0`` the normals are multiplied by :func:`depth_edge_gate`: 1 at depth
    discontinuities (a relative step of more than :data:`EDGE_JUMP` between valid neighbours),
    ``exp(-d^2 / 2 r^2)`` at a distance ``d`` (``r`` in LR cells) from the nearest one, never below
    :data:`GATE_FLOOR`, so along smooth contacts (floor-wall junctions, rims of objects resting on the
    floor) the normals count less. Hole borders are no discontinuity (a hole creates no surface);
    flat depth is still exactly the 2D kernel. Measured on the label benchmark (5 seeds, x14 / x16)
    it moves the losses between families instead of removing them (``docs/transfer.md``), so the
    default is 0 (the normals count in full everywhere).

Normals of surfaces thinner than a cell (options, off by default)
    ``normal_mismatch = tau > 0`` pulls the normal of a pixel that no LR centre of its 3x3 cells has towards
    its own cell's centre (:func:`normal_mismatch_blend`), ``normal_curvature = tau > 0`` scales the normals
    down on surfaces that turn by more than ``tau`` radians across a cell (:func:`curvature_gate`). Both aim
    at the lift's losses on the label benchmark: box tops and sphere rims, whose normal no cell has, borrow
    the label of another surface of that orientation (the floor, another sphere's rim).

TTO
    :func:`fit_rgbd` fits the five parameter maps with :func:`ua3d.core.tto.fit_params` so that
    rendering the LR guide ``[RGB and normals on the LR grid (config.guide_downsample), phi(z_q)]``
    reconstructs the HR RGB (and, with ``depth_weight > 0``, the HR depth feature; L1, holes
    excluded), with the channel weights ``c (1, 1, 1, 0, 0, depth_weight)``, ``c = 6 / 3`` (so that
    the colour part equals the 2D kernel's loss; default ``depth_weight = 0``) unless the config
    gives its own ``channel_weights`` (colour + depth; the normals get 0). With flat depth the
    normals and the depth are constant, add nothing to any distance, and the lift is the 2D kernel
    of the same config (tested to 1e-9 in float64). ``depth_fit="staged"`` is the other recipe: the
    2D fit, then ``sigma_z`` alone fitted on the depth reconstruction (see :func:`fit_rgbd`).
    Benchmark and ablation: ``docs/transfer.md``.
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
    "DEPTH_FITS",
    "DEPTH_MODES",
    "DEPTH_STEPS",
    "EDGE_JUMP",
    "GATE_FLOOR",
    "NORMAL_GATE",
    "NORMAL_SCALE",
    "LiftedKernel",
    "as_depth",
    "cell_gradients",
    "curvature_gate",
    "depth_edge_gate",
    "depth_feature",
    "fill_nearest",
    "fit_rgbd",
    "normal_mismatch_blend",
    "pool_depth",
    "surface_normals",
]

DEPTH_MODES = ("relative", "absolute")
#: scale of the surface-normal channels appended to the colour group (:func:`fit_rgbd`)
NORMAL_SCALE = 0.7
#: the normal components used as guide channels: ``(n_x, n_y)`` (``n_z`` follows for surfaces facing the camera)
NORMAL_CHANNELS = (0, 1)
#: radius (in LR cells) of the depth-edge gate on the normal channels (:func:`fit_rgbd`; 0 = ungated,
#: the default: the gate did not beat the ungated normals on the label benchmark, ``docs/transfer.md``)
NORMAL_GATE = 0.0
#: relative depth step that counts as a depth discontinuity (:func:`depth_edge_gate`)
EDGE_JUMP = 0.03
#: the gate's value far from every depth discontinuity (:func:`depth_edge_gate`)
GATE_FLOOR = 0.6
#: steps of the staged fit's depth stage (:func:`fit_rgbd`)
DEPTH_STEPS = 10


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


#: False: the lift's preprocessing (per-segment medians, surface normals) runs in torch (the ``*_torch``
#: references) even where numba could run it (for tests and measurements)
FAST_PREP = True


def _fast_prep(*tensors: torch.Tensor) -> bool:
    """Whether :mod:`ua3d.rgbd.fast_prep` (numba) runs for these tensors: CPU, float32/float64 or integer
    (ids, masks), :data:`FAST_PREP` on and numba importable."""
    if not FAST_PREP or any(
        t.device.type != "cpu" or (t.is_floating_point() and t.dtype not in (torch.float32, torch.float64))
        for t in tensors
    ):
        return False
    try:
        from ua3d.rgbd import fast_prep
    except Exception:  # noqa: BLE001  # pragma: no cover - any failure to import means "not available"
        return False
    return bool(fast_prep.AVAILABLE)


def _segment_median(
    values: torch.Tensor, segment: torch.Tensor, n_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Median of ``values [N]`` per segment id ``segment [N]`` (int64 in ``[0, n_segments)``).

    Even counts average the two middle values. Returns ``median [n_segments]`` (0 for empty
    segments) and ``has [n_segments]`` bool. CPU float32/float64 values take the numba twin
    (:func:`ua3d.rgbd.fast_prep.segment_median`, the same bits), everything else its reference
    :func:`_segment_median_torch`.
    """
    if values.is_floating_point() and not values.requires_grad and _fast_prep(values, segment):
        from ua3d.rgbd import fast_prep

        return fast_prep.segment_median(values, segment, n_segments)
    return _segment_median_torch(values, segment, n_segments)


def _segment_median_torch(
    values: torch.Tensor, segment: torch.Tensor, n_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of :func:`_segment_median` (torch, any device): two stable sorts (by value, then
    by segment) and the two middle values of each segment's run."""
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
    if depth.is_floating_point() and _fast_prep(depth, valid):
        # numba: the same medians, without the [B, H, W] cell map and the masked copies
        from ua3d.rgbd import fast_prep

        med, has = fast_prep.cell_median(depth[:, 0], valid[:, 0], (h, w))
        return med.reshape(B, 1, h, w), has.reshape(B, 1, h, w)
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
    if feature.is_floating_point() and _fast_prep(feature, valid):
        # numba: the same medians, without the [B, H, W] cell map and the masked copies
        from ua3d.rgbd import fast_prep

        f0, v0 = feature[:, 0], valid[:, 0]
        slopes = [fast_prep.cell_median(f0, v0, (h, w), d)[0].reshape(B, h, w) for d in ((1, 0), (0, 1))]
        return torch.stack(slopes, 1)
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


# ---------------------------------------------------------------------- surface normals
def surface_normals(depth: torch.Tensor, valid: torch.Tensor, camera: PinholeCamera) -> torch.Tensor:
    """Unit camera-frame surface normals ``[1, 3, H, W]`` of a depth map (holes filled from the nearest
    valid pixel).

    The points ``P = ((u - cx) z / fx, (v - cy) z / fy, z)`` are differentiated along rows and columns
    with the one-sided difference of smaller depth change (so a normal never spans a depth edge), and
    ``n = normalise(dP/du x dP/dv)`` (pointing at the camera, ``n_z < 0``). A pixel whose two sides are
    both holes uses whichever side exists, else gets the nearest valid pixel's normal. Any depth unit
    gives the same normals.

    Parameters
    ----------
    depth : ``[1, 1, H, W]`` floating, metres (any value at holes)
    valid : ``[1, 1, H, W]`` bool, at least one True
    camera : intrinsics for ``W x H``

    Returns
    -------
    ``[1, 3, H, W]`` in ``depth``'s dtype; a constant depth gives ``(0, 0, -1)`` exactly.

    CPU float32/float64 depth takes the numba pass (:func:`ua3d.rgbd.fast_prep.surface_normals_raw`, the
    same bits), everything else the reference :func:`_surface_normals_torch`.
    """
    if _fast_prep(depth, valid):
        from ua3d.rgbd import fast_prep

        n, good = fast_prep.surface_normals_raw(
            depth[0, 0], valid[0, 0], camera.fx, camera.fy, camera.cx, camera.cy
        )
        return _fill_normals(n, good, depth.dtype)
    return _surface_normals_torch(depth, valid, camera)


def _surface_normals_torch(depth: torch.Tensor, valid: torch.Tensor, camera: PinholeCamera) -> torch.Tensor:
    """The reference of :func:`surface_normals` (torch, any device)."""
    H, W = depth.shape[-2:]
    z = torch.where(valid[0, 0], depth[0, 0], torch.zeros((), dtype=depth.dtype, device=depth.device))
    z = z.to(torch.float64)
    v = valid[0, 0]
    u = torch.arange(W, dtype=z.dtype, device=z.device)[None].expand(H, W)
    r = torch.arange(H, dtype=z.dtype, device=z.device)[:, None].expand(H, W)
    pts = torch.stack([(u - camera.cx) * z / camera.fx, (r - camera.cy) * z / camera.fy, z], 0)

    def diff(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = pts.shape[dim] - 1
        step = pts.narrow(dim, 1, n) - pts.narrow(dim, 0, n)
        ok = v.narrow(dim - 1, 1, n) & v.narrow(dim - 1, 0, n)
        fwd, bwd = torch.zeros_like(pts), torch.zeros_like(pts)
        fok, bok = torch.zeros_like(v), torch.zeros_like(v)
        fwd.narrow(dim, 0, n).copy_(step)
        bwd.narrow(dim, 1, n).copy_(step)
        fok.narrow(dim - 1, 0, n).copy_(ok)
        bok.narrow(dim - 1, 1, n).copy_(ok)
        use_f = fok & (~bok | (fwd[2].abs() <= bwd[2].abs()))
        return torch.where(use_f[None], fwd, bwd), fok | bok

    du, oku = diff(2)
    dv, okv = diff(1)
    n = torch.linalg.cross(dv, du, dim=0)
    norm = n.norm(dim=0)
    good = v & oku & okv & (norm > 0)
    n = n / norm.clamp_min(1e-300)
    return _fill_normals(n, good, depth.dtype)


def _fill_normals(n: torch.Tensor, good: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``n [3, H, W]`` (float64 scratch, overwritten) with every pixel outside ``good [H, W]`` given the
    nearest good pixel's normal (scipy's Euclidean feature transform; none good: ``(0, 0, -1)``
    everywhere), as ``[1, 3, H, W]`` in ``dtype``."""
    if not bool(good.any()):
        n = torch.zeros_like(n)
        n[2] = -1.0
        good = torch.ones_like(good)
    if not bool(good.all()):
        from scipy import ndimage

        bad = ~good.cpu().numpy()
        idx = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
        # in place, the bad pixels only (a good pixel's nearest good pixel is itself)
        iy, ix = (torch.from_numpy(i[bad]).to(n.device) for i in idx)
        n[:, torch.from_numpy(bad).to(n.device)] = n[:, iy, ix]
    return n[None].to(dtype)


def _edge_distance(edge: torch.Tensor) -> torch.Tensor | None:
    """Euclidean distance ``[H, W]`` (float64, pixels) of every pixel from the nearest True of ``edge``
    (None when there is none)."""
    if not bool(edge.any()):
        return None
    from scipy import ndimage

    return torch.from_numpy(ndimage.distance_transform_edt(~edge.cpu().numpy())).to(edge.device)


def depth_edge_gate(
    depth: torch.Tensor,
    valid: torch.Tensor,
    radius: float,
    jump: float = EDGE_JUMP,
    floor: float = GATE_FLOOR,
) -> torch.Tensor:
    """Per-pixel weight ``[1, 1, H, W]`` in ``[floor, 1]``: 1 at depth discontinuities, falling to
    ``floor`` with the distance ``d`` from the nearest one as ``max(floor, exp(-d^2 / 2 radius^2))``.

    A discontinuity is a pair of 4-adjacent *valid* pixels whose depths differ by more than ``jump``
    times the nearer depth (hole borders are not discontinuities: a hole creates no surface). No
    discontinuity at all (flat or smooth depth) gives ``floor`` everywhere. Any depth unit gives the
    same gate.

    Parameters
    ----------
    depth : ``[1, 1, H, W]`` (any value at holes); valid : ``[1, 1, H, W]`` bool;
    radius : HR pixels (> 0); jump : relative depth step (> 0); floor : in ``[0, 1]``.
    """
    v = valid[0, 0]
    z = depth[0, 0].to(torch.float64)
    edge = torch.zeros_like(v)
    for dim in (0, 1):
        n = z.shape[dim] - 1
        a, b = z.narrow(dim, 0, n), z.narrow(dim, 1, n)
        ok = v.narrow(dim, 0, n) & v.narrow(dim, 1, n)
        j = ok & ((a - b).abs() > jump * torch.minimum(a, b))
        edge.narrow(dim, 0, n).logical_or_(j)
        edge.narrow(dim, 1, n).logical_or_(j)
    d = _edge_distance(edge)
    base = torch.full_like(z, float(floor))
    if d is None:
        return base[None, None].to(depth.dtype)
    gate = torch.maximum(base, torch.exp(-0.5 * (d.to(z.dtype) / radius) ** 2))
    return gate[None, None].to(depth.dtype)


def curvature_gate(
    normals: torch.Tensor,
    depth: torch.Tensor,
    valid: torch.Tensor,
    cell: float,
    tau: float,
    jump: float = EDGE_JUMP,
) -> torch.Tensor:
    """Per-pixel weight ``[1, 1, H, W]`` in ``(0, 1]`` of the normal channels: how well one normal per LR cell
    describes the surface around a pixel.

    ``kappa(p)`` is the mean turning ``|n(p) - n(p')|`` (radians per HR pixel, small angles) over the
    4-neighbours ``p'`` on the same surface (both valid, no depth step above ``jump``); its median over a
    window of one LR cell (``cell`` HR pixels) ignores isolated creases (a contact line, a box edge) and
    keeps the curvature of curved surfaces. The gate is ``exp(-(cell * kappa / tau)^2 / 2)``: 1 on planes,
    small where the surface turns by more than ``tau`` radians across one cell (a sphere narrower than a
    few cells), where the cell's mean normal matches none of its pixels.
    """
    from scipy import ndimage

    v = valid[0, 0]
    z = depth[0, 0].to(torch.float64)
    n = normals[0].to(torch.float64)
    acc = torch.zeros_like(z)
    cnt = torch.zeros_like(z)
    for dim in (0, 1):
        m = z.shape[dim] - 1
        a, b = z.narrow(dim, 0, m), z.narrow(dim, 1, m)
        ok = v.narrow(dim, 0, m) & v.narrow(dim, 1, m) & ((a - b).abs() <= jump * torch.minimum(a, b))
        dn = (n.narrow(dim + 1, 1, m) - n.narrow(dim + 1, 0, m)).norm(dim=0) * ok
        acc.narrow(dim, 0, m).add_(dn)
        acc.narrow(dim, 1, m).add_(dn)
        cnt.narrow(dim, 0, m).add_(ok.to(z.dtype))
        cnt.narrow(dim, 1, m).add_(ok.to(z.dtype))
    kappa = (acc / cnt.clamp_min(1)).cpu().numpy()
    size = max(1, round(cell))
    kappa = ndimage.median_filter(kappa, size=size, mode="nearest")
    gate = torch.exp(-0.5 * (torch.from_numpy(kappa).to(z.device) * cell / tau) ** 2)
    return gate[None, None].to(depth.dtype)


def normal_mismatch_blend(
    normals: torch.Tensor, centres: torch.Tensor, lr_size: tuple[int, int], tau: float
) -> torch.Tensor:
    """Normals ``[1, K, H, W]`` pulled towards their own LR cell's centre where no cell near the pixel has
    the pixel's normal.

    ``m(p) = min_q |n(p) - n_q|`` over the LR centres ``n_q`` (``centres [1, K, h, w]``) of the pixel's cell
    and its 8 neighbours. A pixel of a surface thinner than a cell (the top of a box seen at a grazing
    angle, the rim of a sphere) has no cell of its own orientation: its normal cannot keep it on its surface,
    only push it to another surface of the same orientation. With ``a = exp(-(m / tau)^2 / 2)`` the result is
    ``a n(p) + (1 - a) n_own(p)`` (``n_own``: the centre of the pixel's own cell), so such a pixel ranks
    cells by colour among those shaped like its own cell.
    """
    H, W = normals.shape[-2:]
    h, w = lr_size
    iy = nearest_anchor(H, h, normals.device)
    ix = nearest_anchor(W, w, normals.device)
    c = torch.nn.functional.pad(centres[0], (1, 1, 1, 1), mode="replicate")  # [K, h + 2, w + 2]
    n = normals[0]
    best = torch.stack(
        [(n - c[:, iy + dy][:, :, ix + dx]).norm(dim=0) for dy in (0, 1, 2) for dx in (0, 1, 2)]
    ).amin(0)
    own = centres[0][:, iy][:, :, ix]
    a = torch.exp(-0.5 * (best / tau) ** 2)
    return (a * n + (1 - a) * own)[None]


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
    q = torch.tensor([0.01, 0.99], dtype=f.dtype)
    whole = mode == "absolute" and f.numel() == z_valid.numel()  # f is the valid depth itself
    med: float | None = None
    if FAST_PREP and f.device.type == "cpu" and f.numel() > 0 and not bool(f.isnan().any()):
        lo, hi, med = _quantiles_select(f, q, whole)
    else:
        lo, hi = (float(x) for x in torch.quantile(f, q))
    if mode == "relative":
        return lo, max(hi - lo, 0.05)
    if med is None:
        med = float(z_valid.to(torch.float64).median())
    return lo, max(hi - lo, 0.05 * med)


def _quantiles_select(f: torch.Tensor, q: torch.Tensor, median: bool) -> tuple[float, float, float | None]:
    """``torch.quantile(f, q)`` (two levels, linear) and, with ``median``, ``f.median()`` (else None) of a
    NaN-free CPU float64 ``f [N]`` with one ``numpy.partition`` instead of torch's full sort: the same order
    statistics, interpolated by torch's own ``lerp`` with torch's ranks and weights (so the same bits)."""
    last = f.numel() - 1
    ranks = q * last
    below = ranks.to(torch.long)
    above = ranks.ceil().to(torch.long)
    mid = last // 2  # torch.median: the lower of the two middle values
    ks = sorted({*below.tolist(), *above.tolist(), mid})
    part = np.partition(f.numpy(), ks)
    lo, hi = (
        float(x)
        for x in torch.from_numpy(part[below.numpy()]).lerp_(
            torch.from_numpy(part[above.numpy()]), ranks - below
        )
    )
    return lo, hi, float(part[mid]) if median else None


# ---------------------------------------------------------------------- the lifted kernel
@dataclass
class LiftedKernel:
    """A fitted RGB-D kernel: a 2-group :class:`~ua3d.api.Kernel` plus the camera and depths.

    Attributes
    ----------
    kernel : the fitted kernel; ``groups = (C + G, 1)``, guide ``[1, C + G + 1, H, W]`` (RGB, ``G``
        normal channels, depth feature),
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
    n_geometry : ``G``, the number of normal channels in the colour group (2 by default, 0 without).
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
    n_geometry: int = 0

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
        return self.kernel.guide_hr[:, : self.kernel.guide_hr.shape[1] - 1 - self.n_geometry]

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
def _lift_config(config: FitConfig | None, n_rgb: int, depth_weight: float, n_geo: int = 0) -> FitConfig:
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
        # the loss is a mean over n_rgb + n_geo + 1 channels: colour weighs (n_rgb + n_geo + 1) / n_rgb
        # so that the colour part of the loss (and of its gradient) is exactly the 2D kernel's
        c = (n_rgb + n_geo + 1) / n_rgb
        cw = (c,) * n_rgb + (0.0,) * n_geo + (c * float(depth_weight),)
    elif len(cw) != n_rgb + 1:
        raise ValueError(
            f"config.channel_weights must have {n_rgb + 1} values (colour + depth), got {len(cw)}"
        )
    else:
        cw = tuple(cw[:n_rgb]) + (0.0,) * n_geo + tuple(cw[n_rgb:])
    return cfg.replace(sigma_range=tuple(sr), channel_weights=tuple(cw))


def _staged_2d(g: torch.Tensor, hw: tuple[int, int], cfg: FitConfig, base: Kernel | None, callback):
    """The colour stage of the staged fit: exactly :func:`ua3d.fit` (or the given 2D ``base``).

    Returns ``(params [1, 3 + 1, h, w], centres [1, C, h, w], losses)``.
    """
    if base is not None:
        if base.groups is not None and len(base.groups) != 1:
            raise ValueError(f"base must be a 2D kernel (one range group), got groups {base.groups}")
        if tuple(base.lr_size) != tuple(hw) or tuple(base.guide_hr.shape) != tuple(g.shape):
            raise ValueError(
                f"base was fitted for a guide of shape {tuple(base.guide_hr.shape)} and grid {tuple(base.lr_size)}, "
                f"not {tuple(g.shape)} and {tuple(hw)}"
            )
        if not torch.equal(base.guide_hr.to(g.dtype), g):
            raise ValueError("base was fitted on a different colour guide than rgb")
        return base.params.detach().to(g.dtype), base.guide_lr.to(g.dtype), list(base.losses)
    centres, values = lr_guides(g, hw, cfg)
    params, losses = fit_params(g, centres, cfg, values_lr=values, callback=callback)
    return params, centres, losses


def _fit_depth_scale(
    params: torch.Tensor,
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    groups: tuple[int, int],
    valid_hr: torch.Tensor,
    valid_lr: torch.Tensor,
    cfg: FitConfig,
    steps: int,
    lr: float,
    callback=None,
    offset: int = 0,
) -> tuple[torch.Tensor, list[float]]:
    """The depth stage: fit only ``log sigma_z`` (``params[:, -1]``) so that rendering the LR depth
    feature reconstructs the HR depth feature (L1 over valid HR depth), every other parameter frozen.

    The loss and its gradient are the engine's :func:`ua3d.core.ops.kernel_fit_loss_grad` with the
    channel weights ``(0, ..., 0, C + 1)`` (the mean absolute depth-feature error); the gradient of
    the frozen maps is discarded. Returns ``(params, losses)``.
    """
    from ua3d.core.ops import kernel_fit_loss_grad
    from ua3d.core.tto import _Adam

    n = guide_hr.shape[1]
    lam = torch.zeros(n, dtype=guide_hr.dtype, device=guide_hr.device)
    lam[-1] = float(n)
    params = params.detach().clone()
    z = params[:, -1:].clone()
    adam = _Adam(z, lr, cfg.lr_decay)
    losses: list[float] = []
    for _ in range(steps):
        loss, grad = kernel_fit_loss_grad(
            params,
            guide_hr,
            guide_lr,
            cfg.radius,
            groups,
            valid_hr,
            valid_lr,
            lam,
            None,
            backend=cfg.backend,
            support_sigmas=cfg.adaptive_support,
        )
        adam.step(grad[:, -1:].to(z.dtype))
        params[:, -1:] = z
        losses.append(float(loss))
        if callback is not None:
            callback(offset + len(losses) - 1, losses[-1])
    return params, losses


DEPTH_FITS = ("joint", "staged")


def fit_rgbd(
    rgb: Any,
    depth: Any,
    camera: PinholeCamera,
    lr_size: Any,
    config: FitConfig | None = None,
    depth_scale: float = 1.0,
    depth_max: float | None = None,
    depth_mode: str = "relative",
    depth_weight: float | None = None,
    callback: Any = None,
    *,
    depth_fit: str = "joint",
    depth_steps: int = DEPTH_STEPS,
    depth_lr: float | None = None,
    base: Kernel | None = None,
    normal_scale: float = NORMAL_SCALE,
    normal_gate: float = NORMAL_GATE,
    normal_curvature: float = 0.0,
    normal_mismatch: float = 0.0,
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
    depth_weight : ``"joint"`` fit only: loss weight of the depth channel relative to a colour channel
        (None = 0, the default: the fit has the 2D kernel's objective, the colour reconstruction).
        Heavier weights make the kernel copy colour along iso-depth lines (floors) and lose to the 2D
        kernel on label transfer (``docs/transfer.md``).
    callback : optional ``callback(step, loss)`` after every TTO step (progress bars).
    depth_fit : ``"joint"`` (default): one fit of all five parameter maps on the colour loss (+
        ``depth_weight`` x depth) with the normal channels in the colour group. ``"staged"``: the
        spatial and colour maps are exactly the 2D kernel's (:func:`ua3d.fit` with the same config, or
        ``base``), then ``depth_steps`` steps fit the depth scale ``sigma_z`` alone to reconstruct the
        HR depth from the LR depth, everything else frozen; no normal channels. Measured on the label
        benchmark it loses to the 2D kernel (the depth loss sharpens ``sigma_z`` on slanted floors
        too); it is kept for depth-centred uses and for reusing a 2D fit cheaply.
    depth_steps : steps of the depth stage (``"staged"`` only; 0 = the 2D kernel with the initial
        ``sigma_z``).
    depth_lr : Adam step of the depth stage (None = ``config.lr``).
    base : optional 2D :class:`~ua3d.api.Kernel` from ``ua3d.fit`` on the same ``rgb``, ``lr_size``
        and ``config`` (``"staged"`` only): its maps are reused and only the depth stage runs.
    normal_scale : ``"joint"`` only: the surface normals' ``(n_x, n_y)`` (:func:`surface_normals`),
        times this scale, join the colour range group (default :data:`NORMAL_SCALE`; 0 = none). They
        have loss weight 0: they only decide which LR cells a pixel may borrow from, so pixels of
        differently oriented surfaces (an object on a floor, a box in front of a wall) are kept apart
        even where their colours match, while a slanted plane, whose normal is constant, is one surface.
    normal_gate : radius in LR cells of the depth-edge gate on the normals (:func:`depth_edge_gate`;
        default :data:`NORMAL_GATE` = 0: the normals count in full everywhere).
    normal_curvature : ``tau`` in radians of :func:`curvature_gate` (0 = off, the default): the normals are
        scaled down where the surface turns by more than ``tau`` across one LR cell (spheres a few cells wide).
    normal_mismatch : ``tau`` (unit-normal distance) of :func:`normal_mismatch_blend` (0 = off, the default):
        a pixel whose normal no LR centre of its 3x3 cells has (a surface thinner than a cell: a box top at a
        grazing angle, a sphere's rim) gets its own cell's centre normal instead. Both options keep flat depth
        exactly the 2D kernel; measured on the label benchmark they raise the lift's mean gain but leave the
        holes family below the 2D kernel (``docs/transfer.md``, "Session 4"), so both are off by default.
    Returns
    -------
    LiftedKernel

    Raises
    ------
    ValueError
        rgb and depth of different sizes, intrinsics not matching the image size, negative depth,
        depth with no valid pixel, bad ``lr_size`` / ``depth_mode`` / ``depth_fit`` / ``depth_steps``,
        ``depth_weight > 0`` or a ``base`` not made for this frame with ``"staged"``.
    """
    if depth_mode not in DEPTH_MODES:
        raise ValueError(f"depth_mode must be one of {DEPTH_MODES}, got {depth_mode!r}")
    if depth_weight is not None:
        check_number(depth_weight, "depth_weight", low=0)
    if depth_fit not in DEPTH_FITS:
        raise ValueError(f"depth_fit must be one of {DEPTH_FITS}, got {depth_fit!r}")
    if depth_fit == "staged" and depth_weight:
        raise ValueError(
            f"depth_weight={depth_weight!r} applies to depth_fit='joint' only (the staged fit has no colour+depth loss)"
        )
    if depth_fit == "joint" and base is not None:
        raise ValueError("base applies to depth_fit='staged' only")
    if base is not None and not isinstance(base, Kernel):
        raise ValueError(f"base must be a ua3d.Kernel fitted by ua3d.fit, got {type(base).__name__}")
    if isinstance(depth_steps, bool) or not isinstance(depth_steps, (int, np.integer)) or depth_steps < 0:
        raise ValueError(f"depth_steps must be an integer >= 0, got {depth_steps!r}")
    if depth_lr is not None:
        check_number(depth_lr, "depth_lr", low=0, low_open=True)
    check_number(normal_scale, "normal_scale", low=0)
    check_number(normal_gate, "normal_gate", low=0)
    check_number(normal_curvature, "normal_curvature", low=0)
    check_number(normal_mismatch, "normal_mismatch", low=0)
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
    if depth_fit == "staged" and base is not None and config is None:
        config = base.config
    if base is not None and config != base.config:
        raise ValueError("config differs from base.config: the staged lift reuses base's fit")
    cfg_2d = config if config is not None else FitConfig()
    n_rgb = g.shape[1]
    n_geo = len(NORMAL_CHANNELS) if (normal_scale > 0 and depth_fit == "joint") else 0
    cfg = _lift_config(config, n_rgb, depth_weight or 0.0, n_geo)
    g = prefilter_guide(g, cfg.guide_prefilter)
    z = torch.where(valid, z, torch.zeros((), dtype=z.dtype, device=z.device))

    lo, spread = _normaliser(z[valid], depth_mode)
    z_lr, v_lr = pool_depth(z, valid, hw)
    z_lr = fill_nearest(z_lr, v_lr)
    f_hr = torch.where(valid, depth_feature(z.clamp_min(1e-12), depth_mode, lo, spread), z.new_zeros(()))
    f_lr = depth_feature(z_lr, depth_mode, lo, spread)
    depth_lr_grad = cell_gradients(f_hr, valid, hw)
    valid_hr = torch.cat([torch.ones_like(valid), valid], 1)
    valid_lr = torch.cat([torch.ones_like(v_lr), v_lr], 1)
    groups = (g.shape[1], 1)
    if depth_fit == "staged":
        guide_hr = torch.cat([g, f_hr.to(g.dtype)], 1)
        p2d, centres, losses = _staged_2d(g, hw, cfg_2d, base, callback)
        guide_lr = torch.cat([centres, f_lr.to(g.dtype)], 1)
        log_sz = math.log(float(cfg.sigma_range[1]))
        params = torch.cat([p2d, torch.full_like(p2d[:, :1], log_sz)], 1)
        params, dl = _fit_depth_scale(
            params,
            guide_hr,
            guide_lr,
            groups,
            valid_hr,
            valid_lr,
            cfg,
            int(depth_steps),
            cfg.lr if depth_lr is None else float(depth_lr),
            callback,
            offset=len(losses) if base is None else 0,
        )
        losses = losses + dl
        cfg = cfg_2d
    else:
        if n_geo:
            n3 = surface_normals(z, valid, camera)
            nrm = n3[:, list(NORMAL_CHANNELS)]
            if normal_gate > 0:
                cell = math.sqrt(H / hw[0] * W / hw[1])  # HR pixels per LR cell
                nrm = nrm * depth_edge_gate(z, valid, float(normal_gate) * cell)
            if normal_curvature > 0:
                cell = math.sqrt(H / hw[0] * W / hw[1])
                nrm = nrm * curvature_gate(n3, z, valid, cell, float(normal_curvature))
            if normal_mismatch > 0:
                cen, _ = lr_guides(nrm.to(g.dtype), hw, cfg)
                nrm = normal_mismatch_blend(nrm.to(g.dtype), cen, hw, float(normal_mismatch))
            g = torch.cat([g, float(normal_scale) * nrm.to(g.dtype)], 1)
            groups = (g.shape[1], 1)
        guide_hr = torch.cat([g, f_hr.to(g.dtype)], 1)
        centres, values = lr_guides(g, hw, cfg)
        guide_lr = torch.cat([centres, f_lr.to(g.dtype)], 1)
        values_lr = None if values is None else torch.cat([values, f_lr.to(g.dtype)], 1)
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
    return LiftedKernel(kernel, camera, z, valid, z_lr, v_lr, depth_mode, lo, spread, depth_lr_grad, n_geo)
