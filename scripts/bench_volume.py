"""Benchmark :func:`ua3d.rgbd.volume.render_volume` on a 640x480 RGB-D frame.

Renders 64-channel LR features (a 30x40 grid, 16x smaller) into a volume of 64 depth bins in
several modes (float32 / float16 in memory, a band of bins, a float32 ``.npy`` memmap), and
prints, per mode, the memory estimate made before allocating, the median wall time and CPU
time (all threads of this process; the better figure on a shared, loaded machine) over
``--repeats`` runs and the peak resident memory above the process's baseline (sampled every
5 ms by a background thread). Writes everything to ``--json``.

The frame is the first Redwood frame of ``../shared/data/redwood-open3d/sample5`` when present,
otherwise a synthetic scene (:func:`ua3d.rgbd.synthetic.make_scene`). The kernel is fitted with
``--steps`` TTO steps (default 0: the render cost does not depend on the fitted values).

Figures (``--threads 1`` on the shared 2-core machine, load average ~8, Redwood frame, planar
depth model; wall times are inflated by the load, CPU seconds are the better guide):

=======  =======  ====  ======  ===========  ============  ======  =====
mode     dtype    band  memmap  est RAM GiB  peak RSS GiB  wall s  cpu s
=======  =======  ====  ======  ===========  ============  ======  =====
f32      float32  --    no      4.87         4.90          186.6   40.7
f16      float16  --    no      2.52         2.48          114.5   39.9
band     float16  4     no      2.50         2.63          47.8    23.0
memmap   float32  --    yes     0.18         4.82          91.9    43.6
=======  =======  ====  ======  ===========  ============  ======  =====

The memmap row's peak RSS counts the file's dirty page-cache pages mapped into the process; they
are file-backed and reclaimable (the kernel writes them back under memory pressure), so the
anonymous memory stays near the estimate.

Usage::

    python scripts/bench_volume.py --json bench_volume.json
    python scripts/bench_volume.py --modes f16,band --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import ua3d
from ua3d.core.ops import fast_available
from ua3d.core.tto import FitConfig
from ua3d.rgbd.lift import fit_rgbd
from ua3d.rgbd.volume import estimate_volume_bytes, render_volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "redwood-open3d" / "sample5"
MODES = {
    "f32": {"out_dtype": torch.float32},
    "f16": {"out_dtype": torch.float16},
    "band": {"out_dtype": torch.float16, "band": 4},
    "memmap": {"out_dtype": torch.float32, "out": "memmap"},
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size above the value at entry, sampled by a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:  # noqa: PYI034
        self.base = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() - self.base)


def load_frame(width: int, height: int):
    """RGB uint8 [H, W, 3], depth metres [H, W], camera, and the frame's name."""
    if DATA.is_dir() and (width, height) == (640, 480):
        from ua3d.io.rgbd import read_color, read_depth, read_intrinsics

        rgb = read_color(DATA / "color" / "00000.jpg")
        depth = read_depth(DATA / "depth" / "00000.png")
        return rgb, depth, read_intrinsics(DATA / "camera_primesense.json"), "redwood sample5/00000"
    from ua3d.rgbd.synthetic import make_scene

    s = make_scene(0, width, height, holes=4)
    return (s["rgb"] * 255).round().astype(np.uint8), s["depth"], s["camera"], "synthetic seed 0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--bins", type=int, default=64)
    ap.add_argument("--scale", type=int, default=16, help="HR / LR size ratio of the feature grid")
    ap.add_argument("--radius", type=float, default=FitConfig().radius)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--modes", default="f32,f16,band,memmap", help=f"comma list of {sorted(MODES)}")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--depth-model", default="planar", choices=["planar", "constant"])
    ap.add_argument("--json", default="bench_volume.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--tmpdir", default=None, help="folder for the memmap mode's temporary .npy")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    rgb, depth, camera, name = load_frame(args.width, args.height)
    H, W = depth.shape
    lr = (H // args.scale, W // args.scale)
    t0 = time.perf_counter()
    lifted = fit_rgbd(rgb, depth, camera, lr, FitConfig(steps=args.steps, radius=args.radius))
    fit_s = time.perf_counter() - t0
    feats = torch.randn(1, args.channels, *lr, generator=torch.Generator().manual_seed(0))
    print(f"frame {name}: {W}x{H}, features {args.channels} x {lr[0]}x{lr[1]}, {args.bins} bins, "
          f"radius {args.radius}, fit {args.steps} steps in {fit_s:.1f} s, torch threads {torch.get_num_threads()}")

    rows = []
    for mode in [m for m in args.modes.split(",") if m]:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {sorted(MODES)}")
        spec = MODES[mode]
        times, cpu, peaks = [], [], []
        est = estimate_volume_bytes(
            args.channels, args.bins, (H, W), spec["out_dtype"], band=spec.get("band"), radius=args.radius,
            lr_size=lr, on_disk="out" in spec,
        )
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
                kw = {k: v for k, v in spec.items() if k != "out"}
                if "out" in spec:
                    kw["out"] = str(Path(tmp) / "volume.npy")
                with PeakRSS() as peak:
                    t0, c0 = time.perf_counter(), time.process_time()
                    vol, mass, _ = render_volume(
                        lifted, feats, bins=args.bins, verbose=True, depth_model=args.depth_model, **kw
                    )
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                del vol, mass
            peaks.append(peak.peak)
        rows.append({
            "mode": mode,
            "out_dtype": str(MODES[mode]["out_dtype"]).replace("torch.", ""),
            "band": MODES[mode].get("band"),
            "memmap": MODES[mode].get("out") == "memmap",
            "estimate_ram_bytes": est.memory,
            "estimate_volume_bytes": est.volume,
            "median_s": statistics.median(times),
            "times_s": times,
            "median_cpu_s": statistics.median(cpu),
            "peak_rss_bytes": max(peaks),
        })

    gib = 2.0**30
    print(f"\n{'mode':8s} {'dtype':8s} {'band':>5s} {'memmap':>6s} {'est RAM GiB':>11s} {'peak RSS GiB':>12s} "
          f"{'median s':>9s} {'cpu s':>8s}")
    for r in rows:
        print(f"{r['mode']:8s} {r['out_dtype']:8s} {r['band']!s:>5s} {r['memmap']!s:>6s} "
              f"{r['estimate_ram_bytes'] / gib:11.2f} {r['peak_rss_bytes'] / gib:12.2f} {r['median_s']:9.1f} {r['median_cpu_s']:8.1f}")
    report = {
        "benchmark": "render_volume",
        "frame": name,
        "size": [H, W],
        "lr_size": list(lr),
        "channels": args.channels,
        "bins": args.bins,
        "radius": args.radius,
        "depth_model": args.depth_model,
        "fit_steps": args.steps,
        "fit_s": fit_s,
        "repeats": args.repeats,
        "results": rows,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(),
        },
        "versions": {
            "ua3d": ua3d.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "fast_engine": fast_available(),
        },
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
