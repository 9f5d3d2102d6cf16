"""Fused render: the twin of :func:`ua3d.core.kernel.kernel_render_reference` (numba kernels
:func:`_render_small`, :func:`_render_weights`, :func:`_gather_signal`; host side
:func:`kernel_render`, the ``torch.bmm`` path and the working-memory estimate)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..kernel import window_offsets
from ._jit import _NEG, AVAILABLE
from .blas import _one_blas_thread, _scipy_blas_threads
from .inputs import Frame, _mask_u8, _require, _setup, _skip_gap
from .pool import Geometry, _empty_huge, _padded_block, _parallel_for

#: render channel counts up to this are fused in numba; more use the weight matrix + ``torch.bmm``.
SMALL_C = 8
#: working-memory budget of one render / fit tile (bytes), on top of the output.
TILE_BYTES = 192 << 20
#: more channels render block by block through BLAS (:func:`_render_dot`, when scipy's BLAS is there);
#: False: the weight matrix + ``torch.bmm`` tiles (:func:`_render_bmm`)
DOT = True

if AVAILABLE:
    from ._jit import _JIT, _fexp, _half_bits, _wide_vectors, njit
    from .blocks import (
        _block_logits,
        _block_pixels,
        _block_scratch,
        _block_weights,
        _exp_sums,
        _gather_block,
        _pad_pixels,
        _rgb_logits,
    )

    @njit(**_JIT)
    def _render_small(t0, t1, fr, geo, smask, use_sm, sig, b, i0, ybase, pmax, out, sup):
        """Fused render of blocks ``t0 <= t < t1`` (block ``(i0 + t // w, t % w)``) of batch ``b``:
        ``out [C, rows, W]`` (rows from ``ybase``; NaN without support), ``sup [rows, W]`` uint8.
        ``fr``, ``geo``: the call's :class:`~ua3d.core.fast.inputs.Frame` and
        :class:`~ua3d.core.fast.pool.Geometry`; ``smask [B, h, w]`` uint8 valid LR values (if ``use_sm``)."""
        _wide_vectors()
        ghr, glr, vhr, gstart, cut, use_vhr = fr.ghr, fr.glr, fr.vhr, fr.gstart, fr.cut, fr.use_vhr
        offs, ry0, ry1, cx0, cx1 = geo.offs, geo.ry0, geo.ry1, geo.cx0, geo.cx1
        w = glr.shape[3]
        C = sig.shape[1]
        G = gstart.shape[0] - 1
        K = offs.shape[0]
        dt = glr.dtype.type
        half_neg = dt(0.5 * _NEG)
        rec, nb, nb_k, px, py, pg, pv, pw, wl, mx, tot, d = _block_scratch(glr, K, G, pmax)
        nb_v = nb.nb_v
        oc = np.empty((C, pmax), glr.dtype)
        for t in range(t0, t1):
            i = i0 + t // w
            j = t - (t // w) * w
            y0, y1 = ry0[i], ry1[i]
            x0, x1 = cx0[j], cx1[j]
            if y1 <= y0 or x1 <= x0:
                continue
            bw = x1 - x0
            kb, kanc = _gather_block(b, i, j, fr, geo, smask, use_sm, rec, nb_v, nb_k)
            if kb == 0:
                for y in range(y0, y1):
                    for x in range(x0, x1):
                        sup[y - ybase, x] = 0
                        for c in range(C):
                            out[c, y - ybase, x] = np.nan
                continue
            n = _block_pixels(b, y0, y1, x0, x1, ghr, vhr, use_vhr, px, py, pg, pv)
            npad = min(pmax, -(-n // 8) * 8)
            _pad_pixels(n, npad, px, py, pg, pv, pw)
            _block_logits(kb, kanc, npad, px, py, pg, pv, gstart, cut, nb, wl, mx, d)
            for p in range(npad):
                tot[p] = 0.0
            for c in range(C):
                for p in range(npad):
                    oc[c, p] = 0.0
            for k in range(kb):
                row = wl[k]
                kk = nb_k[k]
                qi, qj = i + offs[kk, 0], j + offs[kk, 1]
                if C == 1:
                    f = sig[b, 0, qi, qj]
                    for p in range(npad):
                        e = _fexp(row[p] - mx[p])
                        tot[p] += e
                        oc[0, p] += e * f
                    continue
                for p in range(npad):
                    e = _fexp(row[p] - mx[p])
                    row[p] = e
                    tot[p] += e
                for c in range(C):
                    f = sig[b, c, qi, qj]
                    for p in range(npad):
                        oc[c, p] += row[p] * f
            for p in range(n):
                y = y0 + p // bw
                x = x0 + p - (p // bw) * bw
                ok = mx[p] > half_neg
                sup[y - ybase, x] = 1 if ok else 0
                inv = dt(1.0) / tot[p]
                for c in range(C):
                    out[c, y - ybase, x] = oc[c, p] * inv if ok else np.nan

    @njit(**_JIT)
    def _render_weights(t0, t1, fr, geo, smask, use_sm, b, i0, bxm, pmax, wmat, sup):
        """Dense normalised weights of blocks ``t0 <= t < t1`` (block ``(i0 + t // w, t % w)``):
        ``wmat [tiles, K, P]`` (window slot ``k``, pixel ``(y, x)`` at ``(y - ry0) bxm + x - cx0``;
        zero for padding, outside or masked cells), ``sup [tiles, P]`` uint8 (arguments as
        :func:`_render_small`)."""
        _wide_vectors()
        ghr, glr, vhr, gstart, cut, use_vhr = fr.ghr, fr.glr, fr.vhr, fr.gstart, fr.cut, fr.use_vhr
        offs, ry0, ry1, cx0, cx1 = geo.offs, geo.ry0, geo.ry1, geo.cx0, geo.cx1
        w = glr.shape[3]
        G = gstart.shape[0] - 1
        K = offs.shape[0]
        dt = glr.dtype.type
        half_neg = dt(0.5 * _NEG)
        rec, nb, nb_k, px, py, pg, pv, pw, wl, mx, tot, d = _block_scratch(glr, K, G, pmax)
        nb_v = nb.nb_v
        pidx = np.empty(pmax, np.int64)
        written = np.zeros(K, np.uint8)
        ft = np.empty((10, pmax), glr.dtype)
        mom = np.empty((11, K), glr.dtype)
        rgb = G == 1 and glr.shape[1] == 3 and cut == 0
        P = wmat.shape[2]
        for t in range(t0, t1):
            i = i0 + t // w
            j = t - (t // w) * w
            y0, y1 = ry0[i], ry1[i]
            x0, x1 = cx0[j], cx1[j]
            kb = 0
            if y1 > y0 and x1 > x0:
                kb, kanc = _gather_block(b, i, j, fr, geo, smask, use_sm, rec, nb_v, nb_k)
            if kb == 0:
                wmat[t] = 0.0
                sup[t] = 0
                continue
            n = _block_pixels(b, y0, y1, x0, x1, ghr, vhr, use_vhr, px, py, pg, pv)
            npad = min(pmax, -(-n // 8) * 8)
            _pad_pixels(n, npad, px, py, pg, pv, pw)
            if rgb:
                _rgb_logits(kb, npad, px, py, pg, pv, use_vhr, nb, wl, mx, ft, mom)
                _exp_sums(kb, npad, wl, mx, tot)
            else:
                _block_weights(kb, kanc, npad, px, py, pg, pv, gstart, cut, nb, wl, mx, tot, d)
            bw = x1 - x0
            for p in range(n):
                ok = mx[p] > half_neg
                tot[p] = dt(1.0) / tot[p] if ok else dt(0.0)
            if n == P:  # a full-size block: pixel p is column p; rows written whole, only unused slots zeroed
                for p in range(n):
                    sup[t, p] = 1 if mx[p] > half_neg else 0
                for k in range(kb):
                    row = wl[k]
                    dst = wmat[t, nb_k[k]]
                    written[nb_k[k]] = 1
                    for p in range(n):
                        dst[p] = row[p] * tot[p]
                for k in range(K):
                    if written[k] == 0:
                        wmat[t, k] = 0.0
                    written[k] = 0
                continue
            wmat[t] = 0.0
            sup[t] = 0
            for p in range(n):
                pidx[p] = (p // bw) * bxm + (p - (p // bw) * bw)
                sup[t, pidx[p]] = 1 if mx[p] > half_neg else 0
            for k in range(kb):
                row = wl[k]
                dst = wmat[t, nb_k[k]]
                for p in range(n):
                    dst[pidx[p]] = row[p] * tot[p]

    @njit(**_JIT)
    def _render_dot(t0, t1, fr, geo, smask, use_sm, sigt, b, pmax, gap, half, out, sup):
        """Blocks ``t0 <= t < t1`` (block ``(t // w, t % w)``) of batch ``b`` end to end, many channels:
        the block's weights over its listed neighbours, the neighbours whose weight is below
        ``e^-gap`` of the largest at every pixel of the block dropped (``gap = 0``: none; the weights are
        normalised over the kept ones), times their features ``sigt[b, q, :]`` (cell-major ``[B, h w,
        C]``) by numba's ``np.dot`` (BLAS, one thread per caller), written to ``out [C, H, W]`` (float16
        bits into an int16 array when ``half``; NaN without support) and ``sup [H, W]`` uint8. Arguments as
        :func:`_render_small`; per-thread scratch only (a few hundred KB)."""
        _wide_vectors()
        ghr, glr, vhr, gstart, cut, use_vhr = fr.ghr, fr.glr, fr.vhr, fr.gstart, fr.cut, fr.use_vhr
        w = glr.shape[3]
        C = sigt.shape[2]
        G = gstart.shape[0] - 1
        K = geo.offs.shape[0]
        dt = glr.dtype.type
        half_neg = dt(0.5 * _NEG)
        keep = dt(np.exp(-gap)) if gap > 0 else dt(0.0)
        rec, nb, nb_k, px, py, pg, pv, pw, _wl, mx, tot, d = _block_scratch(glr, K, G, pmax)
        nb_v = nb.nb_v
        ft = np.empty((10, pmax), glr.dtype)
        mom = np.empty((11, K), glr.dtype)
        wlf = np.empty(K * pmax, glr.dtype)
        fmt = np.empty((K, C), glr.dtype)
        resf = np.empty(C * pmax, glr.dtype)
        rgb = G == 1 and glr.shape[1] == 3 and cut == 0
        for t in range(t0, t1):
            i = t // w
            j = t - i * w
            y0, y1 = geo.ry0[i], geo.ry1[i]
            x0, x1 = geo.cx0[j], geo.cx1[j]
            if y1 <= y0 or x1 <= x0:
                continue
            bw = x1 - x0
            kb, kanc = _gather_block(b, i, j, fr, geo, smask, use_sm, rec, nb_v, nb_k)
            n = _block_pixels(b, y0, y1, x0, x1, ghr, vhr, use_vhr, px, py, pg, pv)
            npad = min(pmax, -(-n // 8) * 8)
            res = resf[: C * npad].reshape((C, npad))
            if kb == 0:
                for p in range(n):
                    mx[p] = dt(_NEG)
            else:
                _pad_pixels(n, npad, px, py, pg, pv, pw)
                wl = wlf[: K * npad].reshape((K, npad))
                if rgb:
                    _rgb_logits(kb, npad, px, py, pg, pv, use_vhr, nb, wl, mx, ft, mom)
                    _exp_sums(kb, npad, wl, mx, tot)
                else:
                    _block_weights(kb, kanc, npad, px, py, pg, pv, gstart, cut, nb, wl, mx, tot, d)
                # drop the negligible neighbours (rows moved up in place), renormalise over the kept ones
                kk = 0
                for p in range(npad):
                    tot[p] = 0.0
                for k in range(kb):
                    row = wl[k]
                    big = dt(0.0)
                    for p in range(n):
                        big = max(big, row[p])
                    if big < keep:
                        continue
                    dst = wl[kk]
                    q = (i + geo.offs[nb_k[k], 0]) * w + j + geo.offs[nb_k[k], 1]
                    for c in range(C):
                        fmt[kk, c] = sigt[b, q, c]
                    for p in range(npad):
                        v = row[p]
                        dst[p] = v
                        tot[p] += v
                    kk += 1
                np.dot(fmt[:kk].T, wl[:kk], res)
            for p in range(n):
                ok = mx[p] > half_neg
                sup[y0 + p // bw, x0 + p - (p // bw) * bw] = 1 if ok else 0
                tot[p] = dt(1.0) / tot[p] if ok else dt(np.nan)
            for c in range(C):
                for yy in range(y1 - y0):
                    y = y0 + yy
                    o = yy * bw
                    for xx in range(bw):
                        v = res[c, o + xx] * tot[o + xx] if kb > 0 else dt(np.nan)
                        if half:
                            out[c, y, x0 + xx] = _half_bits(np.float32(v))
                        else:
                            out[c, y, x0 + xx] = v

    @njit(**_JIT)
    def _gather_signal(t0, t1, sigt, flat, c0, dst):
        """``dst[t, k, :] = sigt[flat[t, k], c0:c0 + cc]`` (zeros where ``flat < 0``) for blocks
        ``t0 <= t < t1``: the LR signal cell-major (``sigt [h w, C]``), so that every window slot
        is one contiguous copy of ``cc`` channels (``dst [blocks, K, cc]``)."""
        cc = dst.shape[2]
        for t in range(t0, t1):
            for k in range(flat.shape[1]):
                q = flat[t, k]
                if q < 0:
                    for c in range(cc):
                        dst[t, k, c] = 0.0
                else:
                    for c in range(cc):
                        dst[t, k, c] = sigt[q, c0 + c]


def _block_dims(H: int, W: int, h: int, w: int) -> tuple[int, int]:
    """Largest block height and width (HR pixels sharing one anchor)."""
    return -(-H // h) + 1, -(-W // w) + 1


def render_working_bytes(
    out_size: tuple[int, int], lr_size: tuple[int, int], channels: int, radius: float, itemsize: int = 4
) -> int:
    """Working memory of one render tile (one row of blocks), excluding the output."""
    H, W = out_size
    h, w = lr_size
    by, bx = _block_dims(H, W, h, w)
    K = window_offsets(radius).shape[0]
    if channels <= SMALL_C:
        return channels * by * W * itemsize * 2
    cc = min(channels, 128)
    return w * (by * bx * K + K * cc + 2 * by * bx * cc) * itemsize


def kernel_render(
    params: torch.Tensor,
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    signal: torch.Tensor,
    radius: float,
    groups: Sequence[int] | None = None,
    valid_hr: torch.Tensor | None = None,
    valid_lr: torch.Tensor | None = None,
    signal_mask: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    support_sigmas: float | None = None,
    tile_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``signal [B, C, h, w]`` (fused); see :func:`ua3d.core.kernel.kernel_render_reference`.

    Parameters
    ----------
    signal : ``[B, C, h, w]``
    signal_mask : ``[B, 1, h, w]`` bool or None (False = invalid LR value, excluded; pixels
        without a valid neighbour get NaN and ``support=False``).
    out_dtype : output dtype (default: the signal's), e.g. ``torch.float16``.
    support_sigmas : None, or a spatial support cut in sigmas (see :func:`kernel_fit_loss_grad`).
    tile_bytes : working-memory budget of one tile (default :data:`TILE_BYTES`).

    Returns
    -------
    out : ``[B, C, H, W]`` in ``out_dtype``
    support : ``[B, 1, H, W]`` bool
    """
    _require()
    st = _setup(params, guide_hr, guide_lr, groups, valid_hr, valid_lr, radius, support_sigmas)
    fr, geo, cdt, ndt, pmax = st.fr, st.geo, st.cdt, st.ndt, st.pmax
    B, _, h, w = params.shape
    H, W = guide_hr.shape[2:]
    if (
        not isinstance(signal, torch.Tensor)
        or signal.ndim != 4
        or signal.shape[0] != B
        or tuple(signal.shape[2:]) != (h, w)
        or signal.shape[1] == 0
    ):
        raise ValueError(
            f"signal must be [B, C, h, w] = [{B}, C, {h}, {w}], got {tuple(getattr(signal, 'shape', ()))}"
        )
    if signal.device.type != "cpu":
        raise ValueError(f"signal must be a CPU tensor for the fast engine, got device {signal.device}")
    C = signal.shape[1]
    odt = out_dtype or signal.dtype
    ry0, ry1 = geo.ry0, geo.ry1
    if signal_mask is not None and tuple(signal_mask.shape) != (B, 1, h, w):
        raise ValueError(f"signal_mask must have shape {(B, 1, h, w)}, got {tuple(signal_mask.shape)}")
    sm, use_sm = _mask_u8(None if signal_mask is None else signal_mask[:, 0], (B, h, w), "signal_mask")
    sig_t = signal.detach().to(cdt)
    if use_sm:
        sig_t = torch.where(torch.from_numpy(sm).bool()[:, None], sig_t, torch.zeros((), dtype=cdt))
    out = _empty_huge((B, C, H, W), odt)
    support = torch.empty(B, 1, H, W, dtype=torch.bool)
    budget = tile_bytes or TILE_BYTES
    itemsize = 8 if cdt == torch.float64 else 4
    if C <= SMALL_C:
        sig = sig_t.contiguous().numpy()
        per_row = C * (-(-H // h) + 1) * W * itemsize + 1
        nrows = max(1, budget // per_row)
        for b in range(B):
            for i0 in range(0, h, nrows):
                i1 = min(h, i0 + nrows)
                ya, yb = int(ry0[i0]), int(ry1[i1 - 1])
                if yb <= ya:
                    continue
                tile = np.empty((C, yb - ya, W), ndt)
                sup = np.empty((yb - ya, W), np.uint8)
                _parallel_for(
                    _render_small, (i1 - i0) * w, fr, geo, sm, use_sm, sig, b, i0, ya, pmax, tile, sup
                )
                out[b, :, ya:yb] = torch.from_numpy(tile)
                support[b, 0, ya:yb] = torch.from_numpy(sup).bool()
        return out, support
    if DOT and odt in (torch.float32, torch.float64, torch.float16) and _scipy_blas_threads() is not None:
        sigt = sig_t.reshape(B, C, h * w).transpose(1, 2).contiguous().numpy()  # [B, h w, C] cell-major
        sup = np.empty((B, H, W), np.uint8)
        half = odt == torch.float16
        gap = _skip_gap(cdt)
        with _one_blas_thread():
            for b in range(B):
                o = out[b].numpy()
                _parallel_for(
                    _render_dot,
                    h * w,
                    fr,
                    geo,
                    sm,
                    use_sm,
                    sigt,
                    b,
                    pmax,
                    gap,
                    half,
                    o.view(np.int16) if half else o,
                    sup[b],
                )
        support.numpy().reshape(B, H, W)[:] = sup.view(np.bool_)  # numpy: no OpenMP threads left spinning
        return out, support
    _render_bmm(fr, geo, sm, use_sm, sig_t, out, support, budget, itemsize)
    return out, support


def _render_bmm(
    fr: Frame,
    geo: Geometry,
    sm: np.ndarray,
    use_sm: bool,
    sig_t: torch.Tensor,
    out: torch.Tensor,
    support: torch.Tensor,
    budget: int,
    itemsize: int,
) -> None:
    """Weights ``[blocks, K, P]`` from numba; the gathered signal ``[blocks, K, C]`` (cell-major,
    used transposed) times them (``torch.bmm``) gives ``[blocks, C, P]``, which is one permuted copy
    away from the output rows (plus a row/column gather when the blocks differ in size:
    non-integer ratios)."""
    glr, offs, ry0, ry1, cx0, cx1 = fr.glr, geo.offs, geo.ry0, geo.ry1, geo.cx0, geo.cx1
    B, C, h, w = sig_t.shape
    H, W = out.shape[-2:]
    K = offs.shape[0]
    bh, bw = ry1 - ry0, cx1 - cx0
    bym, bxm = int(bh.max()), int(bw.max())
    uniform = int(bh.min()) == bym and int(bw.min()) == bxm
    P = bym * bxm
    pmax = _padded_block(ry0, ry1, cx0, cx1)
    cc = min(C, 128)
    per_row = w * (P * K + K * cc + 3 * P * cc) * itemsize
    nrows = max(1, budget // per_row)
    jj = np.arange(w)[:, None] + offs[None, :, 1]  # [w, K] LR column of every window slot
    col_ok = (jj >= 0) & (jj < w)
    ay = np.repeat(np.arange(h), bh)
    ax = np.repeat(np.arange(w), bw)
    rowpos = torch.from_numpy(ay * bym + (np.arange(H) - ry0[ay]))  # row in the padded tile (+ i0 bym)
    colpos = torch.from_numpy(ax * bxm + (np.arange(W) - cx0[ax]))
    # working buffers, allocated once: fresh multi-MB arrays per tile would page-fault every time
    nbm = min(nrows, h) * w
    dt = torch.float64 if glr.dtype == np.float64 else torch.float32
    wbuf = _empty_huge((nbm, K, P), dt).numpy()
    sbuf = _empty_huge((nbm * cc * K,), dt)
    rbuf = _empty_huge((nbm * cc * P,), dt)
    for b in range(B):
        sigt = sig_t[b].reshape(C, h * w).t().contiguous().numpy()  # [h w, C]: cell-major
        for i0 in range(0, h, nrows):
            i1 = min(h, i0 + nrows)
            ya, yb = int(ry0[i0]), int(ry1[i1 - 1])
            if yb <= ya:
                continue
            ni, nb = i1 - i0, (i1 - i0) * w
            wmat = wbuf[:nb]
            sup = np.empty((nb, P), np.uint8)
            _parallel_for(_render_weights, nb, fr, geo, sm, use_sm, b, i0, bxm, pmax, wmat, sup)
            ii = np.arange(i0, i1)[:, None, None] + offs[None, None, :, 0]
            flat = np.where((ii >= 0) & (ii < h) & col_ok[None], ii * w + jj[None], -1).reshape(nb, K)
            rows = rowpos[ya:yb] - i0 * bym
            wt = torch.from_numpy(wmat)
            sup_t = torch.from_numpy(sup).view(ni, w, bym, bxm).permute(0, 2, 1, 3).reshape(ni * bym, w * bxm)
            support[b, 0, ya:yb] = _untile(sup_t[None], rows, colpos, uniform)[0].bool()
            for c0 in range(0, C, cc):
                c1 = min(C, c0 + cc)
                s = sbuf[: nb * K * (c1 - c0)].view(nb, K, c1 - c0)
                _parallel_for(_gather_signal, nb, sigt, flat, c0, s.numpy())
                res = torch.bmm(s.transpose(1, 2), wt, out=rbuf[: nb * (c1 - c0) * P].view(nb, c1 - c0, P))
                res = res.view(ni, w, c1 - c0, bym, bxm).permute(2, 0, 3, 1, 4)
                if uniform:
                    out[b, c0:c1, ya:yb].view(c1 - c0, ni, bym, w, bxm).copy_(res)
                else:
                    out[b, c0:c1, ya:yb] = _untile(
                        res.reshape(c1 - c0, ni * bym, w * bxm), rows, colpos, False
                    )
    if use_sm:
        out.masked_fill_(~support, float("nan"))


def _untile(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, uniform: bool) -> torch.Tensor:
    """``[C, ni bym, w bxm]`` padded block tile -> ``[C, rows, W]`` output rows."""
    if uniform:
        return t
    return t.index_select(1, rows).index_select(2, cols)
