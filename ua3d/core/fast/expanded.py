"""The fit's *expanded* form for any range-group layout (numba): the generalisation of the RGB kernel
:func:`~ua3d.core.fast.fit._fit_block_rgb` to ``G`` range groups of a few channels each (the RGB-D lift's
colour + normals group and its depth group, a 4-channel guide, ...), with the reconstruction restricted to
the channels of non-zero loss weight.

With pixel coordinates and guide values centred on the block's means, the logit of pixel ``p`` and
neighbour ``k`` (:func:`ua3d.core.kernel.spatial_colour_logits`) is an affine function of ``F`` per-pixel
features (:func:`_exp_features`)::

    x^2, y^2, x y, x, y,                                   (spatial, 5)
    v_g |c_g|^2, v_g c_g,0 .. v_g c_g,n_g-1, v_g           (per range group g: n_g + 2)

(``c_g`` the group's centred guide values, ``v_g`` its HR range validity), padded with zero rows to a
multiple of 8, with coefficients per neighbour (:func:`_exp_coefficients`). A logit then costs ``F``
multiply-adds in passes of eight features, and the gradient of the loss needs only the ``F`` feature
moments ``sum_p t_kp ft[f, p]`` and ``sum_p t_kp`` per neighbour (``t = dL/dlogit``), from which the
``3 + G`` gradient sums of the direct form follow exactly (:func:`_exp_gradient_sums`).

Channels of zero loss weight (the lift's surface normals, its depth at ``depth_weight=0``) are in the
range distance but not in the reconstruction: the reconstruction, the residuals and ``t`` run over the
loss channels ``lch`` only. Terms the direct form would add for the others are exact zeros, so skipping
them changes no value.

The twin is the direct form of :mod:`~ua3d.core.fast.fit` (``inputs.EXPANDED = False``) and the reference
:func:`ua3d.core.kernel.kernel_fit_loss_grad_reference`; ``tests/test_fast_lift.py`` holds the parity
tests.
"""

from __future__ import annotations

import numpy as np

from ._jit import AVAILABLE

#: features of the expanded form are processed eight at a time (one pass over a logit row per eight)
CHUNK = 8
#: layouts with more features (padded) take the direct form: beyond this the expansion saves nothing
MAX_FEATURES = 48


def n_features(groups) -> int:
    """Feature rows of the expanded form for range groups of ``groups`` channels, padded to :data:`CHUNK`."""
    f = 5 + sum(int(n) + 2 for n in groups)
    return -(-f // CHUNK) * CHUNK


if AVAILABLE:
    from ._jit import _JIT, _fexp, njit

    @njit(inline="always", **_JIT)
    def _exp_features(n, px, py, pg, pv, use_vhr, gstart, ft, cen):
        """Centred features ``ft [F, n]`` of the block's first ``n`` pixels (layout in the module doc; rows
        past the last group's are left as they are: zeros from :func:`_exp_scratch`) and the centre
        ``cen = (xc, yc, m_0 .. m_Cg-1)``, the means of the coordinates and of each range channel."""
        dt = ft.dtype.type
        G = gstart.shape[0] - 1
        Cr = gstart[G]
        inv_n = dt(1.0) / dt(n)
        xc = dt(0.0)
        yc = dt(0.0)
        for p in range(n):
            xc += px[p]
            yc += py[p]
        xc *= inv_n
        yc *= inv_n
        cen[0] = xc
        cen[1] = yc
        for c in range(Cr):
            m = dt(0.0)
            for p in range(n):
                m += pg[c, p]
            cen[2 + c] = m * inv_n
        for p in range(n):
            x = px[p] - xc
            y = py[p] - yc
            ft[0, p] = x * x
            ft[1, p] = y * y
            ft[2, p] = x * y
            ft[3, p] = x
            ft[4, p] = y
        fo = 5
        for g in range(G):
            c0, nc = gstart[g], gstart[g + 1] - gstart[g]
            for p in range(n):
                ft[fo, p] = 0.0
            for i in range(nc):
                m = cen[2 + c0 + i]
                for p in range(n):
                    d = pg[c0 + i, p] - m
                    ft[fo + 1 + i, p] = d
                    ft[fo, p] += d * d
            if use_vhr:
                for i in range(nc + 1):
                    for p in range(n):
                        ft[fo + i, p] *= pv[g, p]
                for p in range(n):
                    ft[fo + nc + 1, p] = pv[g, p]
            else:
                for p in range(n):
                    ft[fo + nc + 1, p] = 1.0
            fo += nc + 2

    @njit(inline="always", **_JIT)
    def _exp_coefficients(kb, nb, gstart, cen, q):
        """Logit coefficients ``q [F + 1, K]`` of the listed neighbours: ``logit_kp = q[F, k] + sum_f q[f, k]
        ft[f, p]`` (``-(A a^2 + B b^2) - sum_g r_g v_g |c_g - g_gk|^2`` expanded about the centre ``cen``;
        ``r_g = 1 / (2 sigma_r^2)`` times the neighbour's LR validity)."""
        nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r, nb_v, nb_g = nb
        dt = q.dtype.type
        F = q.shape[0] - 1
        G = gstart.shape[0] - 1
        xc, yc = cen[0], cen[1]
        for k in range(kb):
            ck, sk, ak, bk = nb_c[k], nb_s[k], nb_a[k], nb_b[k]
            dx = nb_cx[k] - xc
            dy = nb_cy[k] - yc
            a0 = ck * dx + sk * dy
            b0 = ck * dy - sk * dx
            q[0, k] = -(ak * ck * ck + bk * sk * sk)
            q[1, k] = -(ak * sk * sk + bk * ck * ck)
            q[2, k] = dt(-2.0) * ck * sk * (ak - bk)
            q[3, k] = dt(2.0) * (ak * a0 * ck - bk * b0 * sk)
            q[4, k] = dt(2.0) * (ak * a0 * sk + bk * b0 * ck)
            q[F, k] = -(ak * a0 * a0 + bk * b0 * b0)
            fo = 5
            for g in range(G):
                c0, nc = gstart[g], gstart[g + 1] - gstart[g]
                rv = nb_r[g, k] * nb_v[g, k]
                gsq = dt(0.0)
                for i in range(nc):
                    gi = nb_g[c0 + i, k] - cen[2 + c0 + i]
                    q[fo + 1 + i, k] = dt(2.0) * rv * gi
                    gsq += gi * gi
                q[fo, k] = -rv
                q[fo + nc + 1, k] = -rv * gsq
                fo += nc + 2
            for f in range(fo, F):
                q[f, k] = 0.0

    @njit(inline="always", **_JIT)
    def _exp_logits(kb, n, ft, q, wl, mx):
        """``wl[k, p] = q[F, k] + sum_f q[f, k] ft[f, p]`` for ``k < kb``, ``p < n``, in passes of eight
        features (the first starts from the constant, the last also takes the max over ``k``, ``mx[p]``)."""
        F = q.shape[0] - 1
        for p in range(n):
            mx[p] = -3.0e38
        for k in range(kb):
            row = wl[k]
            qc = q[F, k]
            for f0 in range(0, F, 8):
                q0, q1, q2, q3 = q[f0, k], q[f0 + 1, k], q[f0 + 2, k], q[f0 + 3, k]
                q4, q5, q6, q7 = q[f0 + 4, k], q[f0 + 5, k], q[f0 + 6, k], q[f0 + 7, k]
                if f0 + 8 >= F:  # the last pass: also the max
                    for p in range(n):
                        v = (
                            (qc if f0 == 0 else row[p])
                            + q0 * ft[f0, p]
                            + q1 * ft[f0 + 1, p]
                            + q2 * ft[f0 + 2, p]
                            + q3 * ft[f0 + 3, p]
                            + q4 * ft[f0 + 4, p]
                            + q5 * ft[f0 + 5, p]
                            + q6 * ft[f0 + 6, p]
                            + q7 * ft[f0 + 7, p]
                        )
                        row[p] = v
                        mx[p] = max(mx[p], v)
                elif f0 == 0:
                    for p in range(n):
                        row[p] = (
                            qc
                            + q0 * ft[f0, p]
                            + q1 * ft[f0 + 1, p]
                            + q2 * ft[f0 + 2, p]
                            + q3 * ft[f0 + 3, p]
                            + q4 * ft[f0 + 4, p]
                            + q5 * ft[f0 + 5, p]
                            + q6 * ft[f0 + 6, p]
                            + q7 * ft[f0 + 7, p]
                        )
                else:
                    for p in range(n):
                        row[p] += (
                            q0 * ft[f0, p]
                            + q1 * ft[f0 + 1, p]
                            + q2 * ft[f0 + 2, p]
                            + q3 * ft[f0 + 3, p]
                            + q4 * ft[f0 + 4, p]
                            + q5 * ft[f0 + 5, p]
                            + q6 * ft[f0 + 6, p]
                            + q7 * ft[f0 + 7, p]
                        )

    @njit(inline="always", **_JIT)
    def _exp_recon_loss(na, act, n, wl, mx, nb_g, vo, lch, tot, recon):
        """As :func:`~ua3d.core.fast.fit._exp_recon` for the loss channels ``lch`` only: ``wl[k, p] =
        exp(logit - mx[p])`` for ``k = act[:na]``, ``tot[p]`` their sums and ``recon[l, p] = sum_k wl[k, p]
        nb_g[vo + lch[l], k]``."""
        L = lch.shape[0]
        for p in range(n):
            tot[p] = 0.0
        for lc in range(L):
            for p in range(n):
                recon[lc, p] = 0.0
        for a in range(na):
            k = act[a]
            row = wl[k]
            if L == 3:
                f0, f1, f2 = nb_g[vo + lch[0], k], nb_g[vo + lch[1], k], nb_g[vo + lch[2], k]
                for p in range(n):
                    e = _fexp(row[p] - mx[p])
                    row[p] = e
                    tot[p] += e
                    recon[0, p] += e * f0
                    recon[1, p] += e * f1
                    recon[2, p] += e * f2
                continue
            for p in range(n):
                e = _fexp(row[p] - mx[p])
                row[p] = e
                tot[p] += e
            for lc in range(L):
                f = nb_g[vo + lch[lc], k]
                for p in range(n):
                    recon[lc, p] += row[p] * f

    @njit(inline="always", **_JIT)
    def _residuals_loss(n, lch, recon, tot, pg, pw, ee, sbar, loss):
        """As :func:`~ua3d.core.fast.fit._residuals` over the loss channels ``lch``: ``loss`` plus ``sum_{l, p}
        pw[c, p] |recon[l, p] / tot[p] - pg[c, p]|`` (``c = lch[l]``), ``ee[l, p] = pw sign(.) / tot`` and
        ``sbar[p] = sum_l ee[l, p] recon[l, p] / tot[p]``."""
        dt = recon.dtype.type
        L = lch.shape[0]
        for p in range(n):
            sbar[p] = 0.0
        for lc in range(L):
            c = lch[lc]
            for p in range(n):
                inv = dt(1.0) / tot[p]
                rc = recon[lc, p] * inv
                diff = rc - pg[c, p]
                loss += abs(diff) * pw[c, p]
                e = np.sign(diff) * pw[c, p]
                ee[lc, p] = e * inv
                sbar[p] += e * rc
        for p in range(n):
            sbar[p] *= dt(1.0) / tot[p]
        return loss

    @njit(inline="always", **_JIT)
    def _exp_moments(na, act, n, wl, ee, sbar, nb_g, vo, lch, ft, tk, q):
        """Per listed neighbour ``k = act[:na]``: ``t_kp = w_kp (sum_l ee[l, p] f_lk - sbar_p)`` (``dL/dlogit``)
        and its moments ``q[f, k] = sum_p t_kp ft[f, p]``, ``q[F, k] = sum_p t_kp`` (overwriting the
        coefficients)."""
        dt = q.dtype.type
        F = q.shape[0] - 1
        L = lch.shape[0]
        for a in range(na):
            k = act[a]
            row = wl[k]
            fused = L == 3  # t computed in the first moment pass
            if not fused:
                for p in range(n):
                    tk[p] = -sbar[p]
                for lc in range(L):
                    f = nb_g[vo + lch[lc], k]
                    for p in range(n):
                        tk[p] += ee[lc, p] * f
                for p in range(n):
                    tk[p] *= row[p]
            st = dt(0.0)
            for f0 in range(0, F, 8):
                s0 = dt(0.0)
                s1 = dt(0.0)
                s2 = dt(0.0)
                s3 = dt(0.0)
                s4 = dt(0.0)
                s5 = dt(0.0)
                s6 = dt(0.0)
                s7 = dt(0.0)
                if f0 == 0 and fused:
                    g0, g1, g2 = nb_g[vo + lch[0], k], nb_g[vo + lch[1], k], nb_g[vo + lch[2], k]
                    for p in range(n):
                        t = row[p] * (ee[0, p] * g0 + ee[1, p] * g1 + ee[2, p] * g2 - sbar[p])
                        tk[p] = t
                        st += t
                        s0 += t * ft[0, p]
                        s1 += t * ft[1, p]
                        s2 += t * ft[2, p]
                        s3 += t * ft[3, p]
                        s4 += t * ft[4, p]
                        s5 += t * ft[5, p]
                        s6 += t * ft[6, p]
                        s7 += t * ft[7, p]
                elif f0 == 0:
                    for p in range(n):
                        t = tk[p]
                        st += t
                        s0 += t * ft[0, p]
                        s1 += t * ft[1, p]
                        s2 += t * ft[2, p]
                        s3 += t * ft[3, p]
                        s4 += t * ft[4, p]
                        s5 += t * ft[5, p]
                        s6 += t * ft[6, p]
                        s7 += t * ft[7, p]
                else:
                    for p in range(n):
                        t = tk[p]
                        s0 += t * ft[f0, p]
                        s1 += t * ft[f0 + 1, p]
                        s2 += t * ft[f0 + 2, p]
                        s3 += t * ft[f0 + 3, p]
                        s4 += t * ft[f0 + 4, p]
                        s5 += t * ft[f0 + 5, p]
                        s6 += t * ft[f0 + 6, p]
                        s7 += t * ft[f0 + 7, p]
                q[f0, k] = s0
                q[f0 + 1, k] = s1
                q[f0 + 2, k] = s2
                q[f0 + 3, k] = s3
                q[f0 + 4, k] = s4
                q[f0 + 5, k] = s5
                q[f0 + 6, k] = s6
                q[f0 + 7, k] = s7
            q[F, k] = st

    @njit(inline="always", **_JIT)
    def _exp_gradient_sums(na, act, nb, gstart, cen, q, out):
        """The direct form's gradient sums from the moments of :func:`_exp_moments`: ``out[k, 0:3 + G]`` =
        ``sum_p t a^2, sum_p t b^2, sum_p t a b`` and per group ``v_gk sum_p t v_g |c_g - g_gk|^2`` (``a, b``
        the rotated offsets of the pixel from the neighbour's centre)."""
        nb_cy, nb_cx, nb_c, nb_s, _, _, _, nb_v, nb_g = nb
        dt = q.dtype.type
        F = q.shape[0] - 1
        G = gstart.shape[0] - 1
        xc, yc = cen[0], cen[1]
        for a in range(na):
            k = act[a]
            ck, sk = nb_c[k], nb_s[k]
            dx = nb_cx[k] - xc
            dy = nb_cy[k] - yc
            a0 = ck * dx + sk * dy
            b0 = ck * dy - sk * dx
            txx, tyy, txy, tx, ty = q[0, k], q[1, k], q[2, k], q[3, k], q[4, k]
            tt = q[F, k]
            out[k, 0] = (
                ck * ck * txx
                + sk * sk * tyy
                + dt(2.0) * ck * sk * txy
                - dt(2.0) * a0 * (ck * tx + sk * ty)
                + a0 * a0 * tt
            )
            out[k, 1] = (
                sk * sk * txx
                + ck * ck * tyy
                - dt(2.0) * ck * sk * txy
                - dt(2.0) * b0 * (ck * ty - sk * tx)
                + b0 * b0 * tt
            )
            out[k, 2] = (
                ck * sk * (tyy - txx)
                + (ck * ck - sk * sk) * txy
                + (a0 * sk - b0 * ck) * tx
                - (a0 * ck + b0 * sk) * ty
                + a0 * b0 * tt
            )
            fo = 5
            for g in range(G):
                c0, nc = gstart[g], gstart[g + 1] - gstart[g]
                sd = q[fo, k]
                gsq = dt(0.0)
                for i in range(nc):
                    gi = nb_g[c0 + i, k] - cen[2 + c0 + i]
                    sd -= dt(2.0) * gi * q[fo + 1 + i, k]
                    gsq += gi * gi
                sd += gsq * q[fo + nc + 1, k]
                out[k, 3 + g] = sd * nb_v[g, k]
                fo += nc + 2

    @njit(**_JIT)
    def _exp_scratch(glr, K, F, G, pmax):
        """Per-thread scratch of the expanded fit: ``ft [F, pmax]`` (zeros: padding rows stay zero), ``q [F + 1,
        K]``, ``tk [pmax]``, ``cen [2 + Cg]`` and the gradient sums ``out [K, 3 + G]``."""
        dt = glr.dtype
        return (
            np.zeros((F, pmax), dt),
            np.empty((F + 1, K), dt),
            np.empty(pmax, dt),
            np.empty(2 + glr.shape[1], dt),
            np.empty((K, 3 + G), dt),
        )
