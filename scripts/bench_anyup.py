"""Benchmark ua3d's AnyUp (fused strip encoders + tiled window attention): time and peak memory.

Each case runs in a fresh subprocess so that its peak resident set size (``ru_maxrss``) is its
own.  Weights are **random** (``torch.manual_seed(0)``; AnyUp's cost does not depend on the weight
values, except that extreme softmax inputs would be slow without ua3d's softmax floor), features
are random ``[1, C, h, w]``, the guide is scikit-image's astronaut photo resized to the output size
(or random noise with ``--guide random``).  float32 on the CPU, ``anyup()`` (no autograd).  Wall
time and process CPU time are both reported: on a shared, busy machine the CPU time is the
steadier.  ``--stages`` adds one more forward split into encoders (+ query projection) and
attention.

The default is **one thread** (it used to be all cores): on a 2-core machine whose other core is
busy, two OpenMP threads mostly wait for each other.  The 1024 px case of the previous
implementation took 351 s with the old default on a loaded machine and 42 s with one thread.

    python scripts/bench_anyup.py --json bench_results/anyup.json
    python scripts/bench_anyup.py --cases 32:512,64:1024 --repeats 3 --stages

Prints a Markdown table and writes JSON with the machine, thread count and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from _machine import machine_info
from _worker import report, run_worker


def _make_guide(size: int, kind: str):
    import torch
    import torch.nn.functional as F

    if kind == "skimage":
        try:
            from skimage import data

            img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255.0
            return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
        except ImportError:
            pass
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def worker(args: argparse.Namespace) -> None:
    """Run one case in this process and print one JSON line."""
    import torch

    from ua3d.baselines.anyup import AnyUp, anyup

    torch.set_num_threads(args.threads)
    lr, out = args.worker
    torch.manual_seed(0)
    kwargs = {} if args.budget_mib is None else {"tile_budget_bytes": int(args.budget_mib * 2**20)}
    model = AnyUp(**kwargs).eval()
    guide = _make_guide(out, args.guide)
    feats = torch.randn(1, args.channels, lr, lr, generator=torch.Generator().manual_seed(2))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        y = anyup(guide, feats, model=model)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if y.shape != (1, args.channels, out, out):
            raise RuntimeError(f"anyup returned {tuple(y.shape)}, expected {(1, args.channels, out, out)}")
        del y
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stages = {}
    if args.stages:
        from ua3d.baselines.anyup import IMAGENET_MEAN, IMAGENET_STD

        normed = (guide - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
            1, 3, 1, 1
        )
        with torch.no_grad():
            c0 = time.process_time()
            qp, k = model._attention_inputs(normed, feats, (out, out))
            c1 = time.process_time()
            model._attend_projected(qp, k, feats, None, None)
            c2 = time.process_time()
        stages = {"encode_cpu_s": c1 - c0, "attention_cpu_s": c2 - c1}
    report(
        {
            "times_s": times,
            "cpu_s": cpu,
            "peak_rss_bytes": peak,
            "rss_before_forward_bytes": rss_before,
            **stages,
        }
    )


def run_case(lr: int, out: int, repeats: int, args: argparse.Namespace) -> dict:
    cmd = [
        str(lr),
        str(out),
        "--repeats",
        str(repeats),
        "--channels",
        str(args.channels),
        "--threads",
        str(args.threads),
        "--guide",
        args.guide,
    ]
    if args.budget_mib is not None:
        cmd += ["--budget-mib", str(args.budget_mib)]
    if args.stages:
        cmd += ["--stages"]
    load_before = os.getloadavg()
    done = run_worker(__file__, cmd)
    if not done.ok:
        raise RuntimeError(f"case {lr}->{out} failed:\n{done.stderr[-3000:]}")
    res, wall = done.record, done.wall_s
    out_bytes = 4 * args.channels * out * out
    return {
        "lr": lr,
        "out": out,
        "channels": args.channels,
        "repeats": repeats,
        "median_s": statistics.median(res["times_s"]),
        "times_s": res["times_s"],
        "median_cpu_s": statistics.median(res["cpu_s"]),
        "cpu_s": res["cpu_s"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "peak_rss_gib": res["peak_rss_bytes"] / 2**30,
        "rss_before_forward_gib": res["rss_before_forward_bytes"] / 2**30,
        "output_tensor_gib": out_bytes / 2**30,
        "subprocess_wall_s": wall,
        **{key: res[key] for key in ("encode_cpu_s", "attention_cpu_s") if key in res},
    }


def _write_json(path: Path, info: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": info, "results": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="64:1024,128:2048", help="comma list of LR:OUT square sizes")
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median reported)")
    ap.add_argument("--large-repeats", type=int, default=1, help="repeats for cases with OUT >= 2048")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    ap.add_argument("--guide", choices=["skimage", "random"], default="skimage")
    ap.add_argument("--budget-mib", type=float, default=None, help="attention tile budget (MiB)")
    ap.add_argument("--stages", action="store_true", help="also time encoders and attention separately")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--worker", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args)
        return

    rows = []
    for spec in args.cases.split(","):
        lr, out = (int(v) for v in spec.split(":"))
        reps = args.large_repeats if out >= 2048 else args.repeats
        print(f"running {lr}x{lr} -> {out}x{out}, C={args.channels}, {reps} repeat(s) ...", file=sys.stderr)
        rows.append(run_case(lr, out, reps, args))
        if args.json is not None:  # after every case, so a long run that gets cut keeps its results
            _write_json(
                args.json,
                machine_info(args.threads, dtype="float32", weights="random (torch.manual_seed(0))"),
                rows,
            )

    info = machine_info(args.threads, dtype="float32", weights="random (torch.manual_seed(0))")
    print(
        f"\nAnyUp (ua3d, fused encoders + tiled window attention), {info['cpu']}, {args.threads} threads, torch {info['torch']}, "
        f"float32, random weights, guide={args.guide}\n"
    )
    print(
        "| LR -> output | C | repeats | median wall (s) | median CPU (s) | peak RSS (GiB) "
        "| RSS before forward (GiB) | output tensor (GiB) | load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['lr']}² -> {r['out']}² | {r['channels']} | {r['repeats']} | {r['median_s']:.1f} "
            f"| {r['median_cpu_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['rss_before_forward_gib']:.2f} "
            f"| {r['output_tensor_gib']:.2f} | {r['load_average_before'][0]:.1f} |"
        )
    if args.stages:
        print("\n| LR -> output | encoders + query projection, CPU (s) | attention, CPU (s) |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['lr']}² -> {r['out']}² | {r['encode_cpu_s']:.1f} | {r['attention_cpu_s']:.1f} |")
    print("\nCPU = process CPU time (all threads); on a busy machine wall time mostly measures the load.")
    if args.json is not None:
        _write_json(args.json, info, rows)
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
