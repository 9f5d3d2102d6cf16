"""Spawn-and-report helper of the benchmark scripts (shared by ``scripts/bench_*.py``).

A benchmark case runs in a fresh ``python SCRIPT --worker ...`` process, so that its peak resident
set size (``ru_maxrss``) and its numba/torch start-up are its own. The worker prints its record as
JSON on the last line of stdout (:func:`report`); the driver reads it back (:func:`run_worker`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerResult:
    """What one worker process gave back."""

    record: dict | None  # the JSON of stdout's last line; None when the worker failed
    returncode: int
    stderr: str
    wall_s: float  # wall-clock seconds of the whole subprocess (start-up included)

    @property
    def ok(self) -> bool:
        return self.record is not None


def run_worker(script: str, args: Sequence[str], *, env: Mapping[str, str] | None = None) -> WorkerResult:
    """Run ``sys.executable script --worker *args`` and parse the JSON record it reports."""
    cmd = [sys.executable, script, "--worker", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, env=None if env is None else dict(env)
    )
    wall = time.perf_counter() - t0
    record = None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            record = json.loads(lines[-1])
        except json.JSONDecodeError:
            record = None
    stderr = (
        proc.stderr
        if record is not None or proc.returncode != 0
        else proc.stderr + "\n(no JSON record on stdout)"
    )
    return WorkerResult(record, proc.returncode, stderr, wall)


def report(record: Mapping[str, object]) -> None:
    """Worker side: print ``record`` as the last stdout line, for :func:`run_worker`."""
    print(json.dumps(dict(record)), flush=True)
