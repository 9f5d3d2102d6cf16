"""Fit time of the RGB-D lift against the 2D fit on a real 640x480 frame (issue 16's lift row).

Alternates ``ua3d.fit`` and ``fit_rgbd`` (same FitConfig, 50 steps) on Redwood frame 0 and prints the
median of ``--repeats`` runs of each, their ratio and the peak RSS; ``--json`` writes them with the machine.
``--sizes 320 640 1280`` also runs the frame resized to other widths (colour: area / bicubic, depth: nearest,
intrinsics scaled) with the grid scaled alike (16 px cells), for the "<= 1.5x at any size" target.

    python scripts/bench_lift_fit.py --threads 2 --repeats 3 --json bench_results/lift_fit.json
    python scripts/bench_lift_fit.py --threads 2 --repeats 3 --sizes 320 640 1280
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
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=[640], help="frame widths (640 = the frame as is)"
    )
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

    rgb0 = Image.open(args.root / "color/00000.jpg").convert("RGB")
    depth0 = Image.open(args.root / "depth/00000.png")
    records = []
    for width in args.sizes:
        records.append(_bench_size(args, rgb0, depth0, width, ua3d, fit_rgbd, PinholeCamera))
    ratio = records[0]["ratio"]
    times, med, cpu, med_cpu = (records[0][k] for k in ("times_s", "median_s", "cpu_s", "median_cpu_s"))
    ratio_cpu = records[0]["ratio_cpu"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.2f} GiB")
    if len(records) > 1:
        print(
            "\n| size | grid | 2D fit (s) | lift fit (s) | lift / 2D (wall) | lift / 2D (CPU) |\n|---|---|---|---|---|---|"
        )
        for r in records:
            print(
                f"| {r['size']} | {r['grid']} | {r['median_s']['fit_2d']:.2f} | {r['median_s']['fit_rgbd']:.2f} "
                f"| {r['ratio']:.2f} | {r['ratio_cpu']:.2f} |"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rec = {"times_s": times, "median_s": med, "ratio": ratio, "peak_rss_gib": peak}
        rec |= {"cpu_s": cpu, "median_cpu_s": med_cpu, "ratio_cpu": ratio_cpu, "sizes": records}
        rec["machine"] = machine_info(args.threads)
        args.json.write_text(json.dumps(rec, indent=2))
        print(f"wrote {args.json}")
    return 0


def _bench_size(args, rgb0, depth0, width, ua3d, fit_rgbd, PinholeCamera) -> dict:
    """Alternating 2D / lift fits of the frame resized to ``width`` (aspect kept); prints its table."""
    W0, H0 = rgb0.size
    W, H = width, round(H0 * width / W0)
    rgb_img = (
        rgb0 if W == W0 else rgb0.resize((W, H), Image.Resampling.BOX if W < W0 else Image.Resampling.BICUBIC)
    )
    dep_img = depth0 if W == W0 else depth0.resize((W, H), Image.Resampling.NEAREST)
    rgb = np.asarray(rgb_img)
    guide = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    depth = np.asarray(dep_img).astype(np.float32) / 1000.0
    f = W / W0  # the PrimeSense default of the Redwood sample, scaled with the image
    cam = PinholeCamera(525.0 * f, 525.0 * f, (319.5 + 0.5) * f - 0.5, (239.5 + 0.5) * f - 0.5, W, H)
    gh, gw = args.grid
    grid = (max(1, round(gh * W / W0)), max(1, round(gw * W / W0)))
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
    print(
        f"lift fit vs 2D fit, {W}x{H}, grid {grid[1]}x{grid[0]}, {args.steps} steps, {args.threads} threads"
    )
    print("| fit | median (s) | runs (s) | median CPU (s, all threads) |\n|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.2f} | {' / '.join(f'{x:.2f}' for x in v)} | {med_cpu[k]:.2f} |")
    ratio = med["fit_rgbd"] / med["fit_2d"]
    ratio_cpu = med_cpu["fit_rgbd"] / med_cpu["fit_2d"]
    print(
        f"ratio lift / 2D: {ratio:.2f} wall, {ratio_cpu:.2f} CPU (issue 16 targets: lift <= 3 s at 640x480, "
        f"ratio <= 1.5)"
    )
    return {
        "size": f"{W}x{H}",
        "grid": f"{grid[1]}x{grid[0]}",
        "times_s": times,
        "median_s": med,
        "cpu_s": cpu,
        "median_cpu_s": med_cpu,
        "ratio": ratio,
        "ratio_cpu": ratio_cpu,
    }


if __name__ == "__main__":
    raise SystemExit(main())
