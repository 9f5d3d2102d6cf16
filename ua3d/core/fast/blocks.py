"""Block kernels shared by fit and render (numba): the neighbour list of a block
(:func:`_gather_block`), its pixels (:func:`_block_pixels`), the logits (:func:`_block_logits`, the
expanded RGB form :func:`_rgb_logits`) and weights (:func:`_block_weights`): the fused form of the
spatial x colour logit of :func:`ua3d.core.kernel.pair_logits`."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._jit import _NEG, AVAILABLE


class Neighbours(NamedTuple):
    """The gathered neighbour list of one block, one column per listed cell (built by
    :func:`_block_scratch`: views of its record ``rec`` except ``nb_v``, filled by :func:`_gather_block`)."""

    nb_cy: np.ndarray  # [K] cell centre row, block-local frame
    nb_cx: np.ndarray  # [K] cell centre column
    nb_c: np.ndarray  # [K] cos theta
    nb_s: np.ndarray  # [K] sin theta
    nb_a: np.ndarray  # [K] 1 / (2 sigma_x^2)
    nb_b: np.ndarray  # [K] 1 / (2 sigma_y^2)
    nb_r: np.ndarray  # [G, K] 1 / (2 sigma_r^2) per range group
    nb_v: np.ndarray  # [G, K] LR range validity (0 or 1)
    nb_g: np.ndarray  # [Cg, K] LR guide values (fit: then the separate LR values)


if AVAILABLE:
    from ._jit import _JIT, _fexp, _wide_vectors, njit

    @njit(**_JIT)
    def _gather_block(b, i, j, fr, geo, smask, use_smask, rec, nb_v, nb_k):
        """Compact neighbour list of block ``(b, i, j)``: cells inside the grid (and valid in
        ``smask [B, h, w]`` when ``use_smask``, and, with a support cut, whose cut box meets the block),
        as columns of ``rec`` (:func:`_block_scratch`), their LR validity ``nb_v`` and window slots
        ``nb_k``. ``fr``, ``geo``: the call's :class:`~ua3d.core.fast.inputs.Frame` and
        :class:`~ua3d.core.fast.pool.Geometry`. Returns ``(Kb, anchor position in the list or -1)``.
        Plain scalar indexing, one copy loop over the cell's contiguous record (no array views: each
        would cost reference counting)."""
        glr, coef, vlr, cut, use_vlr = fr.glr, fr.coef, fr.vlr, fr.cut, fr.use_vlr
        offs, cyv, cxv = geo.offs, geo.cyv, geo.cxv
        y0, y1, x0, x1 = geo.ry0[i], geo.ry1[i], geo.cx0[j], geo.cx1[j]
        h, w = glr.shape[2], glr.shape[3]
        Cg = glr.shape[1]
        G = nb_v.shape[0]
        nrec = 4 + G + Cg
        dt = rec.dtype.type
        fy0 = dt(y0)
        fx0 = dt(x0)
        kb = 0
        kanc = -1
        for k in range(offs.shape[0]):
            di = offs[k, 0]
            dj = offs[k, 1]
            qi = i + di
            qj = j + dj
            if qi < 0 or qi >= h or qj < 0 or qj >= w:
                continue
            if use_smask and smask[b, qi, qj] == 0:
                continue
            is_anchor = di == 0 and dj == 0
            if cut > 0 and not is_anchor:
                cy, cx = cyv[qi], cxv[qj]
                ddx = max(0.0, max(x0 - cx, cx - (x1 - 1)))
                ddy = max(0.0, max(y0 - cy, cy - (y1 - 1)))
                if ddx > coef[b, qi, qj, nrec] or ddy > coef[b, qi, qj, nrec + 1]:
                    continue
            if is_anchor:
                kanc = kb
            rec[0, kb] = cyv[qi] - fy0  # block-local frame: small numbers, no cancellation
            rec[1, kb] = cxv[qj] - fx0
            for c in range(nrec):
                rec[2 + c, kb] = coef[b, qi, qj, c]
            if use_vlr:
                for g in range(G):
                    nb_v[g, kb] = dt(1.0) if vlr[b, g, qi, qj] != 0 else dt(0.0)
            nb_k[kb] = k
            kb += 1
        if not use_vlr:
            for g in range(G):
                for q in range(kb):
                    nb_v[g, q] = dt(1.0)
        return kb, kanc

    @njit(**_JIT)
    def _range_dist(c0, nc, k, n, pg, nb_g, d):
        """``d[p] = sum_{c0 <= c < c0 + nc} (pg[c, p] - nb_g[c, k])^2`` for ``p < n``."""
        if nc == 3:
            g0, g1, g2 = nb_g[c0, k], nb_g[c0 + 1, k], nb_g[c0 + 2, k]
            for p in range(n):
                d0 = pg[c0, p] - g0
                d1 = pg[c0 + 1, p] - g1
                d2 = pg[c0 + 2, p] - g2
                d[p] = d0 * d0 + d1 * d1 + d2 * d2
        elif nc == 1:
            g0 = nb_g[c0, k]
            for p in range(n):
                d0 = pg[c0, p] - g0
                d[p] = d0 * d0
        else:
            for p in range(n):
                d[p] = 0.0
            for c in range(c0, c0 + nc):
                gk = nb_g[c, k]
                for p in range(n):
                    d0 = pg[c, p] - gk
                    d[p] += d0 * d0

    @njit(**_JIT)
    def _block_logits(kb, kanc, n, px, py, pg, pv, gstart, cut, nb, wl, mx, d):
        """Logits of one block, ``wl[k, p]``, and their max over ``k``, ``mx[p]``, for the ``kb``
        listed neighbours and the first ``n`` pixels (``px, py`` coordinates, ``pg [Cg, n]`` guide
        values, ``pv [G, n]`` range validity) and the range groups of ``gstart``. ``mx[p]`` stays below
        ``_NEG / 2`` where a support cut left no neighbour. The one numba home of the spatial x colour
        logit (:func:`ua3d.core.kernel.spatial_colour_logits`), used by fit, render and the volume."""
        _wide_vectors()
        nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r, nb_v, nb_g = nb
        dt = wl.dtype.type
        G = gstart.shape[0] - 1
        lim = dt(-0.5 * cut * cut)
        neg = dt(_NEG)
        for p in range(n):
            mx[p] = dt(-3.0e38)
        for k in range(kb):
            ck, sk, ak, bk = nb_c[k], nb_s[k], nb_a[k], nb_b[k]
            a0 = ck * nb_cx[k] + sk * nb_cy[k]  # a = c dx + s dy = c px + s py - a0
            b0 = ck * nb_cy[k] - sk * nb_cx[k]
            row = wl[k]
            if G == 1 and gstart[1] == 3 and cut == 0:  # RGB guide: one fused pass
                rv = nb_r[0, k] * nb_v[0, k]
                g0, g1, g2 = nb_g[0, k], nb_g[1, k], nb_g[2, k]
                for p in range(n):
                    a = ck * px[p] + sk * py[p] - a0
                    bb = ck * py[p] - sk * px[p] - b0
                    d0 = pg[0, p] - g0
                    d1 = pg[1, p] - g1
                    d2 = pg[2, p] - g2
                    v = -(ak * a * a + bk * bb * bb) - rv * pv[0, p] * (d0 * d0 + d1 * d1 + d2 * d2)
                    row[p] = v
                    mx[p] = max(mx[p], v)
                continue
            for p in range(n):
                a = ck * px[p] + sk * py[p] - a0
                bb = ck * py[p] - sk * px[p] - b0
                row[p] = -(ak * a * a + bk * bb * bb)
            if cut > 0 and k != kanc:
                for p in range(n):
                    row[p] = row[p] if row[p] >= lim else neg
            for g in range(G):
                rv = nb_r[g, k] * nb_v[g, k]
                if rv == 0:
                    continue
                _range_dist(gstart[g], gstart[g + 1] - gstart[g], k, n, pg, nb_g, d)
                for p in range(n):
                    row[p] -= rv * pv[g, p] * d[p]
            for p in range(n):
                mx[p] = max(mx[p], row[p])

    @njit(**_JIT)
    def _block_weights(kb, kanc, n, px, py, pg, pv, gstart, cut, nb, wl, mx, tot, d):
        """Unnormalised weights of one block: ``wl[k, p] = exp(logit_kp - mx[p])`` and ``tot[p] =
        sum_k wl[k, p]`` (see :func:`_block_logits`)."""
        _wide_vectors()
        _block_logits(kb, kanc, n, px, py, pg, pv, gstart, cut, nb, wl, mx, d)
        _exp_sums(kb, n, wl, mx, tot)

    @njit(inline="always", **_JIT)
    def _exp_sums(kb, n, wl, mx, tot):
        """``wl[k, p] = exp(wl[k, p] - mx[p])`` in place and ``tot[p] = sum_k wl[k, p]``."""
        for p in range(n):
            tot[p] = 0.0
        for k in range(kb):
            row = wl[k]
            for p in range(n):
                e = _fexp(row[p] - mx[p])
                row[p] = e
                tot[p] += e

    @njit(**_JIT)
    def _pad_pixels(n, npad, px, py, pg, pv, pw):
        """Fill pixel slots ``n..npad-1`` with copies of pixel 0 of zero loss weight."""
        for p in range(n, npad):
            px[p] = px[0]
            py[p] = py[0]
            for c in range(pg.shape[0]):
                pg[c, p] = pg[c, 0]
                pw[c, p] = 0.0
            for g in range(pv.shape[0]):
                pv[g, p] = pv[g, 0]

    @njit(**_JIT)
    def _block_scratch(glr, K, G, pmax):
        """Per-thread scratch of the block kernels, dtype of ``glr``: the gathered neighbour list
        (one record ``rec [6 + G + Cg, K]`` whose rows are viewed as the fields of the returned
        :class:`Neighbours` ``nb`` but ``nb_v``; ``nb_k``), the block's pixels (``px, py, pg,
        pv, pw``, length ``pmax``), the logits/weights ``wl [K, pmax]`` and the per-pixel ``mx, tot,
        d``."""
        Cg = glr.shape[1]
        dt = glr.dtype
        rec = np.empty((6 + G + Cg, K), dt)
        nb = Neighbours(
            rec[0], rec[1], rec[2], rec[3], rec[4], rec[5], rec[6 : 6 + G], np.empty((G, K), dt), rec[6 + G :]
        )
        return (
            rec,
            nb,
            np.empty(K, np.int64),
            np.empty(pmax, dt),
            np.empty(pmax, dt),
            np.empty((Cg, pmax), dt),
            np.empty((G, pmax), dt),
            np.empty((Cg, pmax), dt),
            np.empty((K, pmax), dt),
            np.empty(pmax, dt),
            np.empty(pmax, dt),
            np.empty(pmax, dt),
        )

    @njit(**_JIT)
    def _rgb_logits(kb, n, px, py, pg, pv, use_vhr, nb, wl, mx, ft, mom):
        """Logits ``wl[k, p]`` and their max ``mx[p]`` of one block, RGB guide (one range group of
        3 channels, no support cut), in *expanded* form: each logit is an affine function of ten
        per-pixel features, ``ft [10, n]`` = ``x^2, y^2, x y, x, y, v |c|^2, v c_0, v c_1, v c_2,
        v`` (``x, y`` relative to the block's mean pixel, ``c`` the guide colour minus the block's
        mean colour, ``v`` the range validity), with coefficients per neighbour in ``mom [11, K]``.
        Centring keeps the expansion free of cancellation (distances are translation invariant).
        Returns the centre ``(xc, yc, m0, m1, m2)``."""
        _wide_vectors()
        nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r, nb_v, nb_g = nb
        dt = wl.dtype.type
        xc = dt(0.0)
        yc = dt(0.0)
        m0 = dt(0.0)
        m1 = dt(0.0)
        m2 = dt(0.0)
        for p in range(n):
            xc += px[p]
            yc += py[p]
            m0 += pg[0, p]
            m1 += pg[1, p]
            m2 += pg[2, p]
        inv_n = dt(1.0) / dt(n)
        xc *= inv_n
        yc *= inv_n
        m0 *= inv_n
        m1 *= inv_n
        m2 *= inv_n
        for p in range(n):
            x = px[p] - xc
            y = py[p] - yc
            c0 = pg[0, p] - m0
            c1 = pg[1, p] - m1
            c2 = pg[2, p] - m2
            v = pv[0, p] if use_vhr else dt(1.0)
            ft[0, p] = x * x
            ft[1, p] = y * y
            ft[2, p] = x * y
            ft[3, p] = x
            ft[4, p] = y
            ft[5, p] = v * (c0 * c0 + c1 * c1 + c2 * c2)
            ft[6, p] = v * c0
            ft[7, p] = v * c1
            ft[8, p] = v * c2
            ft[9, p] = v
        # logit coefficients of every neighbour (one loop over k, vectorised): v_kp = mom[:, k] . ft[:, p]
        # + mom[10, k] (mom holds them until the gradient pass overwrites it)
        for k in range(kb):
            ck, sk, ak, bk = nb_c[k], nb_s[k], nb_a[k], nb_b[k]
            dx = nb_cx[k] - xc
            dy = nb_cy[k] - yc
            a0 = ck * dx + sk * dy
            b0 = ck * dy - sk * dx
            rv = nb_r[0, k] * nb_v[0, k]
            g0 = nb_g[0, k] - m0
            g1 = nb_g[1, k] - m1
            g2 = nb_g[2, k] - m2
            q9 = -rv * (g0 * g0 + g1 * g1 + g2 * g2)
            mom[0, k] = -(ak * ck * ck + bk * sk * sk)
            mom[1, k] = -(ak * sk * sk + bk * ck * ck)
            mom[2, k] = dt(-2.0) * ck * sk * (ak - bk)
            mom[3, k] = dt(2.0) * (ak * a0 * ck - bk * b0 * sk)
            mom[4, k] = dt(2.0) * (ak * a0 * sk + bk * b0 * ck)
            mom[5, k] = -rv
            mom[6, k] = dt(2.0) * rv * g0
            mom[7, k] = dt(2.0) * rv * g1
            mom[8, k] = dt(2.0) * rv * g2
            mom[9, k] = q9 if use_vhr else dt(0.0)
            mom[10, k] = -(ak * a0 * a0 + bk * b0 * b0) + (dt(0.0) if use_vhr else q9)
        # logits and their max
        for p in range(n):
            mx[p] = dt(-3.0e38)
        for k in range(kb):
            q0, q1, q2, q3, q4, q5 = mom[0, k], mom[1, k], mom[2, k], mom[3, k], mom[4, k], mom[5, k]
            q6, q7, q8, q9, qc = mom[6, k], mom[7, k], mom[8, k], mom[9, k], mom[10, k]
            row = wl[k]
            for p in range(n):  # without validity q9 = 0 (folded into qc) and ft[9] = 1: the term adds 0
                v = (
                    qc
                    + q0 * ft[0, p]
                    + q1 * ft[1, p]
                    + q2 * ft[2, p]
                    + q3 * ft[3, p]
                    + q4 * ft[4, p]
                    + q5 * ft[5, p]
                    + q6 * ft[6, p]
                    + q7 * ft[7, p]
                    + q8 * ft[8, p]
                    + q9 * ft[9, p]
                )
                row[p] = v
                mx[p] = max(mx[p], v)
        return xc, yc, m0, m1, m2

    @njit(**_JIT)
    def _block_pixels(b, y0, y1, x0, x1, ghr, vhr, use_vhr, px, py, pg, pv):
        """All pixels of a block, row-major: coordinates, guide values, range validity. Returns n.
        (Channel-outer loops over contiguous row segments: vectorised copies.)"""
        dt = px.dtype.type
        Cg = ghr.shape[1]  # pg may have more rows (a fit with separate LR values sizes it by guide_lr)
        G = pv.shape[0]
        bw = x1 - x0
        n = (y1 - y0) * bw
        for y in range(y1 - y0):
            for x in range(bw):
                px[y * bw + x] = dt(x)
                py[y * bw + x] = dt(y)
        for c in range(Cg):
            for y in range(y1 - y0):
                for x in range(bw):
                    pg[c, y * bw + x] = ghr[b, c, y0 + y, x0 + x]
        for g in range(G):
            if use_vhr:
                for y in range(y1 - y0):
                    for x in range(bw):
                        pv[g, y * bw + x] = dt(1.0) if vhr[b, g, y0 + y, x0 + x] != 0 else dt(0.0)
            else:
                for p in range(n):
                    pv[g, p] = dt(1.0)
        return n
