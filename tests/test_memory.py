"""Memory estimates against the measured peak: no entry point allocates more than it estimated plus
a stated margin.

One subprocess (its own address space, one thread) warms the engines up, then runs each case with the
peak resident set (``VmHWM``) reset before it (``/proc/self/clear_refs``): the growth of the peak over the
resident set before the call is what the call allocated at its worst moment.

Margin: ``MARGIN_BYTES + MARGIN_FRACTION * estimate`` (48 MiB for Python/torch temporaries, allocator
slack and small LR-sized arrays the estimates leave out, plus 10 %).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ua3d.core.memory import MEMORY_FRACTION, MemoryEstimateError, check_memory, check_window, window_size

MARGIN_BYTES = 48 << 20
MARGIN_FRACTION = 0.10

_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    import ua3d
    from ua3d.baselines import classic
    from ua3d.core import ops
    from ua3d.core.tto import FitConfig
    from ua3d.rgbd.camera import PinholeCamera
    from ua3d.rgbd.lift import fit_rgbd
    from ua3d.rgbd.volume import estimate_volume_bytes, render_volume

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    k = ua3d.fit(torch.rand(1, 3, 32, 32), (8, 8), steps=1)          # warm-up: numba, torch kernels
    k.render(torch.rand(1, 16, 8, 8)); k.render(torch.rand(1, 2, 8, 8))
    classic.jbu(torch.rand(1, 3, 32, 32), torch.rand(1, 2, 8, 8))
    rows = []

    def measure(name, est, fn):
        before = status("VmRSS")
        reset()
        fn()
        rows.append({"case": name, "estimate": int(est), "peak": status("VmHWM") - before})

    k = ua3d.fit(torch.rand(1, 3, 512, 512, generator=g), (32, 32), steps=0)
    for C in (4, 48):
        s = torch.rand(1, C, 32, 32, generator=g)
        est = ops.estimate_render_memory(1, C, (512, 512), (32, 32), k.radius)["total"]
        measure(f"render C={C} 512x512", est, lambda: k.render(s))
    guide = torch.rand(1, 3, 768, 768, generator=g)
    cfg = FitConfig(steps=2)
    est = ops.estimate_fit_memory(1, 3, (768, 768), (48, 48), cfg.radius)["total"]
    measure("fit 768x768 on 48x48", est, lambda: ua3d.fit(guide, (48, 48), cfg))
    expanded = torch.rand(1, 3, 1, 1, generator=g).expand(1, 3, 1024, 1024)
    est = ops.estimate_fit_memory(1, 3, (1024, 1024), (32, 32), cfg.radius, contiguous=False)["total"]
    measure("fit expanded 1024x1024 guide", est, lambda: ua3d.fit(expanded, (32, 32), cfg))
    small, sig = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 16, 16, 16, generator=g)
    est = (16 + 3) * 1024 * 1024 * 4
    measure("bilinear 16 ch to 1024x1024", est, lambda: classic.bilinear(small, sig, (1024, 1024)))
    rgb, depth = torch.rand(3, 96, 128, generator=g), 1 + torch.rand(96, 128, generator=g)
    lk = fit_rgbd(rgb, depth, PinholeCamera(100.0, 100.0, 63.5, 47.5, 128, 96), (12, 16), FitConfig(steps=1))
    f = torch.rand(1, 16, 12, 16, generator=g)
    est = estimate_volume_bytes(16, 32, (96, 128), radius=lk.kernel.radius, lr_size=(12, 16)).memory
    measure("render_volume 16 ch x 32 bins 96x128", est, lambda: render_volume(lk, f, bins=32))
    print(json.dumps(rows))
    """
)


def _hwm_resettable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in Path("/proc/self/status").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _hwm_resettable(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_estimates_bound_the_measured_peak():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", _PROBE], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) == 6
    for r in rows:
        allowed = r["estimate"] * (1 + MARGIN_FRACTION) + MARGIN_BYTES
        assert r["peak"] <= allowed, (
            f"{r['case']}: peak {r['peak'] / 2**20:.1f} MiB above estimate {r['estimate'] / 2**20:.1f} MiB + margin"
        )
    big = [r for r in rows if r["estimate"] > 64 << 20]
    assert big and all(r["peak"] > 0.2 * r["estimate"] for r in big)  # the estimates are not vacuous either


def test_check_memory_and_window_refuse_before_allocating(monkeypatch):
    from ua3d.core import memory

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 100 << 20)
    check_memory(int(MEMORY_FRACTION * (100 << 20)) - 1, "x", "y")
    with pytest.raises(MemoryEstimateError, match=r"^doing it needs about 0\.10 GiB .*: pass fewer$"):
        check_memory(100 << 20, "doing it", "pass fewer")
    with pytest.raises(ValueError, match=r"radius=10 already covers all of it: pass radius <= 10"):
        check_window(1e5, (8, 6))
    with pytest.raises(ValueError, match=r"radius must be a finite number >= 0, got 'big'"):
        check_window("big", (8, 6))
    assert [window_size(r) for r in (0, 1, 1.5, 2, 8)] == [1, 5, 9, 13, 197]


def test_memory_limit_environment_variable(monkeypatch):
    from ua3d.core.memory import available_memory_bytes

    monkeypatch.setenv("UA3D_MEMORY_LIMIT", "12345")
    assert available_memory_bytes() == 12345
    monkeypatch.setenv("UA3D_MEMORY_LIMIT", "lots")
    with pytest.raises(ValueError, match="UA3D_MEMORY_LIMIT must be a number of bytes"):
        available_memory_bytes()
