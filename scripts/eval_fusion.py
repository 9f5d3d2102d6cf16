"""Evaluate multi-frame fusion (:mod:`ua3d.rgbd.fusion`): labels, geometry, consistency, cost.

Part 1, synthetic posed sequences (``--frames`` views on an arc around a
:func:`ua3d.rgbd.synthetic.make_layout` scene, ``--size`` pixels, several seeds; depth with
dropout holes, RGB noise 0.01). The LR features are the one-hot object ids area-pooled to a grid
16x coarser. Each frame's features are upsampled by the lift (``FeatureMap.integrate``), the 2D
kernel (``ua3d.fit`` on RGB, the same config), bilinear resizing (the ConceptFusion recipe) and
nearest, and fused into a 2 cm map. A voxel's label is the argmax of its fused feature; its true
id is the layout object whose surface is nearest to the voxel's (mean) position. We print the
label accuracy over all voxels and over the voxels within 2 voxels (Chebyshev, in voxel
coordinates) of a voxel with another true id. Ablations: the lift without the kernel-agreement
weight, the lift fitted at half the resolution (what the 640x480 default does), and the lift with
the single-frame depth weight 10 instead of the fusion's 0.3.

Part 2, real frames (``../shared/data/redwood-open3d/sample5``, 5 posed 640x480 frames, random-net
features on a 30x40 grid, 32 channels): the Chamfer distance (mean nearest-neighbour distance
each way, in voxels) between the map's points and the points Open3D extracts from its own TSDF
integration (``VoxelBlockGrid``) of the same frames at the same voxel size and ``depth_max``; and
multi-view consistency: the fused feature of every valid pixel (its back-projected point's voxel)
vs the frame's own upsampled feature there (mean cosine similarity), for lift and bilinear fusion.
Also the memory an Open3D ``VoxelBlockGrid`` with a 32-channel feature attribute reserves for
the blocks these frames touch, beside the map's.

Part 3, cost: per-frame ``integrate`` time on the Redwood 640x480 frames (wall and CPU seconds,
2 threads, median), and in a fresh subprocess a 50-frame 640x480 synthetic orbit at 2 cm, 32
channels, float16: peak RSS and the map's bytes as frames are added; the map size against voxel
size (1 / 2 / 4 cm) on the same frames.

Usage::

    python scripts/eval_fusion.py --json bench_results/eval_fusion.json
    python scripts/eval_fusion.py --seeds 0 1 --skip-cost
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info

import ua3d
from ua3d.baselines import bilinear, nearest
from ua3d.core.tto import FitConfig
from ua3d.rgbd.camera import PinholeCamera, backproject, look_at
from ua3d.rgbd.fusion import FeatureMap, default_fit_config
from ua3d.rgbd.lift import fit_rgbd
from ua3d.rgbd.synthetic import make_layout, render_layout, surface_distance

ROOT = Path(__file__).resolve().parents[1]
REDWOOD = ROOT.parent / "shared" / "data" / "redwood-open3d" / "sample5"


# ---------------------------------------------------------------------- synthetic sequences
def orbit_cameras(n: int, W: int, H: int, seed: int, radius: float = 2.6) -> list[PinholeCamera]:
    """``n`` cameras on an arc (yaw -45..45 deg) around the scene centre, heights 1.0-1.5 m."""
    rng = np.random.default_rng([seed, 3])
    target = np.array([0.0, 0.3, -1.0])
    f = 525.0 * W / 640.0
    cams = []
    for i, yaw in enumerate(np.linspace(-np.pi / 4, np.pi / 4, n)):
        h = 1.0 + 0.25 * (1 + np.sin(2 * np.pi * i / max(n, 1))) + rng.uniform(-0.05, 0.05)
        eye = target + np.array([radius * np.sin(yaw), h - target[1], radius * np.cos(yaw)])
        cams.append(PinholeCamera(f, f, (W - 1) / 2, (H - 1) / 2, W, H, look_at(eye, target)))
    return cams


def true_ids(positions: np.ndarray, objects: list[dict]) -> np.ndarray:
    d = np.stack([surface_distance(positions, o) for o in objects], 1)
    return np.array([o["id"] for o in objects])[d.argmin(1)]


def boundary_mask(m: FeatureMap, ids: np.ndarray, reach: int = 2) -> np.ndarray:
    """Voxels with a voxel of another true id within ``reach`` voxels (Chebyshev)."""
    coords = m.voxel_coords()
    ids_t = torch.from_numpy(ids)
    out = torch.zeros(len(m), dtype=torch.bool)
    from ua3d.rgbd.fusion import _pack

    for dx in range(-reach, reach + 1):
        for dy in range(-reach, reach + 1):
            for dz in range(-reach, reach + 1):
                if dx == dy == dz == 0:
                    continue
                slot = m.lookup(_pack(coords + torch.tensor([dx, dy, dz])))
                hit = slot >= 0
                out[hit] |= ids_t[slot[hit]] != ids_t[hit]
    return out.numpy()


def synthetic(seed: int, n_frames: int, W: int, H: int, cfg: FitConfig, voxel: float) -> dict:
    layout = make_layout(seed, n_objects=4)
    n_cls = 3 + 4
    hw = (H // 16, W // 16)
    maps = {
        k: FeatureMap(voxel, n_cls, torch.float32, work_width=None, fit_config=cfg)
        for k in (
            "lift",
            "lift_no_agreement",
            "lift_half_res",
            "lift_depth_weight_10",
            "kernel_2d",
            "bilinear",
            "nearest",
        )
    }
    maps["lift_no_agreement"].agreement_tau = None
    maps["lift_half_res"].work_width = W // 2
    t = {k: 0.0 for k in maps}
    for i, cam in enumerate(orbit_cameras(n_frames, W, H, seed)):
        s = render_layout(layout, cam, holes=3, noise_std=0.01, seed=seed * 100 + i)
        onehot = F.one_hot(torch.from_numpy(s["ids"]).long(), n_cls).permute(2, 0, 1)[None].float()
        lr = F.adaptive_avg_pool2d(onehot, hw)
        guide = torch.from_numpy(s["rgb"]).permute(2, 0, 1)[None]
        t0 = time.perf_counter()
        lifted = fit_rgbd(guide, s["depth"], cam, hw, cfg, depth_weight=maps["lift"].depth_weight)
        maps["lift"].integrate(guide, s["depth"], cam, lr, lifted=lifted)
        t["lift"] += time.perf_counter() - t0
        lk10 = fit_rgbd(guide, s["depth"], cam, hw, cfg, depth_weight=10.0)  # the single-frame default
        maps["lift_depth_weight_10"].integrate(guide, s["depth"], cam, lr, lifted=lk10)
        maps["lift_no_agreement"].integrate(guide, s["depth"], cam, lr, lifted=lifted)
        t0 = time.perf_counter()
        maps["lift_half_res"].integrate(guide, s["depth"], cam, lr)
        t["lift_half_res"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        k2 = ua3d.fit(guide, hw, cfg)
        f2, sup = k2.render(lr, return_support=True)
        maps["kernel_2d"].integrate_hr(s["depth"], cam, f2, weights=sup[0, 0].float(), rgb=guide, lr_size=hw)
        t["kernel_2d"] += time.perf_counter() - t0
        for name, fn in (("bilinear", bilinear), ("nearest", nearest)):
            t0 = time.perf_counter()
            maps[name].integrate_hr(s["depth"], cam, fn(guide, lr), rgb=guide, lr_size=hw)
            t[name] += time.perf_counter() - t0
    res = {}
    for k, m in maps.items():
        ids = true_ids(m.positions.double().numpy(), layout.objects)
        pred = m.features.argmax(1).numpy()
        b = boundary_mask(m, ids)
        res[k] = {
            "voxels": len(m),
            "boundary_voxels": int(b.sum()),
            "acc_all": float((pred == ids).mean()),
            "acc_boundary": float((pred[b] == ids[b]).mean()),
            "seconds_per_frame": t[k] / n_frames if t[k] else None,
        }
    return res


def synthetic_resolution(seed: int, n_frames: int, voxel: float) -> dict:
    """640x480 frames, 30x40 grid: the lift as by default (fitted at 320 px width, rendered and fused at
    full resolution), fitted at full resolution (also with a quarter of the pixels per step), and
    everything at the work width 320 (frame reduced by 2); bilinear."""
    layout = make_layout(seed, n_objects=4)
    n_cls, W, H = 7, 640, 480
    hw = (H // 16, W // 16)
    base = default_fit_config()
    variants = {  # (work_width, fit_width, config)
        "lift_default_fit_320": (None, 320, base),
        "lift_fit_full_res": (None, None, base),
        "lift_work_320": (320, None, base),
        "lift_fit_full_res_pixel_fraction_0.25": (None, None, base.replace(pixel_fraction=0.25)),
    }
    maps = {
        k: FeatureMap(voxel, n_cls, torch.float32, work_width=ww, fit_width=fw, fit_config=c)
        for k, (ww, fw, c) in variants.items()
    }
    maps["bilinear"] = FeatureMap(voxel, n_cls, torch.float32)
    t = {k: [] for k in maps}
    cpu = {k: [] for k in maps}
    for i, cam in enumerate(orbit_cameras(n_frames, W, H, seed)):
        s = render_layout(layout, cam, holes=3, noise_std=0.01, seed=seed * 100 + i)
        onehot = F.one_hot(torch.from_numpy(s["ids"]).long(), n_cls).permute(2, 0, 1)[None].float()
        lr = F.adaptive_avg_pool2d(onehot, hw)
        for k, m in maps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            if k == "bilinear":
                m.integrate_hr(s["depth"], cam, bilinear(s["rgb"], lr), rgb=s["rgb"], lr_size=hw)
            else:
                m.integrate(s["rgb"], s["depth"], cam, lr)
            t[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    res = {}
    for k, m in maps.items():
        ids = true_ids(m.positions.double().numpy(), layout.objects)
        pred = m.features.argmax(1).numpy()
        b = boundary_mask(m, ids)
        res[k] = {
            "voxels": len(m),
            "acc_all": float((pred == ids).mean()),
            "acc_boundary": float((pred[b] == ids[b]).mean()),
            "median_integrate_s_wall": statistics.median(t[k]),
            "median_integrate_s_cpu": statistics.median(cpu[k]),
        }
    return res


# ---------------------------------------------------------------------- real frames
def _o3d_tsdf_points(seq, voxel: float, depth_max: float) -> tuple[np.ndarray, int]:
    import open3d as o3d
    import open3d.core as o3c

    vbg = o3d.t.geometry.VoxelBlockGrid(
        ("tsdf", "weight", "color"),
        (o3c.float32, o3c.float32, o3c.float32),
        ((1), (1), (3)),
        voxel,
        16,
        20000,
        o3c.Device("CPU:0"),
    )
    intr = o3c.Tensor(seq.camera.K, o3c.float64)
    blocks = set()
    for fr in seq:
        depth = o3d.t.geometry.Image(o3c.Tensor((fr.depth * 1000).astype(np.uint16)))
        color = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(fr.rgb)))
        ext = o3c.Tensor(np.linalg.inv(fr.camera.pose), o3c.float64)
        coords = vbg.compute_unique_block_coordinates(depth, intr, ext, 1000.0, depth_max)
        blocks |= {tuple(c) for c in coords.numpy().tolist()}
        vbg.integrate(coords, depth, color, intr, ext, 1000.0, depth_max)
    pc = vbg.extract_point_cloud()
    return pc.point.positions.numpy(), len(blocks)


def _chamfer(a: np.ndarray, b: np.ndarray, voxel: float) -> dict:
    from scipy.spatial import cKDTree

    ab = cKDTree(b).query(a)[0]
    ba = cKDTree(a).query(b)[0]
    return {
        "map_to_o3d_vox": float(ab.mean() / voxel),
        "o3d_to_map_vox": float(ba.mean() / voxel),
        "chamfer_vox": float((ab.mean() + ba.mean()) / 2 / voxel),
        "map_to_o3d_p95_vox": float(np.percentile(ab, 95) / voxel),
    }


def _vbg_reserve_bytes(blocks: int, voxel: float, channels: int) -> dict:
    """RSS growth of allocating an Open3D VoxelBlockGrid with a ``channels`` float32 feature attribute."""
    import open3d as o3d
    import open3d.core as o3c

    def rss():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    r0 = rss()
    vbg = o3d.t.geometry.VoxelBlockGrid(
        ("tsdf", "weight", "color", "features"),
        (o3c.float32, o3c.float32, o3c.float32, o3c.float32),
        ((1), (1), (3), (channels)),
        voxel,
        16,
        blocks,
        o3c.Device("CPU:0"),
    )
    r1 = rss()
    del vbg
    return {
        "block_count": blocks,
        "rss_growth_bytes": r1 - r0,
        "bytes_per_block_theory": 16**3 * 4 * (1 + 1 + 3 + channels),
    }


def redwood(voxel: float, depth_max: float, channels: int) -> dict:
    from ua3d.features.random_net import random_features
    from ua3d.io.sequences import open_sequence

    seq = open_sequence(REDWOOD)
    lift = FeatureMap(voxel, channels, torch.float16, depth_max=depth_max)
    bil = FeatureMap(voxel, channels, torch.float16, depth_max=depth_max)
    own_lift, own_bil, times, cpu = [], [], [], []
    frames = list(seq)
    for fr in frames:
        feats, _ = random_features(fr.rgb, stride=16, channels=channels, seed=0)
        t0, c0 = time.perf_counter(), time.process_time()
        factor = 1 if lift.work_width is None else round(640 / lift.work_width)
        rep = lift.integrate(fr.rgb, fr.depth, fr.camera, feats)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print(f"  redwood {rep}", flush=True)
        fb = bilinear(fr.rgb, feats)
        bil.integrate_hr(fr.depth, fr.camera, fb, rgb=fr.rgb, lr_size=tuple(feats.shape[-2:]))
        own_bil.append(fb[0])
        own_lift.append((feats, factor))
    # own renders of the lift at the work resolution: refit (deterministic, same seed) per frame
    cons = {"lift": [], "bilinear": []}
    for fr, (feats, factor), fb in zip(frames, own_lift, own_bil):
        from ua3d.rgbd.fusion import reduce_frame
        from ua3d.rgbd.lift import _as_rgb, as_depth

        g = _as_rgb(fr.rgb)
        z = as_depth(fr.depth)
        z = torch.where((z > 0) & (z <= depth_max), z, torch.zeros(()))
        gr, zr, cam = reduce_frame(g, z, fr.camera, factor)
        lk = fit_rgbd(
            gr,
            zr,
            cam,
            tuple(feats.shape[-2:]),
            lift.frame_config(gr.shape[-1]),
            depth_max=depth_max,
            depth_weight=lift.depth_weight,
        )
        fl = lk.render_2d(feats)[0]
        zf = torch.from_numpy(np.where(fr.depth <= depth_max, fr.depth, 0)).float()
        pts, pix = backproject(zf, fr.camera, frame="world")
        pts, pix = pts[::2], pix[::2]
        for name, m, own in (
            (
                "lift",
                lift,
                fl[
                    :,
                    (pix[:, 0] // factor).clamp(max=fl.shape[1] - 1),
                    (pix[:, 1] // factor).clamp(max=fl.shape[2] - 1),
                ],
            ),
            ("bilinear", bil, fb[:, pix[:, 0], pix[:, 1]]),
        ):
            slot = m.lookup_points(pts)
            ok = slot >= 0
            fused = m.features[slot[ok]].float()
            cons[name].append(float(F.cosine_similarity(fused, own.T[ok].float(), dim=1).mean()))
    o3d_pts, blocks = _o3d_tsdf_points(seq, voxel, depth_max)
    out = {
        "frames": len(frames),
        "voxel_size": voxel,
        "depth_max": depth_max,
        "channels": channels,
        "lift_voxels": len(lift),
        "bilinear_voxels": len(bil),
        "o3d_points": len(o3d_pts),
        "geometry_lift": _chamfer(lift.positions.numpy(), o3d_pts, voxel),
        "geometry_bilinear_fullres": _chamfer(bil.positions.numpy(), o3d_pts, voxel),
        "consistency_cosine": {k: float(np.mean(v)) for k, v in cons.items()},
        "consistency_per_frame": cons,
        "integrate_s_wall": times,
        "integrate_s_cpu": cpu,
        "integrate_s_wall_median": statistics.median(times[1:] or times),
        "integrate_s_cpu_median": statistics.median(cpu[1:] or cpu),
        "map_bytes": lift.nbytes,
        "map_bytes_exact": FeatureMap.estimate_bytes(len(lift), channels),
        "vbg_blocks_touched": blocks,
    }
    out["vbg"] = _vbg_reserve_bytes(blocks, voxel, channels)
    return out


# ---------------------------------------------------------------------- cost (subprocess)
def _peak_rss() -> int:
    """This process's peak resident memory (``VmHWM``; ``ru_maxrss`` would include the peak of the parent
    that forked it, which exec keeps)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def _cost_child(n_frames: int, channels: int, voxel_sizes: list[float], mode: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    from ua3d.features.random_net import random_features

    layout = make_layout(0, n_objects=4)
    cams = orbit_cameras(n_frames, 640, 480, 0)
    maps = {v: FeatureMap(v, channels, torch.float16) for v in voxel_sizes}
    growth, times, cpu = [], [], []
    for i, cam in enumerate(cams):
        s = render_layout(layout, cam, holes=3, noise_std=0.01, seed=i)
        feats, _ = random_features(s["rgb"], stride=16, channels=channels, seed=0)
        for m in maps.values():
            t0, c0 = time.perf_counter(), time.process_time()
            if mode == "lift":
                m.integrate(s["rgb"], s["depth"], cam, feats)
            else:
                m.integrate_hr(s["depth"], cam, bilinear(s["rgb"], feats), rgb=s["rgb"])
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        if (i + 1) % 10 == 0 or i == 0:
            growth.append(
                {
                    "frames": i + 1,
                    **{f"voxels_{v}": len(m) for v, m in maps.items()},
                    **{f"bytes_{v}": m.nbytes for v, m in maps.items()},
                    "peak_rss_bytes": _peak_rss(),
                }
            )
    return {
        "mode": mode,
        "frames": n_frames,
        "channels": channels,
        "growth": growth,
        "peak_rss_bytes": _peak_rss(),
        "median_integrate_s": statistics.median(times),
        "median_integrate_cpu_s": statistics.median(cpu),
    }


def cost(n_frames: int, channels: int, threads: int) -> dict:
    out = {}
    for mode, sizes in (("lift", [0.02]), ("bilinear", [0.01, 0.02, 0.04])):
        cmd = [
            sys.executable,
            __file__,
            "--_cost-child",
            mode,
            "--frames-cost",
            str(n_frames),
            "--channels",
            str(channels),
            "--threads",
            str(threads),
            "--voxel-sizes",
            *map(str, sizes),
        ]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"cost child failed: {r.stderr[-2000:]}")
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        out[mode]["wall_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    ap.add_argument("--voxel", type=float, default=0.02)
    ap.add_argument("--depth-max", type=float, default=3.0)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--frames-cost", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument(
        "--resolution-seeds",
        type=int,
        nargs="*",
        default=[0, 3],
        help="seeds of the 640x480 work-resolution check (none to skip)",
    )
    ap.add_argument("--json", default="bench_results/eval_fusion.json")
    ap.add_argument("--_cost-child", dest="cost_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--voxel-sizes", type=float, nargs="+", default=[0.02], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cost_child:
        print(
            json.dumps(
                _cost_child(args.frames_cost, args.channels, args.voxel_sizes, args.cost_child, args.threads)
            )
        )
        return 0
    torch.set_num_threads(args.threads)
    cfg = default_fit_config()
    report: dict = {"machine": machine_info(args.threads), "fit_config": cfg.to_dict(), "args": vars(args)}
    if not args.skip_synthetic:
        W, H = args.size
        per_seed = {}
        for seed in args.seeds:
            t0 = time.perf_counter()
            per_seed[seed] = synthetic(seed, args.frames, W, H, cfg, args.voxel)
            print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        methods = list(next(iter(per_seed.values())))
        mean = {
            k: {
                m: float(np.mean([per_seed[s][k][m] for s in args.seeds]))
                for m in ("acc_all", "acc_boundary")
            }
            for k in methods
        }
        report["synthetic"] = {"per_seed": per_seed, "mean": mean}
        print(
            f"\nsynthetic: {len(args.seeds)} seeds x {args.frames} frames at {W}x{H}, grid {H // 16}x{W // 16}, "
            f"voxel {args.voxel} m; label accuracy (mean over seeds; per seed boundary)"
        )
        print(f"{'method':20s} {'overall':>8s} {'boundary':>9s}   per-seed boundary")
        for k in methods:
            ps = " ".join(f"{per_seed[s][k]['acc_boundary']:.3f}" for s in args.seeds)
            print(f"{k:20s} {mean[k]['acc_all']:8.4f} {mean[k]['acc_boundary']:9.4f}   {ps}")
        d = 100 * (mean["lift"]["acc_boundary"] - mean["bilinear"]["acc_boundary"])
        print(
            f"lift - bilinear: boundary {d:+.1f} points, overall "
            f"{100 * (mean['lift']['acc_all'] - mean['bilinear']['acc_all']):+.2f} points"
        )
    if args.resolution_seeds:
        rs = {seed: synthetic_resolution(seed, args.frames, args.voxel) for seed in args.resolution_seeds}
        report["synthetic_640x480"] = rs
        print(
            f"\nsynthetic 640x480, grid 30x40, {args.frames} frames, seeds {args.resolution_seeds}: work resolution"
        )
        print(f"{'method':36s} {'overall':>8s} {'boundary':>9s} {'wall s':>7s} {'CPU s':>6s}")
        for k in next(iter(rs.values())):

            def mean(f, k=k):
                return float(np.mean([rs[sd][k][f] for sd in rs]))

            print(
                f"{k:36s} {mean('acc_all'):8.4f} {mean('acc_boundary'):9.4f} {mean('median_integrate_s_wall'):7.2f} "
                f"{mean('median_integrate_s_cpu'):6.2f}"
            )
    if not args.skip_real:
        if not (REDWOOD / "trajectory.log").is_file():
            print(f"skipping real frames: {REDWOOD} not found")
        else:
            r = redwood(args.voxel, args.depth_max, args.channels)
            report["redwood"] = r
            print(
                f"\nRedwood sample5 ({r['frames']} frames, voxel {args.voxel} m, depth_max {args.depth_max} m)"
            )
            for k in ("geometry_lift", "geometry_bilinear_fullres"):
                g = r[k]
                print(
                    f"  {k:28s} chamfer {g['chamfer_vox']:.3f} vox (map->o3d {g['map_to_o3d_vox']:.3f}, "
                    f"o3d->map {g['o3d_to_map_vox']:.3f}, p95 {g['map_to_o3d_p95_vox']:.2f})"
                )
            c = r["consistency_cosine"]
            print(f"  multi-view consistency (cosine): lift {c['lift']:.4f}, bilinear {c['bilinear']:.4f}")
            print(
                f"  integrate 640x480, grid 30x40, {args.channels} ch: median wall {r['integrate_s_wall_median']:.2f} s, "
                f"CPU {r['integrate_s_cpu_median']:.2f} s (measured under load)"
            )
            v = r["vbg"]
            print(
                f"  map {r['lift_voxels']} voxels, {r['map_bytes_exact'] / 2**20:.1f} MiB; Open3D VoxelBlockGrid "
                f"with a {args.channels}-ch feature attribute: {v['block_count']} blocks -> "
                f"{v['rss_growth_bytes'] / 2**20:.0f} MiB reserved ({v['bytes_per_block_theory'] / 2**20:.2f} MiB/block)"
            )
    if not args.skip_cost:
        c = cost(args.frames_cost, args.channels, args.threads)
        report["cost"] = c
        lf = c["lift"]
        print(
            f"\ncost: {lf['frames']} frames 640x480, {args.channels} ch float16, 2 cm, lift: peak RSS "
            f"{lf['peak_rss_bytes'] / 2**30:.2f} GiB, median integrate {lf['median_integrate_s']:.2f} s wall, "
            f"{lf['median_integrate_cpu_s']:.2f} s CPU"
        )
        for g in lf["growth"]:
            print(
                f"  frames {g['frames']:3d}: voxels {g['voxels_0.02']:8d}, map {g['bytes_0.02'] / 2**20:7.1f} MiB, "
                f"peak RSS {g['peak_rss_bytes'] / 2**30:.2f} GiB"
            )
        bl = c["bilinear"]
        last = bl["growth"][-1]
        print(
            "  voxel size vs map size after all frames: "
            + ", ".join(
                f"{v * 100:g} cm {last[f'voxels_{v}']} voxels {last[f'bytes_{v}'] / 2**20:.1f} MiB"
                for v in (0.01, 0.02, 0.04)
            )
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
