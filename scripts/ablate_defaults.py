#!/usr/bin/env python
"""Ablation of the 2D fit's defaults on the transfer benchmark (issue 13; ``docs/transfer_defaults.md``).

Every variant is a set of :class:`ua3d.core.tto.FitConfig` overrides (``--set``-style JSON values);
each run scores one or more variants with the task functions of :mod:`ua3d.eval.transfer` and writes
one JSON per variant; ``--table`` prints the ablation table from those files.

python scripts/ablate_defaults.py --list
python scripts/ablate_defaults.py --variants box median_box --threads 1
python scripts/ablate_defaults.py --variant-set try_x '{"guide_downsample": "median"}'
python scripts/ablate_defaults.py --table --out bench_results/defaults/abl

Tasks (``--tasks``): ``rgb`` (gain over bicubic of rendering the area- and the bicubic-downsampled
photo, 224 px / 14x14; groups ``skimage`` = astronaut, coffee, chelsea and ``data`` = rocket,
Middlebury Art, Books, Moebius, NYUv2 1000, 1001), ``labels`` (boundary accuracy (3 px) and mIoU per
family, ``--seeds`` seeds, x14 and x16), ``features`` (cosine / probe agreement, 3 photos, x16),
``corrupt`` (sp20, gauss05, gauss10, jpeg20 on the guide: RGB on the 3 skimage photos, labels on the 5
families, seed 0, x16), ``depth`` (Middlebury dev x16, 2D recipe, RMSE). The ``baselines`` pseudo
variant scores bilinear / bicubic upsampling and the authors' recipe once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ua3d.eval import transfer as T

SKIMAGE = ("astronaut", "coffee", "chelsea")
DATA = ("rocket", "middlebury/Art", "middlebury/Books", "middlebury/Moebius", "nyuv2/1000", "nyuv2/1001")
FAMILIES = ("textured", "contact", "thin", "camouflage", "holes")
CORRUPT = ("sp20", "gauss05", "gauss10", "jpeg20")
TASKS = ("rgb", "labels", "features", "corrupt", "depth")

#: the previous defaults, pinned: box LR guide rendered as is (``values_mix=0``), impulse clean-up only
#: (``"auto"`` without the noise and JPEG rules); the mode's mean-shift bandwidth of the first runs
OLD_PF = {"tto.NOISE_LEVEL": 1e9, "tto.JPEG_RANGE": 0}
OLD = {"guide_downsample": "box", "values_mix": 0.0, "tto.MODE_BANDWIDTH": 0.1, **OLD_PF}


def _v(**kw) -> dict:
    return {**OLD, **{k.replace("__", "."): v for k, v in kw.items()}}


#: name -> FitConfig overrides (``tto__NAME`` = a module constant of ua3d.core.tto); ``{}`` = today's default
VARIANTS: dict[str, dict] = {
    "default": {},
    "box": _v(),  # the previous default
    "bilinear": _v(guide_downsample="bilinear"),
    "median": _v(guide_downsample="median"),
    "mode": _v(guide_downsample="mode"),
    "median_box": _v(guide_downsample="median", fit_values="box"),
    "mode_box": _v(guide_downsample="mode", fit_values="box"),
    "bilinear_box": _v(guide_downsample="bilinear", fit_values="box"),
    "box_srmin05": _v(sigma_range_min=0.05),
    "box_srmin08": _v(sigma_range_min=0.08),
    "box_smin075": _v(sigma_spatial_min=0.75),
    "box_smin1": _v(sigma_spatial_min=1.0),
    "mode_smin075": _v(guide_downsample="mode", fit_values="box", sigma_spatial_min=0.75),
    # values = a * box + (1 - a) * mode (or median); x.mix = [a, robust mode]
    "mode_mix50": _v(guide_downsample="mode", fit_values="mix", x__mix=[0.5, "mode"]),
    "mode_mix65": _v(guide_downsample="mode", fit_values="mix", x__mix=[0.65, "mode"]),
    "mode_mix75": _v(guide_downsample="mode", fit_values="mix", x__mix=[0.75, "mode"]),
    "median_mix50": _v(guide_downsample="median", fit_values="mix", x__mix=[0.5, "median"]),
    "box_two50": _v(x__two=[0.5, "mode"]),
    "box_mix50": _v(values_mix=0.5),
    "box_mix50_bw05": _v(values_mix=0.5, tto__MODE_BANDWIDTH=0.05),
    "box_mix50_bw20": _v(values_mix=0.5, tto__MODE_BANDWIDTH=0.2),
    "box_mix65_bw05": _v(values_mix=0.65, tto__MODE_BANDWIDTH=0.05),
    "mode_mix50_bw05": _v(
        guide_downsample="mode", fit_values="box", values_mix=0.5, tto__MODE_BANDWIDTH=0.05
    ),
    # the guide pre-filter (box LR guide, values_mix 0): noise rule, JPEG rule and their constants
    "box_denoise": _v(tto__NOISE_LEVEL=0.02),
    "box_denoise_jpeg05": _v(tto__NOISE_LEVEL=0.02, tto__JPEG_RANGE=0.05),
    "box_denoise_jpeg10": _v(tto__NOISE_LEVEL=0.02, tto__JPEG_RANGE=0.1),
    "box_denoise_jpeg15": _v(tto__NOISE_LEVEL=0.02, tto__JPEG_RANGE=0.15),
    "box_denoise_r3": _v(tto__NOISE_LEVEL=0.02, tto__JPEG_RANGE=0.1, tto__DENOISE_RANGE=3.0),
    "box_denoise_p3": _v(tto__NOISE_LEVEL=0.02, tto__JPEG_RANGE=0.1, tto__DENOISE_PASSES=3),
}


def _mean(v) -> float:
    v = [x for x in v if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _module_constants(overrides: dict) -> dict:
    """Set the ``"tto.NAME"`` entries of a variant as constants of :mod:`ua3d.core.tto` (the pre-filter's
    thresholds, read at call time); returns the FitConfig overrides."""
    from ua3d.core import tto

    if "x.mix" in overrides:  # experimental LR values: a * box + (1 - a) * <robust mode>
        a, base = overrides["x.mix"]
        orig = tto.cell_guide

        def mixed(guide, lr_size, mode="median", bandwidth=None):
            if mode != "mix":
                return orig(guide, lr_size, mode, bandwidth)
            box = tto.resample_guide(guide, lr_size, "box")
            return a * box + (1 - a) * orig(guide, lr_size, base, bandwidth)

        tto.cell_guide = mixed
        tto.CELL_MODES = (*tto.CELL_MODES, "mix")
        tto.LR_GUIDE_MODES = (*tto.LR_GUIDE_MODES, "mix")
    if "x.two" in overrides:  # experimental: loss = a * L1(box values) + (1 - a) * L1(<robust> values)
        a2, base2 = overrides["x.two"]
        orig_lg = tto.kernel_fit_loss_grad
        cache: dict = {}

        def two(params, g_hr, guide_lr, *args, values_lr=None, **kw):
            key = (id(g_hr), g_hr.shape)
            if key not in cache:
                cache.clear()
                cache[key] = tto.cell_guide(g_hr, tuple(guide_lr.shape[-2:]), base2)
            l1, g1 = orig_lg(params, g_hr, guide_lr, *args, values_lr=values_lr, **kw)
            l2, g2 = orig_lg(params, g_hr, guide_lr, *args, values_lr=cache[key], **kw)
            return a2 * l1 + (1 - a2) * l2, a2 * g1 + (1 - a2) * g2

        tto.kernel_fit_loss_grad = two
    for k, v in overrides.items():
        if k.startswith("x."):
            continue
        if k.startswith("tto."):
            if not hasattr(tto, k[4:]):
                raise ValueError(f"ua3d.core.tto has no constant {k[4:]!r}")
            setattr(tto, k[4:], v)
    return {k: v for k, v in overrides.items() if not k.startswith(("tto.", "x."))}


def score(overrides: dict, tasks, seeds: int, baselines: bool = False) -> dict:
    """Scores of one variant (or of the baselines) on the chosen tasks."""
    cfg = T._fit_config(_module_constants(overrides))
    methods = ["bilinear", "bicubic", "authors"] if baselines else ["kernel"]
    out: dict = {"overrides": overrides, "config": cfg.to_dict(), "seconds": {}}
    if "rgb" in tasks or "features" in tasks or "corrupt" in tasks:
        sk = T.load_photos(SKIMAGE, 224)
        data = T.load_photos(DATA, 224)
    if "rgb" in tasks:
        t0 = time.perf_counter()
        rows = T.task_rgb(sk + data, (14,), ["bicubic", *methods], cfg)
        out["rgb"] = {
            r["photo"]: {
                h: {m: r[h][m] - r[h]["bicubic"] for m in r[h] if m != "bicubic"} for h in ("area", "bicubic")
            }
            for r in rows
        }
        out["seconds"]["rgb"] = time.perf_counter() - t0
    if "labels" in tasks:
        t0 = time.perf_counter()
        rows = T.task_labels(FAMILIES, range(seeds), (14, 16), methods, cfg)
        lab: dict = {}
        for r in rows:
            for m in methods:
                d = lab.setdefault(f"{r['family']}/x{r['scale']}", {}).setdefault(
                    m, {"boundary_acc": [], "miou": []}
                )
                d["boundary_acc"].append(r[m]["boundary_acc"])
                d["miou"].append(r[m]["miou"])
        out["labels"] = {
            k: {m: {q: _mean(x) for q, x in d.items()} for m, d in v.items()} for k, v in lab.items()
        }
        out["seconds"]["labels"] = time.perf_counter() - t0
    if "features" in tasks:
        t0 = time.perf_counter()
        rows = T.task_features(sk, (16,), methods, cfg)
        out["features"] = {
            m: {q: _mean([r[m][q] for r in rows]) for q in ("cosine", "probe_agreement")} for m in methods
        }
        out["seconds"]["features"] = time.perf_counter() - t0
    if "corrupt" in tasks:
        t0 = time.perf_counter()
        rows = T.task_corrupt(sk, CORRUPT, 14, methods, cfg, families=FAMILIES, seeds=(0,))
        acc: dict = {}
        for r in rows:
            q = "psnr" if r["task"] == "rgb" else "boundary_acc"
            for m in methods:
                acc.setdefault(f"{r['task']}/{r['corruption']}", {}).setdefault(m, []).append(r[m][q])
        out["corrupt"] = {k: {m: _mean(x) for m, x in d.items()} for k, d in acc.items()}
        out["seconds"]["corrupt"] = time.perf_counter() - t0
    if "depth" in tasks:
        t0 = time.perf_counter()
        rows = T.task_depth(None, (16,), ["bicubic", *methods], cfg)
        out["depth"] = {m: _mean([r[m]["rmse"] for r in rows]) for m in ["bicubic", *methods]}
        out["seconds"]["depth"] = time.perf_counter() - t0
    return out


def _merge(old: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict) and k not in ("overrides", "config"):
            old[k] = _merge(old[k], v)
        else:
            old[k] = v
    return old


def table(folder: Path, names=None) -> str:
    """The ablation table (markdown) of every variant JSON in ``folder``."""
    files = sorted(folder.glob("*.json"))
    res = {f.stem: json.loads(f.read_text()) for f in files}
    base = res.pop("baselines", None)
    if names:
        res = {n: res[n] for n in names if n in res}
    lines = []

    def group(d, photos, how, m="kernel"):
        return _mean([d["rgb"][p][how].get(m, 0.0) for p in photos if p in d.get("rgb", {})])

    hdr = (
        "| variant | RGB sk area | RGB sk bic | RGB data area | RGB data bic | "
        + " | ".join(f"{f[:4]} x14/x16" for f in FAMILIES)
        + " | labels mean | mIoU mean | feat cos / probe | sp20 rgb/lab | g05 rgb/lab | g10 rgb/lab | jpeg rgb/lab | depth x16 |"
    )
    lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]

    def row(name, d, m):
        cells = [name]
        if "rgb" in d:
            cells += [f"{group(d, SKIMAGE, h, m):+.2f}" for h in ("area", "bicubic")]
            cells += [f"{group(d, DATA, h, m):+.2f}" for h in ("area", "bicubic")]
        else:
            cells += ["-"] * 4
        lab = d.get("labels", {})
        b_all, i_all = [], []
        for f in FAMILIES:
            v = [lab.get(f"{f}/x{s}", {}).get(m, {}).get("boundary_acc") for s in (14, 16)]
            b_all += v
            i_all += [lab.get(f"{f}/x{s}", {}).get(m, {}).get("miou") for s in (14, 16)]
            cells.append("/".join("-" if x is None else f"{x:.3f}" for x in v))
        cells.append(f"{_mean(b_all):.4f}" if lab else "-")
        cells.append(f"{_mean(i_all):.4f}" if lab else "-")
        fe = d.get("features", {}).get(m)
        cells.append(f"{fe['cosine']:.4f} / {fe['probe_agreement']:.4f}" if fe else "-")
        co = d.get("corrupt", {})
        for k in CORRUPT:
            a, b = co.get(f"rgb/{k}", {}).get(m), co.get(f"labels/{k}", {}).get(m)
            cells.append("-" if a is None else f"{a:.2f} / {b:.3f}")
        dp = d.get("depth", {}).get(m)
        cells.append("-" if dp is None else f"{dp:.2f}")
        return "| " + " | ".join(cells) + " |"

    if base:
        for m in ("bilinear", "bicubic", "authors"):
            lines.append(row(f"({m})", base, m))
    for n, d in res.items():
        lines.append(row(f"`{n}`", d, "kernel"))
    # two tables: the clean tasks (columns 1-13), the corrupted guides and depth (1 and 14-)
    split = []
    for part in (slice(0, 14), slice(14, None)):
        for ln in lines:
            cells = ln.strip("|").split("|")
            keep = cells[part] if part.start == 0 else [cells[0], *cells[part]]
            if part.start != 0 and all(c.strip() in ("-", "---") for c in keep[1:]) and "---" not in keep[1]:
                continue
            split.append("|" + "|".join(keep) + "|")
        split.append("")
    return "\n".join(split)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=[], help="names from --list, or 'baselines'")
    ap.add_argument("--variant-set", nargs=2, action="append", default=[], metavar=("NAME", "JSON"))
    ap.add_argument("--tasks", nargs="+", default=["rgb", "labels", "features", "corrupt"], choices=TASKS)
    ap.add_argument("--seeds", type=int, default=2, help="seeds per scene family (labels)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench_results/defaults/abl", help="folder of the per-variant JSON")
    ap.add_argument("--table", action="store_true", help="print the table of the JSON files in --out")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.list:
        for k, v in VARIANTS.items():
            print(f"{k}: {json.dumps(v)}")
        return 0
    torch.set_num_threads(a.threads)
    todo = [(n, VARIANTS[n] if n != "baselines" else None) for n in a.variants]
    todo += [(n, json.loads(j)) for n, j in a.variant_set]
    from ua3d.core import tto

    saved = dict(vars(tto))  # the variants' "tto." constants and "x." patches are undone after each
    for name, ov in todo:
        t0 = time.perf_counter()
        try:
            res = score(ov or {}, a.tasks, a.seeds, baselines=ov is None)
        finally:
            for k, v in saved.items():
                setattr(tto, k, v)
        res["machine"] = T.machine_info()
        out.mkdir(parents=True, exist_ok=True)
        f = out / f"{name}.json"
        if f.is_file():
            res = _merge(json.loads(f.read_text()), res)
        f.write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(f"{name}: {time.perf_counter() - t0:.0f} s -> {f}", flush=True)
    if a.table or not todo:
        print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
