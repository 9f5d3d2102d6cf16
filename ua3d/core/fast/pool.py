"""Host-side machinery of the fused engine: the thread pool (:func:`_parallel_for`, denormals
flushed in its threads), the cached block geometry (:func:`_geometry`) and huge-page buffers
(:func:`_empty_huge`)."""

from __future__ import annotations

import ctypes
import itertools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from ..kernel import lr_centres, nearest_anchor, window_offsets
from ._jit import _ftz_begin, _ftz_end

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
            _POOL = ThreadPoolExecutor(
                max_workers=n, thread_name_prefix="ua3d-fast", initializer=_flush_denormals
            )
            _POOL_KEY = key
        return _POOL


def _parallel_for(fn: Callable, n: int, *args) -> None:
    """``fn(start, stop, *args)`` over ``[0, n)`` in about ``4 * threads`` chunks, taken in turn by the
    calling thread and ``threads - 1`` pool threads, all with denormals flushed (the caller's own setting
    is restored after: :func:`ua3d.core.fast._jit._ftz_begin`).

    The numba kernels release the GIL (``nogil=True``) and write disjoint outputs per item, so the
    chunks run truly in parallel without races; results do not depend on the split. The caller works
    too, so one thread needs no pool and ``t`` threads wake only ``t - 1`` others (a wake-up cost
    ~0.5 ms of CPU on a busy machine: several per call were a fifth of a 224 px fit step).
    """
    if n <= 0:
        return
    t = min(num_threads(), n)
    bounds = np.linspace(0, n, (min(n, 4 * t) if t > 1 else 1) + 1).round().astype(np.int64)
    chunks = iter([(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a])
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                ab = next(chunks, None)
            if ab is None:
                return
            fn(ab[0], ab[1], *args)

    futures = [_pool(t - 1).submit(work) for _ in range(t - 1)] if t > 1 else []
    old = _ftz_begin()
    try:
        work()
    finally:
        _ftz_end(old)
        for f in futures:
            f.result()


class Geometry(NamedTuple):
    """Block layout and window of an ``(H, W) <- (h, w)`` pair (read-only arrays, :func:`_geometry`)."""

    offs: np.ndarray  # [K, 2] int64 window offsets (di, dj)
    ry0: np.ndarray  # [h] int64 first HR row whose anchor is row i
    ry1: np.ndarray  # [h] int64 one past the last
    cx0: np.ndarray  # [w] int64
    cx1: np.ndarray  # [w] int64
    cyv: np.ndarray  # [h] LR centres in HR pixels (compute dtype)
    cxv: np.ndarray  # [w]


@lru_cache(maxsize=32)
def _geometry(H: int, W: int, h: int, w: int, radius: float, np_dtype: str) -> Geometry:
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
    return Geometry(offs, ry0, ry1, cx0, cx1, cyv, cxv)


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
