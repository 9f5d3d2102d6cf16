#!/usr/bin/env python
"""Throughput of ``ua3d.batch`` for depth SR: 1 vs 2 workers, local process pool vs Ray, per-item overhead.

Items: the 8 Middlebury dev scenes (``../shared/data/middlebury-gdsr-dev``, protocol B x8, 16-bit PNGs
written once into a work folder; the 0-255 values are stored as ``value * 100`` with ``depth_scale 100``),
listed repeatedly in a manifest up to ``--items`` (default 96; ``--quick``: 24). A second item set, the
NYUv2 640x480 frames (``nyuv2-dkn-test``, x8), gives the cost of one 640x480 depth-SR item, the yardstick
of the Ray overhead target (<= 10 % of it).

Configurations (each a fresh output folder, run alternately ``--repeats`` times; the median is reported):

* ``local`` with 1 worker x 2 threads, 1 worker x 1 thread, 2 workers x 1 thread (a ``spawn`` process pool;
  the default threads are ``cores // workers``);
* ``ray`` with the same worker / thread settings on one local instance started once with ``num_cpus=2``
  (its start-up is excluded; Ray's worker processes are reused across runs, the local pool's are not).

Per configuration: end-to-end items/s (the whole ``ua3d.batch.run`` call: pool start, imports, numba cache
load included), steady-state items/s (after every slot finished its first item: items / time between
completions), the start-up (run call to the first item's start), and two per-item overheads of the engine:
the **idle gap** (mean time a worker process sits between the end of one of its items and the start of
its next: dispatch, result return, scheduling; from the wall-clock stamps in the sidecars) and the
**end-to-end overhead** ``wall x slots / items - time inside the task`` (start-up amortised in). The
time inside the task is the worker's own read + compute + write + sidecar time. Under load from other
processes the wall times grow, the idle gaps much less: compare ratios measured in the same run.

    PYTHONPATH=$PWD python scripts/bench_batch.py --json bench_results/batch.json          # ~100 items
    PYTHONPATH=$PWD python scripts/bench_batch.py --quick --json bench_results/batch_quick.json

Prints a Markdown table and writes JSON (every run, medians, machine, versions, load average).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine_info

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MIDDLEBURY = SHARED / "middlebury-gdsr-dev"
NYU = SHARED / "nyuv2-dkn-test"
SCALE = 8
CONFIGS = [  # (engine, workers, threads)
    ("local", 1, 2),
    ("local", 1, 1),
    ("local", 2, 1),
    ("ray", 1, 2),
    ("ray", 1, 1),
    ("ray", 2, 1),
]


def prepare(work: Path) -> tuple[list[dict], list[dict]]:
    """Write the LR / HR PNGs once; return the Middlebury and NYUv2 frame lists (paths per scene)."""
    import numpy as np
    from PIL import Image

    from ua3d.depth.datasets import read_middlebury_gdsr
    from ua3d.depth.protocols import make_lr
    from ua3d.io.rgbd import write_color, write_depth

    mb, nyu = [], []
    if not MIDDLEBURY.is_dir():
        sys.exit(f"Middlebury dev scenes not found at {MIDDLEBURY} (../shared/data beside the checkout)")
    for s in read_middlebury_gdsr(MIDDLEBURY):
        rgb, depth = s.load()
        hr, lr = make_lr(depth, SCALE, "B")
        d = work / "mb" / s.name
        write_color(d / "rgb.png", np.ascontiguousarray(rgb[: hr.shape[0], : hr.shape[1]]))
        write_depth(d / "depth_lr.png", np.clip(lr, 0, 255), depth_scale=100.0)
        write_depth(d / "gt.png", hr, depth_scale=100.0)
        mb.append(
            {
                "name": s.name,
                "rgb": str(d / "rgb.png"),
                "depth": str(d / "depth_lr.png"),
                "gt": str(d / "gt.png"),
                "size": list(hr.shape),
            }
        )
    for f in sorted(NYU.glob("*/depth.npy")) if NYU.is_dir() else []:
        depth = np.load(f).astype(np.float32)
        rgb = np.asarray(Image.open(f.parent / "rgb.jpg").convert("RGB"))
        hr, lr = make_lr(depth, SCALE, "B")
        d = work / "nyu" / f.parent.name
        write_color(d / "rgb.png", np.ascontiguousarray(rgb[: hr.shape[0], : hr.shape[1]]))
        write_depth(d / "depth_lr.png", lr, depth_scale=1000.0)
        nyu.append(
            {
                "name": f.parent.name,
                "rgb": str(d / "rgb.png"),
                "depth": str(d / "depth_lr.png"),
                "size": list(hr.shape),
            }
        )
    return mb, nyu


def manifest(path: Path, frames: list[dict], n: int, depth_scale: float, gt: bool) -> Path:
    rows = []
    for k in range(n):
        f = frames[k % len(frames)]
        row = {"id": f"{f['name']}_{k:03d}", "rgb": f["rgb"], "depth": f["depth"], "depth_scale": depth_scale}
        if gt and "gt" in f:
            row["gt"] = f["gt"]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def measure(man: Path, out: Path, engine: str, workers: int, threads: int) -> dict:
    from ua3d.batch import run

    shutil.rmtree(out, ignore_errors=True)
    t0, t_wall = time.perf_counter(), time.time()
    s = run("depth-sr", man, out=out, engine=engine, workers=workers, threads=threads)
    wall = time.perf_counter() - t0
    if s.failed:
        raise RuntimeError(f"{engine} w{workers} t{threads}: {len(s.failed)} item(s) failed: {s.failed[:2]}")
    sides = [json.loads((out / f"{i}.json").read_text()) for i in s.done]
    n = len(sides)
    inside = [d["timings"]["total_s"] for d in sides]
    compute = [d["timings"]["compute_s"] for d in sides]
    ends = sorted(d["finished_at"] for d in sides)
    slots = workers
    steady_n = n - slots
    window = ends[-1] - ends[slots - 1]
    rmse = [d["metrics"]["rmse"] for d in sides if d.get("metrics")]
    # idle time of a worker process between two of its items: the engine's own per-item cost
    gaps = []
    for pid in {d["pid"] for d in sides}:
        seq = sorted((d for d in sides if d["pid"] == pid), key=lambda d: d["started_at"])
        gaps += [b["started_at"] - a["finished_at"] for a, b in itertools.pairwise(seq)]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "engine": engine,
        "workers": workers,
        "threads": threads,
        "items": n,
        "wall_s": wall,
        "items_per_s": n / wall,
        "steady_items_per_s": steady_n / window if window > 0 else float("nan"),
        "task_s_mean": statistics.mean(inside),
        "task_s_median": statistics.median(inside),
        "compute_s_median": statistics.median(compute),
        "cpu_s_median": statistics.median(d["timings"]["cpu_s"] for d in sides),
        "gap_s_mean": statistics.mean(gaps) if gaps else float("nan"),
        "gap_s_median": statistics.median(gaps) if gaps else float("nan"),
        "startup_s": min(d["started_at"] for d in sides) - t_wall,
        "overhead_s": wall * slots / n - statistics.mean(inside),
        "rmse_mean": statistics.mean(rmse) if rmse else None,
        "load_before": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--items", type=int, default=96, help="Middlebury items per run (default 96 = 8 scenes x 12)"
    )
    ap.add_argument("--nyu-items", type=int, default=12, help="640x480 items for the per-item yardstick")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats of every configuration")
    ap.add_argument(
        "--quick", action="store_true", help="24 items, 6 NYU items, 1 repeat (a noisy first look)"
    )
    ap.add_argument("--no-ray", action="store_true", help="local engine only")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary folder, removed)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.nyu_items, args.repeats = 24, 6, 1
    configs = [c for c in CONFIGS if not (args.no_ray and c[0] == "ray")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ua3d-bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(threads=None, scale=SCALE, items=args.items)
    mb, nyu = prepare(work)
    man = manifest(work / "middlebury.jsonl", mb, args.items, 100.0, gt=True)
    ray_started = None
    if any(c[0] == "ray" for c in configs):
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_started = time.perf_counter() - t
    runs = []
    try:
        for rep in range(args.repeats):
            for engine, w, t in configs:
                r = measure(man, work / "out", engine, w, t)
                r["repeat"] = rep
                runs.append(r)
                print(
                    f"  {engine:5s} w{w} t{t}: {r['items_per_s']:.2f} items/s (steady {r['steady_items_per_s']:.2f}), "
                    f"idle gap {r['gap_s_mean'] * 1000:.1f} ms/item, in-task {r['task_s_median']:.3f} s",
                    file=sys.stderr,
                )
        item640 = None
        if nyu:
            man640 = manifest(work / "nyu.jsonl", nyu, args.nyu_items, 1000.0, gt=False)
            item640 = {c: measure(man640, work / "out640", *c) for c in (("local", 2, 1), ("local", 1, 2))}
    finally:
        if ray_started is not None:
            import ray

            ray.shutdown()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    def med(engine, w, t, key):
        vals = [r[key] for r in runs if (r["engine"], r["workers"], r["threads"]) == (engine, w, t)]
        return statistics.median(vals)

    keys = (
        "items_per_s",
        "steady_items_per_s",
        "overhead_s",
        "gap_s_mean",
        "gap_s_median",
        "startup_s",
        "task_s_median",
        "cpu_s_median",
    )
    table = [
        {k: med(e, w, t, k) for k in keys} | {"engine": e, "workers": w, "threads": t} for e, w, t in configs
    ]
    speedup = {}
    for engine in ("local", "ray"):
        rows = {(r["workers"], r["threads"]): r for r in table if r["engine"] == engine}
        for base in ((1, 2), (1, 1)):
            if (2, 1) in rows and base in rows:
                speedup[f"{engine}: 2x1 vs {base[0]}x{base[1]}"] = {
                    "e2e": rows[(2, 1)]["items_per_s"] / rows[base]["items_per_s"],
                    "steady": rows[(2, 1)]["steady_items_per_s"] / rows[base]["steady_items_per_s"],
                }
    print(
        f"\nDepth SR x{SCALE}, {args.items} Middlebury items (8 scenes ~456x368), {args.repeats} repeat(s) (medians), "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        "\n| engine | workers x threads | items/s | steady items/s | start-up s | idle gap ms/item (median / mean) "
        "| e2e overhead ms/item | in-task s/item | CPU s/item |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['engine']} | {r['workers']} x {r['threads']} | {r['items_per_s']:.2f} | {r['steady_items_per_s']:.2f} "
            f"| {r['startup_s']:.2f} | {r['gap_s_median'] * 1000:.1f} / {r['gap_s_mean'] * 1000:.1f} "
            f"| {r['overhead_s'] * 1000:.0f} | {r['task_s_median']:.3f} | {r['cpu_s_median']:.3f} |"
        )
    print("\n| speed-up (items/s) | end-to-end | steady |\n|---|---|---|")
    for k, v in speedup.items():
        print(f"| {k} | {v['e2e']:.2f}x | {v['steady']:.2f}x |")
    overhead_vs_640 = {}
    if item640:
        for (e, w, t), r in item640.items():
            print(
                f"\n640x480 item ({e}, {w} x {t}): {r['task_s_median']:.3f} s in the task (median; compute "
                f"{r['compute_s_median']:.3f} s, CPU {r['cpu_s_median']:.3f} s)"
            )
        base = item640[("local", 2, 1)]["task_s_median"]
        for r in table:
            key = f"{r['engine']} {r['workers']}x{r['threads']}"
            overhead_vs_640[key] = {
                "gap_pct": 100 * r["gap_s_mean"] / base,
                "e2e_pct": 100 * r["overhead_s"] / base,
            }
            print(
                f"{key}: per-item overhead / 640x480 item (1 thread) = {overhead_vs_640[key]['gap_pct']:.1f} % "
                f"(idle gap), {overhead_vs_640[key]['e2e_pct']:.1f} % (end-to-end, start-up included)"
            )
    result = {
        "benchmark": "bench_batch",
        "machine": machine,
        "ray_init_s": ray_started,
        "runs": runs,
        "table": table,
        "speedup": speedup,
        "item640": {f"{e}_{w}x{t}": r for (e, w, t), r in (item640 or {}).items()},
        "overhead_vs_640": overhead_vs_640,
        "args": vars(args),
        "load_after": os.getloadavg(),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
