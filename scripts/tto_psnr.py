#!/usr/bin/env python
"""Reconstruction PSNR of 50-step TTO vs bicubic on real photos (issue 2 acceptance).

Fits skimage's astronaut, coffee and chelsea resized to 224x224 with a 14x14 LR grid and prints a
Markdown table of the PSNR with which each method reconstructs the HR image from the 14x14 one.

    python scripts/tto_psnr.py [--steps 50] [--backend auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

import ua3d
from ua3d.baselines import bicubic


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b) ** 2).mean())
    return 10 * np.log10(1.0 / mse)


def load(name: str, size: int) -> torch.Tensor:
    import skimage.data

    img = getattr(skimage.data, name)()
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(
        0, 1
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--images", default="astronaut,coffee,chelsea")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for name in a.images.split(","):
        hr = load(name, a.size)
        t0 = time.perf_counter()
        k = ua3d.fit(hr, (a.grid, a.grid), steps=a.steps, backend=a.backend)
        rec = k.render(k.guide_lr)
        dt = time.perf_counter() - t0
        bic = bicubic(hr, k.guide_lr)
        rows.append({"image": name, "bicubic_db": psnr(bic, hr), "tto_db": psnr(rec, hr), "seconds": dt})
    print(f"Reconstruction PSNR, {a.size}x{a.size} from a {a.grid}x{a.grid} grid, {a.steps} TTO steps\n")
    print("| image | bicubic (dB) | ua3d TTO (dB) | gain (dB) | fit+render (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        gain = r["tto_db"] - r["bicubic_db"]
        print(
            f"| {r['image']} | {r['bicubic_db']:.2f} | {r['tto_db']:.2f} | {gain:+.2f} | {r['seconds']:.2f} |"
        )
    out = {
        "rows": rows,
        "settings": vars(a),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
