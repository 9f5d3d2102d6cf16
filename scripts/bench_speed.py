"""Speed and memory of the Upsample Anything engine: fit (TTO) and render, fast vs reference vs bilinear.

Every case runs in a fresh subprocess so that its peak resident set size (``ru_maxrss``) is its own.
The guide is scikit-image's astronaut photo (512 x 512) resized to the output size (bicubic, so
sizes above 512 are smooth upsamplings: timing does not depend on content); the LR grid is
``size / 16`` (a ViT-S/16-like feature map) and the rendered signal is random ``[1, 384, h, w]``.
float32 on the CPU.

Cases
-----
* ``fast`` at every ``--sizes``: ``ua3d.fit`` (50 steps, the authors' recipe, full radius-8 window)
  and ``Kernel.render`` of 384 channels, each the median of ``--repeats`` runs after a warm-up
  (``--large-repeats`` for sizes >= 2048).
* ``reference`` (pure PyTorch) at 224 only: a few steps timed and extrapolated to 50
  (``steps_run`` says how many), one render of ``--reference-channels`` channels scaled
  linearly to 384 (its cost is linear in the channels; 384 would take minutes).
* ``bilinear``: ``F.interpolate`` of the 384 channels (the trivial baseline).
* ``options`` at 224: each speed option of :class:`ua3d.FitConfig` with its fit time, fit +
  render time and reconstruction PSNR (the fitted kernel renders the LR guide; PSNR against
  the HR guide), averaged over three photos, and the loss against the default full fit.
* ``depth4096``: a 4096 x 4096 guide with a 256 x 256 one-channel (depth) signal, fitted with
  speed options (``DEPTH_4096_CONFIG``) and rendered.

    python scripts/bench_speed.py --json bench_results/speed.json
    python scripts/bench_speed.py --sizes 224,448 --repeats 3 --no-reference --no-depth
    python scripts/bench_speed.py --issue16 --json bench_results/speed_issue16.json  # the rows of issue 16

The last table compares the fast path with issue 16's targets (224 px and 896 px fit + render time, 2048 px
peak memory); the JSON carries it as ``"targets"``.

Prints Markdown tables and writes JSON with the machine, threads, load average and versions.
Timings on a shared machine are noisy: compare the CPU time columns too (``fit_cpu_s``).
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

#: speed options measured at 224 px (FitConfig overrides); "default" is the authors' recipe.
OPTION_CONFIGS: dict[str, dict] = {
    "default": {},
    "pixel_fraction=0.5": {"pixel_fraction": 0.5},
    "pixel_fraction=0.25": {"pixel_fraction": 0.25},
    "pixel_fraction=0.1": {"pixel_fraction": 0.1},
    "adaptive_support=3": {"adaptive_support": 3.0},
    "coarse_to_fine=0.5": {"coarse_to_fine": 0.5, "fine_steps": 10},
    "steps=25": {"steps": 25},
    "radius=4": {"radius": 4.0},
    "pf=0.25+c2f=0.5": {"pixel_fraction": 0.25, "coarse_to_fine": 0.5, "fine_steps": 10},
    "pf=0.25+steps=30": {"pixel_fraction": 0.25, "steps": 30},
    "pf=0.1+c2f=0.5": {"pixel_fraction": 0.1, "coarse_to_fine": 0.5, "fine_steps": 10},
}
#: issue 16's rows: size -> (what, limit) for the fast path at 384 channels, 2 threads
TARGETS: dict[int, tuple[str, float]] = {
    224: ("fit + render (s)", 0.42),
    896: ("fit + render (s)", 5.0),
    2048: ("peak RSS (GB)", 8.0),
}
#: the 4096 px depth case: fit mostly at 1024 px, finish with a random tenth of the pixels.
DEPTH_4096_CONFIG = {"coarse_to_fine": 0.25, "fine_steps": 5, "pixel_fraction": 0.1}
PHOTOS = ("astronaut", "coffee", "chelsea")


# --------------------------------------------------------------------------- worker side
def _photo(name: str, size: int):
    """A scikit-image photo, centre-cropped square, resized to ``size`` (bicubic), ``[1, 3, S, S]`` in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    img = getattr(data, name)()
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    im = Image.fromarray(img).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255.0


def _psnr(a, b) -> float:
    import math

    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-20))


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(fn, repeats: int):
    """``(wall times, cpu times, last result)`` of ``repeats`` calls."""
    walls, cpus, res = [], [], None
    for _ in range(repeats):
        res = None
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus, res


def work_kernel(spec: dict) -> dict:
    """fit + render with ua3d (fast or reference backend)."""
    import torch

    import ua3d

    size, C, backend = spec["size"], spec["channels"], spec["backend"]
    lr = (size // 16, size // 16)
    cfg = ua3d.FitConfig(backend=backend, **spec.get("config", {}))
    guide = _photo(spec.get("photo", "astronaut"), size)
    steps_run = spec.get("steps_run", cfg.steps)
    run_cfg = cfg.replace(steps=steps_run)
    ua3d.fit(guide, lr, run_cfg.replace(steps=min(2, steps_run)))  # warm-up (numba compile / cache load)
    fw, fc, kernel = _timed(lambda: ua3d.fit(guide, lr, run_cfg), spec["repeats_fit"])
    rss_fit = _rss()
    scale = cfg.steps / max(steps_run, 1)
    rec = kernel.render(kernel.guide_lr)
    psnr = _psnr(rec, guide)
    Cr = spec.get("render_channels", C)  # fewer channels, scaled linearly (reference: it is slow)
    feats = torch.randn(1, Cr, *lr, generator=torch.Generator().manual_seed(2))
    out_dtype = getattr(torch, spec.get("out_dtype", "float32"))
    del rec
    if spec["repeats_render"] > 1:
        kernel.render(feats, out_dtype=out_dtype)  # warm-up
    rw, rc, out = _timed(lambda: kernel.render(feats, out_dtype=out_dtype), spec["repeats_render"])
    if out.shape != (1, Cr, size, size):
        raise RuntimeError(f"render returned {tuple(out.shape)}, expected {(1, Cr, size, size)}")
    del out
    rscale = C / Cr
    return {
        "fit_s": statistics.median(fw) * scale,
        "fit_cpu_s": statistics.median(fc) * scale,
        "fit_times_s": fw,
        "steps": cfg.steps,
        "steps_run": steps_run,
        "extrapolated": steps_run != cfg.steps,
        "render_s": statistics.median(rw) * rscale,
        "render_cpu_s": statistics.median(rc) * rscale,
        "render_times_s": rw,
        "render_channels_run": Cr,
        "psnr_db": psnr,
        "rss_after_fit_gib": rss_fit / 2**30,
        "peak_rss_gib": _rss() / 2**30,
    }


def work_bilinear(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    size, C = spec["size"], spec["channels"]
    feats = torch.randn(1, C, size // 16, size // 16, generator=torch.Generator().manual_seed(2))
    F.interpolate(feats, size=(size, size), mode="bilinear", align_corners=False)
    rw, rc, out = _timed(
        lambda: F.interpolate(feats, size=(size, size), mode="bilinear", align_corners=False),
        spec["repeats_render"],
    )
    del out
    return {
        "fit_s": 0.0,
        "fit_cpu_s": 0.0,
        "render_s": statistics.median(rw),
        "render_cpu_s": statistics.median(rc),
        "render_times_s": rw,
        "peak_rss_gib": _rss() / 2**30,
    }


def work_options(spec: dict) -> dict:
    """Every speed option at one size: fit time, fit + render time, PSNR per photo."""
    import torch

    import ua3d
    from ua3d.core.ops import kernel_render

    size, C = spec["size"], spec["channels"]
    lr = (size // 16, size // 16)
    feats = torch.randn(1, C, *lr, generator=torch.Generator().manual_seed(2))
    rows = {}
    for name, over in OPTION_CONFIGS.items():
        cfg = ua3d.FitConfig(**over)
        psnrs, psnrs_cut, fits, totals, cpus = [], [], [], [], []
        for photo in PHOTOS:
            guide = _photo(photo, size)
            ua3d.fit(guide, lr, cfg.replace(steps=2)).render(feats)  # warm-up (compile / cache load)
            fw, fc, k = _timed(lambda guide=guide, cfg=cfg: ua3d.fit(guide, lr, cfg), spec["repeats_fit"])
            rw, _, _ = _timed(lambda k=k: k.render(feats), spec["repeats_fit"])
            fits.append(statistics.median(fw))
            cpus.append(statistics.median(fc))
            totals.append(statistics.median(fw) + statistics.median(rw))
            psnrs.append(_psnr(k.render(k.guide_lr), guide))
            if cfg.adaptive_support is not None:
                rec, _ = kernel_render(
                    k.params,
                    k.guide_hr,
                    k.guide_lr,
                    k.guide_lr,
                    k.radius,
                    support_sigmas=cfg.adaptive_support,
                )
                psnrs_cut.append(_psnr(rec, guide))
        rows[name] = {
            "config": over,
            "fit_s": statistics.median(fits),
            "fit_cpu_s": statistics.median(cpus),
            "fit_render_s": statistics.median(totals),
            "psnr_db": psnrs,
            "psnr_mean_db": sum(psnrs) / len(psnrs),
            "psnr_cut_render_mean_db": (sum(psnrs_cut) / len(psnrs_cut)) if psnrs_cut else None,
        }
    base = rows["default"]["psnr_mean_db"]
    for r in rows.values():
        r["psnr_loss_db"] = base - r["psnr_mean_db"]
    return {"options": rows, "peak_rss_gib": _rss() / 2**30}


WORKERS = {"kernel": work_kernel, "bilinear": work_bilinear, "options": work_options}


# --------------------------------------------------------------------------- driver side
def run_case(spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    done = run_worker(__file__, [json.dumps(spec), "--threads", str(threads)], env=env)
    if not done.ok:
        return {**spec, "error": done.stderr[-2000:], "subprocess_wall_s": done.wall_s}
    return {**spec, **done.record, "subprocess_wall_s": done.wall_s}


def _fmt(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def print_tables(results: list[dict], info: dict) -> None:
    print(
        f"\nua3d speed, {info['cpu']}, {info['threads']} threads, torch {info['torch']}, numba {info['numba']}, "
        f"load average at start {info['load_average'][0]:.1f}\n"
    )
    print(
        "| path | size | LR | C | fit 50 steps (s) | fit CPU (s) | render (s) | fit + render (s) | "
        "peak RSS (GiB) | recon. PSNR (dB) | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.get("kind") == "options":
            continue
        if "error" in r:
            print(
                f"| {r['label']} | {r['size']} | | | error | | | | | | {r['error'].splitlines()[-1][:60]} |"
            )
            continue
        note = []
        if r.get("extrapolated"):
            note.append(f"fit: {r['steps_run']} steps x {r['steps'] / r['steps_run']:.1f}")
        if r.get("render_channels_run", r.get("channels")) != r.get("channels"):
            note.append(
                f"render: {r['render_channels_run']} channels x {r['channels'] / r['render_channels_run']:.0f}"
            )
        if r.get("config"):
            note.append(json.dumps(r["config"]))
        note.append(f"{len(r.get('render_times_s', []))} repeats")
        print(
            f"| {r['label']} | {r['size']} | {r['size'] // 16} | {r['channels']} | {_fmt(r['fit_s'])} "
            f"| {_fmt(r['fit_cpu_s'])} | {_fmt(r['render_s'])} | {_fmt(r['fit_s'] + r['render_s'])} "
            f"| {_fmt(r['peak_rss_gib'])} | {_fmt(r.get('psnr_db'))} | {'; '.join(note)} |"
        )
    for r in results:
        if r.get("kind") != "options" or "error" in r:
            continue
        print(
            f"\nSpeed options at {r['size']} px (LR {r['size'] // 16}, 384-channel render), mean over "
            f"{', '.join(PHOTOS)}:\n"
        )
        print(
            "| option | fit (s) | fit CPU (s) | fit + render (s) | recon. PSNR (dB) | loss vs default (dB) "
            "| PSNR, cut render (dB) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, o in r["options"].items():
            print(
                f"| {name} | {_fmt(o['fit_s'], 3)} | {_fmt(o['fit_cpu_s'], 3)} | {_fmt(o['fit_render_s'], 3)} "
                f"| {_fmt(o['psnr_mean_db'])} | {_fmt(o['psnr_loss_db'])} | {_fmt(o['psnr_cut_render_mean_db'])} |"
            )


def target_rows(results: list[dict]) -> list[dict]:
    """Issue 16's rows (:data:`TARGETS`) from the fast-path results: measured value, limit, met."""
    rows = []
    for r in results:
        if (
            r.get("label") != "fast"
            or r.get("size") not in TARGETS
            or "error" in r
            or r.get("channels") != 384
        ):
            continue
        what, limit = TARGETS[r["size"]]
        value = r["fit_s"] + r["render_s"] if what.startswith("fit") else r["peak_rss_gib"] * 2**30 / 1e9
        rows.append({"size": r["size"], "what": what, "value": value, "limit": limit, "met": value <= limit})
    return rows


def print_targets(rows: list[dict]) -> None:
    if not rows:
        return
    print("\nIssue 16 targets (fast path, 384 channels; times are medians, memory the worker's peak RSS):\n")
    print("| size | what | measured | target | met |")
    print("|---|---|---|---|---|")
    for t in rows:
        print(
            f"| {t['size']} | {t['what']} | {t['value']:.2f} | <= {t['limit']:g} | {'MET' if t['met'] else 'NOT MET'} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="224,448,896,1024,2048", help="comma list of square output sizes")
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--large-repeats", type=int, default=2, help="repeats for sizes >= 2048")
    ap.add_argument("--reference-steps", type=int, default=3, help="reference steps run (extrapolated to 50)")
    ap.add_argument(
        "--reference-channels",
        type=int,
        default=24,
        help="channels the reference renders (time scaled linearly to --channels)",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-options", action="store_true")
    ap.add_argument("--no-depth", action="store_true")
    ap.add_argument("--issue16", action="store_true", help="only issue 16's rows: 224, 896, 2048 px fast")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        import torch

        torch.set_num_threads(args.threads)
        spec = json.loads(args.worker)
        report(WORKERS[spec["kind"]](spec))
        return

    if args.issue16:
        args.sizes, args.no_reference, args.no_options, args.no_depth = "224,896,2048", True, True, True
    sizes = [int(s) for s in args.sizes.split(",") if s]
    specs = []
    for s in sizes:
        reps = args.large_repeats if s >= 2048 else args.repeats
        specs.append(
            {
                "kind": "kernel",
                "label": "fast",
                "backend": "fast",
                "size": s,
                "channels": args.channels,
                "repeats_fit": reps,
                "repeats_render": reps,
            }
        )
        specs.append(
            {
                "kind": "bilinear",
                "label": "bilinear",
                "size": s,
                "channels": args.channels,
                "repeats_render": reps,
            }
        )
    if not args.no_reference and 224 in sizes:
        specs.append(
            {
                "kind": "kernel",
                "label": "reference",
                "backend": "reference",
                "size": 224,
                "channels": args.channels,
                "steps_run": args.reference_steps,
                "repeats_fit": 1,
                "repeats_render": 1,
                "render_channels": args.reference_channels,
            }
        )
    if not args.no_options:
        specs.append(
            {
                "kind": "options",
                "label": "options",
                "size": 224,
                "channels": args.channels,
                "repeats_fit": max(1, min(args.repeats, 3)),
            }
        )
    if not args.no_depth:
        specs.append(
            {
                "kind": "kernel",
                "label": "fast (depth)",
                "backend": "fast",
                "size": 4096,
                "channels": 1,
                "config": DEPTH_4096_CONFIG,
                "repeats_fit": 1,
                "repeats_render": 1,
            }
        )
    results = []
    for spec in specs:
        print(f"running {spec['label']} {spec['size']} ...", file=sys.stderr, flush=True)
        results.append(run_case(spec, args.threads))
    info = machine_info(args.threads, dtype="float32")
    print_tables(results, info)
    targets = target_rows(results)
    print_targets(targets)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "results": results, "targets": targets}, indent=2))
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
