"""The RGB-D lift's per-call preprocessing in numba: the twins of :func:`ua3d.rgbd.lift._segment_median_torch`
(per-segment medians: LR depth, in-cell slopes, the volume's plane centres) and
:func:`ua3d.rgbd.lift._surface_normals_torch` (the one-sided differences, cross product and normalisation;
the nearest-valid fill of bad pixels stays scipy, shared with the reference).

Both give **the same bits** as their torch references: the kernels are compiled without ``fastmath``
(IEEE operations in the reference's order) and

* the medians pick the same two middle values of each segment as the reference's stable sorts (values
  grouped by a counting sort, which keeps the input order inside a segment, then sorted per segment);
  where a picked value is a zero or a NaN, whose sign / payload a stable sort decides by input order, the
  bits are taken from the matching zero / NaN in input order. ``0.5 * (lo + hi)`` in the values' dtype.
* the normals use torch's CPU cross product ``a_1 b_2 - a_2 b_1`` with the first product fused
  (``fma(a_1, b_2, -(a_2 b_1))``, as its vectorised kernel computes it) and its norm
  ``sqrt((x^2 + y^2) + z^2)`` (no fma).

Serial (one call is tens of milliseconds at 640x480); ``AVAILABLE`` is False without numba and the
callers in :mod:`ua3d.rgbd.lift` keep their torch references (also for non-CPU tensors).
"""

from __future__ import annotations

import numpy as np
import torch

from ua3d.core.fast._jit import AVAILABLE

__all__ = ["AVAILABLE", "cell_median", "segment_median", "surface_normals_raw"]

if AVAILABLE:
    from llvmlite import ir as _llir
    from numba import types
    from numba.extending import intrinsic

    from ua3d.core.fast._jit import njit

    #: jit options: the project's caching and nogil, but **no fastmath** (the results must be the torch
    #: references' bits: no reassociation, no contraction, no reciprocal division)
    _EXACT = {"cache": True, "nogil": True}

    @intrinsic
    def _fma(typingctx, a, b, c):
        """``a * b + c`` rounded once (LLVM's ``llvm.fma``; float64)."""
        sig = types.float64(types.float64, types.float64, types.float64)

        def codegen(context, builder, signature, args):
            from numba.core import cgutils

            f64 = _llir.DoubleType()
            fty = _llir.FunctionType(f64, [f64, f64, f64])
            return builder.call(cgutils.get_or_insert_function(builder.module, fty, "llvm.fma.f64"), args)

        return sig, codegen

    @njit(**_EXACT)
    def _ranked(x, seg, p):
        """The element of rank ``p`` of ``seg`` (the segment in input order) under a stable sort, given its
        value ``x``: ``x`` itself, except for a zero or a NaN, whose sign / payload bits are those of the
        element of that class a stable sort puts at ``p`` (its rank among the class, in input order)."""
        nan = x != x
        if not (x == 0 or nan):
            return x
        below = 0  # elements sorted before x's class: negatives (zeros) or every number (NaNs)
        for i in range(seg.shape[0]):
            e = seg[i]
            if (e == e) if nan else (e < 0):
                below += 1
        k = p - below
        for i in range(seg.shape[0]):
            e = seg[i]
            if (e != e) if nan else (e == 0):
                if k == 0:
                    return e
                k -= 1
        return x  # not reached

    @njit(**_EXACT)
    def _before(a, b):
        """numpy's sort order: ``a < b``, NaNs last."""
        return a < b or (b != b and a == a)

    @njit(**_EXACT)
    def _segment_median_kernel(values, segment, med, has):
        """``med [S]``, ``has [S]`` from ``values [N]`` and ``segment [N]`` (ids in ``[0, S)``); returns
        the number of out-of-range ids (nothing is written then)."""
        n = values.shape[0]
        S = med.shape[0]
        start = np.zeros(S + 1, np.int64)
        bad = 0
        for i in range(n):
            s = segment[i]
            if s < 0 or s >= S:
                bad += 1
            else:
                start[s + 1] += 1
        if bad:
            return bad
        for k in range(S):
            start[k + 1] += start[k]
        pos = start[:S].copy()
        grouped = np.empty(n, values.dtype)  # counting sort: input order kept inside a segment
        for i in range(n):
            s = segment[i]
            grouped[pos[s]] = values[i]
            pos[s] += 1
        zero = values.dtype.type(0.0)
        for k in range(S):
            a, b = start[k], start[k + 1]
            if a == b:
                med[k] = zero
                has[k] = False
            else:
                med[k] = _median_of(grouped[a:b])
                has[k] = True
        return 0

    @njit(**_EXACT)
    def _median_of(seg):
        """The reference's median of a non-empty segment ``seg`` in input order: the elements of ranks
        ``(c - 1) // 2`` and ``c // 2`` of a stable sort, ``0.5 * (lo + hi)`` in ``seg``'s dtype."""
        c = seg.shape[0]
        lo, hi = (c - 1) // 2, c // 2
        part = np.partition(seg, hi)  # part[hi] has rank hi, part[:hi] the ranks below
        xh = part[hi]
        xl = xh
        if lo != hi:
            xl = part[0]
            for i in range(1, hi):
                if _before(xl, part[i]):
                    xl = part[i]
        return seg.dtype.type(0.5) * (_ranked(xl, seg, lo) + _ranked(xh, seg, hi))

    @njit(**_EXACT)
    def _cell_median_kernel(f, ok, ys, xs, dy, dx, med, has):
        """Per (batch item, LR cell) median ``med [B h w]`` / ``has`` of what :func:`ua3d.rgbd.lift.pool_depth`
        (``dy = dx = 0``: ``f`` where ``ok``) and :func:`ua3d.rgbd.lift.cell_gradients` (``(dy, dx) = (1, 0)``
        or ``(0, 1)``: ``f(p + d) - f(p)`` where both are ``ok`` and in the cell) hand to the medians.
        ``f, ok [B, H, W]``; the cells are rectangles (the nearest-anchor partition is monotone): rows
        ``ys[i] <= y < ys[i + 1]``, columns ``xs[j] <= x < xs[j + 1]``. A cell's values are gathered in
        row-major order, the order of the reference's masked ``[B, H - dy, W - dx]`` copies."""
        B = f.shape[0]
        h, w = ys.shape[0] - 1, xs.shape[0] - 1
        longest = 0
        for i in range(h):
            for j in range(w):
                longest = max(longest, (ys[i + 1] - ys[i]) * (xs[j + 1] - xs[j]))
        buf = np.empty(longest, f.dtype)
        zero = f.dtype.type(0.0)
        for b in range(B):
            for i in range(h):
                for j in range(w):
                    m = 0
                    for y in range(ys[i], ys[i + 1] - dy):
                        for x in range(xs[j], xs[j + 1] - dx):
                            if ok[b, y, x] and ok[b, y + dy, x + dx]:
                                buf[m] = f[b, y + dy, x + dx] - f[b, y, x] if (dy or dx) else f[b, y, x]
                                m += 1
                    k = (b * h + i) * w + j
                    if m == 0:
                        med[k] = zero
                        has[k] = False
                    else:
                        med[k] = _median_of(buf[:m])
                        has[k] = True

    @njit(inline="always", **_EXACT)
    def _one_sided(pts, valid, y, x, dy, dx):
        """The difference of the points ``pts [3, H, W]`` at ``(y, x)`` along ``(dy, dx)`` (one of ``(0, 1)``,
        ``(1, 0)``): forward when that neighbour is valid and its depth step is not larger than the backward
        one, else backward; and whether either side was valid. As the torch reference's ``diff``."""
        H, W = valid.shape
        v = valid[y, x]
        has_f = y + dy < H and x + dx < W
        has_b = y - dy >= 0 and x - dx >= 0
        fok = has_f and v and valid[y + dy, x + dx]
        bok = has_b and v and valid[y - dy, x - dx]
        if has_f:
            f0 = pts[0, y + dy, x + dx] - pts[0, y, x]
            f1 = pts[1, y + dy, x + dx] - pts[1, y, x]
            f2 = pts[2, y + dy, x + dx] - pts[2, y, x]
        else:
            f0 = f1 = f2 = 0.0
        if has_b:
            b0 = pts[0, y, x] - pts[0, y - dy, x - dx]
            b1 = pts[1, y, x] - pts[1, y - dy, x - dx]
            b2 = pts[2, y, x] - pts[2, y - dy, x - dx]
        else:
            b0 = b1 = b2 = 0.0
        if fok and (not bok or abs(f2) <= abs(b2)):
            return f0, f1, f2, fok or bok
        return b0, b1, b2, fok or bok

    @njit(**_EXACT)
    def _normals_kernel(depth, valid, fx, fy, cx, cy, n, good):
        """Unit normals ``n [3, H, W]`` (float64, unfilled) and ``good [H, W]`` (``valid``, a usable
        difference along both axes and a non-zero cross product) of ``depth [H, W]``."""
        H, W = depth.shape
        pts = np.empty((3, H, W), np.float64)
        for y in range(H):
            r = np.float64(y)
            for x in range(W):
                z = np.float64(depth[y, x]) if valid[y, x] else 0.0
                pts[0, y, x] = (np.float64(x) - cx) * z / fx
                pts[1, y, x] = (r - cy) * z / fy
                pts[2, y, x] = z
        for y in range(H):
            for x in range(W):
                v = valid[y, x]
                # one-sided differences along u (columns) and v (rows)
                u0, u1, u2, oku = _one_sided(pts, valid, y, x, 0, 1)
                d0, d1, d2, okv = _one_sided(pts, valid, y, x, 1, 0)
                # n = dv x du, as torch.linalg.cross(dv, du) on CPU
                c0 = _fma(d1, u2, -(d2 * u1))
                c1 = _fma(d2, u0, -(d0 * u2))
                c2 = _fma(d0, u1, -(d1 * u0))
                nrm = np.sqrt((c0 * c0 + c1 * c1) + c2 * c2)
                good[y, x] = v and oku and okv and nrm > 0
                den = 1e-300 if nrm < 1e-300 else nrm  # clamp_min (a NaN stays NaN)
                n[0, y, x] = c0 / den
                n[1, y, x] = c1 / den
                n[2, y, x] = c2 / den


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError("ua3d.rgbd.fast_prep needs numba (pip install numba); use the torch reference")


def segment_median(
    values: torch.Tensor, segment: torch.Tensor, n_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Median of CPU float32/float64 ``values [N]`` per ``segment [N]`` (int64 ids in ``[0, n_segments)``):
    ``(median [n_segments], has [n_segments] bool)``, bit for bit
    :func:`ua3d.rgbd.lift._segment_median_torch` (even counts: the mean of the two middle values; empty
    segments: 0 / False)."""
    _require()
    v = values.detach().contiguous().numpy()
    s = segment.detach().to(torch.int64).contiguous().numpy()
    med = np.empty(int(n_segments), v.dtype)
    has = np.empty(int(n_segments), np.bool_)
    bad = _segment_median_kernel(v, s, med, has)
    if bad:
        raise ValueError(f"segment ids must lie in [0, {int(n_segments)}), got {bad} outside")
    return torch.from_numpy(med), torch.from_numpy(has)


def cell_median(
    f: torch.Tensor, valid: torch.Tensor, lr_size: tuple[int, int], step: tuple[int, int] = (0, 0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch item, LR cell) median ``[B h w]`` and ``has [B h w]`` of a CPU float32/float64 map
    ``f [B, H, W]`` over the cells' nearest-anchor partition, bit for bit the torch paths of
    :func:`ua3d.rgbd.lift.pool_depth` (``step (0, 0)``: ``f`` where ``valid``) and
    :func:`ua3d.rgbd.lift.cell_gradients` (``step (1, 0)`` / ``(0, 1)``: the differences of vertically /
    horizontally adjacent ``valid`` pixels of one cell), without the ``[B, H, W]`` cell map and masks."""
    from ua3d.core.kernel import nearest_anchor

    _require()
    B, H, W = f.shape
    h, w = (int(v) for v in lr_size)
    fv = f.detach().contiguous().numpy()
    ok = valid.detach().to(torch.bool).contiguous().numpy()
    med = np.empty(B * h * w, fv.dtype)
    has = np.empty(B * h * w, np.bool_)
    ys = np.searchsorted(nearest_anchor(H, h).numpy(), np.arange(h + 1))  # first row of each cell row
    xs = np.searchsorted(nearest_anchor(W, w).numpy(), np.arange(w + 1))
    _cell_median_kernel(fv, ok, ys, xs, int(step[0]), int(step[1]), med, has)
    return torch.from_numpy(med), torch.from_numpy(has)


def surface_normals_raw(
    depth: torch.Tensor, valid: torch.Tensor, fx: float, fy: float, cx: float, cy: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfilled unit normals ``[3, H, W]`` float64 and ``good [H, W]`` bool of a CPU float32/float64
    ``depth [H, W]`` (any value where ``valid [H, W]`` is False), bit for bit the first part of
    :func:`ua3d.rgbd.lift._surface_normals_torch` (the fill of bad pixels is the caller's)."""
    _require()
    d = depth.detach().contiguous().numpy()
    ok = valid.detach().to(torch.bool).contiguous().numpy()
    H, W = d.shape
    n = np.empty((3, H, W), np.float64)
    good = np.empty((H, W), np.bool_)
    _normals_kernel(d, ok, float(fx), float(fy), float(cx), float(cy), n, good)
    return torch.from_numpy(n), torch.from_numpy(good)
