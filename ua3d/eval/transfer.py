"""Transfer benchmark: judge a fitted kernel by the *other* signals it renders.

A kernel is fitted on an HR guide for an LR grid; what matters is how well it renders signals
that live on that grid (patch features, pooled labels, depth), not how well it reconstructs its
own LR guide. Every task has a ground truth at HR:

``rgb``
    Fit on the HR photo, render the **box-** (area-) and the **bicubic**-downsampled HR photo,
    PSNR against the HR photo (the LR signal is made by a different process than the LR guide in the
    bicubic case). Photos: skimage's astronaut, coffee, chelsea, rocket, Middlebury and NYUv2 colour
    images from ``../shared/data``, centre-cropped, at 224 px (14x14 and 16x16 grids) and 448 px
    (32x32).
``labels``
    Synthetic RGB-D scenes of :data:`ua3d.rgbd.synthetic.FAMILIES` with exact object ids; one-hot ids
    area-pooled by 14x and 16x, upsampled, argmax; accuracy within 3 px of an id boundary and mIoU,
    per family (mean over seeds). The RGB-D lift competes here.
``features``
    The random conv net (:mod:`ua3d.features.random_net`) evaluated densely (stride 1) is the HR
    ground truth; its box pool onto the grid (stride 14/16 evaluation up to the per-channel
    standardisation) is the LR signal. Mean cosine similarity, and agreement of a linear
    (nearest-centroid) probe fitted on the dense features (k-means, 8 classes).
``depth``
    Middlebury guided-depth-SR dev scenes: LR depth by bicubic downsampling (protocol B) x8 / x16,
    the 2D recipe (fit on colour, render depth); RMSE in the data's 0-255 units.
``corrupt``
    The guide only is corrupted (salt-and-pepper 10% / 20%, Gaussian noise 0.05 / 0.1, JPEG quality
    20); the LR signal and the ground truth stay clean. RGB transfer (box LR) and label transfer.

Methods: ``bilinear``, ``bicubic``, ``jbu`` (:func:`ua3d.baselines.classic.jbu`), ``kernel`` (the
2D kernel with the given :class:`~ua3d.core.tto.FitConfig`, by default ua3d's defaults),
``authors`` (the same engine with the authors' recipe: point-sampled LR guide), ``lift`` (RGB-D
tasks) and ``anyup`` when ``--anyup-checkpoint`` is given.

Use ``ua3d eval transfer`` or ``python scripts/eval_transfer.py`` (``--quick`` for a subset, ``--tasks``
to choose, ``--set steps=20`` to override a FitConfig field, ``--json`` for the report).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CORRUPTIONS",
    "TASKS",
    "add_arguments",
    "boundary_mask",
    "corrupt_guide",
    "downsample",
    "label_scores",
    "load_photos",
    "psnr",
    "run",
    "task_corrupt",
    "task_depth",
    "task_features",
    "task_labels",
    "task_rgb",
]

TASKS = ("rgb", "labels", "features", "depth", "corrupt")
CORRUPTIONS = ("sp10", "sp20", "gauss05", "gauss10", "jpeg20")
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
QUICK_PHOTOS = ("astronaut", "coffee", "chelsea")
DATA_PHOTOS = ("middlebury/Art", "middlebury/Books", "middlebury/Moebius", "nyuv2/1000", "nyuv2/1001")
#: the authors' recipe expressed in ua3d's engine (their LR guide is a non-antialiased resize, no pre-filter)
AUTHORS = {"guide_downsample": "bilinear", "guide_prefilter": "none", "values_mix": 0.0, "cell_samples": None}


# ---------------------------------------------------------------------- data
def default_data_root() -> Path:
    """``$UA3D_DATA`` or ``../shared/data`` beside the checkout."""
    env = os.environ.get("UA3D_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def _square(img: np.ndarray, size: int) -> torch.Tensor:
    """Centre-cropped square ``[1, 3, size, size]`` float in [0, 1] (antialiased bicubic resize)."""
    H, W = img.shape[:2]
    s = min(H, W)
    y0, x0 = (H - s) // 2, (W - s) // 2
    t = (
        torch.from_numpy(np.ascontiguousarray(img[y0 : y0 + s, x0 : x0 + s, :3]))
        .permute(2, 0, 1)[None]
        .float()
        / 255
    )
    return F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(
        0, 1
    )


def load_photos(
    names: Sequence[str], size: int, data_root: Path | None = None
) -> list[tuple[str, torch.Tensor]]:
    """``(name, [1, 3, size, size])`` for skimage names and ``middlebury/<scene>`` / ``nyuv2/<frame>``.

    Photos whose data folder is missing are skipped (the report lists what was used).
    """
    import skimage.data

    root = default_data_root() if data_root is None else Path(data_root)
    out = []
    for name in names:
        if "/" not in name:
            out.append((name, _square(getattr(skimage.data, name)(), size)))
            continue
        kind, key = name.split("/", 1)
        if kind == "middlebury":
            hits = sorted((root / "middlebury-gdsr-dev").glob(f"*_{key}/*_output_color.png"))
        elif kind == "nyuv2":
            hits = [root / "nyuv2-dkn-test" / key / "rgb.jpg"]
        else:
            raise ValueError(
                f"unknown photo {name!r}: use a skimage name, middlebury/<scene> or nyuv2/<frame>"
            )
        if not hits or not hits[0].is_file():
            continue
        from PIL import Image

        out.append((name, _square(np.asarray(Image.open(hits[0]).convert("RGB")), size)))
    return out


# ---------------------------------------------------------------------- signals and metrics
def downsample(x: torch.Tensor, grid: tuple[int, int], how: str = "area") -> torch.Tensor:
    """LR signal ``[B, C, h, w]``: ``"area"`` = mean over each cell (a patch token, a pooled label),
    ``"bicubic"`` = antialiased bicubic resize (protocol B of depth SR)."""
    if how == "area":
        return F.interpolate(x, size=grid, mode="area")
    if how == "bicubic":
        return F.interpolate(x, size=grid, mode="bicubic", antialias=True, align_corners=False)
    raise ValueError(f"how must be 'area' or 'bicubic', got {how!r}")


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of ``pred`` (clamped to [0, 1]) against ``target`` in [0, 1]."""
    mse = float(((pred.clamp(0, 1) - target) ** 2).mean())
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def boundary_mask(ids: torch.Tensor, px: int = 3) -> torch.Tensor:
    """Pixels within ``px`` pixels (Chebyshev) of a 4-neighbour label change. ``ids [H, W]`` -> bool."""
    e = torch.zeros(ids.shape, dtype=torch.bool)
    dy = ids[1:] != ids[:-1]
    dx = ids[:, 1:] != ids[:, :-1]
    e[1:] |= dy
    e[:-1] |= dy
    e[:, 1:] |= dx
    e[:, :-1] |= dx
    if px > 0:
        e = F.max_pool2d(e[None, None].float(), 2 * px + 1, stride=1, padding=px)[0, 0] > 0
    return e


def label_scores(pred: torch.Tensor, ids: torch.Tensor, boundary: torch.Tensor) -> dict[str, float]:
    """Boundary accuracy, overall accuracy and mIoU (over the ids present in ``ids``)."""
    ok = pred == ids
    ious = []
    for c in torch.unique(ids):
        p, t = pred == c, ids == c
        ious.append(float((p & t).sum()) / max(1.0, float((p | t).sum())))
    return {
        "boundary_acc": float(ok[boundary].float().mean()),
        "acc": float(ok.float().mean()),
        "miou": float(np.mean(ious)),
    }


def corrupt_guide(img: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """Corrupted copy of a guide ``[1, 3, H, W]`` in [0, 1]: ``sp10``/``sp20`` (salt and pepper on that
    fraction of pixels, all channels), ``gauss05``/``gauss10`` (additive noise, clipped), ``jpeg20``."""
    g = torch.Generator().manual_seed(int(seed))
    if kind in ("sp10", "sp20"):
        frac = 0.1 if kind == "sp10" else 0.2
        u = torch.rand(img.shape[0], 1, *img.shape[-2:], generator=g)
        salt = torch.rand(u.shape, generator=g) < 0.5
        out = torch.where(u < frac, salt.to(img.dtype).expand_as(img), img)
        return out
    if kind in ("gauss05", "gauss10"):
        s = 0.05 if kind == "gauss05" else 0.1
        return (img + s * torch.randn(img.shape, generator=g)).clamp(0, 1)
    if kind == "jpeg20":
        import io

        from PIL import Image

        arr = (img[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=20)
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        return torch.from_numpy(back.copy()).permute(2, 0, 1)[None].to(img.dtype) / 255
    raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {kind!r}")


# ---------------------------------------------------------------------- methods
def _fit_config(overrides: dict[str, Any]):
    from ua3d.core.tto import FitConfig

    return FitConfig().replace(**overrides) if overrides else FitConfig()


class _Renderers:
    """Upsamplers for one guide and grid; the kernels are fitted once and reused for every signal."""

    def __init__(
        self,
        guide: torch.Tensor,
        grid: tuple[int, int],
        methods: Sequence[str],
        cfg,
        *,
        rgbd: dict | None = None,
        lift_kw: dict | None = None,
        anyup_model=None,
    ):
        import ua3d
        from ua3d.baselines import classic

        self.guide, self.grid, self.fns, self.fit_s = guide, grid, {}, {}
        size = tuple(guide.shape[-2:])
        for m in methods:
            t0 = time.perf_counter()
            if m == "bilinear":
                self.fns[m] = lambda s: classic.bilinear(guide, s)
            elif m == "bicubic":
                self.fns[m] = lambda s: classic.bicubic(guide, s)
            elif m == "jbu":
                self.fns[m] = lambda s: classic.jbu(guide, s)
            elif m == "kernel":
                self.fns[m] = ua3d.fit(guide, grid, cfg).render
            elif m == "authors":
                self.fns[m] = ua3d.fit(guide, grid, cfg.replace(**AUTHORS)).render
            elif m == "lift":
                if rgbd is None:
                    continue
                from ua3d.rgbd.lift import fit_rgbd

                lk = fit_rgbd(guide, rgbd["depth"], rgbd["camera"], grid, cfg, **(lift_kw or {}))
                self.fns[m] = lk.render_2d
            elif m == "anyup":
                if anyup_model is None:
                    continue
                from ua3d.baselines.anyup import anyup

                self.fns[m] = lambda s: anyup(guide, s, size, model=anyup_model)
            else:
                raise ValueError(f"unknown method {m!r}")
            self.fit_s[m] = time.perf_counter() - t0

    def __iter__(self):
        return iter(self.fns.items())


# ---------------------------------------------------------------------- tasks
def task_rgb(
    photos: Sequence[tuple[str, torch.Tensor]],
    grids: Sequence[int] | None,
    methods,
    cfg,
    *,
    anyup_model=None,
    grid_for: Callable[[int], Sequence[int]] | None = None,
) -> list[dict]:
    """PSNR of each method rendering the area / bicubic LR photo; one row per (photo, size, grid)."""
    rows = []
    for name, hr in photos:
        size = hr.shape[-1]
        for n in grid_for(size) if grid_for else grids:
            grid = (n, n)
            r = _Renderers(hr, grid, methods, cfg, anyup_model=anyup_model)
            row = {"photo": name, "size": size, "grid": n, "fit_s": r.fit_s}
            for how in ("area", "bicubic"):
                lr = downsample(hr, grid, how)
                row[how] = {m: psnr(fn(lr), hr) for m, fn in r}
            rows.append(row)
    return rows


def _scene(family: str, seed: int, size: tuple[int, int]):
    from ua3d.rgbd.synthetic import make_family_scene

    W, H = size
    s = make_family_scene(family, seed, W, H)
    rgb = torch.from_numpy(s["rgb"]).permute(2, 0, 1)[None].contiguous()
    return s, rgb, torch.from_numpy(s["ids"]).long()


def _label_lr(ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    n = int(ids.max()) + 1
    return F.interpolate(F.one_hot(ids, n).permute(2, 0, 1)[None].float(), size=grid, mode="area")


def task_labels(
    families: Sequence[str],
    seeds: Sequence[int],
    scales: Sequence[int],
    methods,
    cfg,
    *,
    size=(320, 240),
    lift_kw: dict | None = None,
    corruption: str | None = None,
) -> list[dict]:
    """Label transfer on synthetic RGB-D scenes: one row per (family, seed, scale)."""
    rows = []
    for fam in families:
        for seed in seeds:
            s, rgb, ids = _scene(fam, seed, size)
            guide = rgb if corruption is None else corrupt_guide(rgb, corruption, seed)
            bnd = boundary_mask(ids, 3)
            H, W = ids.shape
            for sc in scales:
                grid = (max(1, round(H / sc)), max(1, round(W / sc)))
                r = _Renderers(
                    guide,
                    grid,
                    methods,
                    cfg,
                    rgbd={"depth": s["depth"], "camera": s["camera"]},
                    lift_kw=lift_kw,
                )
                lr = _label_lr(ids, grid)
                row = {"family": fam, "seed": seed, "scale": sc, "grid": list(grid), "fit_s": r.fit_s}
                for m, fn in r:
                    row[m] = label_scores(fn(lr).argmax(1)[0], ids, bnd)
                rows.append(row)
    return rows


def _kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Centroids ``[k, C]`` of the rows of ``x [N, C]`` (Lloyd, seeded init from the rows)."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        for j in range(k):
            sel = a == j
            if bool(sel.any()):
                c[j] = x[sel].mean(0)
    return c


def task_features(
    photos, scales: Sequence[int], methods, cfg, *, channels: int = 16, anyup_model=None
) -> list[dict]:
    """Dense random-net features as HR truth; cosine similarity and probe agreement per method."""
    from ua3d.features.random_net import random_features

    rows = []
    for name, hr in photos:
        H, W = hr.shape[-2:]
        dense, _ = random_features(hr[0].permute(1, 2, 0), stride=1, channels=channels)
        flat = dense[0].flatten(1).T
        cent = _kmeans(flat[:: max(1, flat.shape[0] // 4096)], 8)
        truth = torch.cdist(flat, cent).argmin(1)
        for sc in scales:
            grid = (max(1, round(H / sc)), max(1, round(W / sc)))
            r = _Renderers(hr, grid, methods, cfg, anyup_model=anyup_model)
            lr = F.interpolate(dense, size=grid, mode="area")
            row = {"photo": name, "size": int(H), "scale": sc, "fit_s": r.fit_s}
            for m, fn in r:
                up = fn(lr)
                cos = float(F.cosine_similarity(up, dense, dim=1).mean())
                pred = torch.cdist(up[0].flatten(1).T, cent).argmin(1)
                row[m] = {"cosine": cos, "probe_agreement": float((pred == truth).float().mean())}
            rows.append(row)
    return rows


def task_depth(
    scenes: Sequence[str] | None, scales: Sequence[int], methods, cfg, *, data_root=None, max_side: int = 448
) -> list[dict]:
    """Middlebury dev depth SR with the 2D recipe (protocol B LR); RMSE in 0-255 units."""
    from ua3d.depth.datasets import load_dataset

    root = (default_data_root() if data_root is None else Path(data_root)) / "middlebury-gdsr-dev"
    if not root.is_dir():
        return []
    rows = []
    for smp in load_dataset("middlebury-gdsr", root):
        if scenes and not any(smp.name.endswith(s) for s in scenes):
            continue
        rgb, depth = smp.load()
        H, W = depth.shape
        m = 16 * max(scales)
        Hc, Wc = min(H, max_side) // m * m, min(W, max_side) // m * m
        y0, x0 = (H - Hc) // 2, (W - Wc) // 2
        g = (
            torch.from_numpy(np.ascontiguousarray(rgb[y0 : y0 + Hc, x0 : x0 + Wc]))
            .permute(2, 0, 1)[None]
            .float()
            / 255
        )
        d = torch.from_numpy(np.ascontiguousarray(depth[y0 : y0 + Hc, x0 : x0 + Wc]))[None, None].float()
        for sc in scales:
            grid = (Hc // sc, Wc // sc)
            r = _Renderers(g, grid, [m_ for m_ in methods if m_ not in ("lift", "anyup")], cfg)
            lr = downsample(d, grid, "bicubic")
            row = {"scene": smp.name, "size": [Hc, Wc], "scale": sc, "fit_s": r.fit_s}
            for meth, fn in r:
                row[meth] = {"rmse": float(((fn(lr) - d) ** 2).mean().sqrt())}
            rows.append(row)
    return rows


def task_corrupt(
    photos,
    corruptions: Sequence[str],
    grid: int,
    methods,
    cfg,
    *,
    families=(),
    seeds=(0,),
    scale: int = 16,
    lift_kw: dict | None = None,
) -> list[dict]:
    """RGB (area LR) and label transfer with a corrupted guide; the LR signal and the truth are clean."""
    rows = []
    for kind in corruptions:
        for i, (name, hr) in enumerate(photos):
            guide = corrupt_guide(hr, kind, seed=i)
            r = _Renderers(guide, (grid, grid), methods, cfg)
            lr = downsample(hr, (grid, grid), "area")
            rows.append(
                {
                    "task": "rgb",
                    "corruption": kind,
                    "photo": name,
                    "grid": grid,
                    "fit_s": r.fit_s,
                    **{m: {"psnr": psnr(fn(lr), hr)} for m, fn in r},
                }
            )
        for row in task_labels(families, seeds, (scale,), methods, cfg, lift_kw=lift_kw, corruption=kind):
            rows.append({"task": "labels", "corruption": kind, **row})
    return rows


# ---------------------------------------------------------------------- summaries
def _mean(vals) -> float:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(report: dict) -> dict:
    """Per-task means per method (what the tables print and the README quotes)."""
    out: dict[str, Any] = {}
    if report.get("rgb"):
        rgb: dict[str, Any] = {}
        for r in report["rgb"]:
            key = f"{r['size']}px/{r['grid']}"
            for how in ("area", "bicubic"):
                for m, v in r[how].items():
                    rgb.setdefault(key, {}).setdefault(how, {}).setdefault(m, []).append(v)
        out["rgb"] = {
            k: {h: {m: _mean(v) for m, v in d.items()} for h, d in hv.items()} for k, hv in rgb.items()
        }
        gains = {}
        for r in report["rgb"]:
            if r["size"] == 224 and r["grid"] == 14 and "kernel" in r["area"] and "bicubic" in r["area"]:
                gains[r["photo"]] = r["area"]["kernel"] - r["area"]["bicubic"]
        out["rgb_gain_224_14_area"] = gains
    if report.get("labels"):
        lab: dict[str, Any] = {}
        for r in report["labels"]:
            for m, v in r.items():
                if isinstance(v, dict) and "boundary_acc" in v:
                    d = lab.setdefault(f"{r['family']}/x{r['scale']}", {}).setdefault(
                        m, {"boundary_acc": [], "miou": []}
                    )
                    d["boundary_acc"].append(v["boundary_acc"])
                    d["miou"].append(v["miou"])
        out["labels"] = {
            k: {m: {q: _mean(x) for q, x in d.items()} for m, d in md.items()} for k, md in lab.items()
        }
    for task, keyf, metric in (
        ("features", lambda r: f"{r['size']}px/x{r['scale']}", None),
        ("depth", lambda r: f"x{r['scale']}", "rmse"),
    ):
        if report.get(task):
            acc: dict[str, Any] = {}
            for r in report[task]:
                for m, v in r.items():
                    if isinstance(v, dict) and m != "fit_s":
                        for q, x in v.items():
                            if metric is None or q == metric:
                                acc.setdefault(keyf(r), {}).setdefault(m, {}).setdefault(q, []).append(x)
            out[task] = {
                k: {m: {q: _mean(x) for q, x in d.items()} for m, d in md.items()} for k, md in acc.items()
            }
    if report.get("corrupt"):
        acc = {}
        for r in report["corrupt"]:
            for m, v in r.items():
                if isinstance(v, dict) and m != "fit_s":
                    q = "psnr" if r["task"] == "rgb" else "boundary_acc"
                    acc.setdefault(f"{r['task']}/{r['corruption']}", {}).setdefault(m, []).append(v[q])
        out["corrupt"] = {k: {m: _mean(x) for m, x in d.items()} for k, d in acc.items()}
    return out


def _print_tables(summary: dict) -> None:
    def table(title, rows: dict, fmt="{:.2f}"):
        methods: list[str] = []
        for d in rows.values():
            methods += [m for m in d if m not in methods]
        print(f"\n{title}\n\n| | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
        for k, d in rows.items():
            print(f"| {k} | " + " | ".join(fmt.format(d[m]) if m in d else "-" for m in methods) + " |")

    if "rgb" in summary:
        flat = {f"{k} {h}": d for k, hv in summary["rgb"].items() for h, d in hv.items()}
        table("RGB transfer, PSNR (dB), mean over photos (rows: size/grid, LR signal)", flat)
        g = summary.get("rgb_gain_224_14_area", {})
        if g:
            print(
                "\nkernel gain over bicubic, 224 px, 14x14, area LR: "
                + ", ".join(f"{k} {v:+.2f}" for k, v in g.items())
                + f" (mean {_mean(g.values()):+.2f} dB)"
            )
    if "labels" in summary:
        table(
            "Label transfer, boundary accuracy (3 px), mean over seeds",
            {k: {m: v["boundary_acc"] for m, v in d.items()} for k, d in summary["labels"].items()},
            "{:.4f}",
        )
        table(
            "Label transfer, mIoU, mean over seeds",
            {k: {m: v["miou"] for m, v in d.items()} for k, d in summary["labels"].items()},
            "{:.4f}",
        )
    if "features" in summary:
        table(
            "Feature transfer (random net, dense truth): cosine / probe agreement",
            {
                f"{k} {q}": {m: v[q] for m, v in d.items()}
                for k, d in summary["features"].items()
                for q in ("cosine", "probe_agreement")
            },
            "{:.4f}",
        )
    if "depth" in summary:
        table(
            "Depth as a signal (Middlebury dev, protocol B): RMSE (0-255)",
            {k: {m: v["rmse"] for m, v in d.items()} for k, d in summary["depth"].items()},
        )
    if "corrupt" in summary:
        table("Corrupted guides: RGB PSNR (dB) / label boundary accuracy", summary["corrupt"], "{:.4f}")


def machine_info(**extra: object) -> dict:
    """CPU, threads, load and versions (the fields of ``scripts/_machine.py``)."""
    import ua3d

    try:
        import numba

        numba_version = numba.__version__
    except ImportError:  # pragma: no cover
        numba_version = None
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": numba_version,
        "ua3d": ua3d.__version__,
        "platform": platform.platform(),
        **extra,
    }


# ---------------------------------------------------------------------- CLI
#: fit_rgbd keyword arguments that ``--lift-set`` may give
LIFT_OPTIONS = (
    "depth_fit",
    "depth_steps",
    "depth_lr",
    "normal_scale",
    "depth_weight",
    "depth_mode",
    "normal_gate",
)


def _parse_set(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"{flag} expects NAME=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            val: Any = json.loads(v)
        except json.JSONDecodeError:
            val = v
        out[k.strip()] = tuple(val) if isinstance(val, list) else val
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``ua3d eval transfer`` (also used by ``scripts/eval_transfer.py``)."""
    parser.add_argument(
        "--quick", action="store_true", help="a subset that runs in under 2 minutes on 2 cores"
    )
    parser.add_argument(
        "--tasks", nargs="+", default=list(TASKS), metavar="TASK", help=f"any of {', '.join(TASKS)}"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="M",
        help="bilinear bicubic jbu kernel authors lift anyup (default: all that apply)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="FitConfig overrides (JSON values), e.g. --set steps=20 sigma_range=0.08",
    )
    parser.add_argument(
        "--depth-weight", type=float, default=None, help="lift depth_weight (default: fit_rgbd's)"
    )
    parser.add_argument("--depth-mode", default=None, help="lift depth_mode (default: fit_rgbd's)")
    parser.add_argument(
        "--lift-set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help=f"fit_rgbd options (JSON values) for the lift, any of {', '.join(LIFT_OPTIONS)}",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per scene family (full: 5, quick: 1)")
    parser.add_argument("--families", nargs="+", default=None, help="scene families (default: all)")
    parser.add_argument("--photos", nargs="+", default=None, help="photo names (default: 9 photos; quick: 3)")
    parser.add_argument("--corruptions", nargs="+", default=None, help=f"any of {', '.join(CORRUPTIONS)}")
    parser.add_argument("--anyup-checkpoint", default=None, help="local AnyUp .pth: adds the anyup method")
    parser.add_argument(
        "--data-root", default=None, help="shared data folder (default: $UA3D_DATA or ../shared/data)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default="bench_results/eval_transfer.json", help="report path ('' = none)")
    return parser


def _check_choices(values, allowed, name):
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"unknown {name} {bad}; choose from {list(allowed)}")


def run(args: argparse.Namespace) -> int:
    """Run the chosen tasks, print the tables, write the JSON report. Returns 0."""
    from ua3d.rgbd.synthetic import FAMILIES

    if args.threads:
        torch.set_num_threads(int(args.threads))
    _check_choices(args.tasks, TASKS, "task(s)")
    methods = args.methods or ["bilinear", "bicubic", "jbu", "kernel", "authors", "lift", "anyup"]
    _check_choices(methods, ("bilinear", "bicubic", "jbu", "kernel", "authors", "lift", "anyup"), "method(s)")
    families = args.families or list(FAMILIES)
    _check_choices(families, FAMILIES, "family(ies)")
    corruptions = args.corruptions or list(CORRUPTIONS)
    _check_choices(corruptions, CORRUPTIONS, "corruption(s)")
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    cfg = _fit_config(_parse_set(args.set))
    lift_kw = _parse_set(getattr(args, "lift_set", None) or [], "--lift-set")
    _check_choices(sorted(lift_kw), LIFT_OPTIONS, "--lift-set option(s)")
    if args.depth_weight is not None:
        lift_kw["depth_weight"] = args.depth_weight
    if args.depth_mode is not None:
        lift_kw["depth_mode"] = args.depth_mode
    anyup_model = None
    if args.anyup_checkpoint:
        from ua3d.baselines.anyup import load_anyup

        anyup_model = load_anyup(args.anyup_checkpoint)
    elif args.methods and "anyup" in args.methods:
        raise ValueError("method 'anyup' needs --anyup-checkpoint PATH (no weights are built in)")
    quick = bool(args.quick)
    seeds = list(range(args.seeds if args.seeds is not None else (1 if quick else 5)))
    data_root = Path(args.data_root) if args.data_root else None
    names = args.photos or (list(QUICK_PHOTOS) if quick else list(SKIMAGE_PHOTOS) + list(DATA_PHOTOS))
    report: dict[str, Any] = {
        "settings": {
            "quick": quick,
            "tasks": args.tasks,
            "methods": methods,
            "config": cfg.to_dict(),
            "lift": lift_kw,
            "seeds": seeds,
            "families": families,
            "photos": names,
            "corruptions": corruptions,
            "authors_recipe": AUTHORS,
        },
        "machine": machine_info(),
    }
    t_all = time.perf_counter()
    timings = {}
    p224 = load_photos(names, 224, data_root)
    if "rgb" in args.tasks:
        t0 = time.perf_counter()
        report["rgb"] = task_rgb(p224, (14,) if quick else (14, 16), methods, cfg, anyup_model=anyup_model)
        if not quick:
            report["rgb"] += task_rgb(
                load_photos(names, 448, data_root), (32,), methods, cfg, anyup_model=anyup_model
            )
        timings["rgb"] = time.perf_counter() - t0
    if "labels" in args.tasks:
        t0 = time.perf_counter()
        report["labels"] = task_labels(
            families, seeds, (16,) if quick else (14, 16), methods, cfg, lift_kw=lift_kw
        )
        timings["labels"] = time.perf_counter() - t0
    if "features" in args.tasks:
        t0 = time.perf_counter()
        report["features"] = task_features(
            p224[:2] if quick else p224, (16,) if quick else (14, 16), methods, cfg, anyup_model=anyup_model
        )
        timings["features"] = time.perf_counter() - t0
    if "depth" in args.tasks:
        t0 = time.perf_counter()
        report["depth"] = task_depth(
            ("Art", "Moebius") if quick else None,
            (16,) if quick else (8, 16),
            methods,
            cfg,
            data_root=data_root,
        )
        timings["depth"] = time.perf_counter() - t0
    if "corrupt" in args.tasks:
        t0 = time.perf_counter()
        report["corrupt"] = task_corrupt(
            p224[:3],
            ["sp20"] if quick and args.corruptions is None else corruptions,
            14,
            [m for m in methods if m in ("bilinear", "kernel", "authors", "lift")],
            cfg,
            families=families if not quick else ["camouflage"],
            seeds=seeds[:2],
            lift_kw=lift_kw,
        )
        timings["corrupt"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    report["seconds"] = timings
    report["summary"] = summarise(report)
    _print_tables(report["summary"])
    print("\nseconds (measured under load): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=float) + "\n")
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ua3d.eval.transfer`` entry point."""
    parser = add_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
