"""The ``ua3d`` command.

Subcommands: ``demo``, ``upsample``, ``depth-sr``, ``lift``, ``eval`` (``depth-sr``, ``transfer``),
``view`` (``volume``, ``points``). Each has ``--help``. Every option and output path is checked before
any work; long stages show a progress bar naming the running stage (``--quiet``: none). Bad input ends
with one line ``ua3d: error: ...`` on stderr and exit code 2 (``--debug`` shows the traceback instead).
Sizes are written W x H (width x height) everywhere.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["UserError", "build_parser", "main"]

FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
MODEL_HELP = (
    "backbone: dinov2_vits14, dinov2_vitb14, dinov2_vits14_reg, dinov2_vitb14_reg (local weights, see "
    "--checkpoint), dinov2_tiny (test architecture), timm:<name> (needs the 'models' extra), or random "
    "(a fixed-seed random conv net: no weights needed, meaningless features; for trying lift)"
)
# lazily imported sub-subcommands: name -> (module with add_arguments/run, help)
EVAL_TASKS = {
    "depth-sr": (
        "ua3d.depth.evaluate",
        "guided depth super-resolution benchmark (Middlebury, NYU, Redwood...)",
    ),
    "transfer": ("ua3d.eval.transfer", "feature-transfer benchmark of the lifted kernel"),
}
VIEW_KINDS = {
    "volume": ("ua3d.viz.volume_slices", "feature volume .npz as depth slices (--png: headless picture)"),
    "points": ("ua3d.viz.feature_points", "feature point cloud .ply/.npz/.pcd (--png: headless picture)"),
    "map": ("ua3d.viz.map_view", "fused feature map .npz from `ua3d fuse` (--png: headless picture)"),
}
GIB = 2.0**30


class UserError(ValueError):
    """An error caused by the user's input; printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with the one error format: ``ua3d: error: ...`` and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"ua3d: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


# --------------------------------------------------------------------------- progress
_BARS: list = []


class _Stage:
    """A progress bar for one running stage (named before it runs); silent with ``--quiet``."""

    def __init__(self, args, desc: str, total: int | None = None, unit: str = "it"):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            disable=bool(getattr(args, "quiet", False)),
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        _BARS.append(self.bar)

    def step(self, _step=None, loss=None) -> None:  # fit callback(step, loss)
        self.bar.update(1)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def rows(self, done: int, total: int) -> None:  # render_volume progress(done, total)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()
        if self.bar in _BARS:
            _BARS.remove(self.bar)


def _close_bars() -> None:
    """Clear every open bar (so that an error message starts on a clean line)."""
    while _BARS:
        _BARS.pop().close()


def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


# --------------------------------------------------------------------------- checks (before any work)
def _wh(h: int, w: int) -> str:
    return f"{w}x{h}"


def _require_file(path, option: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{option} {p}: file not found")
    return p


def _check_out(path, suffixes: tuple[str, ...], option: str) -> Path:
    """An output file: its suffix is one of ``suffixes`` and it is not a folder."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise UserError(
            f"{option} {p}: unsupported file type {p.suffix or '(none)'!r}; use one of {', '.join(suffixes)}"
        )
    if p.is_dir():
        raise UserError(f"{option} {p} is a folder; give a file name")
    if p.parent.exists() and not p.parent.is_dir():
        raise UserError(f"{option} {p}: {p.parent} is not a folder")
    return p


def _check_out_dir(path, option: str = "--out") -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {p} is a file; give a folder")
    return p


def _check_numbers(args, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    for name in positive:
        v = getattr(args, name, None)
        if v is not None and not v > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    for name in non_negative:
        v = getattr(args, name, None)
        if v is not None and not v >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {v}")


def _device(args):
    import torch

    try:
        dev = torch.device(args.device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"--device {args.device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return dev


def _fit_config(args, **extra):
    from .core.tto import FitConfig

    kw = {"steps": args.steps, "seed": args.seed}
    if getattr(args, "radius", None) is not None:
        kw["radius"] = args.radius
    kw.update(extra)
    return FitConfig(**kw)


def _seed(args):
    import torch

    torch.manual_seed(args.seed)


def _guide_tensor(rgb, device):
    import torch

    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).to(device)


def _check_grid(H, W, h, w, what):
    """The LR grid fits in the image (any ratio, also non-integer, as the API allows)."""
    if h > H or w > W:
        raise UserError(f"{what}: grid {_wh(h, w)} is larger than the image {_wh(H, W)} (WxH)")


def _aspect_error(h: int, w: int, H: int, W: int) -> float:
    import math

    return abs(math.log((w / h) / (W / H)))


def _load_signal(path, layout: str, H: int, W: int):
    """LR signal ``[1, C, h, w]`` and its layout; ``auto`` picks the layout whose grid has the image's
    aspect ratio (a ``[30, 40, 64]`` array beside a 640x480 image is 64 channels on 40x30, not 30 on 64x40)."""
    from .features.files import guess_layout, load_features

    if layout != "auto":
        return load_features(path, layout=layout)
    f, used = load_features(path, layout="chw")
    if used == "hw" or f.ndim != 4:
        return f, used
    a, b, c = f.shape[1:]
    cands = {"chw": (a, b, c), "hwc": (c, a, b)}  # layout -> (C, h, w)
    tol = 0.1  # 10 % aspect mismatch: patch grids round the image size
    fits = {k: v for k, v in cands.items() if v[1] <= H and v[2] <= W}
    match = [k for k, v in fits.items() if _aspect_error(v[1], v[2], H, W) < tol]
    guess = guess_layout((a, b, c))
    if len(match) == 1:
        pick = match[0]
    elif guess is not None and (guess in fits or not fits):
        pick = guess
    else:
        raise UserError(
            f"{path}: cannot tell the layout of shape {(a, b, c)} beside the {_wh(H, W)} image; pass "
            f"--layout chw (C={a} on {_wh(b, c)}) or --layout hwc (C={c} on {_wh(a, b)})"
        )
    if pick == "hwc":
        f = f.permute(0, 3, 1, 2).contiguous()
    return f, pick


# --------------------------------------------------------------------------- subcommands
def cmd_upsample(args) -> int:
    _require_file(args.image, "--image")
    _require_file(args.signal, "--signal")
    from .features.files import FEATURE_SUFFIXES

    _check_out(args.out, FEATURE_SUFFIXES, "--out")
    if args.png:
        _check_out(args.png, FIGURE_SUFFIXES, "--png")
    _check_numbers(args, positive=("steps", "radius"))
    dev = _device(args)

    import torch

    import ua3d

    from .features.files import save_features
    from .io.rgbd import read_color

    _seed(args)
    rgb = read_color(args.image)
    H, W = rgb.shape[:2]
    feats, layout = _load_signal(args.signal, args.layout, H, W)
    h, w = feats.shape[-2:]
    _check_grid(H, W, h, w, args.signal)
    guide = _guide_tensor(rgb, dev)
    with _Stage(args, "upsample: fit (TTO steps)", args.steps, "step") as bar:
        k = ua3d.fit(guide, (h, w), _fit_config(args), callback=bar.step)
    with _Stage(args, "upsample: render", 1):
        out = k.render(feats.to(dev), out_dtype=torch.float16 if args.half else None)
    path = save_features(args.out, out[0].float().cpu() if not args.half else out[0].cpu())
    _say(args, f"upsampled {feats.shape[1]} channels ({layout}) {_wh(h, w)} -> {_wh(H, W)}: {path}")
    if args.png:
        from .viz.figures import comparison_figure

        bil = torch.nn.functional.interpolate(feats, size=(H, W), mode="bilinear", align_corners=False)
        with _Stage(args, "upsample: figure", 1):
            comparison_figure(
                guide=rgb, lr=feats[0], bilinear=bil[0], ours=out[0].float().cpu(), path=args.png
            )
        _say(args, f"figure: {args.png}")
    return 0


def cmd_depth_sr(args) -> int:
    import numpy as np
    import torch

    from .depth.sr import upsample_depth
    from .io.rgbd import read_color, read_depth, write_depth

    _check_out(args.out, (".png",), "--out")  # cli: outputs checked before any work
    if args.png:
        _check_out(args.png, FIGURE_SUFFIXES, "--png")
    _seed(args)
    dev = _device(args)
    rgb = read_color(args.rgb)
    depth_lr = read_depth(args.depth, depth_scale=args.depth_scale)
    H, W = rgb.shape[:2]
    h, w = depth_lr.shape
    if h > H or w > W:
        raise UserError(f"{args.depth}: depth {_wh(h, w)} is larger than the colour image {_wh(H, W)}")
    guide = _guide_tensor(rgb, dev)
    d = torch.from_numpy(np.nan_to_num(depth_lr, nan=0.0)).float()[None, None].to(dev)
    opts = {"consistency": args.consistency, "interval_phase": args.interval_phase}
    if args.steps is not None:
        opts["fit_steps"] = args.steps
    with _Stage(args, "depth-sr: fit and render", 1):
        try:
            out, models = upsample_depth(
                d, guide, mask_lr=d > 0, fill_holes=args.fill_holes, return_model=True, **opts
            )
        except ValueError as err:
            raise UserError(str(err)) from err
    hr = out[0, 0].cpu().numpy()
    write_depth(args.out, np.nan_to_num(hr, nan=0.0), depth_scale=args.depth_scale)
    if not args.quiet:
        valid = np.isfinite(hr) & (hr > 0)
        print(
            f"depth {_wh(h, w)} -> {_wh(H, W)} (x{W / w:.3g} / x{H / h:.3g}), forward model {models[0].describe()}, "
            f"{valid.mean() * 100:.1f}% with support: {args.out}"
        )
    if args.png:
        from .viz.figures import depth_sr_figure

        up = (
            torch.nn.functional.interpolate(d, size=(H, W), mode="bicubic", align_corners=False)[0, 0]
            .cpu()
            .numpy()
        )
        depth_sr_figure(guide=rgb, lr=depth_lr, bicubic=up, ours=hr, path=args.png, unit="m")
    return 0


def _volume_plan(args, C: int, H: int, W: int, h: int, w: int):
    """The volume's memory/disk estimate, printed, and refused over ``--max-volume-gib`` or the free RAM."""
    import torch

    from .api import available_memory_bytes
    from .rgbd.volume import estimate_volume_bytes

    dt = torch.float16 if args.half else torch.float32
    est = estimate_volume_bytes(
        C, args.bins, (H, W), dt, band=args.band, radius=args.radius or 8.0, lr_size=(h, w)
    )
    what = (
        f"volume {C} channels x {args.bins} bins x {_wh(H, W)} {'float16' if args.half else 'float32'}"
        f"{'' if args.band is None else f', band {2 * args.band + 1} bins'}"
    )
    _say(args, f"{what}: {est.memory / GIB:.2f} GiB of RAM, file up to {est.volume / GIB:.2f} GiB")
    if est.volume > args.max_volume_gib * GIB:
        raise UserError(
            f"{what} needs {est.volume / GIB:.2f} GiB, over --max-volume-gib {args.max_volume_gib:g}: use fewer "
            f"--bins, --band 2, --half, or raise --max-volume-gib"
        )
    avail = available_memory_bytes()
    if est.memory > 0.8 * avail:
        raise UserError(
            f"{what} needs {est.memory / GIB:.2f} GiB of RAM but only {avail / GIB:.2f} GiB is available: use fewer "
            f"--bins, --band 2 or --half"
        )
    return est


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def cmd_lift(args) -> int:
    for name in ("rgb", "depth", "intrinsics"):
        _require_file(getattr(args, name), f"--{name}")
    if args.features:
        _require_file(args.features, "--features")
    if args.checkpoint:
        _require_file(args.checkpoint, "--checkpoint")
    _check_numbers(
        args,
        positive=("steps", "radius", "bins", "depth_scale", "depth_max", "max_volume_gib"),
        non_negative=("band",),
    )
    out = _check_out_dir(args.out)
    dev = _device(args)

    import torch

    from .io.rgbd import read_color, read_depth, read_intrinsics, save_volume
    from .rgbd.lift import fit_rgbd
    from .rgbd.points import render_points
    from .rgbd.volume import render_volume

    _seed(args)
    rgb = read_color(args.rgb)
    depth = read_depth(args.depth, depth_scale=args.depth_scale)
    cam = read_intrinsics(args.intrinsics)
    H, W = rgb.shape[:2]
    if depth.shape != (H, W):
        raise UserError(
            f"{args.depth}: depth {_wh(*depth.shape)} does not match the colour image {_wh(H, W)} (WxH)"
        )
    if args.features:
        feats, layout = _load_signal(args.features, args.layout, H, W)
        desc = f"file {args.features} ({layout})"
    else:
        feats, desc = _model_features(args, rgb, dev)
    h, w = feats.shape[-2:]
    _check_grid(H, W, h, w, args.features or args.model)
    _volume_plan(args, int(feats.shape[1]), H, W, h, w)
    with _Stage(args, "lift: fit (TTO steps)", args.steps, "step") as bar:
        lifted = fit_rgbd(
            rgb, depth, cam, (h, w), _fit_config(args), depth_max=args.depth_max, callback=bar.step
        )
    with _Stage(args, f"lift: volume ({args.bins} bins)", H, "row") as bar:
        vol, mass, bins = render_volume(
            lifted,
            feats.to(dev),
            bins=args.bins,
            band=args.band,
            out_dtype=torch.float16 if args.half else None,
            progress=bar.rows,
        )
    with _Stage(args, "lift: points", 1):
        pc = render_points(lifted, feats.to(dev), colors=args.colors)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with _Stage(args, "lift: writing files", 2, "file") as bar:
        written.append(
            save_volume(
                out / "volume.npz",
                vol.cpu().numpy(),
                mass.cpu().numpy(),
                bins.cpu().numpy(),
                cam,
                rgb=rgb,
                depth=depth,
                compressed=args.compress,
            )
        )
        bar.step()
        written.append(pc.save(out / f"points.{args.format}"))
        bar.step()
    if args.format == "pcd":
        from .rgbd.formats import PCD_DROPS

        _say(args, f"note: .pcd drops the {PCD_DROPS}")
    _say(
        args,
        f"features: {desc}\nvolume {list(vol.shape)} [C, D, H, W] {str(vol.dtype).replace('torch.', '')} "
        f"-> {written[0]} ({_size(written[0])})\npoints {len(pc)} (colours: {args.colors}) -> {written[1]} "
        f"({_size(written[1])})",
    )
    return 0


def _model_features(args, rgb, device):
    from .features.backbones import extract_features

    try:
        with _Stage(args, f"lift: features ({args.model})", 1):
            f, info = extract_features(rgb, args.model, checkpoint=args.checkpoint, device=device)
    except FileNotFoundError as e:  # no local weights: name what runs without them
        raise UserError(f"{str(e).splitlines()[0]} (models: {MODEL_HELP.split(': ', 1)[1]})") from None
    except ImportError as e:
        raise UserError(
            f"--model {args.model}: {e} (install the extra: pip install 'ua3d[models]', or try "
            f"--model random)"
        ) from None
    return f, str(info.get("description", info) if isinstance(info, dict) else info)


def cmd_demo(args) -> int:
    _check_numbers(args, positive=("steps", "bins", "max_volume_gib"))
    if args.band < -1:
        raise UserError(f"--band must be >= 0 (or -1: all bins), got {args.band}")
    _check_out_dir(args.out)
    dev = _device(args)
    from .demo import check_data, run_demo

    data = Path(args.data) if args.data else None
    check_data(data)
    run_demo(
        data=data,
        out=Path(args.out),
        steps=args.steps,
        seed=args.seed,
        quiet=args.quiet,
        tiny=args.tiny,
        bins=args.bins,
        band=None if args.band < 0 else args.band,
        device=str(dev),
        max_volume_gib=args.max_volume_gib,
    )
    return 0


# --------------------------------------------------------------------------- parser
def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    """The common options, each only where the parser does not define it already."""
    have = {s for a in p._actions for s in a.option_strings}
    if device and "--device" not in have:
        p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1); default cpu")
    if "--seed" not in have:
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if "--quiet" not in have:
        p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    if "--debug" not in have:
        p.add_argument("--debug", action="store_true", help="show tracebacks on error")


def _import_task(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise UserError(
                f"{what} needs the module {module}, which this installation does not have"
            ) from None
        raise


def _lazy_group(sub, name: str, help: str, table: dict, chosen: str | None, dest: str) -> None:
    """``ua3d NAME TASK``: the task's module is imported only when that task is run (fast ``--help``)."""
    g = sub.add_parser(name, help=help, description=help)
    s = g.add_subparsers(dest=dest, required=True, metavar="{" + ",".join(table) + "}")
    for task, (module, task_help) in table.items():
        if task != chosen:
            s.add_parser(task, help=task_help, add_help=False)  # listed in the help; built when chosen
            continue
        tp = s.add_parser(
            task, help=task_help, description=task_help, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        mod = _import_task(module, f"ua3d {name} {task}")
        mod.add_arguments(tp)
        _add_common(tp, device=name == "eval")
        tp.set_defaults(func=lambda args, m=mod: int(m.run(args) or 0), module=mod)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; for ``eval`` / ``view`` only the task named in ``argv`` is imported and built."""
    from . import __version__

    argv = list(argv or [])
    chosen = argv[1] if len(argv) > 1 and argv[0] in ("eval", "view") else None
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common)

    p = _Parser(prog="ua3d", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"ua3d {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", parents=[common], help="run everything on the bundled sample scene")
    d.add_argument("--out", default="ua3d-demo", help="output folder (default ./ua3d-demo)")
    d.add_argument("--data", default=None, help="sample folder (default: the sample scene bundled with ua3d)")
    d.add_argument("--steps", type=int, default=50, help="TTO steps (default 50)")
    d.add_argument("--bins", type=int, default=16, help="depth bins of the feature volume (default 16)")
    d.add_argument(
        "--band",
        type=int,
        default=2,
        help="keep 2 band + 1 bins around each pixel's depth in the volume (default 2; -1: all bins)",
    )
    d.add_argument("--max-volume-gib", type=float, default=4.0, help="refuse a larger volume (default 4 GiB)")
    d.add_argument("--tiny", action="store_true", help="a quick half-size run (for CI)")
    d.set_defaults(func=cmd_demo)

    u = sub.add_parser("upsample", parents=[common], help="image + LR signal file -> HR signal")
    u.add_argument("--image", required=True, help="guide image (PNG/JPG)")
    u.add_argument(
        "--signal", required=True, help="LR signal: .npy/.pt/.npz, [C,h,w] or [h,w,C]; any grid size"
    )
    u.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "chw", "hwc"],
        help="signal layout (default auto: the one whose grid has the image's aspect ratio)",
    )
    u.add_argument("--out", required=True, help="output .npy/.pt/.npz ([C,H,W])")
    u.add_argument("--png", default=None, help="also write a comparison figure (.png/.pdf/.svg)")
    u.add_argument("--steps", type=int, default=50, help="TTO steps (default 50)")
    u.add_argument("--radius", type=float, default=None, help="window radius in LR cells (default 8)")
    u.add_argument("--half", action="store_true", help="float16 output")
    u.set_defaults(func=cmd_upsample)

    s = sub.add_parser(
        "depth-sr", parents=[common], help="RGB + LR depth (16-bit PNG) -> HR depth (16-bit PNG)"
    )
    s.add_argument("--rgb", required=True, help="HR colour image (PNG/JPEG) that guides the upsampling")
    s.add_argument(
        "--depth", required=True, help="LR depth, 16-bit PNG (0 = hole); any ratio to the colour image"
    )
    s.add_argument(
        "--depth-scale", type=float, default=1000.0, help="raw units per metre (1000 = mm, 5000 = TUM)"
    )
    s.add_argument("--out", required=True, help="HR depth, 16-bit PNG in the same units")
    s.add_argument("--fill-holes", action="store_true", help="fill pixels that had no valid LR support")
    s.add_argument("--png", default=None, help="also write a comparison figure")
    s.add_argument(
        "--steps", type=int, default=None, help="self-supervised depth-fit steps (default: the method's)"
    )
    s.add_argument(
        "--consistency",
        default="auto",
        choices=["auto", "bicubic", "area", "bilinear", "point", "interval", "gauss", "none"],
        help="forward model: how the LR depth was made from the scene. auto (default) detects it per image; "
        "bicubic = PIL bicubic downsampling (synthetic benchmarks), area = box average (most sensors), "
        "point/interval = every s-th pixel, none = no consistency solve",
    )
    s.add_argument(
        "--interval-phase",
        default="auto",
        choices=["auto", "end", "start"],
        help="for every-s-th-pixel LR depth, which pixel of each s x s block was kept: end = hr[s-1::s] "
        "(protocol A), start = hr[::s] (a plain slice); auto (default) detects it",
    )
    s.set_defaults(func=cmd_depth_sr)

    lf = sub.add_parser(
        "lift", parents=[common], help="RGB-D + intrinsics + features -> volume and point cloud"
    )
    lf.add_argument("--rgb", required=True, help="colour image (PNG/JPG)")
    lf.add_argument("--depth", required=True, help="16-bit depth PNG, same size as --rgb (0 = hole)")
    lf.add_argument("--depth-scale", type=float, default=1000.0, help="raw depth units per metre (1000 = mm)")
    lf.add_argument("--depth-max", type=float, default=None, help="depths beyond this (m) are holes")
    lf.add_argument("--intrinsics", required=True, help="Open3D-style intrinsics JSON")
    src = lf.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="LR features file (.npy/.pt/.npz), any grid size")
    src.add_argument("--model", help=MODEL_HELP)
    lf.add_argument("--checkpoint", default=None, help="local checkpoint file for --model")
    lf.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "chw", "hwc"],
        help="features layout (default auto: the one whose grid has the image's aspect ratio)",
    )
    lf.add_argument("--bins", type=int, default=32, help="depth bins of the feature volume (default 32)")
    lf.add_argument(
        "--band",
        type=int,
        default=None,
        help="keep only 2 band + 1 bins around each pixel's depth (smaller, faster; default: all)",
    )
    lf.add_argument("--half", action="store_true", help="float16 volume (computed and saved; half the size)")
    lf.add_argument("--compress", action="store_true", help="zip-compress volume.npz (slower to write)")
    lf.add_argument(
        "--max-volume-gib",
        type=float,
        default=4.0,
        help="refuse (before any work) a volume larger than this (default 4 GiB)",
    )
    lf.add_argument("--steps", type=int, default=50, help="TTO steps (default 50)")
    lf.add_argument("--radius", type=float, default=None, help="window radius in LR cells (default 8)")
    lf.add_argument(
        "--colors",
        choices=["rgb", "pca"],
        default="rgb",
        help="point colours: the image's (default) or a PCA of the features",
    )
    lf.add_argument(
        "--format",
        choices=["ply", "npz", "pcd"],
        default="ply",
        help="point cloud file: ply (uchar RGB + features; Open3D/MeshLab/CloudCompare), npz "
        "(lossless), pcd (PCL; drops pixel indices, bins and the colour-mode note)",
    )
    lf.add_argument("--out", required=True, help="output folder (volume.npz, points.<format>)")
    lf.set_defaults(func=cmd_lift)

    _lazy_group(
        sub,
        "eval",
        "benchmarks: ua3d eval depth-sr --help, ua3d eval transfer --help",
        EVAL_TASKS,
        chosen if argv[:1] == ["eval"] else None,
        "task",
    )
    _lazy_group(
        sub,
        "view",
        "open a viewer (or --png for a headless picture): ua3d view points --help",
        VIEW_KINDS,
        chosen if argv[:1] == ["view"] else None,
        "kind",
    )

    from .cli_fuse import add_fuse_parser  # `ua3d fuse` (issue 17): arguments live there

    add_fuse_parser(sub, common)

    from .batch.cli import add_parser as add_batch_parser  # `ua3d batch ...` (issue 18): arguments live there

    add_batch_parser(sub, parents=[common])
    return p


def _prepare_task(args) -> None:
    """Common options of the lazily built eval / view tasks, checked before the task runs."""
    if getattr(args, "command", None) == "eval":
        _device(args)
        if args.quiet and hasattr(args, "no_progress"):
            args.no_progress = True
    if getattr(args, "command", None) == "view":
        f = getattr(args, "volume", None) or getattr(args, "cloud", None)
        if f and not getattr(args, "demo", False):
            _require_file(f, "view")
        checker = getattr(args.module, "check_args", None)
        if checker is not None:
            checker(args)


def _run_quiet(args) -> int:
    if not getattr(args, "quiet", False) or getattr(args, "command", None) != "view":
        return args.func(args)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return args.func(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser(argv).parse_args(argv)
        if getattr(args, "command", None) in ("eval", "view"):
            _prepare_task(args)
        return int(_run_quiet(args) or 0)
    except (
        ValueError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        MemoryError,
        ImportError,
        RuntimeError,
    ) as e:
        if isinstance(e, RuntimeError) and type(e).__name__ != "RenderingUnavailable":
            raise
        _close_bars()
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ua3d: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        _close_bars()
        print("ua3d: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
