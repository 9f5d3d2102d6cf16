"""Benchmark :func:`ua3d.rgbd.volume.render_volume` and :func:`ua3d.rgbd.points.render_points` on a 640x480 RGB-D frame.

Renders 64-channel LR features (a 30x40 grid, 16x smaller) into a volume of 64 depth bins with the
fused engine (``backend="fast"``, :mod:`ua3d.core.fast_volume`) and, for an A/B, the tensor
reference (``backend="reference"``), run *alternately* (reference, fast, reference, fast, ...) so
that both see the same machine load; then the pixel point cloud of the same frame
(``render_points``, 64 channels). Every measurement runs in a fresh worker process (its own peak
RSS, no warm caches from another run; numba kernels load from the on-disk cache), with
``--threads`` torch / engine threads.

Per row: the memory estimate made before allocating, the median wall time and the median CPU time
(``time.process_time``: all threads of the worker; the better figure on a shared machine), the peak
resident memory above the worker's baseline (sampled every 5 ms) and, for the volume, the physical
bound: ``pairs`` (pixel, bin, in-grid neighbour) x ``2 C`` flops of the contraction at the CPU's
FMA peak (``--peak-gflops`` per core, default 2 FMA units x 16 float32 lanes x 2 flops x 2.6 GHz)
plus one ``exp`` per pair. The table ends with the reference / fast ratios of wall and CPU time.

The frame is the first Redwood frame of ``../shared/data/redwood-open3d/sample5`` when present,
otherwise a synthetic scene (:func:`ua3d.rgbd.synthetic.make_scene`). The kernel is fitted with
``--steps`` TTO steps (default 0: the render cost does not depend on the fitted values).

Usage::

    python scripts/bench_volume.py --json bench_results/bench_volume.json
    python scripts/bench_volume.py --modes f16,band,memmap --backends fast --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "redwood-open3d" / "sample5"
MODES = {
    "f16": {"out_dtype": "float16"},
    "f32": {"out_dtype": "float32"},
    "band": {"out_dtype": "float16", "band": 4},
    "memmap": {"out_dtype": "float16", "out": "memmap"},
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
    import numpy as np

    if DATA.is_dir() and (width, height) == (640, 480):
        from ua3d.io.rgbd import read_color, read_depth, read_intrinsics

        rgb = read_color(DATA / "color" / "00000.jpg")
        depth = read_depth(DATA / "depth" / "00000.png")
        return rgb, depth, read_intrinsics(DATA / "camera_primesense.json"), "redwood sample5/00000"
    from ua3d.rgbd.synthetic import make_scene

    s = make_scene(0, width, height, holes=4)
    return (s["rgb"] * 255).round().astype(np.uint8), s["depth"], s["camera"], "synthetic seed 0"


def _pairs(H: int, W: int, h: int, w: int, radius: float, n_bins: int) -> int:
    """(pixel, computed bin, in-grid neighbour) pairs of one volume render."""
    import numpy as np

    from ua3d.core.kernel import nearest_anchor, window_offsets

    offs = window_offsets(radius).numpy()
    ay, ax = nearest_anchor(H, h).numpy(), nearest_anchor(W, w).numpy()
    iy = ay[:, None] + offs[None, :, 0]
    jx = ax[:, None] + offs[None, :, 1]
    oky = ((iy >= 0) & (iy < h)).astype(np.int64)  # [H, K]
    okx = ((jx >= 0) & (jx < w)).astype(np.int64)  # [W, K]
    return int(np.einsum("yk,xk->", oky, okx)) * n_bins


# --------------------------------------------------------------------------- worker side
def work(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from ua3d.core.tto import FitConfig
    from ua3d.rgbd.lift import fit_rgbd
    from ua3d.rgbd.points import render_points
    from ua3d.rgbd.volume import estimate_volume_bytes, render_volume

    rgb, depth, camera, name = load_frame(spec["width"], spec["height"])
    H, W = depth.shape
    lr = (H // spec["scale"], W // spec["scale"])
    lifted = fit_rgbd(rgb, depth, camera, lr, FitConfig(steps=spec["steps"], radius=spec["radius"]))
    feats = torch.randn(1, spec["channels"], *lr, generator=torch.Generator().manual_seed(0))
    out = {"frame": name, "size": [H, W], "lr_size": list(lr)}
    if spec["what"] == "points":
        render_points(lifted, feats[:, :, :, :])  # warm-up (numba cache load, first-touch of buffers)
        with PeakRSS() as peak:
            t0, c0 = time.perf_counter(), time.process_time()
            pc = render_points(lifted, feats)
            out.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, points=len(pc))
        out["peak_rss_bytes"] = peak.peak
        return out
    mode = MODES[spec["mode"]]
    dt = getattr(torch, mode["out_dtype"])
    kw = {
        "out_dtype": dt,
        "band": mode.get("band"),
        "depth_model": spec["depth_model"],
        "backend": spec["backend"],
    }
    est = estimate_volume_bytes(
        spec["channels"],
        spec["bins"],
        (H, W),
        dt,
        band=mode.get("band"),
        radius=spec["radius"],
        lr_size=lr,
        on_disk="out" in mode,
        backend=spec["backend"],
    )
    render_volume(lifted, feats[:, :1], bins=2, backend=spec["backend"])  # warm-up: kernels, pools
    with tempfile.TemporaryDirectory(dir=spec.get("tmpdir")) as tmp:
        if "out" in mode:
            kw["out"] = str(Path(tmp) / "volume.npy")
        with PeakRSS() as peak:
            t0, c0 = time.perf_counter(), time.process_time()
            vol, mass, _ = render_volume(lifted, feats, bins=spec["bins"], **kw)
            out.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
        del vol, mass
    n_bins = spec["bins"] if mode.get("band") is None else min(spec["bins"], 2 * mode["band"] + 1)
    pairs = _pairs(H, W, *lr, spec["radius"], n_bins)
    out.update(
        peak_rss_bytes=peak.peak,
        estimate_ram_bytes=est.memory,
        estimate_volume_bytes=est.volume,
        pairs=pairs,
        contraction_flops=2 * spec["channels"] * pairs,
    )
    return out


# --------------------------------------------------------------------------- driver side
def run_worker(spec: dict) -> dict:
    env = dict(
        os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=str(Path(__file__).resolve().parents[1])
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    keys = ("wall_s", "cpu_s", "peak_rss_bytes")
    s = {f"median_{k}": statistics.median(r[k] for r in runs) for k in keys[:2]}
    s["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    s["wall_times_s"] = [r["wall_s"] for r in runs]
    s["cpu_times_s"] = [r["cpu_s"] for r in runs]
    for k in ("estimate_ram_bytes", "estimate_volume_bytes", "pairs", "contraction_flops", "points"):
        if k in runs[0]:
            s[k] = runs[0][k]
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--bins", type=int, default=64)
    ap.add_argument("--scale", type=int, default=16, help="HR / LR size ratio of the feature grid")
    ap.add_argument("--radius", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--modes", default="f16", help=f"comma list of {sorted(MODES)}")
    ap.add_argument("--backends", default="reference,fast", help="comma list; run alternately per repeat")
    ap.add_argument("--reference-repeats", type=int, default=1, help="repeats of the (slow) reference")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-points", action="store_true", help="skip the render_points row")
    ap.add_argument("--depth-model", default="planar", choices=["planar", "constant"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-gflops", type=float, default=2 * 16 * 2 * 2.6, help="float32 GFLOP/s per core")
    ap.add_argument("--json", default="bench_results/bench_volume.json")
    ap.add_argument("--tmpdir", default=None, help="folder for the memmap mode's temporary .npy")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(work(json.loads(args.worker))))
        return

    from _machine import machine_info

    info = machine_info(args.threads)
    base = {
        "width": args.width,
        "height": args.height,
        "channels": args.channels,
        "bins": args.bins,
        "scale": args.scale,
        "radius": args.radius,
        "steps": args.steps,
        "depth_model": args.depth_model,
        "threads": args.threads,
        "tmpdir": args.tmpdir,
    }
    backends = [b for b in args.backends.split(",") if b]
    rows = []
    for mode in [m for m in args.modes.split(",") if m]:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {sorted(MODES)}")
        runs: dict[str, list[dict]] = {b: [] for b in backends}
        for r in range(args.repeats):  # alternate: both backends see the same load
            for b in backends:
                if b == "reference" and r >= args.reference_repeats:
                    continue
                res = run_worker({**base, "what": "volume", "mode": mode, "backend": b})
                print(
                    f"  {mode} {b}: wall {res['wall_s']:.1f} s, cpu {res['cpu_s']:.1f} s, "
                    f"peak {res['peak_rss_bytes'] / 2**30:.2f} GiB",
                    flush=True,
                )
                runs[b].append(res)
        for b in backends:
            rows.append(
                {"what": "render_volume", "mode": mode, "backend": b, **MODES[mode], **_summary(runs[b])}
            )
    if not args.no_points:
        pts = [run_worker({**base, "what": "points", "backend": "auto"}) for _ in range(args.repeats)]
        rows.append({"what": "render_points", "mode": "pixels", "backend": "auto", **_summary(pts)})

    gib = 2.0**30
    print(
        f"\nrender_volume / render_points, {args.width}x{args.height}, {args.channels} channels, {args.bins} bins, "
        f"radius {args.radius}, {args.threads} threads, {info['cpu']}, load average at start "
        f"{info['load_average'][0]:.1f} (measured under load: wall times inflated, CPU times the better guide)\n"
    )
    print(
        "| what | mode | backend | est RAM GiB | peak RSS GiB | wall s (median) | CPU s (median) | bound s | runs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bound = None
        if "pairs" in r:  # contraction at FMA peak on all threads, plus exp at ~1 per lane-cycle / 16 lanes
            bound = r["contraction_flops"] / (args.peak_gflops * 1e9 * args.threads)
            r["bound_s"] = bound
        est = r.get("estimate_ram_bytes")
        print(
            f"| {r['what']} | {r['mode']} | {r['backend']} | {'-' if est is None else f'{est / gib:.2f}'} | "
            f"{r['peak_rss_bytes'] / gib:.2f} | {r['median_wall_s']:.2f} | {r['median_cpu_s']:.2f} | "
            f"{'-' if bound is None else f'{bound:.2f}'} | {len(r['wall_times_s'])} |"
        )
    ratios = {}
    for mode in {r["mode"] for r in rows if r["what"] == "render_volume"}:
        by = {r["backend"]: r for r in rows if r["what"] == "render_volume" and r["mode"] == mode}
        if "reference" in by and "fast" in by:
            ratios[mode] = {
                "wall": by["reference"]["median_wall_s"] / by["fast"]["median_wall_s"],
                "cpu": by["reference"]["median_cpu_s"] / by["fast"]["median_cpu_s"],
            }
            print(
                f"\n{mode}: reference / fast = {ratios[mode]['wall']:.1f}x wall, {ratios[mode]['cpu']:.1f}x CPU "
                "(alternate runs, same window)"
            )
    report = {
        "benchmark": "render_volume",
        "config": base,
        "results": rows,
        "ratios": ratios,
        "peak_gflops_per_core": args.peak_gflops,
        "machine": info,
        "load_average_end": os.getloadavg(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
