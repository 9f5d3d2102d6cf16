#!/usr/bin/env python
"""Ablation of the ua3d guided depth super-resolution method (``ua3d.depth.sr.upsample_depth``).

Every variant is registered as a method of the evaluation harness (:mod:`ua3d.depth.evaluate`), so the
scores follow the literature conventions (Middlebury GDSR: RMSE in 0-255, no crop, prediction clipped to
[0, 255]; NYUv2: RMSE in cm, 6-px border crop) and protocol B LR generation (PIL bicubic downsampling of the
HR depth cropped to a multiple of the scale). Prints one Markdown table per dataset (mean of per-image RMSE
per scale per variant, with the baselines) and writes JSON (per image, means, settings, versions).

Variants (options of :class:`ua3d.depth.sr.DepthSRConfig`; the rest at their defaults):

* ``render``: the start kernel (sigma 0.7 LR cells, colour sigma 0.3, radius 2) renders the LR depth: no
  consistency solve, no fit.
* ``rgbfit``: the 2D recipe: fit the kernel to reconstruct the colour guide (50 steps), render the LR depth.
* ``rgbfit+solve``: the same fit, then the consistency solve.
* ``solve``: start kernel + consistency solve (GMRES, 4 iterations), no fit.
* ``richardson``: start kernel + 4 steps of iterative back-projection instead of GMRES, no fit.
* ``ua3d``: the default: solve, self-supervised depth fit (5 steps), solve again.
* ``ua3d-fast``: the :data:`ua3d.depth.sr.FAST` preset (3 iterations, 3 fit steps).
* ``ua3d-r3``: the default with a window radius of 3 LR cells (29 neighbours instead of 13).

``--protocol A`` (interval sampling) switches the variants' consistency model to ``"interval"``: the
default bicubic model is wrong for point-sampled LR depth and then loses to bicubic upsampling.

Example (the command behind the issue-8 tables)::

    python scripts/ablate_depth_sr.py --json out/ablate_depth_sr.json
    python scripts/ablate_depth_sr.py --datasets nyuv2 --scales 8 --variants solve,ua3d --limit 1
    python scripts/ablate_depth_sr.py --protocol A --variants render,ua3d --json out/ablate_depth_sr_A.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ua3d.depth.evaluate import evaluate, register_method
from ua3d.depth.sr import FAST, upsample_depth

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {"middlebury-gdsr": DATA / "middlebury-gdsr-dev", "nyuv2": DATA / "nyuv2-dkn-test"}
BASELINES = ("bicubic", "jbu", "guided")
VARIANTS: dict[str, dict] = {
    "render": {"consistency": "none", "fit_steps": 0},
    "rgbfit": {"consistency": "none", "fit_target": "rgb", "fit_steps": 50},
    "rgbfit+solve": {"fit_target": "rgb", "fit_steps": 50},
    "solve": {"fit_steps": 0},
    "richardson": {"fit_steps": 0, "solver": "richardson"},
    "ua3d": {},
    "ua3d-fast": FAST.to_dict(),
    "ua3d-r3": {"radius": 3.0},
}


#: the forward model that matches each LR protocol (A: every s-th pixel; B: PIL bicubic downsampling)
CONSISTENCY = {"A": "interval", "B": "bicubic"}


def _variant(options: dict, protocol: str):
    if options.get("consistency") != "none":
        options = {**options, "consistency": CONSISTENCY[protocol]}

    def method(depth_lr, guide_hr, *, mask_lr=None, **kw):
        return upsample_depth(depth_lr, guide_hr, mask_lr=mask_lr, **{**options, **kw})

    return method


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: middlebury-gdsr,nyuv2")
    ap.add_argument("--scales", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of {list(VARIANTS)}")
    ap.add_argument("--baselines", default=",".join(BASELINES),
                    help="comma-separated harness methods ('' = none)")
    ap.add_argument("--protocol", choices=sorted(CONSISTENCY), default="B",
                    help="LR generation; the variants' consistency model follows it (A: interval, B: bicubic)")
    ap.add_argument("--limit", type=int, default=None, help="first N images per dataset")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="out/ablate_depth_sr.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    for name in variants:
        register_method(name, _variant(VARIANTS[name], args.protocol))
    methods = [b for b in args.baselines.split(",") if b] + variants
    out = {"protocol": args.protocol, "variants": {v: VARIANTS[v] for v in variants}, "results": {}}
    tables = []
    for ds in [d for d in args.datasets.split(",") if d]:
        if ds not in DATASETS:
            raise SystemExit(f"unknown dataset {ds!r}; known: {list(DATASETS)}")
        if not DATASETS[ds].is_dir():
            raise SystemExit(f"dataset folder {DATASETS[ds]} not found "
                             f"(expected ../shared/data beside the checkout)")
        t0 = time.perf_counter()
        res = evaluate(ds, DATASETS[ds], args.scales, args.protocol, methods, limit=args.limit, progress=False,
                       verbose=False)
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
