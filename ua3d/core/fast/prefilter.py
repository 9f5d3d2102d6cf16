"""The guide pre-filter's bilateral pass in numba: the twin of :func:`ua3d.core.tto._bilateral_torch`
(same taps, same order of operations per tap; ``exp`` is the engine's :func:`~ua3d.core.fast._jit._fexp`,
< 1 ulp, so results agree with the torch pass to a few ulps). Rows of the image run in parallel on the
engine's threads (:func:`~ua3d.core.fast.pool._parallel_for`); scratch is two rows per thread."""

from __future__ import annotations

import numpy as np
import torch

from ._jit import AVAILABLE
from .inputs import _np, _require
from .pool import _parallel_for

if AVAILABLE:
    from ._jit import _JIT, _fexp, _wide_vectors, njit

    @njit(**_JIT)
    def _bilateral_rows(r0, r1, pad, inv, tdy, tdx, tds, radius, out):
        """Rows ``r0 <= b H + y < r1`` of the filtered guide ``out [B, C, H, W]`` from the replicate-padded
        guide ``pad [B, C, H + 2 radius, W + 2 radius]``: ``sum_t w_t q_t / sum_t w_t`` over the taps
        ``(tdy, tdx)`` (offsets into the padding) with ``w_t = exp(-inv[b] |q_t - centre|^2 - tds[t])``."""
        _wide_vectors()
        _, C, H, W = out.shape
        dt = out.dtype.type
        acc = np.empty((C, W), out.dtype)
        norm = np.empty(W, out.dtype)
        d = np.empty(W, out.dtype)
        for bi in range(r0, r1):
            b = bi // H
            y = bi - b * H
            ib = dt(inv[b])
            for c in range(C):
                for x in range(W):
                    acc[c, x] = 0.0
            for x in range(W):
                norm[x] = 0.0
            for t in range(tdy.shape[0]):
                yy = y + tdy[t]
                xo = tdx[t]
                ds = dt(tds[t])
                for x in range(W):
                    d[x] = 0.0
                for c in range(C):  # row views: indices the vectoriser can prove in bounds
                    q = pad[b, c, yy, xo : xo + W]
                    ctr = pad[b, c, y + radius, radius : radius + W]
                    for x in range(W):
                        e = q[x] - ctr[x]
                        d[x] += e * e
                for x in range(W):
                    wgt = _fexp(d[x] * -ib - ds)
                    d[x] = wgt
                    norm[x] += wgt
                for c in range(C):
                    q = pad[b, c, yy, xo : xo + W]
                    a = acc[c]
                    for x in range(W):
                        a[x] += d[x] * q[x]
            for c in range(C):
                for x in range(W):
                    out[b, c, y, x] = acc[c, x] / norm[x]


def bilateral(guide: torch.Tensor, sigma_r: torch.Tensor, sigma_s: float, radius: int, taps) -> torch.Tensor:
    """Bilateral filter of a CPU float32/float64 ``guide [B, C, H, W]`` (see
    :func:`ua3d.core.tto._bilateral_torch`); ``taps`` its list of ``(dy, dx, spatial term)``."""
    _require()
    B, C, H, W = guide.shape
    pad = _np(torch.nn.functional.pad(guide, (radius,) * 4, mode="replicate"))
    inv = (
        (0.5 / sigma_r.detach().to(guide.dtype) ** 2).numpy().astype(np.float64)
    )  # as the reference rounds it
    tdy = np.array([t[0] for t in taps], np.int64)
    tdx = np.array([t[1] for t in taps], np.int64)
    tds = np.array([t[2] for t in taps], np.float64)
    out = np.empty((B, C, H, W), pad.dtype)
    _parallel_for(_bilateral_rows, B * H, pad, inv, tdy, tdx, tds, radius, out)
    return torch.from_numpy(out)
