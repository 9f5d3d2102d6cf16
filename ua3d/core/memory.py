"""The one memory guard: estimates before large allocations, one threshold, one message format.

Every entry point that allocates in proportion to its inputs (fit, render, volume, points,
baselines, image readers) computes what it will allocate *before* allocating it and calls
:func:`check_memory`, which refuses with a :class:`MemoryEstimateError` (a ``ValueError``, also a
``MemoryError``) naming the size and the option that reduces it when the plan exceeds
:data:`MEMORY_FRACTION` of the memory available to the process.

The window of a kernel holds ``K ~ pi radius^2`` LR cells; :func:`check_window` refuses a radius
whose window alone would not fit, and says which radius already covers the whole LR grid (cells
outside the grid are excluded, so a larger radius changes nothing but the cost).
"""

from __future__ import annotations

import math
import os

__all__ = [
    "MEMORY_FRACTION",
    "MemoryEstimateError",
    "available_memory_bytes",
    "check_memory",
    "check_window",
    "format_bytes",
    "window_size",
]

#: fraction of the available memory one call may plan to use (the one threshold of the package)
MEMORY_FRACTION = 0.8


class MemoryEstimateError(ValueError, MemoryError):
    """A call refused before allocating: its memory estimate exceeds the available memory."""


def available_memory_bytes() -> int:
    """Physical memory available to this process (best effort; Linux ``/proc/meminfo``).

    ``UA3D_MEMORY_LIMIT`` (bytes, e.g. ``8e9``) caps it, for tests and shared machines.
    """
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:  # pragma: no cover
        pass
    if avail is None:  # pragma: no cover
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 40
    cap = os.environ.get("UA3D_MEMORY_LIMIT")
    if cap:
        try:
            avail = min(avail, int(float(cap)))
        except ValueError:
            raise ValueError(f"UA3D_MEMORY_LIMIT must be a number of bytes, got {cap!r}") from None
    return int(avail)


def format_bytes(n: float) -> str:
    """``"1.23 GiB"``-style size (GiB above 1 GiB, else MiB)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_memory(need: int | dict[str, int], what: str, hint: str, *, device=None) -> None:
    """Refuse (``MemoryEstimateError``) when ``need`` bytes exceed ``MEMORY_FRACTION`` of the available memory.

    Parameters
    ----------
    need : bytes, or a dict with ``"total"`` and optional parts (``"output"``, ``"working"``...) that the
        message lists.
    what : what is being done, e.g. ``"rendering 64 channels at (480, 640)"``.
    hint : the option(s) that reduce the need, e.g. ``"render fewer channels at a time"``.
    device : the tensors' device; only CPU (or None) memory is checked.
    """
    if device is not None and getattr(device, "type", str(device)) != "cpu":
        return
    if isinstance(need, dict):
        total = int(need["total"])
        parts = [f"{k} {format_bytes(v)}" for k, v in need.items() if k != "total" and v]
        detail = f" ({' + '.join(parts)})" if parts else ""
    else:
        total, detail = int(need), ""
    avail = available_memory_bytes()
    if total > MEMORY_FRACTION * avail:
        raise MemoryEstimateError(
            f"{what} needs about {total / 2**30:.2f} GiB{detail} but only {avail / 2**30:.2f} GiB is available "
            f"(limit {MEMORY_FRACTION:.0%} of it): {hint}"
        )


def window_size(radius: float) -> int:
    """Number of integer offsets in the disc ``di^2 + dj^2 <= radius^2`` (``K``), without building it."""
    r = math.floor(radius)
    if r > 10_000_000:  # the exact count would take a while; pi r^2 is within 1e-6 of it there
        return int(math.pi * radius * radius)
    import numpy as np

    di = np.arange(-r, r + 1, dtype=np.float64)
    half = np.floor(np.sqrt(np.maximum(radius * radius + 1e-9 - di * di, 0.0)))
    return int((2 * half + 1).sum())


def check_window(radius: float, lr_size: tuple[int, int], batch: int = 1, name: str = "radius") -> int:
    """Check that the window of ``radius`` LR cells can be built and return ``K`` (its size).

    Building the window costs ``(2 r + 1)^2`` offsets (24 bytes each); the per-row buffers of the
    engines scale with ``K`` and ``2 r + 1``. A radius beyond the LR grid's diagonal adds no neighbour.
    """
    if (
        isinstance(radius, bool)
        or not isinstance(radius, (int, float))
        or not (radius >= 0)
        or not math.isfinite(radius)
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {radius!r}")
    h, w = lr_size
    r = math.floor(radius)
    cover = math.ceil(math.hypot(h, w))
    build = (2 * r + 1) ** 2 * 24 + batch * h * (2 * r + 1) * w * 8 * 8
    if build < (64 << 20):
        pass  # small: not worth reading /proc/meminfo on every fit step
    elif r > cover:
        check_memory(
            build,
            f"a window of {name}={radius:g} LR cells ({(2 * r + 1) ** 2:.3g} offsets)",
            f"the LR grid is {h}x{w}, so {name}={cover} already covers all of it: pass {name} <= {cover}",
        )
    else:
        check_memory(build, f"a window of {name}={radius:g} LR cells", f"pass a smaller {name}")
    return window_size(radius)
