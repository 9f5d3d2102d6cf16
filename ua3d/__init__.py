"""ua3d: training-free, guidance-driven upsampling of any low-resolution signal, lifted to 3D.

Core entry points: :func:`fit` (test-time optimisation of the kernel on a guide image),
:meth:`Kernel.render` (apply it to any LR signal), :func:`upsample` (both in one call).

The names are imported on first use (so ``ua3d --help`` starts without importing torch).
"""

from __future__ import annotations

from typing import Any


def _version() -> str:
    """The installed distribution's version (``importlib.metadata``); the source tree's as a fallback."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("ua3d")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.1.0+unknown"


__version__ = _version()
__all__ = ["FitConfig", "Kernel", "__version__", "fit", "upsample"]

_LAZY = {"Kernel": "ua3d.api", "fit": "ua3d.api", "upsample": "ua3d.api", "FitConfig": "ua3d.core.tto"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ua3d' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
