r"""Fused CPU engine (numba) for the dense feature volume of :func:`ua3d.rgbd.volume.render_volume`.

Numerically the same function as the tensor twin ``ua3d.rgbd.volume._stream_reference`` (see
:mod:`ua3d.rgbd.volume` for the maths): for every HR pixel ``p``, computed bin ``d`` and window
neighbour ``q``

.. math:: \ell = s(p, q) - \pi_q (\phi_d - \mu_q(p))^2, \qquad
          \text{volume}[c, d, p] = \frac{\sum_q e^{\max(\ell - m, -80)} f_c(q)}{\sum_q e^{\max(\ell - m, -80)}},
          \qquad \log M_d(p) = m + \log \sum_q e^{\max(\ell - m, -80)}

with ``s`` the spatial + colour logit, ``pi_q = 1 / (2 sigma_z^2)`` (0 for cells without depth),
``mu_q(p) = phi_q + g_q . (p - c_q)`` (planar; ``g_q = 0`` for the constant model) and ``m`` the
largest logit of the ``(p, d)`` column.

Organisation (the layout of :mod:`ua3d.core.fast`'s render):

* **Blocks.** The HR pixels sharing a nearest LR anchor share their neighbour list (``K <= 197``
  cells for radius 8); the neighbours' records are gathered once per block with
  :func:`ua3d.core.fast._gather_block`. Per block and neighbour the bin-independent parts, the
  spatial + colour logit ``s`` and the depth centre ``mu``, are computed once (``[K, n]``).
* **Weights** (:func:`_volume_weights`): for chunks of :data:`BIN_CHUNK` bins (so that the chunk's
  ``[K, chunk n]`` logits stay in the L2 cache) one pass writes the logits and their per-column
  max, a second one replaces them with ``exp`` (the vectorisable :func:`ua3d.core.fast._fexp`) and
  sums them; the block's weights ``[K, Db n]`` are never normalised (the scatter divides).
* **Contraction.** ``torch.bmm`` multiplies the block's gathered features ``[C, K]`` with its
  weights ``[K, Db n]`` (the only ``O(pairs x C)`` work: BLAS at near peak), a batch of blocks at
  a time, sized to the working budget.
* **Scatter** (:func:`_volume_scatter`): divides by the weight sums and writes every block's
  ``[C, Db, n]`` result to the volume ``[C, D, H, W]`` at each pixel's own bins (``band``), with
  the float32 -> float16 rounding done in numba (:func:`_half_bits`, round to nearest even, as
  numpy and torch) when the volume is float16, so a float16 or memmap (``np.memmap``) volume is
  written in place with no float32 copy; ``log M`` goes to ``log_mass [D, H, W]``.

Work and its physical bound (640x480, 30x40 grid, radius 8, 64 bins, 64 channels): ``3.9e9``
(pixel, bin, neighbour) pairs, each one ``exp`` and ``~8`` flops of logits in numba plus ``2 C``
flops in the contraction: ``5.0e11`` flops of BLAS, which at this CPU's AVX-512 FMA peak (2 x 16
lanes x 2 flops per cycle, ~2.6 GHz: ~170 GFLOP/s per core) is ~1.5 s per core; figures in the
note of issue 16 / ``scripts/bench_volume.py``.

The weights kernel and the scatter release the GIL and run on :func:`ua3d.core.fast._parallel_for`'s
pool (``torch.get_num_threads()`` threads); each block is written by one thread (no races, results
independent of the thread count). ``AVAILABLE`` is False when numba cannot be imported.
"""

from __future__ import annotations

import numpy as np
import torch

from . import fast as _fast
from .fast import AVAILABLE
from .memory import window_size

__all__ = ["AVAILABLE", "BIN_CHUNK", "half_bits", "kernel_render_volume", "volume_working_bytes"]

#: bins per pass of the weights kernel (keeps a block's chunk of logits in the L2 cache)
BIN_CHUNK = 4
#: logit floor below a column's max, as the reference (``ua3d.rgbd.volume._EXP_FLOOR``)
EXP_FLOOR = -80.0

if AVAILABLE:
    from llvmlite import ir as _llir
    from numba import njit, types
    from numba.extending import intrinsic

    _JIT = _fast._JIT
    _fexp = _fast._fexp
    _wide_vectors = _fast._wide_vectors
    _gather_block = _fast._gather_block
    _block_pixels = _fast._block_pixels
    _block_scratch = _fast._block_scratch

    @intrinsic
    def _f32_to_bits(typingctx, x):
        """Reinterpret the bits of a float32 as an int32."""
        sig = types.int32(types.float32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llir.IntType(32))

        return sig, codegen

    @njit(**_JIT)
    def _half_bits(v):
        """IEEE binary16 bits of ``float32(v)``, round to nearest even (numpy's / torch's rule):
        overflow gives inf, NaN stays NaN, subnormal halves are exact-rounded."""
        f = np.int64(_f32_to_bits(np.float32(v))) & 0xFFFFFFFF
        sign = (f >> 16) & 0x8000
        a = f & 0x7FFFFFFF
        if a >= 0x47800000:  # |v| >= 65536, inf, NaN
            if a > 0x7F800000:
                return sign | 0x7E00
            return sign | 0x7C00
        if a < 0x38800000:  # below the smallest normal half 2^-14
            if a < 0x33000000:  # below 2^-25: rounds to (signed) zero
                return sign
            e = a >> 23
            m = (a & 0x7FFFFF) | 0x800000
            shift = 126 - e  # value / 2^-24 = m 2^(e - 126), shift >= 14
            hm = m >> shift
            rem = m & ((np.int64(1) << shift) - 1)
            halfway = np.int64(1) << (shift - 1)
            if rem > halfway or (rem == halfway and (hm & 1) == 1):
                hm += 1
            return sign | hm
        h = (a - 0x38000000) >> 13
        rem = a & 0x1FFF
        if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
            h += 1  # a carry into the exponent is the right rounding (up to inf)
        return sign | h

    @njit(**_JIT)
    def _half_bits_array(x, out):
        """``out[i] = _half_bits(x[i])`` (for tests)."""
        for i in range(x.shape[0]):
            out[i] = _half_bits(x[i])

    @njit(**_JIT)
    def _volume_weights(t0, t1, bi, bj, ghr, glr, coef, vlr, slope, planar, phib, d0, sig, offs, ry0, ry1, cx0,
                        cx1, cyv, cxv, pmax, jc, wmat, fmat, tot, lse):
        """Unnormalised weights of blocks ``t0 <= t < t1`` (block ``(bi[t], bj[t])``).

        ``wmat[t, k, jj P + p]`` (neighbour ``k`` of the block's compact list, computed bin ``jj``,
        block pixel ``p`` row-major), the gathered features ``fmat[t, c, k]`` (zero rows past the
        list), the weight sums ``tot[t, jj P + p]`` and ``lse[t, jj P + p] = log M``; ``P = pmax``
        (the largest block), ``Db = wmat.shape[2] // P`` bins from each pixel's ``d0``.
        """
        _wide_vectors()
        w = glr.shape[3]
        Cg = glr.shape[1]
        Cc = Cg - 1  # colour channels; the last guide channel (the depth feature) is not used
        K = offs.shape[0]
        C = fmat.shape[1]
        Kmax = wmat.shape[1]
        P = pmax
        Db = wmat.shape[2] // P
        dt = glr.dtype.type
        floor = dt(EXP_FLOOR)
        (rec, nb_cy, nb_cx, nb_c, nb_s, nb_a, nb_b, nb_r, nb_v, nb_g, nb_k, px, py, pg, pv, _pw, _wl, _mx, _tot,
         _d) = _block_scratch(glr, K, 2, pmax)
        sm = np.ones((1, 1, 1), np.uint8)
        vhr = np.ones((1, 1, 1, 1), np.uint8)
        base = np.empty((K, pmax), glr.dtype)
        cen = np.empty((K, pmax), glr.dtype)
        prec = np.empty(K, glr.dtype)
        phb = np.empty((jc, pmax), glr.dtype)
        mx = np.empty((jc, pmax), glr.dtype)
        sm_ = np.empty((jc, pmax), glr.dtype)
        for t in range(t0, t1):
            i, j = bi[t], bj[t]
            y0, y1 = ry0[i], ry1[i]
            x0, x1 = cx0[j], cx1[j]
            bw = x1 - x0
            kb, _kanc = _gather_block(0, i, j, glr, coef, vlr, sm, offs, cyv, cxv, y0, y1, x0, x1, 0.0, True,
                                      False, rec, nb_v, nb_k)
            n = _block_pixels(0, y0, y1, x0, x1, ghr, vhr, False, px, py, pg, pv)
            for k in range(kb):
                kk = nb_k[k]
                qi, qj = i + offs[kk, 0], j + offs[kk, 1]
                ck, sk, ak, bk, rc = nb_c[k], nb_s[k], nb_a[k], nb_b[k], nb_r[0, k]
                cyk, cxk = nb_cy[k], nb_cx[k]
                prec[k] = nb_r[1, k] * nb_v[1, k]
                phik = nb_g[Cc, k]
                gy = slope[0, qi, qj] if planar else dt(0.0)
                gx = slope[1, qi, qj] if planar else dt(0.0)
                for p in range(n):
                    dx = px[p] - cxk
                    dy = py[p] - cyk
                    a = ck * dx + sk * dy
                    b = ck * dy - sk * dx
                    dist = dt(0.0)
                    for c in range(Cc):
                        e = pg[c, p] - nb_g[c, k]
                        dist += e * e
                    base[k, p] = -(a * a * ak + b * b * bk) - dist * rc
                    cen[k, p] = phik + gy * dy + gx * dx
                q = qi * w + qj
                for c in range(C):
                    fmat[t, c, k] = sig[c, q]
            for k in range(kb, Kmax):
                for c in range(C):
                    fmat[t, c, k] = 0.0
                wmat[t, k] = 0.0
            for ja in range(0, Db, jc):
                nj = min(Db, ja + jc) - ja
                for jj in range(nj):
                    for p in range(n):
                        yy = p // bw
                        phb[jj, p] = phib[d0[y0 + yy, x0 + p - yy * bw] + ja + jj]
                        mx[jj, p] = dt(-3.0e38)
                        sm_[jj, p] = dt(0.0)
                for k in range(kb):
                    pk = prec[k]
                    row = wmat[t, k]
                    bk_ = base[k]
                    ck_ = cen[k]
                    for jj in range(nj):
                        o = (ja + jj) * P
                        for p in range(n):
                            dz = phb[jj, p] - ck_[p]
                            v = bk_[p] - dz * dz * pk
                            row[o + p] = v
                            mx[jj, p] = max(mx[jj, p], v)
                for k in range(kb):
                    row = wmat[t, k]
                    for jj in range(nj):
                        o = (ja + jj) * P
                        for p in range(n):
                            e = _fexp(max(row[o + p] - mx[jj, p], floor))
                            row[o + p] = e
                            sm_[jj, p] += e
                for jj in range(nj):
                    o = (ja + jj) * P
                    for p in range(n):
                        tot[t, o + p] = sm_[jj, p]
                        lse[t, o + p] = mx[jj, p] + np.log(sm_[jj, p])

    @njit(**_JIT)
    def _volume_scatter(t0, t1, bi, bj, res, tot, lse, d0, ry0, ry1, cx0, cx1, pmax, half, out, log_mass):
        """Blocks ``t0 <= t < t1``: ``out[c, d0 + jj, y, x] = res[t, c, jj P + p] / tot[t, jj P + p]``
        (float16 bits when ``half``) and ``log_mass[d0 + jj, y, x] = lse[t, jj P + p]``."""
        C = res.shape[1]
        P = pmax
        Db = res.shape[2] // P
        for t in range(t0, t1):
            i, j = bi[t], bj[t]
            y0, y1 = ry0[i], ry1[i]
            x0, x1 = cx0[j], cx1[j]
            bw = x1 - x0
            for jj in range(Db):
                o = jj * P
                for yy in range(y1 - y0):
                    for xx in range(bw):
                        y, x = y0 + yy, x0 + xx
                        log_mass[d0[y, x] + jj, y, x] = lse[t, o + yy * bw + xx]
            for c in range(C):
                for jj in range(Db):
                    o = jj * P
                    for yy in range(y1 - y0):
                        y = y0 + yy
                        for xx in range(bw):
                            x = x0 + xx
                            p = o + yy * bw + xx
                            v = res[t, c, p] / tot[t, p]
                            if half:
                                out[c, d0[y, x] + jj, y, x] = _half_bits(v)
                            else:
                                out[c, d0[y, x] + jj, y, x] = v


def half_bits(x: np.ndarray) -> np.ndarray:
    """float16 bit patterns (uint16) of float32 ``x [N]`` by the engine's converter (for tests)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape[0], np.uint16)
    _half_bits_array(x, out)
    return out


def _blocks(ry0: np.ndarray, ry1: np.ndarray, cx0: np.ndarray, cx1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anchor rows and columns of the non-empty blocks, row-major."""
    ii, jj = np.meshgrid(np.arange(ry0.shape[0]), np.arange(cx0.shape[0]), indexing="ij")
    ok = ((ry1 - ry0)[:, None] > 0) & ((cx1 - cx0)[None, :] > 0)
    return np.ascontiguousarray(ii[ok], dtype=np.int64), np.ascontiguousarray(jj[ok], dtype=np.int64)


def volume_working_bytes(out_size: tuple[int, int], lr_size: tuple[int, int], channels: int, n_bins: int,
                         radius: float, itemsize: int = 4, budget_bytes: int = 256 << 20) -> tuple[int, int]:
    """``(blocks per batch, working bytes)`` of :func:`kernel_render_volume`: per block the weights
    ``[K, Db P]``, the features ``[C, K]``, the product ``[C, Db P]`` and the sums ``2 [Db P]``
    (``P`` the largest block), as many blocks as fit ``budget_bytes`` (at least one)."""
    H, W = out_size
    h, w = lr_size
    P = (-(-H // h) + 1) * (-(-W // w) + 1)
    K = window_size(radius)
    per_block = (K * n_bins * P + channels * K + channels * n_bins * P + 2 * n_bins * P) * itemsize
    nb = max(1, min(h * w, budget_bytes // per_block))
    return int(nb), int(nb * per_block)


def kernel_render_volume(
    params: torch.Tensor,
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    valid_lr: torch.Tensor,
    features: torch.Tensor,
    radius: float,
    slopes: torch.Tensor | None,
    phi_bins: torch.Tensor,
    band_start: torch.Tensor,
    n_bins: int,
    volume: torch.Tensor | np.ndarray,
    log_mass: torch.Tensor,
    budget_bytes: int = 256 << 20,
    progress=None,
) -> None:
    """Fill ``volume`` and ``log_mass`` with the lifted kernel's feature volume (fused).

    Parameters
    ----------
    params : ``[1, 5, h, w]`` raw kernel parameters (two range groups: colour, depth feature).
    guide_hr : ``[1, Cc + 1, H, W]`` colour channels then the depth feature (only the colour is used:
        every pixel is evaluated at the bin depths).
    guide_lr : ``[1, Cc + 1, h, w]``; the last channel is the cells' depth feature ``phi_q``.
    valid_lr : ``[1, 2, h, w]`` bool; group 1 False drops the cell's depth term.
    features : ``[1, C, h, w]``.
    radius : window radius in LR cells.
    slopes : ``[1, 2, h, w]`` ``(d/dy, d/dx)`` of the depth feature per cell (planar model) or None
        (constant model).
    phi_bins : ``[D]`` depth feature of the bins.
    band_start : ``[H, W]`` int64 first computed bin of each pixel (``0 <= start <= D - n_bins``).
    n_bins : computed bins per pixel ``Db``.
    volume : ``[C, D, H, W]`` output, float16 / float32 / float64 (a tensor, or a numpy array such
        as an ``np.memmap``), written at the computed bins only.
    log_mass : ``[D, H, W]`` float32 output ``log M``, written at the computed bins only.
    budget_bytes : working-memory budget (:func:`volume_working_bytes`).
    progress : optional ``progress(rows_done, rows_total)``.

    The computation runs in float64 when ``params`` is float64, else float32.
    """
    _fast._require()
    B, _, h, w = params.shape
    Cg, H, W = guide_hr.shape[1:]
    if B != 1 or tuple(guide_lr.shape) != (1, Cg, h, w) or tuple(valid_lr.shape) != (1, 2, h, w) or Cg < 2:
        raise ValueError(
            f"kernel_render_volume needs one frame with a depth group: params {tuple(params.shape)}, guide_hr "
            f"{tuple(guide_hr.shape)}, guide_lr {tuple(guide_lr.shape)}, valid_lr {tuple(valid_lr.shape)}"
        )
    C = features.shape[1]
    D = phi_bins.numel()
    vol = volume.numpy() if isinstance(volume, torch.Tensor) else volume
    if tuple(vol.shape) != (C, D, H, W) or tuple(log_mass.shape) != (D, H, W):
        raise ValueError(f"volume must be [{C}, {D}, {H}, {W}] and log_mass [{D}, {H}, {W}], got "
                         f"{tuple(vol.shape)} and {tuple(log_mass.shape)}")
    half = vol.dtype == np.float16
    if half:
        vol = vol.view(np.uint16)
    elif vol.dtype not in (np.float32, np.float64):
        raise ValueError(f"volume must be float16, float32 or float64, got {vol.dtype}")
    cdt = _fast._compute_dtype(params)
    ndt = np.float64 if cdt == torch.float64 else np.float32
    offs, ry0, ry1, cx0, cx1, cyv, cxv = _fast._geometry(H, W, h, w, float(radius), np.dtype(ndt).name)
    ghr = _fast._np(guide_hr, cdt)
    glr = _fast._np(guide_lr, cdt)
    coef = _fast._coefficients(params, glr, cdt, 0.0)
    vlr = _fast._np(valid_lr != 0, torch.uint8)
    planar = slopes is not None
    slope = _fast._np(slopes[0], cdt) if planar else np.zeros((2, 1, 1), ndt)
    phib = _fast._np(phi_bins, cdt)
    d0 = _fast._np(band_start, torch.int64)
    sig = _fast._np(features[0].reshape(C, h * w), cdt)
    lm = log_mass.numpy()
    bi, bj = _blocks(ry0, ry1, cx0, cx1)
    pmax = int((ry1 - ry0).max()) * int((cx1 - cx0).max())
    K = offs.shape[0]
    itemsize = 8 if cdt == torch.float64 else 4
    nbm, _ = volume_working_bytes((H, W), (h, w), C, n_bins, radius, itemsize, budget_bytes)
    nbm = min(nbm, bi.shape[0])
    wbuf = torch.zeros(nbm, K, n_bins * pmax, dtype=cdt)  # zeroed once: padding columns stay finite
    fbuf = torch.empty(nbm, C, K, dtype=cdt)
    rbuf = torch.empty(nbm, C, n_bins * pmax, dtype=cdt)
    tot = np.empty((nbm, n_bins * pmax), ndt)
    lse = np.empty((nbm, n_bins * pmax), ndt)
    wn, fn, rn = wbuf.numpy(), fbuf.numpy(), rbuf.numpy()
    jc = max(1, min(BIN_CHUNK, n_bins))
    done = 0
    for s in range(0, bi.shape[0], nbm):
        e = min(bi.shape[0], s + nbm)
        nb = e - s
        b_i, b_j = bi[s:e], bj[s:e]
        _fast._parallel_for(_volume_weights, nb, b_i, b_j, ghr, glr, coef, vlr, slope, planar, phib, d0, sig, offs,
                            ry0, ry1, cx0, cx1, cyv, cxv, pmax, jc, wn, fn, tot, lse)
        torch.bmm(fbuf[:nb], wbuf[:nb], out=rbuf[:nb])
        _fast._parallel_for(_volume_scatter, nb, b_i, b_j, rn, tot, lse, d0, ry0, ry1, cx0, cx1, pmax, half, vol,
                            lm)
        if progress is not None:
            last = int(b_i[-1]) if e == bi.shape[0] or bi[e] != b_i[-1] else int(b_i[-1]) - 1
            rows = int(ry1[last]) if last >= 0 else 0
            if rows > done:
                done = rows
                progress(rows, H)

