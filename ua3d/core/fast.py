r"""Fused CPU engine (numba) for the Upsample Anything kernel: fit loss/gradient and render.

Numerically the same functions as the ``*_reference`` twins in :mod:`ua3d.core.kernel`
(see there for the maths and the parameterisation), organised for speed:

* **Blocks.** HR pixels that share the same nearest LR anchor ``(i, j)`` form a block
  (``P`` pixels, 16 x 16 for a ViT/16 grid); they share one neighbour list (the window
  offsets around the anchor, cells outside the grid dropped: ``K <= 197`` for radius 8).
  Per LR cell one contiguous record (``cos theta, sin theta, 1 / (2 sigma_x^2),
  1 / (2 sigma_y^2), 1 / (2 sigma_r^2)``, the LR guide values) is computed once per call;
  per block the neighbours' records are gathered once. Inside a block the loops run over
  neighbours (outer) and pixels (inner, vectorised, padded to a multiple of 8), in a
  block-local frame; ``exp`` is an own vectorisable polynomial (:func:`_fexp`, < 1 ulp
  float32, ~1e-16 float64) with the max subtracted. The hot kernels ask LLVM for 512-bit
  vectors (:func:`_wide_vectors`; LLVM's default on AVX-512 CPUs is 256).
* **RGB guides** (one range group of three channels, the common case) take an *expanded*
  form (:func:`_rgb_logits`): with pixel coordinates and colours centred on the block's
  means, every logit is an affine function of ten per-pixel features (``x^2, y^2, x y, x, y,
  |c|^2, c``, validity), so a logit costs ten multiply-adds, and the gradient needs ten
  feature moments per neighbour instead of per-pixel offsets and distances.
* **Fit.** Per block: logits and their max per pixel; ``exp`` fused with the reconstruction
  of the guide; then the hand-derived gradient of the L1 loss through the softmax,

  .. math:: \partial L / \partial \ell_k = w_k (s_k - \textstyle\sum_j w_j s_j),
            \quad s_k = \textstyle\sum_c e_c f_{ck},\quad e_c = m_c \lambda_c\,\mathrm{sign}(\hat g_c - g_c) / N,

  reduced over the block's pixels into four sums per neighbour
  ``sum g a^2, sum g b^2, sum g a b, sum g D_r`` (``a, b`` the rotated offsets, ``D_r`` the
  masked range distance of each group), whose products with per-cell factors are the
  parameter gradients (:func:`_chain_rule`). Nothing of size ``[K, H, W]`` is materialised.
  The sums go to a per-LR-row buffer ``[B h, 2 r + 1, w, 3 + G]`` (one writer per row: no
  races, and a fixed reduction order, so results do not depend on the thread count).
  Pixels outside ``pixel_mask`` are skipped before any work. Host-side work per call is
  numpy on small arrays: torch's threaded kernels, called between the engine's own parallel
  sections, leave OpenMP threads spinning against the engine's threads.
* **Render.** Up to :data:`SMALL_C` channels (depth) the weighted sum is fused in numba.
  For more, numba writes each block's normalised weights ``[K, P]`` and gathers the LR
  signal ``[K, C]`` (cell-major: one contiguous copy per window slot); ``torch.bmm`` multiplies
  them; the ``[blocks, C, P]`` result is one permuted copy away from the output rows. Work is
  tiled over rows of blocks (:data:`TILE_BYTES`) so that peak memory is the output plus a
  bounded working set; the working buffers are allocated once per call, and large buffers
  are advised for transparent huge pages (:func:`_empty_huge`): page faults on fresh memory
  were a third of the render's time.
* **Threads.** The kernels are plain ``nogil`` numba functions over a range of block rows
  (or blocks); :func:`_parallel_for` runs chunks of that range on a thread pool of
  ``torch.get_num_threads()`` threads (no parfors: they tripled the compile time).

Numba is imported when this module is imported (which :mod:`ua3d.core.ops` does lazily,
on first use) and each kernel compiles on its first call per dtype (about 20 s of CPU for
float32 or float64; ``cache=True``: later processes load it from disk in well under a
second). ``AVAILABLE`` is False when numba cannot be imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

from .kernel import LOG_SIGMA_MAX, LOG_SIGMA_MIN, THETA_MAX, lr_centres, nearest_anchor, window_offsets
from .params import decode_params

__all__ = [
    "AVAILABLE",
    "SMALL_C",
    "kernel_fit_loss_grad",
    "kernel_render",
    "num_threads",
    "render_working_bytes",
]

try:  # pragma: no cover - depends on the environment
    from llvmlite import ir as _llir
    from numba import njit, types
    from numba.extending import intrinsic, overload

    AVAILABLE = True
except Exception:  # noqa: BLE001  # pragma: no cover - numba missing or broken (any import error)
    AVAILABLE = False

#: render channel counts up to this are fused in numba; more use the weight matrix + ``torch.bmm``.
SMALL_C = 8
#: working-memory budget of one render / fit tile (bytes), on top of the output.
TILE_BYTES = 192 << 20
#: logit given to pairs dropped by a support cut (its ``exp`` is exactly 0).
_NEG = -1.0e30


# =========================================================================== numba kernels
if AVAILABLE:
    _FM = {"nsz", "arcp", "contract", "reassoc", "afn"}  # no nnan/ninf: infinities stay meaningful
    _JIT = {"fastmath": _FM, "cache": True, "nogil": True}

    @intrinsic
    def _bits_to_f32(typingctx, x):
        """Reinterpret the bits of an int32 as a float32 (vectorisable)."""
        sig = types.float32(types.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llir.FloatType())

        return sig, codegen

    @intrinsic
    def _bits_to_f64(typingctx, x):
        """Reinterpret the bits of an int64 as a float64 (vectorisable)."""
        sig = types.float64(types.int64)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llir.DoubleType())

        return sig, codegen

    @intrinsic
    def _wide_vectors(typingctx):
        """Ask LLVM to vectorise the calling function with 512-bit vectors where the CPU has them
        (a function attribute; ignored elsewhere)."""
        sig = types.none()

        def codegen(context, builder, signature, args):
            # a string attribute, which llvmlite's checked ``add`` does not know: add it to the set itself;
            # with another llvmlite (no set underneath), keep LLVM's default width
            with contextlib.suppress(Exception):
                set.add(builder.function.attributes, '"prefer-vector-width"="512"')
            return context.get_dummy_value()

        return sig, codegen

    def _fexp(x):  # pragma: no cover - replaced by the overload below inside numba
        return np.exp(x)

    @overload(_fexp)
    def _fexp_overload(x):
        """``exp(x)`` for ``x <= 0``, vectorisable (no libm call): ``2^n * poly(r)``.

        Range reduction ``x = n ln2 + r`` with ``|r| <= ln2 / 2`` (two-constant ln2),
        Taylor polynomial of degree 7 (float32, < 1 ulp from truncation) or 13
        (float64, ~1e-16), and ``2^n`` built from the exponent bits. Inputs below the
        smallest normal exponent give exactly 0.
        """
        if x == types.float32:
            lo, log2e = np.float32(-87.0), np.float32(1.4426950408889634)
            c1, c2 = np.float32(0.693359375), np.float32(-2.12194440e-4)
            t2, t3, t4, t5, t6, t7 = (np.float32(1.0 / math.factorial(k)) for k in range(2, 8))
            one = np.float32(1.0)

            def impl32(x):
                xc = max(x, lo)
                n = np.floor(xc * log2e + np.float32(0.5))
                r = (xc - n * c1) - n * c2
                p = ((((((t7 * r + t6) * r + t5) * r + t4) * r + t3) * r + t2) * r + one) * r + one
                s = _bits_to_f32((np.int32(n) + np.int32(127)) << np.int32(23))
                return np.float32(0.0) if x < lo else p * s

            return impl32
        if x == types.float64:
            lo, log2e = -708.0, 1.4426950408889634
            c1, c2 = 6.93147180369123816490e-01, 1.90821492927058770002e-10
            u2, u3, u4, u5, u6, u7, u8, u9, u10, u11, u12, u13 = (1.0 / math.factorial(k) for k in range(2, 14))

            def impl64(x):
                xc = max(x, lo)
                n = np.floor(xc * log2e + 0.5)
                r = (xc - n * c1) - n * c2
                p = u13 * r + u12
                p = (((p * r + u11) * r + u10) * r + u9) * r + u8
                p = (((p * r + u7) * r + u6) * r + u5) * r + u4
                p = (((p * r + u3) * r + u2) * r + 1.0) * r + 1.0
                s = _bits_to_f64((np.int64(n) + np.int64(1023)) << np.int64(52))
                return 0.0 if x < lo else p * s

            return impl64
        return None

    @njit(**_JIT)
    def _gather_block(b, i, j, glr, coef, vlr, smask, offs, cyv, cxv, y0, y1, x0, x1, cut,
                      use_vlr, use_smask, rec, nb_v, nb_k):
        """Compact neighbour list of block ``(b, i, j)``: cells inside the grid (and valid in
        ``smask``, and, with a support cut, whose 3-sigma box meets the block), as columns of
        ``rec`` (:func:`_block_scratch`), their LR validity ``nb_v`` and window slots ``nb_k``.
        Returns ``(Kb, anchor position in the list or -1)``. Plain scalar indexing, one copy loop
        over the cell's contiguous record (no array views: each would cost reference counting)."""
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
    def _block_logits(kb, kanc, n, px, py, pg, pv, gstart, cut, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r,
                      nb_v, nb_g, wl, mx, d):
        """Logits of one block, ``wl[k, p]``, and their max over ``k``, ``mx[p]``, for the ``kb``
        listed neighbours and the first ``n`` pixels (``px, py`` coordinates, ``pg [Cg, n]`` guide
        values, ``pv [G, n]`` range validity). ``mx[p]`` stays below ``_NEG / 2`` where a support
        cut left no neighbour."""
        _wide_vectors()
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
    def _block_weights(kb, kanc, n, px, py, pg, pv, gstart, cut, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r,
                       nb_v, nb_g, wl, mx, tot, d):
        """Unnormalised weights of one block: ``wl[k, p] = exp(logit_kp - mx[p])`` and ``tot[p] =
        sum_k wl[k, p]`` (see :func:`_block_logits`)."""
        _wide_vectors()
        _block_logits(kb, kanc, n, px, py, pg, pv, gstart, cut, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r,
                      nb_v, nb_g, wl, mx, d)
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
        (one record ``rec [6 + G + Cg, K]`` whose rows are viewed as ``nb_cy, nb_cx, nb_c, nb_s,
        nb_a, nb_b, nb_r [G], nb_g [Cg]``; ``nb_v``, ``nb_k``), the block's pixels (``px, py, pg,
        pv, pw``, length ``pmax``), the logits/weights ``wl [K, pmax]`` and the per-pixel ``mx, tot,
        d``."""
        Cg = glr.shape[1]
        dt = glr.dtype
        rec = np.empty((6 + G + Cg, K), dt)
        return (rec, rec[0], rec[1], rec[2], rec[3], rec[4], rec[5], rec[6:6 + G], np.empty((G, K), dt),
                rec[6 + G:], np.empty(K, np.int64), np.empty(pmax, dt), np.empty(pmax, dt),
                np.empty((Cg, pmax), dt), np.empty((G, pmax), dt), np.empty((Cg, pmax), dt),
                np.empty((K, pmax), dt), np.empty(pmax, dt), np.empty(pmax, dt), np.empty(pmax, dt))

    @njit(**_JIT)
    def _rgb_logits(kb, n, px, py, pg, pv, use_vhr, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r, nb_v, nb_g, wl, mx,
                    ft, mom):
        """Logits ``wl[k, p]`` and their max ``mx[p]`` of one block, RGB guide (one range group of
        3 channels, no support cut), in *expanded* form: each logit is an affine function of ten
        per-pixel features, ``ft [10, n]`` = ``x^2, y^2, x y, x, y, v |c|^2, v c_0, v c_1, v c_2,
        v`` (``x, y`` relative to the block's mean pixel, ``c`` the guide colour minus the block's
        mean colour, ``v`` the range validity), with coefficients per neighbour in ``mom [11, K]``.
        Centring keeps the expansion free of cancellation (distances are translation invariant).
        Returns the centre ``(xc, yc, m0, m1, m2)``."""
        _wide_vectors()
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
                v = (qc + q0 * ft[0, p] + q1 * ft[1, p] + q2 * ft[2, p] + q3 * ft[3, p] + q4 * ft[4, p]
                     + q5 * ft[5, p] + q6 * ft[6, p] + q7 * ft[7, p] + q8 * ft[8, p] + q9 * ft[9, p])
                row[p] = v
                mx[p] = max(mx[p], v)
        return xc, yc, m0, m1, m2

    @njit(**_JIT)
    def _fit_block_rgb(kb, n, px, py, pg, pv, pw, use_vhr, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r, nb_v, nb_g,
                       wl, mx, tot, recon, ee, sbar, ft, mom, vo):
        """Loss and gradient moments of one block, RGB guide, in the expanded form of
        :func:`_rgb_logits`: the gradient needs only the ten feature moments ``sum_p t_kp ft[f, p]``
        and ``sum_p t_kp`` per neighbour (``t = dL/dlogit``), which are turned into the four
        gradient sums ``mom[0:4, k]`` at the end. The rendered values are ``nb_g[vo:vo + 3]`` (``vo = 0``:
        the range centres themselves; ``vo = 3``: separate LR values). Returns the block's loss."""
        _wide_vectors()
        dt = wl.dtype.type
        xc, yc, m0, m1, m2 = _rgb_logits(kb, n, px, py, pg, pv, use_vhr, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r,
                                         nb_v, nb_g, wl, mx, ft, mom)
        # weights (exp) fused with the reconstruction of the guide
        for p in range(n):
            tot[p] = 0.0
            recon[0, p] = 0.0
            recon[1, p] = 0.0
            recon[2, p] = 0.0
        for k in range(kb):
            row = wl[k]
            f0, f1, f2 = nb_g[vo, k], nb_g[vo + 1, k], nb_g[vo + 2, k]
            for p in range(n):
                e = _fexp(row[p] - mx[p])
                row[p] = e
                tot[p] += e
                recon[0, p] += e * f0
                recon[1, p] += e * f1
                recon[2, p] += e * f2
        loss = dt(0.0)
        for p in range(n):
            inv = dt(1.0) / tot[p]
            sb = dt(0.0)
            for c in range(3):
                rc = recon[c, p] * inv
                diff = rc - pg[c, p]
                loss += abs(diff) * pw[c, p]
                e = np.sign(diff) * pw[c, p]
                ee[c, p] = e * inv
                sb += e * rc
            sbar[p] = sb * inv
        # dL/dlogit_kp = w_kp (sum_c e_cp f_ck - sbar_p), summed against the ten features
        for k in range(kb):
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
        for k in range(kb):
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
            saa = ck * ck * txx + sk * sk * tyy + dt(2.0) * ck * sk * txy - dt(2.0) * a0 * (ck * tx + sk * ty) \
                + a0 * a0 * tt
            sbb = sk * sk * txx + ck * ck * tyy - dt(2.0) * ck * sk * txy - dt(2.0) * b0 * (ck * ty - sk * tx) \
                + b0 * b0 * tt
            sab = ck * sk * (tyy - txx) + (ck * ck - sk * sk) * txy + (a0 * sk - b0 * ck) * tx \
                - (a0 * ck + b0 * sk) * ty + a0 * b0 * tt
            sd = mom[5, k] - dt(2.0) * (g0 * mom[6, k] + g1 * mom[7, k] + g2 * mom[8, k]) \
                + (g0 * g0 + g1 * g1 + g2 * g2) * mom[9, k]
            mom[0, k] = saa
            mom[1, k] = sbb
            mom[2, k] = sab
            mom[3, k] = sd
        return loss

    @njit(**_JIT)
    def _fit_rows(bi0, bi1, ghr, glr, coef, vhr, vlr, pmask, lam, gstart, gch, offs, ry0, ry1, cx0, cx1, cyv,
                  cxv, cut, use_vhr, use_vlr, use_pm, r, pmax, rowbuf, rowloss):
        """Loss and gradient sums of the block rows ``bi0 <= b h + i < bi1`` into ``rowbuf[b h + i]``.

        ``rowbuf [B h, 2 r + 1, w, 3 + G]`` float64 receives, per neighbour cell
        ``(i + di, j)`` at slot ``di + r``: ``sum g a^2, sum g b^2, sum g a b, sum g D_g``
        with ``g = dL/dlogit`` summed over the block's pixels. ``rowloss [B h]`` gets the loss.
        ``pmax`` is the padded largest block size.
        """
        _wide_vectors()
        h, w = glr.shape[2:]
        Cg = ghr.shape[1]
        vo = glr.shape[1] - Cg  # 0, or Cg when glr carries separate values after the range centres
        G = gstart.shape[0] - 1
        K = offs.shape[0]
        dt = glr.dtype.type
        smask_dummy = np.zeros((1, 1, 1), np.uint8)
        (rec, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r, nb_v, nb_g, nb_k, px, py, pg, pv, pw, wl, mx, tot,
         d) = _block_scratch(glr, K, G, pmax)
        ee = np.empty((Cg, pmax), glr.dtype)
        recon = np.empty((Cg, pmax), glr.dtype)
        sbar = np.empty(pmax, glr.dtype)
        tk = np.empty(pmax, glr.dtype)
        ft = np.empty((10, pmax), glr.dtype)
        mom = np.empty((11, K), glr.dtype)
        rgb = G == 1 and Cg == 3 and cut == 0
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
                kb, kanc = _gather_block(b, i, j, glr, coef, vlr, smask_dummy, offs, cyv, cxv, y0, y1, x0, x1,
                                         cut, use_vlr, False, rec, nb_v, nb_k)
                if rgb:
                    loss_row += _fit_block_rgb(kb, npad, px, py, pg, pv, pw, use_vhr, nb_cy, nb_cx, nb_c, nb_s, nb_a,
                                               nb_b, nb_r, nb_v, nb_g, wl, mx, tot, recon, ee, sbar, ft, mom, vo)
                    for k in range(kb):
                        kk = nb_k[k]
                        slot = offs[kk, 0] + r
                        qj = j + offs[kk, 1]
                        rowbuf[bi, slot, qj, 0] += mom[0, k]
                        rowbuf[bi, slot, qj, 1] += mom[1, k]
                        rowbuf[bi, slot, qj, 2] += mom[2, k]
                        rowbuf[bi, slot, qj, 3] += mom[3, k] * nb_v[0, k]
                    continue
                _block_logits(kb, kanc, npad, px, py, pg, pv, gstart, cut, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b,
                              nb_r, nb_v, nb_g, wl, mx, d)
                # weights (exp) fused with the reconstruction of the guide
                for p in range(npad):
                    tot[p] = 0.0
                for c in range(Cg):
                    for p in range(npad):
                        recon[c, p] = 0.0
                for k in range(kb):
                    row = wl[k]
                    if Cg == 3:
                        f0, f1, f2 = nb_g[vo, k], nb_g[vo + 1, k], nb_g[vo + 2, k]
                        for p in range(npad):
                            e = _fexp(row[p] - mx[p])
                            row[p] = e
                            tot[p] += e
                            recon[0, p] += e * f0
                            recon[1, p] += e * f1
                            recon[2, p] += e * f2
                        continue
                    for p in range(npad):
                        e = _fexp(row[p] - mx[p])
                        row[p] = e
                        tot[p] += e
                    for c in range(Cg):
                        f = nb_g[vo + c, k]
                        for p in range(npad):
                            recon[c, p] += row[p] * f
                for p in range(npad):
                    inv = dt(1.0) / tot[p]
                    sb = dt(0.0)
                    for c in range(Cg):
                        rc = recon[c, p] * inv
                        diff = rc - pg[c, p]
                        loss_row += abs(diff) * pw[c, p]
                        e = np.sign(diff) * pw[c, p]
                        ee[c, p] = e * inv
                        sb += e * rc
                    sbar[p] = sb * inv
                # dL/dlogit_kp = w_kp (sum_c e_cp f_ck - sbar_p), summed against the logit derivatives
                for k in range(kb):
                    row = wl[k]
                    kk = nb_k[k]
                    slot = offs[kk, 0] + r
                    qj = j + offs[kk, 1]
                    ck, sk = nb_c[k], nb_s[k]
                    a0 = ck * nb_cx[k] + sk * nb_cy[k]
                    b0 = ck * nb_cy[k] - sk * nb_cx[k]
                    if G == 1 and Cg == 3:  # RGB guide: one fused pass
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
                    for c in range(Cg):
                        f = nb_g[vo + c, k]
                        for p in range(npad):
                            tk[p] += ee[c, p] * f
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

    @njit(**_JIT)
    def _block_pixels(b, y0, y1, x0, x1, ghr, vhr, use_vhr, px, py, pg, pv):
        """All pixels of a block, row-major: coordinates, guide values, range validity. Returns n.
        (Channel-outer loops over contiguous row segments: vectorised copies.)"""
        dt = px.dtype.type
        Cg = pg.shape[0]
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

    @njit(**_JIT)
    def _render_small(t0, t1, ghr, glr, coef, vhr, vlr, smask, sig, gstart, offs, ry0, ry1, cx0, cx1, cyv, cxv,
                      cut, use_vhr, use_vlr, use_sm, b, i0, ybase, pmax, out, sup):
        """Fused render of blocks ``t0 <= t < t1`` (block ``(i0 + t // w, t % w)``) of batch ``b``:
        ``out [C, rows, W]`` (rows from ``ybase``; NaN without support), ``sup [rows, W]`` uint8."""
        _wide_vectors()
        w = glr.shape[3]
        C = sig.shape[1]
        G = gstart.shape[0] - 1
        K = offs.shape[0]
        dt = glr.dtype.type
        half_neg = dt(0.5 * _NEG)
        (rec, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r, nb_v, nb_g, nb_k, px, py, pg, pv, pw, wl, mx, tot,
         d) = _block_scratch(glr, K, G, pmax)
        oc = np.empty((C, pmax), glr.dtype)
        for t in range(t0, t1):
            i = i0 + t // w
            j = t - (t // w) * w
            y0, y1 = ry0[i], ry1[i]
            x0, x1 = cx0[j], cx1[j]
            if y1 <= y0 or x1 <= x0:
                continue
            bw = x1 - x0
            kb, kanc = _gather_block(b, i, j, glr, coef, vlr, smask, offs, cyv, cxv, y0, y1, x0, x1, cut,
                                     use_vlr, use_sm, rec, nb_v, nb_k)
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
            _block_logits(kb, kanc, npad, px, py, pg, pv, gstart, cut, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b,
                          nb_r, nb_v, nb_g, wl, mx, d)
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
    def _render_weights(t0, t1, ghr, glr, coef, vhr, vlr, smask, gstart, offs, ry0, ry1, cx0, cx1, cyv, cxv, cut,
                        use_vhr, use_vlr, use_sm, b, i0, bxm, pmax, wmat, sup):
        """Dense normalised weights of blocks ``t0 <= t < t1`` (block ``(i0 + t // w, t % w)``):
        ``wmat [tiles, K, P]`` (window slot ``k``, pixel ``(y, x)`` at ``(y - ry0) bxm + x - cx0``;
        zero for padding, outside or masked cells), ``sup [tiles, P]`` uint8."""
        _wide_vectors()
        w = glr.shape[3]
        G = gstart.shape[0] - 1
        K = offs.shape[0]
        dt = glr.dtype.type
        half_neg = dt(0.5 * _NEG)
        (rec, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r, nb_v, nb_g, nb_k, px, py, pg, pv, pw, wl, mx, tot,
         d) = _block_scratch(glr, K, G, pmax)
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
                kb, kanc = _gather_block(b, i, j, glr, coef, vlr, smask, offs, cyv, cxv, y0, y1, x0, x1, cut,
                                         use_vlr, use_sm, rec, nb_v, nb_k)
            if kb == 0:
                wmat[t] = 0.0
                sup[t] = 0
                continue
            n = _block_pixels(b, y0, y1, x0, x1, ghr, vhr, use_vhr, px, py, pg, pv)
            npad = min(pmax, -(-n // 8) * 8)
            _pad_pixels(n, npad, px, py, pg, pv, pw)
            if rgb:
                _rgb_logits(kb, npad, px, py, pg, pv, use_vhr, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r, nb_v,
                            nb_g, wl, mx, ft, mom)
                for p in range(npad):
                    tot[p] = 0.0
                for k in range(kb):
                    row = wl[k]
                    for p in range(npad):
                        e = _fexp(row[p] - mx[p])
                        row[p] = e
                        tot[p] += e
            else:
                _block_weights(kb, kanc, npad, px, py, pg, pv, gstart, cut, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b,
                               nb_r, nb_v, nb_g, wl, mx, tot, d)
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

# =========================================================================== threading
_POOL: ThreadPoolExecutor | None = None
_POOL_KEY: tuple[int, int] = (0, 0)
_POOL_LOCK = threading.Lock()


def num_threads() -> int:
    """Threads the engine uses: ``torch.get_num_threads()`` (set it with ``torch.set_num_threads``)."""
    return max(1, int(torch.get_num_threads()))


def _flush_denormals() -> None:
    """Pool threads flush denormals to zero (FTZ/DAZ). Weights of distant or off-colour cells reach
    the denormal range (``exp(logit) * value < 1.2e-38`` in float32), where every operation takes a
    slow microcode path: measured here, a 224 px fit ran 3x slower without this. Flushed values are
    below the dtype's resolution of any result. Only the pool's threads are affected, never the
    caller's."""
    torch.set_flush_denormal(True)


def _pool(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``n`` threads (re-created after a fork or a change of ``n``)."""
    global _POOL, _POOL_KEY
    key = (os.getpid(), n)
    with _POOL_LOCK:
        if _POOL is None or _POOL_KEY != key:
            if _POOL is not None and _POOL_KEY[0] == key[0]:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="ua3d-fast", initializer=_flush_denormals)
            _POOL_KEY = key
        return _POOL


def _parallel_for(fn: Callable, n: int, *args) -> None:
    """``fn(start, stop, *args)`` over ``[0, n)`` in about ``4 * threads`` chunks on a thread pool
    (whose threads flush denormals, :func:`_flush_denormals`).

    The numba kernels release the GIL (``nogil=True``) and write disjoint outputs per item,
    so the chunks run truly in parallel without races; results do not depend on the split.
    """
    if n <= 0:
        return
    t = min(num_threads(), n)  # even one thread runs on the pool: its threads flush denormals
    bounds = np.linspace(0, n, min(n, 4 * t) + 1).round().astype(np.int64)
    pool = _pool(t)
    futures = [pool.submit(fn, int(a), int(b), *args) for a, b in itertools.pairwise(bounds) if b > a]
    for f in futures:
        f.result()


# =========================================================================== host-side helpers
def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError("ua3d.core.fast needs numba (pip install numba); use backend='reference'")


def _groups(groups: Sequence[int] | None, n_channels: int) -> tuple[int, ...]:
    g = (n_channels,) if groups is None else tuple(int(v) for v in groups)
    if sum(g) != n_channels or any(v <= 0 for v in g):
        raise ValueError(f"groups {g} must be positive channel counts summing to {n_channels} (guide channels)")
    return g


@lru_cache(maxsize=32)
def _geometry(H: int, W: int, h: int, w: int, radius: float, np_dtype: str):
    """Block layout and window for an ``(H, W) <- (h, w)`` pair (cached).

    Returns ``offs [K, 2]``, ``ry0, ry1 [h]`` (HR rows whose anchor is row ``i``),
    ``cx0, cx1 [w]``, LR centres ``cyv [h]``, ``cxv [w]`` in HR pixels.
    """
    offs = window_offsets(radius).numpy().astype(np.int64)
    ay = nearest_anchor(H, h).numpy()
    ax = nearest_anchor(W, w).numpy()
    ry0 = np.searchsorted(ay, np.arange(h), "left").astype(np.int64)
    ry1 = np.searchsorted(ay, np.arange(h), "right").astype(np.int64)
    cx0 = np.searchsorted(ax, np.arange(w), "left").astype(np.int64)
    cx1 = np.searchsorted(ax, np.arange(w), "right").astype(np.int64)
    cyv = lr_centres(h, H, dtype=torch.float64).numpy().astype(np_dtype)
    cxv = lr_centres(w, W, dtype=torch.float64).numpy().astype(np_dtype)
    for a in (offs, ry0, ry1, cx0, cx1, cyv, cxv):
        a.setflags(write=False)
    return offs, ry0, ry1, cx0, cx1, cyv, cxv


def _padded_block(ry0: np.ndarray, ry1: np.ndarray, cx0: np.ndarray, cx1: np.ndarray) -> int:
    """Largest block size (pixels sharing one anchor), rounded up to a multiple of 8."""
    n = int((ry1 - ry0).max()) * int((cx1 - cx0).max())
    return max(8, -(-n // 8) * 8)


_MADV_HUGEPAGE = 14
_HUGE = 2 << 20


@lru_cache(maxsize=1)
def _madvise():
    """libc's ``madvise`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process image: libc is linked in
        fn = libc.madvise
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _empty_huge(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty``, with large buffers advised for transparent huge pages (Linux): the first
    write to a fresh multi-GB output otherwise takes one page fault per 4 KiB (measured here: a
    1.2 GB output filled in 0.41 s fresh, 0.18 s advised, 0.10 s already touched). Only advice:
    the result is the same either way."""
    t = torch.empty(shape, dtype=dtype)
    n = t.numel() * t.element_size()
    fn = _madvise() if n >= 16 * _HUGE else None
    if fn is not None:
        a = t.data_ptr()
        s, e = (a + _HUGE - 1) & ~(_HUGE - 1), (a + n) & ~(_HUGE - 1)
        if e > s:
            fn(s, e - s, _MADV_HUGEPAGE)  # failure (e.g. THP disabled) leaves ordinary pages
    return t


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
    return _np(m != 0, torch.uint8) if m.dtype != torch.uint8 else _np(m), True


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
        raise ValueError(f"params has {P} channels, expected 3 + {len(gs)} range groups (shape {tuple(params.shape)})")
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


def _check_cut(support_sigmas: float | None) -> float:
    if support_sigmas is None:
        return 0.0
    if not (support_sigmas > 0) or not math.isfinite(support_sigmas):
        raise ValueError(f"support_sigmas must be a positive finite number or None, got {support_sigmas!r}")
    return float(support_sigmas)


# =========================================================================== memory estimates
def _block_dims(H: int, W: int, h: int, w: int) -> tuple[int, int]:
    """Largest block height and width (HR pixels sharing one anchor)."""
    return -(-H // h) + 1, -(-W // w) + 1


def render_working_bytes(out_size: tuple[int, int], lr_size: tuple[int, int], channels: int, radius: float,
                         itemsize: int = 4) -> int:
    """Working memory of one render tile (one row of blocks), excluding the output."""
    H, W = out_size
    h, w = lr_size
    by, bx = _block_dims(H, W, h, w)
    K = window_offsets(radius).shape[0]
    if channels <= SMALL_C:
        return channels * by * W * itemsize * 2
    cc = min(channels, 128)
    return w * (by * bx * K + K * cc + 2 * by * bx * cc) * itemsize


# =========================================================================== public entry points
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
    gs, gstart, vhr, use_vhr, vlr, use_vlr = _check_common(params, guide_hr, guide_lr, groups, valid_hr,
                                                           valid_lr, radius)
    cut = _check_cut(support_sigmas)
    B, _, h, w = params.shape
    Cg, H, W = guide_hr.shape[1:]
    G = len(gs)
    cdt = _compute_dtype(params)
    ndt = np.float64 if cdt == torch.float64 else np.float32
    offs, ry0, ry1, cx0, cx1, cyv, cxv = _geometry(H, W, h, w, float(radius), np.dtype(ndt).name)
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
    denom = _loss_denominator(B, Cg, H, W, gs, vhr, use_vhr, pm, use_pm)
    lam_n = np.ascontiguousarray(lam[None, :] / denom[:, None], dtype=ndt)  # [B, Cg]
    gch = np.repeat(np.arange(G, dtype=np.int64), gs)

    ghr = _np(guide_hr, cdt)
    glr = _np(guide_lr, cdt)
    if values_lr is not None:  # the values ride in the same per-cell record, after the range centres
        if tuple(values_lr.shape) != tuple(guide_lr.shape):
            raise ValueError(f"values_lr must have the shape of guide_lr {tuple(guide_lr.shape)}, "
                             f"got {tuple(values_lr.shape)}")
        glr = np.ascontiguousarray(np.concatenate([glr, _np(values_lr, cdt)], 1))
    coef = _coefficients(params, glr, cdt, cut)
    rowbuf = np.zeros((B * h, 2 * r + 1, w, 3 + G), np.float64)
    rowloss = np.zeros(B * h, np.float64)
    _parallel_for(_fit_rows, B * h, ghr, glr, coef, vhr, vlr, pm, lam_n, gstart, gch, offs, ry0, ry1, cx0, cx1, cyv,
                  cxv, cut, use_vhr, use_vlr, use_pm, r, _padded_block(ry0, ry1, cx0, cx1), rowbuf, rowloss)
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
    _, gstart, vhr, use_vhr, vlr, use_vlr = _check_common(params, guide_hr, guide_lr, groups, valid_hr,
                                                          valid_lr, radius)
    cut = _check_cut(support_sigmas)
    B, _, h, w = params.shape
    H, W = guide_hr.shape[2:]
    if not isinstance(signal, torch.Tensor) or signal.ndim != 4 or signal.shape[0] != B or \
            tuple(signal.shape[2:]) != (h, w) or signal.shape[1] == 0:
        raise ValueError(
            f"signal must be [B, C, h, w] = [{B}, C, {h}, {w}], got {tuple(getattr(signal, 'shape', ()))}"
        )
    if signal.device.type != "cpu":
        raise ValueError(f"signal must be a CPU tensor for the fast engine, got device {signal.device}")
    C = signal.shape[1]
    odt = out_dtype or signal.dtype
    cdt = _compute_dtype(params)
    ndt = np.float64 if cdt == torch.float64 else np.float32
    offs, ry0, ry1, cx0, cx1, cyv, cxv = _geometry(H, W, h, w, float(radius), np.dtype(ndt).name)
    if signal_mask is not None and tuple(signal_mask.shape) != (B, 1, h, w):
        raise ValueError(f"signal_mask must have shape {(B, 1, h, w)}, got {tuple(signal_mask.shape)}")
    sm, use_sm = _mask_u8(None if signal_mask is None else signal_mask[:, 0], (B, h, w), "signal_mask")
    sig_t = signal.detach().to(cdt)
    if use_sm:
        sig_t = torch.where(torch.from_numpy(sm).bool()[:, None], sig_t, torch.zeros((), dtype=cdt))
    ghr = _np(guide_hr, cdt)
    glr = _np(guide_lr, cdt)
    coef = _coefficients(params, glr, cdt, cut)
    out = _empty_huge((B, C, H, W), odt)
    support = torch.empty(B, 1, H, W, dtype=torch.bool)
    budget = tile_bytes or TILE_BYTES
    common = (ghr, glr, coef, vhr, vlr, sm, gstart, offs, ry0, ry1, cx0, cx1, cyv, cxv, cut, use_vhr, use_vlr,
              use_sm)
    itemsize = 8 if cdt == torch.float64 else 4
    pmax = _padded_block(ry0, ry1, cx0, cx1)
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
                _parallel_for(_render_small, (i1 - i0) * w, ghr, glr, coef, vhr, vlr, sm, sig, gstart, offs, ry0, ry1,
                              cx0, cx1, cyv, cxv, cut, use_vhr, use_vlr, use_sm, b, i0, ya, pmax, tile, sup)
                out[b, :, ya:yb] = torch.from_numpy(tile)
                support[b, 0, ya:yb] = torch.from_numpy(sup).bool()
        return out, support
    _render_bmm(common, sig_t, out, support, budget, itemsize)
    return out, support


def _render_bmm(common, sig_t, out, support, budget, itemsize) -> None:
    """Weights ``[blocks, K, P]`` from numba; the gathered signal ``[blocks, K, C]`` (cell-major,
    used transposed) times them (``torch.bmm``) gives ``[blocks, C, P]``, which is one permuted copy
    away from the output rows (plus a row/column gather when the blocks differ in size:
    non-integer ratios)."""
    ghr, glr, coef, vhr, vlr, sm, gstart, offs, ry0, ry1, cx0, cx1, cyv, cxv, cut, use_vhr, use_vlr, use_sm = common
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
            _parallel_for(_render_weights, nb, ghr, glr, coef, vhr, vlr, sm, gstart, offs, ry0, ry1, cx0, cx1, cyv,
                          cxv, cut, use_vhr, use_vlr, use_sm, b, i0, bxm, pmax, wmat, sup)
            ii = np.arange(i0, i1)[:, None, None] + offs[None, None, :, 0]
            flat = np.where((ii >= 0) & (ii < h) & col_ok[None], ii * w + jj[None], -1).reshape(nb, K)
            rows = rowpos[ya:yb] - i0 * bym
            wt = torch.from_numpy(wmat)
            sup_t = torch.from_numpy(sup).view(ni, w, bym, bxm).permute(0, 2, 1, 3).reshape(ni * bym, w * bxm)
            support[b, 0, ya:yb] = _untile(sup_t[None], rows, colpos, uniform)[0].bool()
            for c0 in range(0, C, cc):
                c1 = min(C, c0 + cc)
                s = sbuf[:nb * K * (c1 - c0)].view(nb, K, c1 - c0)
                _parallel_for(_gather_signal, nb, sigt, flat, c0, s.numpy())
                res = torch.bmm(s.transpose(1, 2), wt, out=rbuf[:nb * (c1 - c0) * P].view(nb, c1 - c0, P))
                res = res.view(ni, w, c1 - c0, bym, bxm).permute(2, 0, 3, 1, 4)
                if uniform:
                    out[b, c0:c1, ya:yb].view(c1 - c0, ni, bym, w, bxm).copy_(res)
                else:
                    out[b, c0:c1, ya:yb] = _untile(res.reshape(c1 - c0, ni * bym, w * bxm), rows, colpos, False)
    if use_sm:
        out.masked_fill_(~support, float("nan"))


def _untile(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, uniform: bool) -> torch.Tensor:
    """``[C, ni bym, w bxm]`` padded block tile -> ``[C, rows, W]`` output rows."""
    if uniform:
        return t
    return t.index_select(1, rows).index_select(2, cols)
