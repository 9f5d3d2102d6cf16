"""Fit time of the RGB-D lift against the 2D fit on a real 640x480 frame (issue 16's lift row).

Alternates ``ua3d.fit`` and ``fit_rgbd`` (same FitConfig, 50 steps) on Redwood frame 0 and prints the
median of ``--repeats`` runs of each, their ratio and the peak RSS; ``--json`` writes them with the machine.

    python scripts/bench_lift_fit.py --threads 2 --repeats 3 --json bench_results/lift_fit.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    ap.add_argument("--root", type=Path, default=here.parent / "shared/data/redwood-open3d/sample5")
    ap.add_argument("--grid", type=int, nargs=2, default=(30, 40), metavar=("H", "W"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (args.root / "color/00000.jpg").is_file():
        raise SystemExit(
            f"Redwood frame not found under {args.root} (needs ../shared/data beside the checkout)"
        )
    torch.set_num_threads(args.threads)
    import ua3d
    from ua3d.rgbd.camera import PinholeCamera
    from ua3d.rgbd.lift import fit_rgbd

    rgb = np.asarray(Image.open(args.root / "color/00000.jpg").convert("RGB"))
    guide = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    depth = np.asarray(Image.open(args.root / "depth/00000.png")).astype(np.float32) / 1000.0
    H, W = depth.shape
    cam = PinholeCamera(525.0, 525.0, 319.5, 239.5, W, H)  # the PrimeSense default of the Redwood sample
    grid = tuple(args.grid)
    cfg = ua3d.FitConfig(steps=args.steps)
    ua3d.fit(guide, grid, cfg.replace(steps=2))  # warm-up: numba compiles / loads its cache
    fit_rgbd(guide, depth, cam, grid, cfg.replace(steps=2))
    times: dict[str, list[float]] = {"fit_2d": [], "fit_rgbd": []}
    cpu: dict[str, list[float]] = {"fit_2d": [], "fit_rgbd": []}  # all threads: the figure to read under load
    for _ in range(args.repeats):
        for name, run in (
            ("fit_2d", lambda: ua3d.fit(guide, grid, cfg)),
            ("fit_rgbd", lambda: fit_rgbd(guide, depth, cam, grid, cfg)),
        ):
            t, c = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"lift fit vs 2D fit, {W}x{H}, grid {grid[1]}x{grid[0]}, {args.steps} steps, {args.threads} threads"
    )
    print("| fit | median (s) | runs (s) | median CPU (s, all threads) |\n|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.2f} | {' / '.join(f'{x:.2f}' for x in v)} | {med_cpu[k]:.2f} |")
    ratio = med["fit_rgbd"] / med["fit_2d"]
    ratio_cpu = med_cpu["fit_rgbd"] / med_cpu["fit_2d"]
    print(
        f"ratio lift / 2D: {ratio:.2f} wall, {ratio_cpu:.2f} CPU (issue 16 targets: lift <= 3 s, ratio <= 1.5); "
        f"peak RSS {peak:.2f} GiB"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rec = {"times_s": times, "median_s": med, "ratio": ratio, "peak_rss_gib": peak}
        rec |= {"cpu_s": cpu, "median_cpu_s": med_cpu, "ratio_cpu": ratio_cpu}
        rec["machine"] = machine_info(args.threads)
        args.json.write_text(json.dumps(rec, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
