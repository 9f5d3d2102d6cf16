"""The BLAS that numba's ``np.dot`` calls (scipy's OpenBLAS): whether it is there, and holding it at one
thread while the engine's own threads each call it (:func:`_one_blas_thread`)."""

from __future__ import annotations

import contextlib
import ctypes
from functools import lru_cache


@lru_cache(maxsize=1)
def _scipy_blas_threads():
    """``(get, set)`` of the thread count of the BLAS that numba's ``np.dot`` calls (scipy's OpenBLAS),
    or None when there is no scipy (then the batched path with ``torch.bmm`` runs)."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library numba calls)
    except Exception:  # noqa: BLE001  # pragma: no cover - no scipy: numba's np.dot is unavailable
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and "scipy.libs" in ln})
        for p in paths:
            lib = ctypes.CDLL(p)
            for g, s in (
                ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                ("openblas_get_num_threads", "openblas_set_num_threads"),
            ):
                if hasattr(lib, g) and hasattr(lib, s):
                    return getattr(lib, g), getattr(lib, s)
    except OSError:  # pragma: no cover - no /proc: leave scipy's BLAS threads as they are
        pass
    return (lambda: 1), (lambda n: None)


@contextlib.contextmanager
def _one_blas_thread():
    """The engine's threads each call BLAS: make it single-threaded meanwhile (restored after; the
    setting is process-wide, so scipy BLAS calls of other threads run single-threaded meanwhile)."""
    gs = _scipy_blas_threads()
    if gs is None:
        yield
        return
    get, set_ = gs
    before = int(get())
    set_(1)
    try:
        yield
    finally:
        set_(before)
