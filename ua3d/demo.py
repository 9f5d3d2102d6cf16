"""``ua3d demo``: everything end to end on the bundled synthetic RGB-D sample.

Steps (each timed and summarised in ``summary.txt`` / ``summary.json``):

1. load the sample scene bundled with the package (``ua3d/sample_data/``: RGB, depth in mm, object ids,
   intrinsics);
2. LR "features": a fixed-seed RANDOM conv net (honest but meaningless features, labelled as such) and
   the one-hot object ids area-pooled to the same grid (a class-probability map);
3. 2D kernel (Upsample Anything TTO on RGB) -> guide reconstruction PSNR vs bicubic, label accuracy;
4. lifted RGB-D kernel -> depth-aware label accuracy, a feature volume over depth bins (float16, a band of
   bins around the surface, compressed: the file the slice viewer shows) and a feature point cloud (PLY
   with the image's colours and the features);
5. guided depth super-resolution of the depth downsampled x8 (protocol B), RMSE vs bicubic;
6. pictures: comparison figures and, when Open3D can render headless, the two viewers' pictures.

Each stage's progress bar names the stage while it runs; the summary lists every file with its size.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SAMPLE_FILES", "check_data", "default_data_dir", "run_demo"]

SAMPLE_FILES = ("rgb.png", "depth.png", "depth_holes.png", "ids.png", "intrinsics.json")


#: zlib level of the demo's volume.npz: level 1 deflates the mostly-zero float16 band ~3x faster than
#: numpy's default (6) for a ~25% larger file (29 -> ~36 MB measured on the bundled scene)
VOLUME_COMPRESS_LEVEL = 1


def default_data_dir() -> Path:
    """The sample scene shipped inside the package (package data, so a wheel install has it)."""
    return Path(__file__).resolve().parent / "sample_data"


def check_data(data: Path | None) -> Path:
    """The sample folder, or a ``ValueError`` naming the files it lacks (checked before any work)."""
    d = default_data_dir() if data is None else Path(data)
    missing = [f for f in SAMPLE_FILES if not (d / f).is_file()]
    if missing:
        hint = "" if data is not None else " (the package data is missing: reinstall ua3d)"
        raise ValueError(f"--data {d}: missing {', '.join(missing)}{hint}")
    return d


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a.clamp(0, 1) - b) ** 2).mean()))


def _hit_rate(hit: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``hit`` over ``mask`` and labelled pixels (``ids >= 0``); NaN when none."""
    m = mask & (ids >= 0)
    return float(hit[m].float().mean()) if m.any() else float("nan")


def _label_accuracy(
    probs: dict[str, torch.Tensor], ids: torch.Tensor, masks: dict[str, torch.Tensor]
) -> dict:
    """``{mask: {method: accuracy}}``, each method's argmax taken once for every mask."""
    hits = {k: p.argmax(1)[0] == ids for k, p in probs.items()}
    return {m: {k: _hit_rate(h, ids, mask) for k, h in hits.items()} for m, mask in masks.items()}


def _prefetch_imports() -> None:
    """Import matplotlib's Agg figure and Open3D (~1 s and ~1.7 s, mostly single-threaded) in a
    background thread while the fits run on the numba pool (which leaves part of the second core
    idle); a failing import is left for the pictures stage to report."""
    import contextlib

    with contextlib.suppress(Exception):
        import ua3d.viz.figures  # noqa: F401
    with contextlib.suppress(Exception):
        from ua3d.viz import o3d_render

        o3d_render.import_open3d()


def _near_depth_edges(depth: np.ndarray, px: int = 3) -> np.ndarray:
    """Pixels within ``px`` of a depth discontinuity (relative jump > 5%)."""
    import cv2

    z = np.where(depth > 0, depth, np.nan)
    jump = np.zeros_like(depth, dtype=bool)
    for dy, dx in ((0, 1), (1, 0)):
        a, b = z[: z.shape[0] - dy, : z.shape[1] - dx], z[dy:, dx:]
        rel = np.abs(a - b) / np.minimum(a, b)
        e = np.nan_to_num(rel, nan=1.0) > 0.05
        jump[: z.shape[0] - dy, : z.shape[1] - dx] |= e
        jump[dy:, dx:] |= e
    k = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    return cv2.dilate(jump.astype(np.uint8), k) > 0


def run_demo(
    data: Path | None = None,
    out: Path = Path("ua3d-demo"),
    steps: int = 50,
    seed: int = 0,
    quiet: bool = False,
    tiny: bool = False,
    bins: int = 16,
    device: str = "cpu",
    band: int | None = 2,
    max_volume_gib: float = 4.0,
) -> dict:
    """Run the demo and write PNGs, a ``.ply`` point cloud, a volume and a summary to ``out``.

    ``bins`` depth bins, of which ``band`` (None: all) on each side of a pixel's depth are computed; the
    volume is refused before any work when it would exceed ``max_volume_gib``.
    """
    for name, v in (("steps", steps), ("bins", bins)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if band is not None and (isinstance(band, bool) or not isinstance(band, int) or band < 0):
        raise ValueError(f"band must be None or an integer >= 0, got {band!r}")
    torch.manual_seed(seed)
    data = check_data(data)
    # background work, each kind in its own thread: "figures" draws every matplotlib figure in turn
    # (matplotlib's font cache is not thread-safe: one thread draws them all) after importing
    # matplotlib and Open3D; "save" writes volume.npz and points.ply (zlib and file writes release
    # the GIL). Both are joined before the summary lists the files; their errors are raised there.
    figures = ThreadPoolExecutor(1, thread_name_prefix="ua3d-demo-figures")
    writer = ThreadPoolExecutor(1, thread_name_prefix="ua3d-demo-save")
    try:
        return _run_demo(
            data, out, steps, seed, quiet, tiny, bins, device, band, max_volume_gib, figures, writer
        )
    finally:  # on an error, what has not started is dropped; what runs is waited for
        figures.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)


def _run_demo(
    data, out, steps, seed, quiet, tiny, bins, device, band, max_volume_gib, figures, writer
) -> dict:
    from tqdm import tqdm

    import ua3d
    from ua3d.baselines import bicubic, bilinear
    from ua3d.depth.sr import upsample_depth
    from ua3d.features.random_net import random_features
    from ua3d.io.rgbd import (
        read_color,
        read_depth,
        read_ids,
        read_intrinsics,
        volume_record,
        write_volume_record,
    )
    from ua3d.rgbd.lift import fit_rgbd
    from ua3d.rgbd.points import render_points
    from ua3d.rgbd.volume import estimate_volume_bytes, render_volume

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file; give a folder")
    dev = torch.device(device)
    log: dict = {"data": str(data), "steps": steps, "seed": seed, "tiny": tiny, "timings_s": {}}
    t_all = time.perf_counter()
    names = ["load", "features", "fit-2d", "lift", "depth-sr", "pictures"]
    bar = tqdm(total=len(names), desc="demo", disable=quiet, leave=False, file=__import__("sys").stderr)
    clock = {"t0": time.perf_counter()}

    def begin(name):  # the bar names the stage that is running now
        bar.set_description_str(f"demo: {name}")
        clock["t0"] = time.perf_counter()

    def stage(name, _t0=None):
        log["timings_s"][name] = round(time.perf_counter() - clock["t0"], 3)
        bar.update(1)

    def say(text):
        if not quiet:
            bar.clear()
            print(text, flush=True)
            bar.refresh()

    # 1. data --------------------------------------------------------------------------------------
    begin("load")
    t0 = time.perf_counter()
    rgb = read_color(data / "rgb.png")
    depth = read_depth(data / "depth_holes.png", depth_scale=1000.0)
    depth_gt = read_depth(data / "depth.png", depth_scale=1000.0)
    ids = read_ids(data / "ids.png").astype(np.int64)
    cam = read_intrinsics(data / "intrinsics.json")
    if tiny:  # half size: every array and the camera
        import cv2

        H2, W2 = rgb.shape[0] // 2, rgb.shape[1] // 2
        rgb = cv2.resize(rgb, (W2, H2), interpolation=cv2.INTER_AREA)
        depth = depth[::2, ::2].copy()
        depth_gt = depth_gt[::2, ::2].copy()
        ids = ids[::2, ::2].copy()
        cam = cam.resized(W2, H2)
    H, W = rgb.shape[:2]
    stride = 16
    h, w = H // stride, W // stride
    guide = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).to(dev)
    C = 32
    est = estimate_volume_bytes(C, bins, (H, W), torch.float16, band=band, lr_size=(H // 16, W // 16))
    log["volume_estimate"] = {"ram_bytes": est.memory, "volume_bytes": est.volume}
    say(
        f"feature volume {C} channels x {bins} bins x {W}x{H} float16"
        f"{'' if band is None else f' (band of {min(bins, 2 * band + 1)} bins)'}: {est.memory / 2**30:.2f} GiB of RAM, "
        f"file up to {est.volume / 2**30:.2f} GiB before compression"
    )
    if est.volume > max_volume_gib * 2**30:
        raise ValueError(
            f"the feature volume would need {est.volume / 2**30:.2f} GiB, over max_volume_gib "
            f"{max_volume_gib:g}: use fewer bins or a band"
        )
    out.mkdir(parents=True, exist_ok=True)
    stage("load", t0)

    # 2. LR signals --------------------------------------------------------------------------------
    begin("features (random conv net)")
    t0 = time.perf_counter()
    feats, desc = random_features(rgb, stride=stride, channels=C, seed=seed, device=dev)
    if tuple(feats.shape[-2:]) != (h, w):
        feats = F.interpolate(feats, size=(h, w), mode="area")
    n_cls = int(ids.max()) + 1
    onehot = F.one_hot(torch.from_numpy(ids), n_cls).permute(2, 0, 1)[None].float().to(dev)
    probs_lr = F.adaptive_avg_pool2d(onehot, (h, w))
    ids_t = torch.from_numpy(ids).to(dev)
    log["features"] = desc
    log["grid"] = [h, w]
    log["image"] = [H, W]
    stage("features", t0)

    # 3. 2D kernel ----------------------------------------------------------------------------------
    begin(f"fit-2d ({steps} TTO steps)")
    t0 = time.perf_counter()
    k2d = ua3d.fit(guide, (h, w), steps=steps, seed=seed)
    rec = k2d.render(k2d.guide_lr)
    feats_2d = k2d.render(feats)
    probs_2d = k2d.render(probs_lr)
    log["psnr_db"] = {"bicubic": _psnr(bicubic(guide, k2d.guide_lr), guide), "ua3d_2d": _psnr(rec, guide)}
    stage("fit-2d", t0)

    # 4. lifted RGB-D kernel ------------------------------------------------------------------------
    begin(f"lift (RGB-D fit, {steps} steps, volume, points)")
    t0 = time.perf_counter()
    # The library defaults (the transfer benchmark's choice, docs/transfer.md): the colour loss of the 2D
    # kernel, with surface normals from the depth deciding which cells a pixel may borrow from.
    lifted = fit_rgbd(rgb, depth, cam, (h, w), ua3d.FitConfig(steps=steps, seed=seed))
    probs_3d = lifted.render_2d(probs_lr)
    valid = torch.from_numpy(depth > 0).to(dev)
    edges = torch.from_numpy(_near_depth_edges(depth_gt)).to(dev) & valid
    probs = {"bilinear": bilinear(guide, probs_lr), "ua3d_2d": probs_2d, "ua3d_rgbd": probs_3d}
    log["label_accuracy"] = _label_accuracy(
        probs, ids_t, {"all_valid": valid, "within_3px_of_depth_edges": edges}
    )
    del probs, probs_2d, probs_3d
    vol, mass, bin_depths = render_volume(lifted, feats, bins=bins, band=band, out_dtype=torch.float16)
    volume = volume_record(
        vol.cpu().numpy(), mass.float().cpu().numpy(), bin_depths.cpu().numpy(), cam, rgb, depth
    )
    # the files are written in the background while the demo goes on (the pictures draw the volume and
    # the points from memory); the summary waits for them
    saved = [
        writer.submit(
            write_volume_record,
            out / "volume.npz",
            volume,
            compressed=True,
            compress_level=VOLUME_COMPRESS_LEVEL,
        )
    ]
    pts = render_points(lifted, feats, colors="rgb")
    saved.append(writer.submit(pts.save, out / "points.ply"))
    log["volume"] = {
        "shape": list(vol.shape),
        "bins_m": [float(bin_depths[0]), float(bin_depths[-1])],
        "dtype": "float16",
        "band": band,
    }
    log["points"] = int(pts.positions.shape[0])
    del vol, mass
    stage("lift", t0)
    # matplotlib/Open3D imports and the first figure start only now: on 2 cores they slow the fits down
    # by more than they save when overlapped with them
    prefetched = figures.submit(_prefetch_imports)
    feature_figure = figures.submit(
        _figure,
        "comparison_figure",
        guide=rgb,
        lr=feats[0].cpu(),
        bilinear=bilinear(guide, feats)[0].cpu(),
        ours=feats_2d[0].cpu(),
        path=out / "features.png",
        names=("bilinear", "ua3d"),
    )
    del feats_2d

    # 5. depth super-resolution ---------------------------------------------------------------------
    begin("depth-sr (x8, protocol B)")
    t0 = time.perf_counter()
    s = 8
    from ua3d.depth.protocols import make_lr

    d_hr = torch.from_numpy(depth_gt).float()[None, None].to(dev)
    Hc, Wc = (H // s) * s, (W // s) * s
    _, d_lr_np = make_lr(np.where(depth_gt > 0, depth_gt, np.nan), s, "B")  # protocol B (bicubic), holes NaN
    d_lr = torch.from_numpy(np.nan_to_num(np.asarray(d_lr_np, np.float32), nan=0.0))[None, None].to(dev)
    d_up = upsample_depth(d_lr, guide[..., :Hc, :Wc], mask_lr=d_lr > 0)
    m = d_hr[..., :Hc, :Wc] > 0
    from ua3d.depth.baselines import bicubic as depth_bicubic

    d_bic = depth_bicubic(d_lr, guide[..., :Hc, :Wc], mask_lr=d_lr > 0)
    rmse = lambda a: float(torch.sqrt(((a - d_hr[..., :Hc, :Wc])[m & torch.isfinite(a)] ** 2).mean()) * 1000)
    log["depth_sr_x8_rmse_mm"] = {"bicubic": rmse(d_bic), "ua3d": rmse(d_up)}
    depth_figure = figures.submit(
        _figure,
        "depth_sr_figure",
        guide=rgb[:Hc, :Wc],
        lr=d_lr[0, 0].cpu().numpy(),
        bicubic=d_bic[0, 0].cpu().numpy(),
        ours=d_up[0, 0].cpu().numpy(),
        gt=depth_gt[:Hc, :Wc],
        path=out / "depth_sr.png",
        names=("bicubic", "ua3d"),
        unit="m",
    )
    stage("depth-sr", t0)

    # 6. pictures ----------------------------------------------------------------------------------
    begin("pictures")
    t0 = time.perf_counter()
    prefetched.result()
    viewer: list = []  # (file, its annotation in the figures thread)
    # the titles and labels are drawn by the figures thread (matplotlib), the 3D views here (Open3D)
    annotate = lambda *a, **k: figures.submit(_figure, "annotated_render", *a, **k)
    try:  # headless Open3D pictures are optional (no EGL: skipped, and the summary says why)
        from ua3d.viz import feature_points, volume_slices

        # from memory, not the file
        viewer.append(
            (
                "volume_slices.png",
                volume_slices.render_png(volume, out / "volume_slices.png", annotate=annotate),
            )
        )
        viewer.append(
            ("points.png", feature_points.render_png(pts, out / "points.png", mode="rgb", annotate=annotate))
        )
    except Exception as e:  # noqa: BLE001
        log["viewer_pictures_skipped"] = _first_line(e)
    del volume, pts
    log["fused_map"] = demo_fusion(out / "fusion", seed=seed, frames=3 if tiny else 4, steps=min(steps, 10))
    feature_figure.result()  # the figures and files are complete (or their errors raised) before the
    depth_figure.result()  # summary lists the files
    pictures = ["features.png", "depth_sr.png"]
    for name, info in viewer:
        try:
            info["annotation"].result()
            pictures.append(name)
        except Exception as e:  # noqa: BLE001
            log.setdefault("viewer_pictures_skipped", _first_line(e))
    log["pictures"] = pictures
    for f in saved:
        f.result()
    stage("pictures", t0)
    bar.close()
    log["timings_s"]["total"] = round(time.perf_counter() - t_all, 3)
    files = sorted(f for f in out.iterdir() if f.is_file() and not f.name.startswith("summary."))
    log["files_bytes"] = {f.name: f.stat().st_size for f in files}
    _write_summary(out, log, quiet)
    return log


def _figure(name: str, *args, **kwargs):
    """``ua3d.viz.figures.<name>(*args, **kwargs)`` (looked up when drawn, in the figures thread)."""
    from ua3d.viz import figures

    return getattr(figures, name)(*args, **kwargs)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _write_summary(out: Path, log: dict, quiet: bool) -> None:
    acc = log["label_accuracy"]
    lines = [
        "ua3d demo on the bundled synthetic RGB-D sample",
        (
            f"image {log['image'][1]}x{log['image'][0]}, LR grid {log['grid'][1]}x{log['grid'][0]}, "
            f"{log['steps']} TTO steps, seed {log['seed']}"
        ),
        f"features: {log['features']}",
        "",
        f"guide reconstruction PSNR: bicubic {log['psnr_db']['bicubic']:.2f} dB, ua3d {log['psnr_db']['ua3d_2d']:.2f} dB",
        "object-id label accuracy (one-hot ids pooled to the LR grid, then upsampled):",
        "  all valid pixels:            bilinear {bilinear:.4f}  ua3d-2d {ua3d_2d:.4f}  ua3d-rgbd {ua3d_rgbd:.4f}".format(
            **acc["all_valid"]
        ),
        "  within 3 px of depth edges:  bilinear {bilinear:.4f}  ua3d-2d {ua3d_2d:.4f}  ua3d-rgbd {ua3d_rgbd:.4f}".format(
            **acc["within_3px_of_depth_edges"]
        ),
        "  (ua3d-rgbd: fit_rgbd with the library defaults; this sample is a camouflage scene, docs/transfer.md)",
        (
            f"feature volume {log['volume']['shape']} [C, D, H, W] float16 over {log['volume']['bins_m'][0]:.2f}-"
            f"{log['volume']['bins_m'][1]:.2f} m"
            + (
                ""
                if log["volume"]["band"] is None
                else f", {2 * log['volume']['band'] + 1}-bin band around the surface"
            )
            + " -> volume.npz (compressed)"
        ),
        f"feature point cloud: {log['points']} points (image colours + features) -> points.ply",
        "depth SR x8 (protocol B) RMSE: bicubic {bicubic:.1f} mm, ua3d {ua3d:.1f} mm".format(
            **log["depth_sr_x8_rmse_mm"]
        ),
        f"pictures: {', '.join(log['pictures'])}"
        + (
            f" (viewer pictures skipped: {log['viewer_pictures_skipped']})"
            if "viewer_pictures_skipped" in log
            else ""
        ),
        "files: "
        + ", ".join(f"{k} {_mb(v)}" for k, v in log["files_bytes"].items())
        + f"; total {_mb(sum(log['files_bytes'].values()))}",
        "fused map of {frames} posed views: {voxels} voxels -> fusion/map.npz ({seconds:.1f} s)".format(
            **log["fused_map"]
        ),
        "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in log["timings_s"].items()),
    ]
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    (out / "summary.json").write_text(json.dumps(log, indent=2))
    if not quiet:
        print(text, end="")
        print(f"outputs in {out}/")


def demo_fusion(
    out: Path,
    seed: int = 0,
    frames: int = 4,
    size: tuple[int, int] = (160, 120),
    steps: int = 10,
    quiet: bool = True,
) -> dict:
    """The demo's short fused sequence: ``frames`` posed views of the bundled scene's layout
    (:func:`ua3d.rgbd.synthetic.make_layout` seed 0, as ``sample_data``), random-net features,
    fused into ``out/map.npz`` (and ``map.png`` when Open3D can render headless)."""

    from .core.tto import FitConfig
    from .features.random_net import random_features
    from .rgbd.camera import PinholeCamera, look_at
    from .rgbd.fusion import FeatureMap
    from .rgbd.synthetic import make_layout, render_layout

    t0 = time.perf_counter()
    W, H = size
    layout = make_layout(0, n_objects=4)
    fmap = FeatureMap(
        0.03, 16, torch.float16, work_width=None, fit_config=FitConfig(steps=steps, radius=2.0, seed=seed)
    )
    target = np.array([0.0, 0.3, -1.0])
    f = 525.0 * W / 640
    for yaw in np.linspace(-0.4, 0.4, frames):
        eye = target + np.array([2.6 * np.sin(yaw), 0.9, 2.6 * np.cos(yaw)])
        cam = PinholeCamera(f, f, (W - 1) / 2, (H - 1) / 2, W, H, look_at(eye, target))
        s = render_layout(layout, cam, holes=2, seed=seed)
        feats, _ = random_features(s["rgb"], stride=8, channels=16, seed=seed)
        fmap.integrate(s["rgb"], s["depth"], cam, feats)
    out.mkdir(parents=True, exist_ok=True)
    fmap.save(out / "map.npz")
    info = {"frames": fmap.frames, "voxels": len(fmap), "file": "map.npz"}
    try:
        from .viz.map_view import render_map

        render_map(fmap, out / "map.png", query_index=0, width=480, height=360)
        info["picture"] = "map.png"
    except Exception as e:  # noqa: BLE001  # headless rendering is optional for the demo
        info["picture_skipped"] = str(e).splitlines()[0]
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info
