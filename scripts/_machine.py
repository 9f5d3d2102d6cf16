"""Machine, thread and version facts recorded in every benchmark's JSON (shared by ``scripts/bench_*.py``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` where that is unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(threads: int | None = None, **extra: object) -> dict:
    """CPU, logical CPUs, load average, threads, Python/torch/numpy/numba versions, plus ``extra``."""
    import numpy
    import torch

    try:
        import numba

        numba_version = numba.__version__
    except ImportError:  # the engine falls back to the reference without numba
        numba_version = None
    return {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "numba": numba_version,
        "platform": platform.platform(),
        **extra,
    }
