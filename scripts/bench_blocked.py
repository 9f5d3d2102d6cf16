"""CPU speed of the blocked torch engine (``ua3d.core.blocked``) against the reference and the fast engine.

For information only: the blocked engine exists for CUDA devices (``backend="auto"`` picks it for
non-CPU tensors); on CPU the fused numba engine is the fast path. Per engine and size, in a fresh
worker process each: one TTO loss + gradient call (one fit step, RGB guide, random parameters) and one
render of ``--channels`` random LR channels, float32, the median of ``--repeats`` runs after a warm-up,
with CPU time (``time.process_time``, all threads) and the worker's peak RSS. The LR grid is
``size / 16`` and the window radius 8 (the paper's 197 neighbours).

    python scripts/bench_blocked.py --json bench_results/blocked.json
    python scripts/bench_blocked.py --sizes 224 --channels 64 --repeats 3 --threads 2

Prints a Markdown table and writes JSON with the machine, threads, load average and versions.
With ``--device cuda`` (where there is one) the blocked engine runs on that device and the others
stay on CPU.
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

ENGINES = ("reference", "blocked", "fast")


def _worker(spec: dict) -> None:
    import torch

    from ua3d.core import ops
    from ua3d.core.kernel import init_params, resample_guide

    torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"] if spec["engine"] == "blocked" else "cpu")
    n, C, radius = spec["size"], spec["channels"], 8.0
    h = w = n // 16
    g = torch.Generator().manual_seed(0)
    guide = torch.rand(1, 3, n, n, generator=g)
    guide_lr = resample_guide(guide, (h, w))
    params = init_params(1, (h, w), (n, n)) + 0.1 * torch.randn(1, 4, h, w, generator=g)
    signal = torch.randn(1, C, h, w, generator=g)
    guide, guide_lr, params, signal = (t.to(dev) for t in (guide, guide_lr, params, signal))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn):
        fn()  # warm-up (numba compile or load, allocator)
        sync()
        walls, cpus = [], []
        for _ in range(spec["repeats"]):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        return statistics.median(walls), statistics.median(cpus)

    fit = lambda: ops.kernel_fit_loss_grad(params, guide, guide_lr, radius, backend=spec["engine"])
    render = lambda: ops.kernel_render(params, guide, guide_lr, signal, radius, backend=spec["engine"])
    fit_s, fit_cpu = timed(fit)
    ren_s, ren_cpu = timed(render)
    report(
        {
            **spec,
            "fit_step_s": fit_s,
            "fit_step_cpu_s": fit_cpu,
            "render_s": ren_s,
            "render_cpu_s": ren_cpu,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="224,448", help="output sizes (square), comma separated")
    ap.add_argument("--channels", type=int, default=64, help="rendered channels (default 64)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {ENGINES}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="device of the blocked engine (cpu or cuda)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    info = machine_info(args.threads)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for engine in args.engines.split(","):  # engines alternate within each size (one load window)
            spec = dict(engine=engine, size=size, channels=args.channels, repeats=args.repeats)
            spec.update(threads=args.threads, device=args.device)
            done = run_worker(__file__, [json.dumps(spec)], env=env)
            if not done.ok:
                print(f"{engine} {size}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(done.record)
    print(
        f"\nblocked engine vs reference and fast, float32, radius 8, {args.channels} channels, {args.threads} threads"
    )
    print("| size | engine | device | fit step s | fit step CPU s | render s | render CPU s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        dev = r["device"] if r["engine"] == "blocked" else "cpu"
        print(
            f"| {r['size']} | {r['engine']} | {dev} | {r['fit_step_s']:.3f} | {r['fit_step_cpu_s']:.3f} | "
            f"{r['render_s']:.3f} | {r['render_cpu_s']:.3f} | {r['peak_rss_gib']:.2f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
