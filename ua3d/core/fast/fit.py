"""Fused fit loss and gradient: the twin of :func:`ua3d.core.kernel.kernel_fit_loss_grad_reference`
(numba kernels :func:`_fit_rows`, :func:`_fit_block_rgb`, :func:`_reduce_rows`; host side
:func:`kernel_fit_loss_grad` and the chain rule to the raw parameters)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..params import LOG_SIGMA_MAX, LOG_SIGMA_MIN, THETA_MAX
from ._jit import AVAILABLE
from .expanded import MAX_FEATURES, n_features
from .inputs import _np, _require, _setup, _skip_gap, _use_expanded
from .pool import _parallel_for

if AVAILABLE:
    from ._jit import _JIT, _fexp, _wide_vectors, njit
    from .blocks import (
        _block_logits,
        _block_pixels,
        _block_scratch,
        _gather_block,
        _pad_pixels,
        _range_dist,
        _rgb_logits,
    )
    from .expanded import (
        _exp_coefficients,
        _exp_features,
        _exp_gradient_sums,
        _exp_logits,
        _exp_moments,
        _exp_recon_loss,
        _exp_scratch,
        _residuals_loss,
    )

    @njit(inline="always", **_JIT)
    def _exp_recon(na, act, n, wl, mx, nb_g, vo, tot, recon):
        """Weights ``wl[k, p] = exp(logit - mx[p])`` in place for the listed neighbours ``k = act[:na]``,
        fused with their sums ``tot[p]`` and the unnormalised reconstruction ``recon[c, p] = sum_k wl[k, p]
        nb_g[vo + c, k]`` of the guide."""
        Cg = recon.shape[0]
        for p in range(n):
            tot[p] = 0.0
        for c in range(Cg):
            for p in range(n):
                recon[c, p] = 0.0
        for a in range(na):
            k = act[a]
            row = wl[k]
            if Cg == 3:
                f0, f1, f2 = nb_g[vo, k], nb_g[vo + 1, k], nb_g[vo + 2, k]
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
            for c in range(Cg):
                f = nb_g[vo + c, k]
                for p in range(n):
                    recon[c, p] += row[p] * f

    @njit(inline="always", **_JIT)
    def _active(kb, n, wl, mx, gap, act):
        """The neighbours that matter somewhere in the block: ``act[:na]`` = the ``k`` whose logit comes within
        ``gap`` of some pixel's largest (``max_p wl[k, p] - mx[p] >= -gap``; every ``k`` when ``gap = 0``).
        The others' weights are below ``e^-gap`` of the largest at every pixel: they are dropped (weight 0).
        Returns ``na``."""
        na = 0
        dt = wl.dtype.type
        g = dt(gap)
        for k in range(kb):
            if gap > 0:
                row = wl[k]
                near = 0  # a count, not a max: integer sums vectorise, float max reductions do not
                for p in range(n):
                    near += 1 if row[p] - mx[p] >= -g else 0
                if near == 0:
                    continue
            act[na] = k
            na += 1
        return na

    @njit(inline="always", **_JIT)
    def _residuals(n, recon, tot, pg, pw, ee, sbar, loss):
        """``loss`` plus the loss of the block's first ``n`` pixels, ``sum_{c, p} pw[c, p] |recon[c, p] /
        tot[p] - pg[c, p]|`` (accumulated in the type of ``loss``), and the factors of its gradient:
        ``ee[c, p] = pw sign(.) / tot``, ``sbar[p] = sum_c ee[c, p] recon[c, p] / tot[p]``."""
        dt = recon.dtype.type
        for p in range(n):
            inv = dt(1.0) / tot[p]
            sb = dt(0.0)
            for c in range(recon.shape[0]):
                rc = recon[c, p] * inv
                diff = rc - pg[c, p]
                loss += abs(diff) * pw[c, p]
                e = np.sign(diff) * pw[c, p]
                ee[c, p] = e * inv
                sb += e * rc
            sbar[p] = sb * inv
        return loss

    @njit(**_JIT)
    def _fit_block_rgb(
        kb, n, px, py, pg, pv, pw, use_vhr, nb, wl, mx, tot, recon, ee, sbar, ft, mom, vo, gap, act
    ):
        """Loss and gradient moments of one block, RGB guide, in the expanded form of
        :func:`_rgb_logits`: the gradient needs only the ten feature moments ``sum_p t_kp ft[f, p]``
        and ``sum_p t_kp`` per neighbour (``t = dL/dlogit``), which are turned into the four
        gradient sums ``mom[0:4, k]`` at the end. The rendered values are ``nb_g[vo:vo + 3]`` (``vo = 0``:
        the range centres themselves; ``vo = 3``: separate LR values). Returns the block's loss."""
        _wide_vectors()
        nb_cy, nb_cx, nb_c, nb_s, nb_g = nb.nb_cy, nb.nb_cx, nb.nb_c, nb.nb_s, nb.nb_g
        dt = wl.dtype.type
        xc, yc, m0, m1, m2 = _rgb_logits(kb, n, px, py, pg, pv, use_vhr, nb, wl, mx, ft, mom)
        na = _active(kb, n, wl, mx, gap, act)  # the others get weight 0 (and no gradient)
        _exp_recon(na, act, n, wl, mx, nb_g, vo, tot, recon)  # weights (exp) fused with the reconstruction
        loss = _residuals(n, recon, tot, pg, pw, ee, sbar, dt(0.0))
        for k in range(kb):
            for f in range(4):
                mom[f, k] = 0.0
        # dL/dlogit_kp = w_kp (sum_c e_cp f_ck - sbar_p), summed against the ten features
        for a in range(na):
            k = act[a]
            row = wl[k]
            f0, f1, f2 = nb_g[vo, k], nb_g[vo + 1, k], nb_g[vo + 2, k]
            s0 = dt(0.0)
            s1 = dt(0.0)
            s2 = dt(0.0)
            s3 = dt(0.0)
            s4 = dt(0.0)
            s5 = dt(0.0)
            s6 = dt(0.0)
            s7 = dt(0.0)
            s8 = dt(0.0)
            s9 = dt(0.0)
            st = dt(0.0)
            for p in range(n):  # ft[9] is the range validity (1 without masks: then s9 = st)
                t = row[p] * (ee[0, p] * f0 + ee[1, p] * f1 + ee[2, p] * f2 - sbar[p])
                st += t
                s0 += t * ft[0, p]
                s1 += t * ft[1, p]
                s2 += t * ft[2, p]
                s3 += t * ft[3, p]
                s4 += t * ft[4, p]
                s5 += t * ft[5, p]
                s6 += t * ft[6, p]
                s7 += t * ft[7, p]
                s8 += t * ft[8, p]
                s9 += t * ft[9, p]
            mom[0, k] = s0
            mom[1, k] = s1
            mom[2, k] = s2
            mom[3, k] = s3
            mom[4, k] = s4
            mom[5, k] = s5
            mom[6, k] = s6
            mom[7, k] = s7
            mom[8, k] = s8
            mom[9, k] = s9
            mom[10, k] = st
        # moments -> sum t a^2, sum t b^2, sum t a b, sum t v |c - g|^2 (into mom[0:4, k])
        for a in range(na):
            k = act[a]
            ck, sk = nb_c[k], nb_s[k]
            dx = nb_cx[k] - xc
            dy = nb_cy[k] - yc
            a0 = ck * dx + sk * dy
            b0 = ck * dy - sk * dx
            g0 = nb_g[0, k] - m0
            g1 = nb_g[1, k] - m1
            g2 = nb_g[2, k] - m2
            txx, tyy, txy, tx, ty = mom[0, k], mom[1, k], mom[2, k], mom[3, k], mom[4, k]
            tt = mom[10, k]
            saa = (
                ck * ck * txx
                + sk * sk * tyy
                + dt(2.0) * ck * sk * txy
                - dt(2.0) * a0 * (ck * tx + sk * ty)
                + a0 * a0 * tt
            )
            sbb = (
                sk * sk * txx
                + ck * ck * tyy
                - dt(2.0) * ck * sk * txy
                - dt(2.0) * b0 * (ck * ty - sk * tx)
                + b0 * b0 * tt
            )
            sab = (
                ck * sk * (tyy - txx)
                + (ck * ck - sk * sk) * txy
                + (a0 * sk - b0 * ck) * tx
                - (a0 * ck + b0 * sk) * ty
                + a0 * b0 * tt
            )
            sd = (
                mom[5, k]
                - dt(2.0) * (g0 * mom[6, k] + g1 * mom[7, k] + g2 * mom[8, k])
                + (g0 * g0 + g1 * g1 + g2 * g2) * mom[9, k]
            )
            mom[0, k] = saa
            mom[1, k] = sbb
            mom[2, k] = sab
            mom[3, k] = sd
        return loss

    @njit(**_JIT)
    def _fit_block_exp(kb, n, bp, use_vhr, gstart, lch, nb, wl, mx, tot, recon, ee, sbar, xs, vo, gap, act):
        """Loss and gradient sums of one block in the expanded form of :mod:`~ua3d.core.fast.expanded` (any
        range-group layout, no support cut; the reconstruction over the loss channels ``lch`` only).
        ``bp = (px, py, pg, pv, pw)`` the block's pixels, ``xs`` the scratch of
        :func:`~ua3d.core.fast.expanded._exp_scratch` whose ``out[k, 0:3 + G]`` receives the direct form's
        gradient sums of the listed neighbours ``k = act[:na]`` (the others get no gradient).
        Returns ``(loss, na)``."""
        _wide_vectors()
        px, py, pg, pv, pw = bp
        ft, q, tk, cen, out = xs
        dt = wl.dtype.type
        _exp_features(n, px, py, pg, pv, use_vhr, gstart, ft, cen)
        _exp_coefficients(kb, nb, gstart, cen, q)
        _exp_logits(kb, n, ft, q, wl, mx)
        na = _active(kb, n, wl, mx, gap, act)  # the others get weight 0 (and no gradient)
        _exp_recon_loss(na, act, n, wl, mx, nb.nb_g, vo, lch, tot, recon)
        loss = _residuals_loss(n, lch, recon, tot, pg, pw, ee, sbar, dt(0.0))
        _exp_moments(na, act, n, wl, ee, sbar, nb.nb_g, vo, lch, ft, tk, q)
        _exp_gradient_sums(na, act, nb, gstart, cen, q, out)
        return loss, na

    @njit(**_JIT)
    def _fit_rows(bi0, bi1, fr, geo, pmask, lam, gch, lch, use_pm, r, pmax, gap, nft, rowbuf, rowloss):
        """Loss and gradient sums of the block rows ``bi0 <= b h + i < bi1`` into ``rowbuf[b h + i]``.

        ``fr`` the call's fixed arrays (:class:`~ua3d.core.fast.inputs.Frame`), ``geo`` its block
        layout (:class:`~ua3d.core.fast.pool.Geometry`); ``pmask [B, H, W]`` pixel weights (used when
        ``use_pm``), ``lam [B, Cg]`` normalised channel weights, ``gch [Cg]`` range group of each channel,
        ``lch [L]`` the channels of non-zero loss weight (the only ones reconstructed). ``nft`` > 0: layouts
        other than RGB take the expanded form with ``nft`` feature rows
        (:mod:`~ua3d.core.fast.expanded`; 0: the direct form).

        ``rowbuf [B h, 2 r + 1, w, 3 + G]`` float64 receives, per neighbour cell
        ``(i + di, j)`` at slot ``di + r``: ``sum g a^2, sum g b^2, sum g a b, sum g D_g``
        with ``g = dL/dlogit`` summed over the block's pixels. ``rowloss [B h]`` gets the loss.
        ``pmax`` is the padded largest block size.
        """
        _wide_vectors()
        ghr, glr, vhr, gstart, cut, use_vhr = fr.ghr, fr.glr, fr.vhr, fr.gstart, fr.cut, fr.use_vhr
        offs, ry0, ry1, cx0, cx1 = geo.offs, geo.ry0, geo.ry1, geo.cx0, geo.cx1
        h, w = glr.shape[2:]
        Cg = ghr.shape[1]
        vo = glr.shape[1] - Cg  # 0, or Cg when glr carries separate values after the range centres
        G = gstart.shape[0] - 1
        K = offs.shape[0]
        dt = glr.dtype.type
        smask_dummy = np.zeros((1, 1, 1), np.uint8)
        rec, nb, nb_k, px, py, pg, pv, pw, wl, mx, tot, d = _block_scratch(glr, K, G, pmax)
        nb_cy, nb_cx, nb_c, nb_s, nb_v, nb_g = nb.nb_cy, nb.nb_cx, nb.nb_c, nb.nb_s, nb.nb_v, nb.nb_g
        ee = np.empty((Cg, pmax), glr.dtype)
        recon = np.empty((Cg, pmax), glr.dtype)
        sbar = np.empty(pmax, glr.dtype)
        tk = np.empty(pmax, glr.dtype)
        ft = np.empty((10, pmax), glr.dtype)
        mom = np.empty((11, K), glr.dtype)
        act = np.empty(K, np.int64)
        rgb = G == 1 and Cg == 3 and cut == 0
        use_exp = nft > 0 and not rgb and cut == 0
        xs = _exp_scratch(glr, K, max(nft, 8), G, pmax)
        xout = xs[4]
        L = lch.shape[0]
        for bi in range(bi0, bi1):
            b = bi // h
            i = bi - b * h
            y0, y1 = ry0[i], ry1[i]
            if y1 <= y0:
                continue
            loss_row = 0.0
            for j in range(w):
                x0, x1 = cx0[j], cx1[j]
                if x1 <= x0:
                    continue
                # active pixels of the block (pixel mask, per-channel loss weights)
                n = 0
                if not use_pm:  # every pixel: plain copies (zero-weight pixels contribute zero)
                    n = _block_pixels(b, y0, y1, x0, x1, ghr, vhr, use_vhr, px, py, pg, pv)
                    for c in range(Cg):
                        lc = lam[b, c]
                        for p in range(n):
                            pw[c, p] = lc
                        if use_vhr:
                            g = gch[c]
                            for p in range(n):
                                pw[c, p] *= pv[g, p]
                for y in range(y0, y1 if use_pm else y0):
                    for x in range(x0, x1):
                        pm = pmask[b, y, x] if use_pm else dt(1.0)
                        if pm == 0:
                            continue
                        anyw = False
                        for c in range(Cg):
                            m = lam[b, c] * pm
                            if use_vhr and vhr[b, gch[c], y, x] == 0:
                                m = dt(0.0)
                            pw[c, n] = m
                            pg[c, n] = ghr[b, c, y, x]
                            anyw = anyw or m != 0
                        if not anyw:
                            continue
                        for g in range(G):
                            pv[g, n] = dt(1.0) if (not use_vhr or vhr[b, g, y, x] != 0) else dt(0.0)
                        px[n] = dt(x - x0)
                        py[n] = dt(y - y0)
                        n += 1
                if n == 0:
                    continue
                npad = min(pmax, -(-n // 8) * 8)
                _pad_pixels(n, npad, px, py, pg, pv, pw)
                kb, kanc = _gather_block(b, i, j, fr, geo, smask_dummy, False, rec, nb_v, nb_k)
                if rgb:
                    loss_row += _fit_block_rgb(
                        kb,
                        npad,
                        px,
                        py,
                        pg,
                        pv,
                        pw,
                        use_vhr,
                        nb,
                        wl,
                        mx,
                        tot,
                        recon,
                        ee,
                        sbar,
                        ft,
                        mom,
                        vo,
                        gap,
                        act,
                    )
                    for k in range(kb):
                        kk = nb_k[k]
                        slot = offs[kk, 0] + r
                        qj = j + offs[kk, 1]
                        rowbuf[bi, slot, qj, 0] += mom[0, k]
                        rowbuf[bi, slot, qj, 1] += mom[1, k]
                        rowbuf[bi, slot, qj, 2] += mom[2, k]
                        rowbuf[bi, slot, qj, 3] += mom[3, k] * nb_v[0, k]
                    continue
                if use_exp:
                    bp = (px, py, pg, pv, pw)
                    lb, na = _fit_block_exp(
                        kb, npad, bp, use_vhr, gstart, lch, nb, wl, mx, tot, recon, ee, sbar, xs, vo, gap, act
                    )
                    loss_row += lb
                    for a in range(na):
                        k = act[a]
                        kk = nb_k[k]
                        slot = offs[kk, 0] + r
                        qj = j + offs[kk, 1]
                        for f in range(3 + G):
                            rowbuf[bi, slot, qj, f] += xout[k, f]
                    continue
                _block_logits(kb, kanc, npad, px, py, pg, pv, gstart, cut, nb, wl, mx, d)
                na = _active(kb, npad, wl, mx, gap, act)  # the others get weight 0 (and no gradient)
                # exp fused with the reconstruction of the loss channels (zero-weight ones add exact zeros)
                _exp_recon_loss(na, act, npad, wl, mx, nb_g, vo, lch, tot, recon)
                loss_row = _residuals_loss(npad, lch, recon, tot, pg, pw, ee, sbar, loss_row)
                # dL/dlogit_kp = w_kp (sum_c e_cp f_ck - sbar_p), summed against the logit derivatives
                for a in range(na):
                    k = act[a]
                    row = wl[k]
                    kk = nb_k[k]
                    slot = offs[kk, 0] + r
                    qj = j + offs[kk, 1]
                    ck, sk = nb_c[k], nb_s[k]
                    a0 = ck * nb_cx[k] + sk * nb_cy[k]
                    b0 = ck * nb_cy[k] - sk * nb_cx[k]
                    if G == 1 and Cg == 3 and L == 3:  # RGB guide (a support cut): one fused pass
                        f0, f1, f2 = nb_g[vo, k], nb_g[vo + 1, k], nb_g[vo + 2, k]
                        g0, g1, g2 = nb_g[0, k], nb_g[1, k], nb_g[2, k]
                        saa = dt(0.0)
                        sbb = dt(0.0)
                        sab = dt(0.0)
                        sd = dt(0.0)
                        for p in range(npad):
                            t = row[p] * (ee[0, p] * f0 + ee[1, p] * f1 + ee[2, p] * f2 - sbar[p])
                            a = ck * px[p] + sk * py[p] - a0
                            bb = ck * py[p] - sk * px[p] - b0
                            saa += t * a * a
                            sbb += t * bb * bb
                            sab += t * a * bb
                            d0 = pg[0, p] - g0
                            d1 = pg[1, p] - g1
                            d2 = pg[2, p] - g2
                            sd += t * pv[0, p] * (d0 * d0 + d1 * d1 + d2 * d2)
                        rowbuf[bi, slot, qj, 0] += saa
                        rowbuf[bi, slot, qj, 1] += sbb
                        rowbuf[bi, slot, qj, 2] += sab
                        rowbuf[bi, slot, qj, 3] += sd * nb_v[0, k]
                        continue
                    for p in range(npad):
                        tk[p] = -sbar[p]
                    for lc in range(L):
                        f = nb_g[vo + lch[lc], k]
                        for p in range(npad):
                            tk[p] += ee[lc, p] * f
                    saa = dt(0.0)
                    sbb = dt(0.0)
                    sab = dt(0.0)
                    for p in range(npad):
                        t = tk[p] * row[p]
                        tk[p] = t
                        a = ck * px[p] + sk * py[p] - a0
                        bb = ck * py[p] - sk * px[p] - b0
                        saa += t * a * a
                        sbb += t * bb * bb
                        sab += t * a * bb
                    rowbuf[bi, slot, qj, 0] += saa
                    rowbuf[bi, slot, qj, 1] += sbb
                    rowbuf[bi, slot, qj, 2] += sab
                    for g in range(G):
                        if nb_v[g, k] == 0:
                            continue
                        _range_dist(gstart[g], gstart[g + 1] - gstart[g], k, npad, pg, nb_g, d)
                        sd = dt(0.0)
                        for p in range(npad):
                            sd += tk[p] * pv[g, p] * d[p]
                        rowbuf[bi, slot, qj, 3 + g] += sd
            rowloss[bi] = loss_row

    @njit(**_JIT)
    def _reduce_rows(rowbuf, B, h, r):
        """``sums [B, h, w, P]``: ``sum_di rowbuf[b h + i - di, di + r, j, p]`` (fixed order; small,
        serial: a parallel launch would cost more than the work)."""
        w, NP = rowbuf.shape[2], rowbuf.shape[3]
        out = np.zeros((B, h, w, NP), np.float64)
        for bi in range(B * h):
            b = bi // h
            qi = bi - b * h
            for di in range(-r, r + 1):
                i = qi - di
                if i < 0 or i >= h:
                    continue
                for j in range(w):
                    for p in range(NP):
                        out[b, qi, j, p] += rowbuf[b * h + i, di + r, j, p]
        return out


def kernel_fit_loss_grad(
    params: torch.Tensor,
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    radius: float,
    groups: Sequence[int] | None = None,
    valid_hr: torch.Tensor | None = None,
    valid_lr: torch.Tensor | None = None,
    channel_weights: torch.Tensor | None = None,
    pixel_mask: torch.Tensor | None = None,
    support_sigmas: float | None = None,
    values_lr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TTO objective and its gradient (fused); see :func:`ua3d.core.kernel.kernel_fit_loss_grad_reference`.

    Parameters
    ----------
    params : ``[B, 3 + G, h, w]``
    guide_hr : ``[B, Cg, H, W]``
    guide_lr : ``[B, Cg, h, w]``
    radius : window radius in LR cells
    groups : channel counts of the G range groups (default: one group)
    valid_hr, valid_lr : ``[B, G, H, W]`` / ``[B, G, h, w]`` bool or None
    channel_weights : ``[Cg]`` or None
    pixel_mask : ``[B, 1, H, W]`` (bool or weights) or None; pixels where it is 0 are skipped.
    support_sigmas : None, or a cut: neighbours whose spatial Mahalanobis distance exceeds it
        are dropped (the anchor always stays).
    values_lr : ``[B, Cg, h, w]`` or None: the LR values the fit renders to reconstruct ``guide_hr``
        (default: ``guide_lr``, which otherwise only sets the range centres).

    Returns
    -------
    loss : scalar tensor, params dtype
    grad : ``[B, 3 + G, h, w]``, params dtype
    """
    _require()
    st = _setup(params, guide_hr, guide_lr, groups, valid_hr, valid_lr, radius, support_sigmas, values_lr)
    fr, gs, ndt = st.fr, st.gs, st.ndt
    B, _, h, w = params.shape
    Cg, H, W = guide_hr.shape[1:]
    G = len(gs)
    r = math.floor(radius)

    lam = np.ones(Cg) if channel_weights is None else channel_weights.detach().double().cpu().numpy()
    if lam.shape != (Cg,):
        raise ValueError(f"channel_weights must have shape ({Cg},), got {tuple(lam.shape)}")
    if pixel_mask is not None:
        if tuple(pixel_mask.shape) != (B, 1, H, W):
            raise ValueError(f"pixel_mask must have shape {(B, 1, H, W)}, got {tuple(pixel_mask.shape)}")
        # numpy, not torch: converting a bool mask with torch runs a threaded kernel per step
        pm, use_pm = np.ascontiguousarray(pixel_mask.detach()[:, 0].cpu().numpy(), dtype=ndt), True
    else:
        pm, use_pm = np.ones((1, 1, 1), ndt), False
    denom = _loss_denominator(B, Cg, H, W, gs, fr.vhr, fr.use_vhr, pm, use_pm)
    lam_n = np.ascontiguousarray(lam[None, :] / denom[:, None], dtype=ndt)  # [B, Cg]
    gch = np.repeat(np.arange(G, dtype=np.int64), gs)
    lch = np.flatnonzero(lam != 0).astype(np.int64)  # the loss channels: the others only enter the distance
    nft = n_features(gs) if _use_expanded() and fr.cut == 0 and n_features(gs) <= MAX_FEATURES else 0
    rowbuf = np.zeros((B * h, 2 * r + 1, w, 3 + G), np.float64)
    rowloss = np.zeros(B * h, np.float64)
    gap = _skip_gap(st.cdt)
    _parallel_for(
        _fit_rows, B * h, fr, st.geo, pm, lam_n, gch, lch, use_pm, r, st.pmax, gap, nft, rowbuf, rowloss
    )
    sums = _reduce_rows(rowbuf, B, h, r).transpose(0, 3, 1, 2)  # [B, 3 + G, h, w] float64
    grad = _chain_rule(params, sums)
    loss = torch.tensor(float(rowloss.sum()), dtype=params.dtype)
    return loss, grad.to(params.dtype)


def _loss_denominator(B, Cg, H, W, gs, vhr, use_vhr, pm, use_pm) -> np.ndarray:
    """Per-sample ``sum m_c(p)`` of the reference's loss mask ``[B]`` float64, without building
    the mask (``Cg H W`` when there is no mask; at least 1). numpy arrays: ``vhr [B, G, H, W]``
    uint8, ``pm [B, H, W]``."""
    if not use_vhr and not use_pm:
        return np.full(B, float(Cg * H * W))
    if not use_vhr:
        tot = Cg * pm.sum(axis=(1, 2), dtype=np.float64)
    elif not use_pm:
        tot = sum(n * vhr[:, g].sum(axis=(1, 2), dtype=np.float64) for g, n in enumerate(gs))
    else:
        tot = sum(n * (vhr[:, g] * pm).sum(axis=(1, 2), dtype=np.float64) for g, n in enumerate(gs))
    return np.maximum(tot, 1.0)


def _chain_rule(params: torch.Tensor, sums: np.ndarray) -> torch.Tensor:
    """Gradient w.r.t. the raw parameters from the per-cell sums ``[B, 3 + G, h, w]`` (float64).

    ``dl/dlog sx = A a^2``, ``dl/dlog sy = B b^2``, ``dl/dtheta = (B - A) a b`` with
    ``A = sx^-2, B = sy^-2``, ``dl/dlog sr = D sr^-2``; clamped entries get zero (as
    ``torch.clamp``'s backward, inclusive bounds). numpy (tiny arrays), returned as a tensor.
    """
    p = _np(params, torch.float64)
    inside = (p >= LOG_SIGMA_MIN) & (p <= LOG_SIGMA_MAX)
    inv2 = np.exp(-2 * np.clip(p, LOG_SIGMA_MIN, LOG_SIGMA_MAX))  # sigma^-2 for channels 0, 1, 3..
    grad = inv2 * sums * inside
    tanh = np.tanh(p[:, 2])
    grad[:, 2] = (inv2[:, 1] - inv2[:, 0]) * sums[:, 2] * THETA_MAX * (1 - tanh * tanh)
    return torch.from_numpy(grad)
