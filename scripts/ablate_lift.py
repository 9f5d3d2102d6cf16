"""Ablation of the RGB-D lift's depth/geometry options on the transfer benchmark's label task.

For every scene of :func:`ua3d.rgbd.synthetic.make_family_scene` (the families of
``ua3d.eval.transfer``), the 2D kernel (``ua3d.fit``) and each lift variant (:func:`fit_rgbd`
keyword sets below) are fitted with the same :class:`FitConfig`; area-pooled one-hot labels are
rendered and scored (boundary accuracy within 3 px, mIoU: ``ua3d.eval.transfer.label_scores``).
Optionally (``--mass``) the volume's mass peak is measured: :func:`render_volume` with ``--bins``
bins (``--depth-models``, default ``plane``, render_volume's default; ``planar`` = the previous one), share of valid pixels whose mass peaks within one bin of their true
depth bin (``depth_to_bin``), on the same grid after the same fit.

Prints, per family and grid: lift minus 2D boundary accuracy (mean over seeds), the mIoU
difference and the mass-peak share; writes everything (per scene) to ``--json``.

Usage::

    python scripts/ablate_lift.py --threads 1 --seeds 0 1 --scales 16 --variants joint normals
    python scripts/ablate_lift.py --threads 1 --seeds 0 1 2 3 4 --scales 14 16 --variants normals --mass
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np
import torch

#: the lift variants (fit_rgbd keyword arguments)
VARIANTS: dict[str, dict] = {
    "joint": {"normal_scale": 0.0},  # the previous default: one fit, depth weight 0, no normals
    "joint_w0.3": {"normal_scale": 0.0, "depth_weight": 0.3},
    "joint_w10": {"normal_scale": 0.0, "depth_weight": 10.0},
    "staged": {"depth_fit": "staged"},
    "staged_s0": {"depth_fit": "staged", "depth_steps": 0},
    "normals0.5": {"normal_scale": 0.5},
    "normals0.6": {"normal_scale": 0.6},
    "normals0.7": {"normal_scale": 0.7},
    "normals1": {"normal_scale": 1.0},
    "normals0.7_w0.3": {"normal_scale": 0.7, "depth_weight": 0.3},
    "normals0.7_w1": {"normal_scale": 0.7, "depth_weight": 1.0},
    "normals0.7_w10": {"normal_scale": 0.7, "depth_weight": 10.0},
    "default": {},
    "ungated": {"normal_gate": 0.0},  # = default (normals count in full everywhere)
    "gate0.5": {"normal_gate": 0.5},  # depth-edge gate, radius 0.5 LR cells, floor GATE_FLOOR (0.6)
    # session 4: normals pulled to their own cell's centre where no nearby cell has the pixel's normal
    "mismatch0.3": {"normal_mismatch": 0.3},
    "mismatch0.15": {"normal_mismatch": 0.15},
    "curv0.5": {"normal_curvature": 0.5},  # normals shrunk on curved surfaces (turning > 0.5 rad per cell)
    "mismatch0.3_curv0.5": {"normal_mismatch": 0.3, "normal_curvature": 0.5},
    "mismatch0.2_curv0.5": {"normal_mismatch": 0.2, "normal_curvature": 0.5},
    "mismatch0.3_curv0.3": {"normal_mismatch": 0.3, "normal_curvature": 0.3},
}


def mass_peak_share(lifted, bins: int, depth_model: str = "plane") -> float:
    from ua3d.rgbd.volume import depth_to_bin, render_volume

    h, w = lifted.lr_size
    _, mass, b = render_volume(lifted, torch.zeros(1, 1, h, w), bins=bins, depth_model=depth_model)
    v = lifted.depth_valid[0, 0]
    err = (mass.argmax(0) - depth_to_bin(lifted.depth[0, 0], b))[v].abs()
    return float((err <= 1).float().mean())


def main(argv=None) -> int:
    import ua3d
    from ua3d.core.tto import FitConfig
    from ua3d.eval.transfer import _label_lr, _scene, boundary_mask, label_scores, machine_info
    from ua3d.rgbd.lift import fit_rgbd
    from ua3d.rgbd.synthetic import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--scales", nargs="+", type=int, default=[16])
    ap.add_argument("--variants", nargs="+", default=["default"], help=f"of {sorted(VARIANTS)}")
    ap.add_argument("--size", nargs=2, type=int, default=[320, 240], metavar=("W", "H"))
    ap.add_argument("--mass", action="store_true", help="also the volume's mass peak share")
    ap.add_argument("--bins", type=int, default=16)
    ap.add_argument(
        "--depth-models",
        nargs="+",
        default=["plane"],
        help="render_volume depth model(s) of the mass peak (plane = the default; planar = the previous one)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {sorted(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FitConfig()
    rows = []
    t0 = time.perf_counter()
    for fam in args.families:
        for seed in args.seeds:
            s, rgb, ids = _scene(fam, seed, tuple(args.size))
            bnd = boundary_mask(ids, 3)
            H, W = ids.shape
            for sc in args.scales:
                grid = (max(1, round(H / sc)), max(1, round(W / sc)))
                lr = _label_lr(ids, grid)
                t = time.perf_counter()
                k2 = ua3d.fit(rgb, grid, cfg)
                row = {"family": fam, "seed": seed, "scale": sc, "fit_s": {"2d": time.perf_counter() - t}}
                row["2d"] = label_scores(k2.render(lr).argmax(1)[0], ids, bnd)
                for name in args.variants:
                    t = time.perf_counter()
                    lk = fit_rgbd(rgb, s["depth"], s["camera"], grid, cfg, **VARIANTS[name])
                    row["fit_s"][name] = time.perf_counter() - t
                    row[name] = label_scores(lk.render_2d(lr).argmax(1)[0], ids, bnd)
                    if args.mass:
                        for dm in args.depth_models:
                            key = "mass_peak_pm1" if dm == args.depth_models[0] else f"mass_peak_pm1_{dm}"
                            row[name][key] = mass_peak_share(lk, args.bins, dm)
                rows.append(row)
                print(
                    f"{fam}/{seed}/x{sc}: 2D {row['2d']['boundary_acc']:.4f} "
                    + " ".join(
                        f"{n} {row[n]['boundary_acc'] - row['2d']['boundary_acc']:+.4f}"
                        for n in args.variants
                    ),
                    flush=True,
                )
    agg: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = f"{r['family']}/x{r['scale']}"
        agg[key]["2d"].append(r["2d"]["boundary_acc"])
        for n in args.variants:
            agg[key][n].append(r[n]["boundary_acc"] - r["2d"]["boundary_acc"])
            agg[key][n + ":miou"].append(r[n]["miou"] - r["2d"]["miou"])
            if args.mass:
                agg[key][n + ":mass"].append(r[n]["mass_peak_pm1"])
                for dm in args.depth_models[1:]:
                    agg[key][n + f":mass_{dm}"].append(r[n][f"mass_peak_pm1_{dm}"])
    print(
        f"\nlift minus 2D, boundary accuracy (mIoU), mean over seeds {args.seeds}"
        + (", mass peak ±1 bin" if args.mass else "")
    )
    print("| family/grid | 2D | " + " | ".join(args.variants) + " |")
    print("|---|---|" + "---|" * len(args.variants))
    for key, d in agg.items():
        cells = []
        for n in args.variants:
            c = f"{np.mean(d[n]):+.4f} ({np.mean(d[n + ':miou']):+.3f})"
            if args.mass:
                c += f" m{np.mean(d[n + ':mass']):.3f}"
                for dm in args.depth_models[1:]:
                    c += f" m[{dm}]{np.mean(d[n + f':mass_{dm}']):.3f}"
            cells.append(c)
        print(f"| {key} | {np.mean(d['2d']):.4f} | " + " | ".join(cells) + " |")
    means = {n: float(np.mean([np.mean(d[n]) for d in agg.values()])) for n in args.variants}
    print("| mean | | " + " | ".join(f"{means[n]:+.4f}" for n in args.variants) + " |")
    wall = time.perf_counter() - t0
    print(f"wall {wall:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "args": vars(args),
                    "variants": {n: VARIANTS[n] for n in args.variants},
                    "rows": rows,
                    "wall_s": wall,
                    "machine": machine_info(),
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
