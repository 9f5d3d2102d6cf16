"""``ua3d fuse``: fuse a posed RGB-D sequence into one feature map (``ua3d view map`` shows it).

``ua3d/cli.py`` registers these with :func:`add_fuse_parser` and sends ``view map`` to
:mod:`ua3d.viz.map_view` (``add_arguments`` / ``run``).
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path
from typing import Any

__all__ = ["add_fuse_parser", "cmd_fuse"]


def add_fuse_parser(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``fuse`` on the subparsers ``sub`` of the ``ua3d`` parser."""
    f = sub.add_parser(
        "fuse",
        parents=[common],
        help="posed RGB-D sequence + features -> one 3D feature map (.npz)",
        description="Fuse every frame's features, upsampled by the lifted RGB-D kernel, into a sparse voxel map "
        "(confidence-weighted running mean per voxel). Poses are camera-to-world.",
    )
    f.add_argument("--sequence", required=True, help="sequence folder")
    f.add_argument(
        "--format",
        choices=["redwood", "tum", "plain"],
        default=None,
        help="layout (default: detected from trajectory.log / rgb.txt / poses.npy)",
    )
    f.add_argument("--intrinsics", default=None, help="Open3D intrinsics JSON (default: one in the folder)")
    f.add_argument(
        "--depth-scale", type=float, default=None, help="raw depth units per metre (default: the format's)"
    )
    f.add_argument("--depth-max", type=float, default=3.0, help="depth beyond this (m) is a hole (default 3)")
    f.add_argument(
        "--features",
        default="random",
        help="'random' (random-net features, meaningless), a model name (dinov2_vits14, ...), or a file "
        "pattern: a glob ('feats/*.npy', sorted, one per frame) or a format string ('feats/{index:05d}.npy')",
    )
    f.add_argument("--checkpoint", default=None, help="local checkpoint for a model name")
    f.add_argument("--layout", default="auto", choices=["auto", "chw", "hwc"], help="layout of feature files")
    f.add_argument("--channels", type=int, default=32, help="channels of --features random (default 32)")
    f.add_argument("--stride", type=int, default=16, help="grid stride of --features random (default 16)")
    f.add_argument("--voxel-size", type=float, default=0.02, help="voxel edge in metres (default 0.02)")
    f.add_argument("--float32", action="store_true", help="store float32 features (default float16)")
    f.add_argument(
        "--fit-width",
        type=int,
        default=320,
        help="fit the kernel on the guide resampled to this width, render at full size (0 = fit at full "
        "size; default 320)",
    )
    f.add_argument(
        "--work-width",
        type=int,
        default=0,
        help="reduce frames (integer factor) to about this width first (default 0 = full resolution)",
    )
    f.add_argument("--steps", type=int, default=20, help="TTO steps per frame (default 20)")
    f.add_argument("--radius", type=float, default=2.0, help="kernel window radius in LR cells (default 2)")
    f.add_argument("--every", type=int, default=1, help="use every N-th frame (default 1)")
    f.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    f.add_argument(
        "--out", required=True, help="output map (.npz; a .ply export is written beside it with --ply)"
    )
    f.add_argument("--ply", action="store_true", help="also write <out>.ply (PCA colours)")
    f.set_defaults(func=cmd_fuse)
    return f


def _feature_source(args, seq):
    """A function ``frame -> (features [1, C, h, w], description)``."""
    from .features.files import load_features

    src = args.features
    if src == "random":
        from .features.random_net import random_features

        return lambda fr: random_features(fr.rgb, stride=args.stride, channels=args.channels, seed=args.seed)
    if any(ch in src for ch in "*?[{") or Path(src).suffix.lower() in (".npy", ".npz", ".pt", ".pth"):
        if "{" in src:

            def path(fr):
                return src.format(index=fr.index, stem=seq.color_paths[fr.index].stem)
        else:
            files = sorted(glob.glob(src))
            if len(files) != len(seq):
                raise ValueError(
                    f"--features {src!r} matches {len(files)} files but the sequence has {len(seq)} frames"
                )

            def path(fr):
                return files[fr.index]

        def load(fr):
            f, layout = load_features(path(fr), layout=args.layout)
            return f, f"file {path(fr)} ({layout})"

        return load
    from .features.backbones import extract_features

    def model(fr):
        f, info = extract_features(fr.rgb, src, checkpoint=args.checkpoint, device=args.device)
        return f, str(info.get("description", src))

    return model


def cmd_fuse(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .core.tto import FitConfig
    from .io.sequences import open_sequence
    from .rgbd.fusion import FeatureMap

    torch.manual_seed(args.seed)
    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        raise ValueError(f"--out must be an .npz file, got {out}")
    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}")
    seq = open_sequence(args.sequence, args.format, args.intrinsics, args.depth_scale)
    idx = list(range(0, len(seq), args.every))[: args.max_frames]
    source = _feature_source(args, seq)
    fmap = None
    cfg = FitConfig(steps=args.steps, radius=args.radius, seed=args.seed)
    log: dict[str, Any] = {"sequence": str(args.sequence), "format": seq.format, "frames": []}
    bar = tqdm(idx, desc="fuse", disable=args.quiet, leave=False, dynamic_ncols=True)
    t_all = time.perf_counter()
    try:
        for i in bar:
            t0 = time.perf_counter()
            fr = seq[i]
            feats, desc = source(fr)
            t_feat = time.perf_counter() - t0
            if fmap is None:
                fmap = FeatureMap(
                    args.voxel_size,
                    int(feats.shape[1]),
                    torch.float32 if args.float32 else torch.float16,
                    args.device,
                    depth_max=args.depth_max,
                    work_width=args.work_width or None,
                    fit_width=args.fit_width or None,
                    fit_config=cfg,
                )
                log["features"] = desc
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # skipped frames are reported below
                rep = fmap.integrate(fr.rgb, fr.depth, fr.camera, feats.to(fmap.device))
            rep.frame = i
            rep.seconds = {"features": t_feat, **rep.seconds, "total": time.perf_counter() - t0}
            log["frames"].append(
                {
                    "frame": i,
                    "status": rep.status,
                    "reason": rep.reason,
                    "points": rep.points,
                    "voxels": rep.voxels,
                    "seconds": {k: round(v, 4) for k, v in rep.seconds.items()},
                }
            )
            bar.set_postfix_str(f"{rep.seconds['total']:.2f}s/frame, {rep.voxels} voxels")
            if not args.quiet:
                tqdm.write(str(rep))
    except (ValueError, MemoryError) as e:
        bar.close()
        if fmap is not None and len(fmap):
            fmap.save(out)
            raise ValueError(
                f"frame {i}: {e} (the {fmap.frames} frames fused before it are saved in {out})"
            ) from None
        raise
    bar.close()
    if fmap is None or fmap.frames == 0:
        raise ValueError("no frame could be fused (every frame was skipped)")
    fmap.save(out)
    if args.ply:
        fmap.save(out.with_suffix(".ply"))
    done = [f for f in log["frames"] if f["status"] == "integrated"]
    totals = sorted(f["seconds"]["total"] for f in done)
    log.update(
        voxels=len(fmap),
        bytes=fmap.nbytes,
        skipped=fmap.skipped,
        seconds=round(time.perf_counter() - t_all, 2),
        median_frame_s=totals[len(totals) // 2],
    )
    out.with_suffix(".json").write_text(json.dumps(log, indent=2) + "\n")
    if not args.quiet:
        print(
            f"fused {fmap.frames} frames ({len(fmap.skipped)} skipped) into {len(fmap)} voxels "
            f"({fmap.nbytes / 2**20:.1f} MiB), median {log['median_frame_s']:.2f} s/frame -> {out}"
        )
        for i, reason in fmap.skipped:
            print(f"  skipped frame {idx[i]}: {reason}")
    return 0
