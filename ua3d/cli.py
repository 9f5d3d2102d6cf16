"""The ``ua3d`` command.

Subcommands: ``demo``, ``upsample``, ``depth-sr``, ``lift``, ``eval``, ``view``. Each has ``--help``.
Bad input ends with a one-line ``ua3d: error: ...`` on stderr and exit code 2 (``--debug`` shows the
traceback instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["UserError", "build_parser", "main"]


class UserError(ValueError):
    """An error caused by the user's input; printed as one line."""


# --------------------------------------------------------------------------- helpers
def _progress(args, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=args.quiet, leave=False, dynamic_ncols=True)


def _fit_config(args, **extra):
    from .core.tto import FitConfig

    kw = {"steps": args.steps, "seed": args.seed}
    if getattr(args, "radius", None) is not None:
        kw["radius"] = args.radius
    kw.update(extra)
    return FitConfig(**kw)


def _device(args):
    import torch

    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        raise UserError(f"--device {args.device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return dev


def _seed(args):
    import torch

    torch.manual_seed(args.seed)


def _guide_tensor(rgb, device):
    import torch

    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).to(device)


def _fit_with_progress(args, guide, lr_size, config):
    """``ua3d.fit`` with a progress bar over TTO steps."""
    from .api import Kernel, check_lr_size
    from .core.checks import as_guide
    from .core.kernel import resample_guide
    from .core.tto import fit_params

    g = as_guide(guide)
    hw = check_lr_size(lr_size, tuple(g.shape[-2:]))
    g_lr = resample_guide(g, hw, config.guide_downsample)
    bar = _progress(args, config.steps, "TTO")
    params, losses = fit_params(g, g_lr, config, callback=lambda s, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")))
    bar.close()
    return Kernel(params, g, g_lr, config.radius, config=config, losses=losses)


# --------------------------------------------------------------------------- subcommands
def cmd_upsample(args) -> int:
    import numpy as np
    import torch

    from .features.files import load_features, save_features
    from .io.rgbd import read_color

    _seed(args)
    dev = _device(args)
    rgb = read_color(args.image)
    feats, layout = load_features(args.signal, layout=args.layout)
    H, W = rgb.shape[:2]
    h, w = feats.shape[-2:]
    _check_grid(H, W, h, w, args.signal)
    guide = _guide_tensor(rgb, dev)
    k = _fit_with_progress(args, guide, (h, w), _fit_config(args))
    out = k.render(feats.to(dev), out_dtype=torch.float16 if args.half else None)
    path = save_features(args.out, out[0].float().cpu() if not args.half else out[0].cpu())
    if not args.quiet:
        print(f"upsampled {tuple(feats.shape[1:])} ({layout}) -> {tuple(out.shape[1:])}: {path}")
    if args.png:
        from .viz.figures import comparison_figure
        from .viz.pca import PCABasis

        basis = PCABasis.fit(out[0].float().cpu(), seed=args.seed)
        bil = torch.nn.functional.interpolate(feats, size=(H, W), mode="bilinear", align_corners=False)
        comparison_figure(
            guide=rgb, lr=basis.transform(feats[0]), bilinear=basis.transform(bil[0]),
            ours=basis.transform(out[0].float().cpu()), path=args.png,
        )
        if not args.quiet:
            print(f"figure: {args.png}")
    del np
    return 0


def _check_grid(H, W, h, w, what):
    if h > H or w > W:
        raise UserError(f"{what}: feature grid {h}x{w} is larger than the image {H}x{W}")
    for n_hr, n_lr, axis in ((H, h, "height"), (W, w, "width")):
        if n_hr % n_lr:
            raise UserError(
                f"{what}: feature grid {h}x{w} does not divide the image {H}x{W} ({axis} {n_hr} / {n_lr} is not "
                f"an integer); resize the image to a multiple of the grid"
            )


def cmd_depth_sr(args) -> int:
    import numpy as np
    import torch

    from .depth.sr import upsample_depth
    from .io.rgbd import read_color, read_depth, write_depth

    if not str(args.out).lower().endswith(".png"):
        raise UserError(f"--out {args.out}: the HR depth is written as a 16-bit PNG; give a .png path")
    _seed(args)
    dev = _device(args)
    rgb = read_color(args.rgb)
    depth_lr = read_depth(args.depth, depth_scale=args.depth_scale)
    H, W = rgb.shape[:2]
    h, w = depth_lr.shape
    if h > H or w > W:
        raise UserError(f"{args.depth}: depth {w}x{h} (WxH) is larger than the colour image {W}x{H} (WxH)")
    guide = _guide_tensor(rgb, dev)
    d = torch.from_numpy(np.nan_to_num(depth_lr, nan=0.0)).float()[None, None].to(dev)
    opts = {"consistency": args.consistency, "interval_phase": args.interval_phase}
    if args.steps is not None:
        opts["fit_steps"] = args.steps
    try:
        out, models = upsample_depth(d, guide, mask_lr=d > 0, fill_holes=args.fill_holes, return_model=True, **opts)
    except ValueError as err:
        raise UserError(str(err)) from err
    hr = out[0, 0].cpu().numpy()
    write_depth(args.out, np.nan_to_num(hr, nan=0.0), depth_scale=args.depth_scale)
    if not args.quiet:
        valid = np.isfinite(hr) & (hr > 0)
        print(f"depth {w}x{h} -> {W}x{H} (WxH, x{W / w:.3g} / x{H / h:.3g}), forward model {models[0].describe()}, "
              f"{valid.mean() * 100:.1f}% with support: {args.out}")
    if args.png:
        from .viz.figures import depth_sr_figure

        up = torch.nn.functional.interpolate(d, size=(H, W), mode="bicubic", align_corners=False)[0, 0].cpu().numpy()
        depth_sr_figure(guide=rgb, lr=depth_lr, bicubic=up, ours=hr, path=args.png)
    return 0


def cmd_lift(args) -> int:
    import numpy as np
    import torch

    from .io.rgbd import read_color, read_depth, read_intrinsics, save_feature_points, save_volume
    from .rgbd.lift import fit_rgbd
    from .rgbd.points import render_points
    from .rgbd.volume import render_volume

    _seed(args)
    dev = _device(args)
    rgb = read_color(args.rgb)
    depth = read_depth(args.depth, depth_scale=args.depth_scale)
    cam = read_intrinsics(args.intrinsics)
    feats, desc = _features_for(args, rgb, dev)
    H, W = rgb.shape[:2]
    if depth.shape != (H, W):
        raise UserError(f"{args.depth}: depth {depth.shape[1]}x{depth.shape[0]} does not match the colour image {W}x{H}")
    h, w = feats.shape[-2:]
    if args.features:  # a model's grid maps onto the image with its own (possibly fractional) scale
        _check_grid(H, W, h, w, args.features)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lifted = fit_rgbd(rgb, depth, cam, (h, w), _fit_config(args), depth_max=args.depth_max)
    vol, mass, bins = render_volume(lifted, feats.to(dev), bins=args.bins, out_dtype=torch.float16 if args.half else None)
    save_volume(out / "volume.npz", vol.float().cpu().numpy(), mass.cpu().numpy(), bins.cpu().numpy(), cam)
    pc = render_points(lifted, feats.to(dev))
    pc.save(out / "points.ply")
    pc.save(out / "points.npz")
    del np, save_feature_points
    if not args.quiet:
        print(f"features: {desc}\nvolume {tuple(vol.shape)} -> {out / 'volume.npz'}\npoints {pc.positions.shape[0]} -> {out / 'points.ply'}")
    return 0


def _features_for(args, rgb, device):
    from .features.files import load_features

    if args.features:
        f, layout = load_features(args.features, layout=args.layout)
        return f, f"file {args.features} ({layout})"
    from .features.backbones import extract_features

    f, info = extract_features(rgb, args.model, checkpoint=args.checkpoint, device=device)
    return f, str(info.get("description", info) if isinstance(info, dict) else info)


def cmd_eval(args, rest) -> int:
    if args.task != "depth-sr":
        raise UserError(f"unknown eval task {args.task!r}; available: depth-sr")
    from .depth.evaluate import main as eval_main

    # --device and --quiet are common options, parsed here: pass them on to the harness.
    rc = eval_main([*rest, "--device", str(_device(args))] + (["--no-progress"] if args.quiet else []))
    return int(rc or 0)


def cmd_view(args) -> int:
    import importlib.util

    root = Path(__file__).resolve().parents[1] / "viewers"
    name = {"volume": "volume_slices", "points": "feature_points"}[args.kind]
    path = root / f"{name}.py"
    if not path.is_file():
        raise UserError(f"viewer script {path} not found (the viewers ship with the source tree)")
    spec = importlib.util.spec_from_file_location(f"ua3d_viewer_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    argv = [args.file] + (["--png", args.png] if args.png else []) + list(getattr(args, "extra", None) or [])
    if not args.quiet:
        return int(mod.main(argv) or 0)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # --quiet: the viewer's "wrote ..." line too
        return int(mod.main(argv) or 0)


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(
        data=Path(args.data) if args.data else None, out=Path(args.out), steps=args.steps, seed=args.seed,
        quiet=args.quiet, tiny=args.tiny, bins=args.bins, device=str(_device(args)),
    )
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1); default cpu")
    common.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    common.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    common.add_argument("--debug", action="store_true", help="show tracebacks on error")

    p = argparse.ArgumentParser(prog="ua3d", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", parents=[common], help="run everything on the bundled sample scene")
    d.add_argument("--out", default="ua3d-demo", help="output folder (default ./ua3d-demo)")
    d.add_argument("--data", default=None, help="sample folder (default: the bundled sample_data/)")
    d.add_argument("--steps", type=int, default=50, help="TTO steps (default 50)")
    d.add_argument("--bins", type=int, default=32, help="depth bins of the feature volume (default 32)")
    d.add_argument("--tiny", action="store_true", help="a quick small run (for CI)")
    d.set_defaults(func=cmd_demo)

    u = sub.add_parser("upsample", parents=[common], help="image + LR signal file -> HR signal")
    u.add_argument("--image", required=True, help="guide image (PNG/JPG)")
    u.add_argument("--signal", required=True, help="LR signal: .npy/.pt/.npz, [C,h,w] or [h,w,C]")
    u.add_argument("--layout", default="auto", choices=["auto", "chw", "hwc"], help="signal layout")
    u.add_argument("--out", required=True, help="output .npy/.pt/.npz ([C,H,W])")
    u.add_argument("--png", default=None, help="also write a comparison figure")
    u.add_argument("--steps", type=int, default=50)
    u.add_argument("--radius", type=float, default=None, help="window radius in LR cells (default 8)")
    u.add_argument("--half", action="store_true", help="float16 output")
    u.set_defaults(func=cmd_upsample)

    s = sub.add_parser("depth-sr", parents=[common], help="RGB + LR depth (16-bit PNG) -> HR depth (16-bit PNG)")
    s.add_argument("--rgb", required=True, help="HR colour image (PNG/JPEG) that guides the upsampling")
    s.add_argument("--depth", required=True, help="LR depth, 16-bit PNG (0 = hole); any ratio to the colour image")
    s.add_argument("--depth-scale", type=float, default=1000.0, help="raw units per metre (1000 = mm, 5000 = TUM)")
    s.add_argument("--out", required=True, help="HR depth, 16-bit PNG in the same units")
    s.add_argument("--fill-holes", action="store_true", help="fill pixels that had no valid LR support")
    s.add_argument("--png", default=None, help="also write a comparison figure")
    s.add_argument("--steps", type=int, default=None, help="self-supervised depth-fit steps (default: the method's)")
    s.add_argument(
        "--consistency", default="auto",
        choices=["auto", "bicubic", "area", "bilinear", "point", "interval", "gauss", "none"],
        help="forward model: how the LR depth was made from the scene. auto (default) detects it per image; "
             "bicubic = PIL bicubic downsampling (synthetic benchmarks), area = box average (most sensors), "
             "point/interval = every s-th pixel, none = no consistency solve",
    )
    s.add_argument(
        "--interval-phase", default="auto", choices=["auto", "end", "start"],
        help="for every-s-th-pixel LR depth, which pixel of each s x s block was kept: end = hr[s-1::s] "
             "(protocol A), start = hr[::s] (a plain slice); auto (default) detects it",
    )
    s.set_defaults(func=cmd_depth_sr)

    lf = sub.add_parser("lift", parents=[common], help="RGB-D + intrinsics + features -> volume and point cloud")
    lf.add_argument("--rgb", required=True)
    lf.add_argument("--depth", required=True, help="16-bit depth PNG")
    lf.add_argument("--depth-scale", type=float, default=1000.0)
    lf.add_argument("--depth-max", type=float, default=None, help="depths beyond this (m) are holes")
    lf.add_argument("--intrinsics", required=True, help="Open3D-style intrinsics JSON")
    src = lf.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="LR features file (.npy/.pt/.npz)")
    src.add_argument("--model", help="backbone name (dinov2_vits14, dinov2_vitb14, timm:<name>)")
    lf.add_argument("--checkpoint", default=None, help="local checkpoint file for --model")
    lf.add_argument("--layout", default="auto", choices=["auto", "chw", "hwc"])
    lf.add_argument("--bins", type=int, default=32)
    lf.add_argument("--half", action="store_true", help="float16 volume")
    lf.add_argument("--steps", type=int, default=50)
    lf.add_argument("--radius", type=float, default=None)
    lf.add_argument("--out", required=True, help="output folder")
    lf.set_defaults(func=cmd_lift)

    e = sub.add_parser("eval", parents=[common], help="benchmarks: `ua3d eval depth-sr --help`", add_help=False)
    e.add_argument("task", help="depth-sr")
    e.set_defaults(func=None)

    v = sub.add_parser(
        "view", parents=[common], help="open a viewer (or --png for a headless picture)",
        epilog="Other options are passed to the viewer script (see viewers/volume_slices.py --help, "
        "viewers/feature_points.py --help), e.g. --show-rgbd, --slice 3 4, --query-index 123.",
    )
    v.add_argument("kind", choices=["volume", "points"])
    v.add_argument("file", help="volume .npz or point cloud .npz")
    v.add_argument("--png", default=None, help="render headless to this PNG instead of opening a window")
    v.set_defaults(func=cmd_view)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["eval"]:
        args, rest = parser.parse_known_args(argv)
        run = lambda: cmd_eval(args, rest)
    elif argv[:1] == ["view"] and not ({"-h", "--help"} & set(argv)):
        args, rest = parser.parse_known_args(argv)
        args.extra = rest
        run = lambda: args.func(args)
    else:
        args = parser.parse_args(argv)
        run = lambda: args.func(args)
    debug = getattr(args, "debug", False) or "--debug" in argv
    try:
        return run()
    except (UserError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError, MemoryError) as e:
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ua3d: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print("ua3d: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
