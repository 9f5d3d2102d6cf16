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
  :func:`ua3d.core.fast.blocks._gather_block`. Per block and neighbour the bin-independent parts, the
  spatial + colour logit ``s`` and the depth centre ``mu``, are computed once (``[K, n]``).
* **Weights**: for chunks of :data:`BIN_CHUNK` bins one pass writes the logits ``[K, chunk n]``
  and their per-column max, a second one replaces them with ``exp`` (the vectorisable
  :func:`ua3d.core.fast._jit._fexp`) and sums them; the weights are never normalised (the scatter
  multiplies by the inverse sums).
* **Contraction**: the chunk's weights times the block's gathered features ``[C, K]``, the only
  ``O(pairs x C)`` work, by BLAS.
* **Scatter**: each block's ``[C, chunk, n]`` result goes to the volume ``[C, D, H, W]`` at each
  pixel's own bins (``band``), with the float32 -> float16 rounding done in numba
  (:func:`_half_bits`: ``vcvtps2ph``, round to nearest even, bit-exact with numpy and torch), so a
  float16 or memmap (``np.memmap``) volume is written in place with no float32 copy; ``log M``
  goes to ``log_mass [D, H, W]``.

Two drivers of these steps. **Fused** (:func:`_volume_fused`, default when scipy is present): each
thread runs the three steps per block and chunk, the product by numba's ``np.dot`` (scipy's
OpenBLAS sgemm, held at one thread per caller meanwhile), so weights and products never leave
the cache: measured here, 640x480 / 64 channels / 16 bins took 2.9 s of CPU against 4.1 s for the
batched driver, which moves every weight through memory twice (written by numba, read by BLAS:
``2 x 4 K`` bytes per voxel against ``2`` for the float16 volume itself). **Batched**
(:func:`_volume_weights`, ``torch.bmm``, :func:`_volume_scatter`; the fallback without scipy, or
``FUSED = False``): batches of consecutive blocks x bins sized to the budget
(:func:`volume_working_bytes`).

Work and its physical bound (640x480, 30x40 grid, radius 8, 64 bins, 64 channels): ``3.15e9``
(pixel, bin, in-grid neighbour) pairs, each one ``exp`` and ``~8`` flops of logits in numba plus
``2 C`` flops in the contraction: ``4.0e11`` flops of BLAS, which at this CPU's AVX-512 FMA peak
(2 x 16 lanes x 2 flops per cycle, ~2.6 GHz: ~170 GFLOP/s per core) is ~2.4 s of one core, ~1.2 s
on two; single-threaded sgemm of these shapes reached ~100 GFLOP/s here. Figures:
``scripts/bench_volume.py``.

The weights kernel and the scatter release the GIL and run on :func:`ua3d.core.fast._parallel_for`'s
pool (``torch.get_num_threads()`` threads); each block is written by one thread (no races, results
independent of the thread count). ``AVAILABLE`` is False when numba cannot be imported.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .fast import inputs as _inputs
from .fast import pool as _pool
from .fast._jit import AVAILABLE
from .fast.blas import _one_blas_thread, _scipy_blas_threads
from .memory import window_size

__all__ = ["AVAILABLE", "BIN_CHUNK", "half_bits", "kernel_render_volume", "volume_working_bytes"]

#: one pass per block, the product by numba's np.dot (scipy BLAS) in the cache; False: batches + torch.bmm
FUSED = True
#: bins per pass of the weights kernel (keeps a block's chunk of logits in the L2 cache)
BIN_CHUNK = 2
#: working-set cap of one batch (bytes); large batches amortise each call's start (16 MiB batches ran 2x slower)
BATCH_BYTES = 128 << 20
#: blocks per batch before the bins are split (keeps both threads busy)
MIN_BATCH_BLOCKS = 4
#: logit floor below a column's max, as the reference (``ua3d.rgbd.volume._EXP_FLOOR``)
EXP_FLOOR = -80.0


class Depth(NamedTuple):
    """The depth side of one volume call, passed to the numba kernels as one argument (numpy)."""

    gcol: np.ndarray  # [2] int64: the colour channels ``[0, Cc)``, as the one range group of the logit kernel
    slope: np.ndarray  # [2, h, w] (d/dy, d/dx) of the cells' depth feature (a dummy unless planar)
    planar: bool
    phib: np.ndarray  # [D] depth feature of the bins
    d0: np.ndarray  # [H, W] int64 first computed bin of each pixel
    sig: np.ndarray  # [C, h w] features, cell-major columns
    pmax: int  # largest block (pixels)


if AVAILABLE:
    from numba import njit

    from .fast._jit import _JIT, _fexp, _half_bits, _wide_vectors
    from .fast.blocks import _block_logits, _block_pixels, _block_scratch, _gather_block

    @njit(**_JIT)
    def _half_bits_array(x, out):
        """``out[i] = _half_bits(x[i])`` (for tests)."""
        for i in range(x.shape[0]):
            out[i] = _half_bits(x[i])

    @njit(**_JIT)
    def _volume_block(i, j, fr, geo, dp, scr, prec, cen):
        """The bin-independent terms of block ``(i, j)``: its neighbour list and pixels (into the
        scratch ``scr`` of :func:`_block_scratch`), the spatial + colour logits ``scr.wl [K, n]`` (the
        one logit kernel :func:`ua3d.core.fast.blocks._block_logits`, colour group ``dp.gcol`` only), the
        depth term's precisions ``prec [K]`` and the depth centres ``cen [K, n]`` of every pixel.
        Returns ``(kb, n)``."""
        rec, nb, nb_k, px, py, pg, pv, _pw, wl, mx, _tot, d = scr
        nb_cy, nb_cx, nb_r, nb_v, nb_g = nb.nb_cy, nb.nb_cx, nb.nb_r, nb.nb_v, nb.nb_g
        Cc = fr.glr.shape[1] - 1  # the last guide channel is the depth feature
        offs = geo.offs
        dt = fr.glr.dtype.type
        y0, y1, x0, x1 = geo.ry0[i], geo.ry1[i], geo.cx0[j], geo.cx1[j]
        kb, _kanc = _gather_block(0, i, j, fr, geo, fr.vlr[0], False, rec, nb_v, nb_k)
        n = _block_pixels(0, y0, y1, x0, x1, fr.ghr, fr.vhr, False, px, py, pg, pv)
        _block_logits(kb, -1, n, px, py, pg, pv, dp.gcol, 0.0, nb, wl, mx, d)
        for k in range(kb):
            kk = nb_k[k]
            qi, qj = i + offs[kk, 0], j + offs[kk, 1]
            cyk, cxk = nb_cy[k], nb_cx[k]
            prec[k] = nb_r[1, k] * nb_v[1, k]
            phik = nb_g[Cc, k]
            gy = dp.slope[0, qi, qj] if dp.planar else dt(0.0)
            gx = dp.slope[1, qi, qj] if dp.planar else dt(0.0)
            ck_ = cen[k]
            for p in range(n):
                ck_[p] = phik + gy * (py[p] - cyk) + gx * (px[p] - cxk)
        return kb, n

    @njit(inline="always", **_JIT)  # inlined in numba IR: as a call it ran the volume 2x slower
    def _volume_chunk(kb, n, nj, P, base, cen, prec, phb, wm, mx, acc, log_mass, d0, doff, y0, x0, bw):
        """Weights of ``nj`` consecutive bins of a block: ``wm[k, jj P + p] = exp(max(l - m, floor))`` with
        the logits ``l = base[k, p] - prec[k] (phb[jj, p] - cen[k, p])^2`` and ``m`` their max over ``k``
        (``phb [jj, n]`` the bins' depth features); ``log_mass[d0 + jj, y, x] = m + log sum_k`` and
        ``acc[jj, p]`` = the inverse weight sums; the chunk's first bin is ``d0[y, x] + doff``."""
        dt = wm.dtype.type
        floor = dt(EXP_FLOOR)
        for jj in range(nj):
            for p in range(n):
                mx[jj, p] = dt(-3.0e38)
                acc[jj, p] = dt(0.0)
        for k in range(kb):
            pk = prec[k]
            row = wm[k]
            bk_ = base[k]
            ck_ = cen[k]
            for jj in range(nj):
                o = jj * P
                for p in range(n):
                    dz = phb[jj, p] - ck_[p]
                    v = bk_[p] - dz * dz * pk
                    row[o + p] = v
                    mx[jj, p] = max(mx[jj, p], v)
        for k in range(kb):
            row = wm[k]
            for jj in range(nj):
                o = jj * P
                for p in range(n):
                    e = _fexp(max(row[o + p] - mx[jj, p], floor))
                    row[o + p] = e
                    acc[jj, p] += e
        for jj in range(nj):
            for p in range(n):
                yy = p // bw
                y, x = y0 + yy, x0 + p - yy * bw
                log_mass[d0[y, x] + doff + jj, y, x] = mx[jj, p] + np.log(acc[jj, p])
                acc[jj, p] = dt(1.0) / acc[jj, p]

    @njit(inline="always", **_JIT)  # inlined in numba IR: as a call it ran the volume 2x slower
    def _bin_phis(nj, n, phib, d0, doff, y0, x0, bw, phb):
        """``phb[jj, p] = phib[d0[y, x] + doff + jj]``: the depth features of ``nj`` bins of a block's pixels."""
        for jj in range(nj):
            for p in range(n):
                yy = p // bw
                phb[jj, p] = phib[d0[y0 + yy, x0 + p - yy * bw] + doff + jj]

    @njit(**_JIT)
    def _volume_weights(t0, t1, bi, bj, fr, geo, dp, da, n_bins, wmat, fmat, inv, log_mass):
        """Unnormalised weights of blocks ``t0 <= t < t1`` (block ``(bi[t], bj[t])``).

        The bins ``da <= d < da + n_bins`` (counted from each pixel's ``d0``) come in chunks of
        ``jc = wmat.shape[3] // pmax``: ``wmat[t, ch, k, jj P + p]`` is the weight of neighbour ``k``
        (the block's compact list) for bin ``da + ch jc + jj`` of block pixel ``p`` (row-major),
        ``P = pmax``; each chunk's ``[K, jc P]`` matrix is contiguous (it stays in the L2 cache
        between the two passes). ``fmat[t, ch, c, k]``: the gathered features (one copy per chunk,
        zero rows past the list); ``inv[t, (d - da) P + p]``: the inverse weight sums;
        ``log_mass[d0 + d, y, x] = log M`` is written directly. ``fr``, ``geo``: the call's
        :class:`~ua3d.core.fast.inputs.Frame` and :class:`~ua3d.core.fast.pool.Geometry`, ``dp`` its
        :class:`Depth`.
        """
        _wide_vectors()
        phib, d0, sig, pmax = dp.phib, dp.d0, dp.sig, dp.pmax
        w = fr.glr.shape[3]
        K = geo.offs.shape[0]
        nch = wmat.shape[1]
        Kmax = wmat.shape[2]
        C = fmat.shape[2]
        P = pmax
        jc = wmat.shape[3] // P
        scr = _block_scratch(fr.glr, K, 2, pmax)
        nb_k = scr[2]
        prec = np.empty(K, fr.glr.dtype)
        cen = np.empty((K, pmax), fr.glr.dtype)
        phb = np.empty((jc, pmax), fr.glr.dtype)
        mx = np.empty((jc, pmax), fr.glr.dtype)
        acc = np.empty((jc, pmax), fr.glr.dtype)
        for t in range(t0, t1):
            i, j = bi[t], bj[t]
            y0, x0 = geo.ry0[i], geo.cx0[j]
            bw = geo.cx1[j] - x0
            kb, n = _volume_block(i, j, fr, geo, dp, scr, prec, cen)
            for k in range(kb):
                kk = nb_k[k]
                q = (i + geo.offs[kk, 0]) * w + j + geo.offs[kk, 1]
                for ch in range(nch):
                    for c in range(C):
                        fmat[t, ch, c, k] = sig[c, q]
            for ch in range(nch):
                for k in range(kb, Kmax):
                    for c in range(C):
                        fmat[t, ch, c, k] = 0.0
                    wmat[t, ch, k] = 0.0
            for ch in range(nch):
                ja = ch * jc
                nj = min(n_bins, ja + jc) - ja
                _bin_phis(nj, n, phib, d0, da + ja, y0, x0, bw, phb)
                _volume_chunk(
                    kb,
                    n,
                    nj,
                    P,
                    scr[8],
                    cen,
                    prec,
                    phb,
                    wmat[t, ch],
                    mx,
                    acc,
                    log_mass,
                    d0,
                    da + ja,
                    y0,
                    x0,
                    bw,
                )
                for jj in range(nj):
                    o = (ja + jj) * P
                    for p in range(n):
                        inv[t, o + p] = acc[jj, p]

    @njit(**_JIT)
    def _volume_scatter(
        c0, c1, bi, bj, res, inv, d0, ry0, ry1, cx0, cx1, pmax, da, n_bins, half, banded, out
    ):
        """Channels ``c0 <= c < c1`` of a batch of consecutive blocks (``bi, bj`` row-major):
        ``out[c, d0 + d, y, x] = res[t, ch, c, jj P + p] inv[t, (d - da) P + p]`` for the bins
        ``d = da + ch jc + jj < da + n_bins`` (float16 bits when ``half``). Per anchor row, each
        ``(c, d)`` plane's rows are written block after block while they stay in the L1 cache (whole
        lines reach memory), reading each block's result sequentially.
        ``banded`` False promises ``d0 == 0`` (contiguous row segments)."""
        _wide_vectors()
        P = pmax
        jc = res.shape[3] // P
        nb = bi.shape[0]
        ts = 0
        while ts < nb:
            te = ts
            while te < nb and bi[te] == bi[ts]:
                te += 1
            i = bi[ts]
            y0, y1 = ry0[i], ry1[i]
            for c in range(c0, c1):
                for dd in range(n_bins):
                    ch = dd // jc
                    oc = (dd - ch * jc) * P
                    o = dd * P
                    d = da + dd
                    for t in range(ts, te):  # a (c, d) plane's rows of this anchor row stay in L1 meanwhile
                        j = bj[t]
                        x0, x1 = cx0[j], cx1[j]
                        bw = x1 - x0
                        for yy in range(y1 - y0):  # plain indexing: a view per row would cost refcounting
                            y = y0 + yy
                            ps = oc + yy * bw
                            pi = o + yy * bw
                            if not banded:  # contiguous: a vectorised row segment
                                for xx in range(bw):
                                    v = res[t, ch, c, ps + xx] * inv[t, pi + xx]
                                    if half:
                                        out[c, d, y, x0 + xx] = _half_bits(np.float32(v))
                                    else:
                                        out[c, d, y, x0 + xx] = v
                                continue
                            for xx in range(bw):
                                x = x0 + xx
                                v = res[t, ch, c, ps + xx] * inv[t, pi + xx]
                                if half:
                                    out[c, d0[y, x] + d, y, x] = _half_bits(np.float32(v))
                                else:
                                    out[c, d0[y, x] + d, y, x] = v
            ts = te


if AVAILABLE:

    @njit(**_JIT)
    def _volume_fused(t0, t1, bi, bj, fr, geo, dp, n_bins, jc, half, banded, out, log_mass):
        """Blocks ``t0 <= t < t1`` end to end, every intermediate in the cache: per chunk of ``jc`` bins
        the weights ``[K, jc P]`` (as :func:`_volume_weights`), their product with the block's features
        ``[C, K]`` (``np.dot``: BLAS sgemm / dgemm, one thread per caller), and the scatter into
        ``out [C, D, H, W]`` (float16 bits when ``half``) and ``log_mass``."""
        _wide_vectors()
        phib, d0, sig, pmax = dp.phib, dp.d0, dp.sig, dp.pmax
        w = fr.glr.shape[3]
        K = geo.offs.shape[0]
        C = sig.shape[0]
        P = pmax
        dt = fr.glr.dtype
        scr = _block_scratch(fr.glr, K, 2, pmax)
        nb_k = scr[2]
        prec = np.empty(K, dt)
        cen = np.empty((K, pmax), dt)
        phb = np.empty((jc, pmax), dt)
        mx = np.empty((jc, pmax), dt)
        acc = np.empty((jc, pmax), dt)
        fmf = np.zeros(C * K, dt)  # flat: viewed as [C, kb] and [kb, jc P] per block (contiguous,
        wmf = np.zeros(K * jc * pmax, dt)  # so BLAS skips the cells outside the grid)
        for t in range(t0, t1):
            i, j = bi[t], bj[t]
            y0, y1 = geo.ry0[i], geo.ry1[i]
            x0 = geo.cx0[j]
            bw = geo.cx1[j] - x0
            kb, n = _volume_block(i, j, fr, geo, dp, scr, prec, cen)
            fm = fmf[: C * kb].reshape((C, kb))
            wm = wmf[: kb * jc * P].reshape((kb, jc * P))
            for k in range(kb):
                kk = nb_k[k]
                q = (i + geo.offs[kk, 0]) * w + j + geo.offs[kk, 1]
                for c in range(C):
                    fm[c, k] = sig[c, q]
            for ja in range(0, n_bins, jc):
                nj = min(n_bins, ja + jc) - ja
                _bin_phis(nj, n, phib, d0, ja, y0, x0, bw, phb)
                _volume_chunk(kb, n, nj, P, scr[8], cen, prec, phb, wm, mx, acc, log_mass, d0, ja, y0, x0, bw)
                res = np.dot(fm, wm)  # [C, jc P]
                for c in range(C):
                    for jj in range(nj):
                        o = jj * P
                        d = ja + jj
                        for yy in range(y1 - y0):
                            y = y0 + yy
                            pp = o + yy * bw
                            if not banded:
                                for xx in range(bw):
                                    v = res[c, pp + xx] * acc[jj, yy * bw + xx]
                                    if half:
                                        out[c, d, y, x0 + xx] = _half_bits(np.float32(v))
                                    else:
                                        out[c, d, y, x0 + xx] = v
                                continue
                            for xx in range(bw):
                                x = x0 + xx
                                v = res[c, pp + xx] * acc[jj, yy * bw + xx]
                                if half:
                                    out[c, d0[y, x] + d, y, x] = _half_bits(np.float32(v))
                                else:
                                    out[c, d0[y, x] + d, y, x] = v


def half_bits(x: np.ndarray) -> np.ndarray:
    """float16 bit patterns (uint16) of float32 ``x [N]`` by the engine's converter (for tests)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape[0], np.int16)
    _half_bits_array(x, out)
    return out.view(np.uint16)


def _blocks(
    ry0: np.ndarray, ry1: np.ndarray, cx0: np.ndarray, cx1: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Anchor rows and columns of the non-empty blocks, row-major."""
    ii, jj = np.meshgrid(np.arange(ry0.shape[0]), np.arange(cx0.shape[0]), indexing="ij")
    ok = ((ry1 - ry0)[:, None] > 0) & ((cx1 - cx0)[None, :] > 0)
    return np.ascontiguousarray(ii[ok], dtype=np.int64), np.ascontiguousarray(jj[ok], dtype=np.int64)


def volume_working_bytes(
    out_size: tuple[int, int],
    lr_size: tuple[int, int],
    channels: int,
    n_bins: int,
    radius: float,
    itemsize: int = 4,
    budget_bytes: int = 256 << 20,
    fused: bool | None = None,
) -> tuple[int, int, int]:
    """``(blocks per batch, bins per batch, working bytes)`` of :func:`kernel_render_volume`.

    ``fused`` (default: whether the fused path runs, i.e. :data:`FUSED` and scipy's BLAS): the fused
    engine works block by block in per-thread scratch, so its working set does not depend on the budget.

    A batch is consecutive blocks (row-major) times a range of bins; per block and bin it holds the
    weights ``[K, P]``, the product ``[C, P]`` and the inverse sums ``[P]`` (``P`` the largest block),
    per block and chunk of :data:`BIN_CHUNK` bins the features ``[C, K]``. The batch is sized to
    ``min(budget_bytes, BATCH_BYTES)``: all bins of as many blocks as fit, else chunks of bins of
    :data:`MIN_BATCH_BLOCKS` blocks (at least one chunk of one block).
    """
    H, W = out_size
    h, w = lr_size
    P = (-(-H // h) + 1) * (-(-W // w) + 1)
    K = window_size(radius)
    jc = max(1, min(BIN_CHUNK, n_bins))
    budget = max(1, min(int(budget_bytes), BATCH_BYTES))

    def block_bytes(nbins: int) -> int:
        nch = -(-nbins // jc)
        return ((K + channels) * nch * jc * P + nch * channels * K + nbins * P) * itemsize

    if fused is None:
        fused = FUSED and _scipy_blas_threads() is not None
    if fused:  # per thread: one block's scratch (:func:`_volume_fused`), never a batch
        per_thread = ((3 + jc) * K + (3 + channels) * jc + 10) * P + (channels + 12) * K
        return 1, jc, int(_pool.num_threads() * per_thread * itemsize)
    if MIN_BATCH_BLOCKS * block_bytes(n_bins) <= budget:
        nbb = n_bins
    else:
        nbb = min(n_bins, max(jc, (budget // max(MIN_BATCH_BLOCKS * block_bytes(jc), 1)) * jc))
    nbk = int(max(1, min(h * w, budget // block_bytes(nbb))))
    return nbk, int(nbb), int(nbk * block_bytes(nbb))


def kernel_render_volume(
    params: torch.Tensor,
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    valid_lr: torch.Tensor | None,
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
    _inputs._require()
    B, _, h, w = params.shape
    Cg, H, W = guide_hr.shape[1:]
    vshape = None if valid_lr is None else tuple(valid_lr.shape)
    if B != 1 or tuple(guide_lr.shape) != (1, Cg, h, w) or vshape != (1, 2, h, w) or Cg < 2:
        raise ValueError(
            f"kernel_render_volume needs one frame with a depth group: params {tuple(params.shape)}, guide_hr "
            f"{tuple(guide_hr.shape)}, guide_lr {tuple(guide_lr.shape)}, valid_lr {vshape}"
        )
    C = features.shape[1]
    D = phi_bins.numel()
    vol = volume.numpy() if isinstance(volume, torch.Tensor) else volume
    if tuple(vol.shape) != (C, D, H, W) or tuple(log_mass.shape) != (D, H, W):
        raise ValueError(
            f"volume must be [{C}, {D}, {H}, {W}] and log_mass [{D}, {H}, {W}], got "
            f"{tuple(vol.shape)} and {tuple(log_mass.shape)}"
        )
    half = vol.dtype == np.float16
    if half:
        vol = vol.view(np.int16)
    elif vol.dtype not in (np.float32, np.float64):
        raise ValueError(f"volume must be float16, float32 or float64, got {vol.dtype}")
    cdt = _inputs._compute_dtype(params)
    ndt = np.float64 if cdt == torch.float64 else np.float32
    geo = _pool._geometry(H, W, h, w, float(radius), np.dtype(ndt).name)
    ry0, ry1, cx0, cx1 = geo.ry0, geo.ry1, geo.cx0, geo.cx1
    glr = _inputs._np(guide_lr, cdt)
    if valid_lr is None:  # checked by the caller
        raise ValueError("valid_lr is required")
    vlr = _inputs._np(valid_lr != 0, torch.uint8).copy()
    vlr[:, 0] = 1  # the colour term applies to every pair (as the reference)
    fr = _inputs.Frame(
        _inputs._np(guide_hr, cdt),
        glr,
        _inputs._coefficients(params, glr, cdt, 0.0),
        np.ones((1, 1, 1, 1), np.uint8),
        vlr,
        np.array([0, Cg - 1, Cg], np.int64),
        0.0,
        False,
        True,
    )
    gcol = np.array([0, Cg - 1], np.int64)  # the colour group (the logit kernel's range groups)
    planar = slopes is not None
    slope = _inputs._np(slopes[0], cdt) if slopes is not None else np.zeros((2, 1, 1), ndt)
    phib = _inputs._np(phi_bins, cdt)
    d0 = _inputs._np(band_start, torch.int64)
    sig = _inputs._np(features[0].reshape(C, h * w), cdt)
    lm = log_mass.numpy()
    bi, bj = _blocks(ry0, ry1, cx0, cx1)
    banded = bool(d0.any())
    pmax = int((ry1 - ry0).max()) * int((cx1 - cx0).max())
    K = geo.offs.shape[0]
    itemsize = 8 if cdt == torch.float64 else 4
    dp = Depth(gcol, slope, planar, phib, d0, sig, pmax)
    if FUSED and _scipy_blas_threads() is not None:
        with _one_blas_thread():
            _pool._parallel_for(
                _volume_fused,
                bi.shape[0],
                bi,
                bj,
                fr,
                geo,
                dp,
                n_bins,
                max(1, min(BIN_CHUNK, n_bins)),
                half,
                banded,
                vol,
                lm,
            )
        if progress is not None:
            progress(H, H)
        return
    nbm, nbb, _ = volume_working_bytes((H, W), (h, w), C, n_bins, radius, itemsize, budget_bytes, fused=False)
    nbm = min(nbm, bi.shape[0])
    jc = max(1, min(BIN_CHUNK, n_bins))
    nch = -(-nbb // jc)
    # flat buffers, allocated once (zeroed: padding columns stay finite) and viewed contiguously per batch
    wbuf = torch.zeros(nbm * nch * K * jc * pmax, dtype=cdt)
    fbuf = torch.empty(nbm * nch * C * K, dtype=cdt)
    rbuf = torch.empty(nbm * nch * C * jc * pmax, dtype=cdt)
    inv = np.empty((nbm, nbb * pmax), ndt)
    done = 0
    for s in range(0, bi.shape[0], nbm):
        e = min(bi.shape[0], s + nbm)
        b_i, b_j = bi[s:e], bj[s:e]
        nb = e - s
        for da in range(0, n_bins, nbb):
            nd = min(n_bins, da + nbb) - da
            nc = -(-nd // jc)
            wt = wbuf[: nb * nc * K * jc * pmax].view(nb, nc, K, jc * pmax)
            ft = fbuf[: nb * nc * C * K].view(nb, nc, C, K)
            rt = rbuf[: nb * nc * C * jc * pmax].view(nb, nc, C, jc * pmax)
            _pool._parallel_for(
                _volume_weights, nb, b_i, b_j, fr, geo, dp, da, nd, wt.numpy(), ft.numpy(), inv, lm
            )
            torch.bmm(
                ft.view(nb * nc, C, K), wt.view(nb * nc, K, jc * pmax), out=rt.view(nb * nc, C, jc * pmax)
            )
            _pool._parallel_for(
                _volume_scatter,
                C,
                b_i,
                b_j,
                rt.numpy(),
                inv,
                d0,
                ry0,
                ry1,
                cx0,
                cx1,
                pmax,
                da,
                nd,
                half,
                banded,
                vol,
            )
        if progress is not None:
            last = int(b_i[-1]) if e == bi.shape[0] or bi[e] != b_i[-1] else int(b_i[-1]) - 1
            rows = int(ry1[last]) if last >= 0 else 0
            if rows > done:
                done = rows
                progress(rows, H)
