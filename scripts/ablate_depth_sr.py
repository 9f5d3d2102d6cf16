#!/usr/bin/env python
"""Ablation of the ua3d guided depth super-resolution method (``ua3d.depth.sr.upsample_depth``).

Every variant is registered as a method of the evaluation harness (:mod:`ua3d.depth.evaluate`), so the
scores follow the literature conventions (Middlebury GDSR: RMSE in 0-255, no crop, prediction clipped to
[0, 255]; NYUv2: RMSE in cm, 6-px border crop) and the chosen LR protocol (default B: PIL bicubic
downsampling; the real sensor sets default to ``area``, park2011 to its own noisy inputs). Prints one
Markdown table per dataset and metric (mean of per-image values per scale per variant, with the
baselines) and writes JSON (per image, means, settings, versions). Figures: ``docs/depth_sr.md``.

Variants (options of :class:`ua3d.depth.sr.DepthSRConfig`; the rest at their defaults). ``matched`` is the
forward model that generated the LR depth (A: point end, A-start: point start, B: bicubic, area: area;
park2011: auto), i.e. an oracle choice:

* ``render``: the start kernel renders the LR depth: no consistency solve, no fit.
* ``rgbfit`` / ``rgbfit+solve``: the 2D recipe (fit the kernel to the colour guide, 50 steps), without /
  with the matched solve.
* ``solve`` / ``richardson``: start kernel + matched solve (GMRES / back-projection, 4 iterations), no fit.
* ``matched``: solve, depth fit, solve with the matched forward model (the round-1 method given the truth).
* ``bicubic-model``: the round-1 default (always the bicubic forward model) with the new bound.
* ``ua3d``: the default (``consistency="auto"``: cross-validated forward model, local bound).
* ``no-bound``, ``global-bound``: the default without the output bound / with the global bound.
* ``huber``, ``tukey``: the default with robust weights.
* ``fast``: the :data:`ua3d.depth.sr.FAST` preset; ``r2`` / ``r3``: window radius 2 (round 2) / 3 (default
  since round 3); ``iters6``: 6 solver iterations; ``fit10``: 10 fit steps.
* round 3: ``sr0.6`` / ``sr1.2`` / ``sr2.4`` / ``nocolour`` (fixed colour sigma; 100 = no colour term),
  ``noisy-none`` (no consistency solve), ``iters1`` / ``iters2``, ``ns2.5`` / ``ns2.5-r3`` (noisy spatial
  sigma 2.5), ``rounds1`` / ``rounds3`` (one / three fit + solve rounds; the default is 2),
  ``round2-default`` (the round-2 default: radius 2, one round, no guided-filter stage), ``no-post`` (no guided-filter stage on noisy
  input), ``post-r1`` / ``post-e4`` (its radius 1 LR cell / eps 1e-4).
* session 3: ``no-blend`` (``colour_blend=0``: the round-3 default), ``blend-all`` (share 0.5 of the
  colour-free solution on every image and scale), ``blend0.25`` / ``blend0.75`` (other shares, every
  image and scale), ``multiscale`` (x16 as two x4 stages, x8 as x4 then x2: the first stage with the
  guide area-resized to the intermediate size), ``ss0.5`` / ``ss1.0`` (start spatial sigma 0.5 / 1.0 LR
  cells; default 0.7), ``r4`` (window radius 4).

Examples::

    python scripts/ablate_depth_sr.py --datasets middlebury-gdsr,nyuv2 --json bench_results/ablate_B.json
    python scripts/ablate_depth_sr.py --protocol A --variants render,matched,ua3d
    python scripts/ablate_depth_sr.py --datasets redwood,tum,sunrgbd,nyu-raw,park2011 --protocol default \
        --variants ua3d,huber,tukey --metrics rmse,edge_rmse
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ua3d.depth.evaluate import EVAL_PROTOCOLS, SENSOR_DATASETS, evaluate, register_method
from ua3d.depth.sr import FAST, upsample_depth

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {
    "middlebury-gdsr": DATA / "middlebury-gdsr-dev",
    "nyuv2": DATA / "nyuv2-dkn-test",
    "park2011": DATA / "middlebury-park2011-noisy",
    "redwood": DATA / "redwood-open3d" / "sample5",
    "tum": DATA / "tum-open3d",
    "sunrgbd": DATA / "sunrgbd-open3d",
    "nyu-raw": DATA / "nyuv2-raw-open3d",
}
BASELINES = ("bicubic", "jbu", "guided")
M = "matched"
VARIANTS: dict[str, dict] = {
    "render": {"consistency": "none", "fit_steps": 0},
    "rgbfit": {"consistency": "none", "fit_target": "rgb", "fit_steps": 50},
    "rgbfit+solve": {"consistency": M, "fit_target": "rgb", "fit_steps": 50},
    "solve": {"consistency": M, "fit_steps": 0},
    "richardson": {"consistency": M, "fit_steps": 0, "solver": "richardson"},
    "matched": {"consistency": M},
    "bicubic-model": {"consistency": "bicubic"},
    "ua3d": {},
    "no-bound": {"bound": "none"},
    "global-bound": {"bound": "global"},
    "huber": {"robust": "huber"},
    "tukey": {"robust": "tukey"},
    "fast": FAST.to_dict(),
    "r2": {"radius": 2.0},
    "r3": {"radius": 3.0},
    "iters6": {"iters": 6},
    "fit10": {"fit_steps": 10},
    # round 3: colour trust (TUM) and noise (Park)
    "sr0.6": {"sigma_range": 0.6},
    "sr1.2": {"sigma_range": 1.2},
    "sr2.4": {"sigma_range": 2.4},
    "nocolour": {"sigma_range": 100.0},
    "noisy-none": {"consistency": "none"},
    "iters2": {"iters": 2},
    "iters1": {"iters": 1},
    "ns2.5": {"noisy_sigma_spatial": 2.5},
    "ns2.5-r3": {"noisy_sigma_spatial": 2.5, "radius": 3.0},
    "rounds1": {"fit_rounds": 1},
    "rounds3": {"fit_rounds": 3},
    "round2-default": {"radius": 2.0, "fit_rounds": 1, "post_filter": "none"},
    "no-post": {"post_filter": "none"},
    "post-r1": {"post_radius": 1.0},
    "post-e4": {"post_eps": 1e-4},
    # session 3: the colour-free blend (default "auto": share 0.5 at scales >= 12 for LR depth with holes)
    "no-blend": {"colour_blend": 0.0},
    "blend-all": {"colour_blend": 0.5},
    "blend0.25": {"colour_blend": 0.25},
    "blend0.75": {"colour_blend": 0.75},
    "multiscale": {"multiscale": True},
    "ss0.5": {"sigma_spatial": 0.5},
    "ss1.0": {"sigma_spatial": 1.0},
    "r4": {"radius": 4.0},
}

#: the forward model that generated each protocol's LR depth (the oracle choice of ``matched``)
MATCHED = {
    "A": {"consistency": "point", "interval_phase": "end"},
    "A-start": {"consistency": "point", "interval_phase": "start"},
    "B": {"consistency": "bicubic"},
    "area": {"consistency": "area"},
    "given": {"consistency": "auto"},
}


def _variant(options: dict, protocol: str):
    if options.get("consistency") == M:
        options = {**options, **MATCHED[protocol]}

    if options.get("multiscale"):
        rest = {k: v for k, v in options.items() if k != "multiscale"}

        def staged(depth_lr, guide_hr, *, mask_lr=None, **kw):
            return _multiscale(depth_lr, guide_hr, mask_lr, {**rest, **kw})

        staged.accepts_confidence = True
        return staged

    def method(depth_lr, guide_hr, *, mask_lr=None, **kw):
        return upsample_depth(depth_lr, guide_hr, mask_lr=mask_lr, **{**options, **kw})

    method.accepts_confidence = True
    return method


def _multiscale(depth_lr, guide_hr, mask_lr, options: dict):
    """Two stages: up by 4 with the guide area-resized to that size, then the rest with the full guide."""
    from ua3d.core.kernel import resample_guide

    h, w = depth_lr.shape[-2:]
    H, W = guide_hr.shape[-2:]
    s = max(H / h, W / w)
    if s <= 4 or "confidence" in options:
        return upsample_depth(depth_lr, guide_hr, mask_lr=mask_lr, **options)
    mid = (h * 4, w * 4)
    d_mid = upsample_depth(depth_lr, resample_guide(guide_hr, mid, "area"), mask_lr=mask_lr, **options)
    return upsample_depth(torch.nan_to_num(d_mid), guide_hr, **options)


def _protocol(arg: str, dataset: str) -> str:
    if arg != "default":
        return arg
    return "given" if dataset == "park2011" else "area" if dataset in SENSOR_DATASETS else "B"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: middlebury-gdsr,nyuv2")
    ap.add_argument("--scales", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}"
    )
    ap.add_argument(
        "--baselines", default=",".join(BASELINES), help="comma-separated harness methods ('' = none)"
    )
    ap.add_argument(
        "--protocol",
        choices=[*EVAL_PROTOCOLS, "default"],
        default="default",
        help="LR generation (default: B for middlebury-gdsr / nyuv2, area for the sensor frames, "
        "given for park2011); 'matched' variants use the model that generated it",
    )
    ap.add_argument(
        "--metrics", default="rmse,edge_rmse", help="tables printed (all metrics are in the JSON)"
    )
    ap.add_argument("--limit", type=int, default=None, help="first N images per dataset")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="bench_results/ablate_depth_sr.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    methods = [b for b in args.baselines.split(",") if b] + variants
    out = {"protocol": args.protocol, "variants": {v: VARIANTS[v] for v in variants}, "results": {}}
    tables = []
    for ds in [d for d in args.datasets.split(",") if d]:
        if ds not in DATASETS:
            raise SystemExit(f"unknown dataset {ds!r}; known: {list(DATASETS)}")
        if not DATASETS[ds].is_dir():
            raise SystemExit(
                f"dataset folder {DATASETS[ds]} not found (expected ../shared/data beside the checkout)"
            )
        protocol = _protocol(args.protocol, ds)
        for name in variants:
            register_method(name, _variant(VARIANTS[name], protocol))
        scales = [s for s in args.scales if ds != "park2011" or s in (2, 4, 8, 16)]
        t0 = time.perf_counter()
        res = evaluate(
            ds,
            DATASETS[ds],
            scales,
            protocol,
            methods,
            limit=args.limit,
            progress=False,
            verbose=False,
            metrics=args.metrics,
        )
        res["wall_s"] = time.perf_counter() - t0
        out["results"][ds] = res
        tables.append(res["table"])
        print(res["table"], "\n", flush=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
