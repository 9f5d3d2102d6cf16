"""Feed the bad and edge inputs of issue 15 to the public entry points and print what each gives.

Usage: ``python scripts/check_bad_inputs.py [--json bench_results/bad_inputs.json]``

Every case prints one row: the case, ``ERROR`` with the exception type and message, or ``OK`` with a
summary of the result (range, dtype, finiteness). Large-memory cases are refused by their estimates
before allocating; the broadcast-expanded 30000^2 guide is run with ``UA3D_MEMORY_LIMIT=8e9`` (a machine
with 8 GB available): with more memory it would be accepted (its estimate, printed too, is ~11 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

import ua3d
from ua3d.baselines import classic
from ua3d.core.ops import estimate_fit_memory
from ua3d.core.tto import FitConfig
from ua3d.features.files import load_features
from ua3d.io import rgbd as io
from ua3d.rgbd.camera import PinholeCamera, depth_to_metres
from ua3d.rgbd.lift import as_depth, fit_rgbd
from ua3d.rgbd.volume import render_volume

TMP = Path(tempfile.mkdtemp(prefix="ua3d_bad_"))
G = torch.Generator().manual_seed(0)


def rand(*shape, dtype=torch.float32):
    return torch.rand(*shape, generator=G).to(dtype)


def summary(x) -> str:
    if isinstance(x, tuple):
        x = x[0]
    if isinstance(x, torch.Tensor):
        xf = x.float()
        fin = bool(torch.isfinite(xf).all())
        return (
            f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} finite={fin} "
            f"range [{float(xf.nan_to_num().min()):.3g}, {float(xf.nan_to_num().max()):.3g}]"
        )
    if isinstance(x, np.ndarray):
        return f"{x.shape} {x.dtype}"
    if isinstance(x, ua3d.Kernel):
        return f"Kernel params {str(x.params.dtype).replace('torch.', '')} finite={bool(torch.isfinite(x.params).all())}"
    return type(x).__name__


# ---------------------------------------------------------------------- case builders
def _lift_rgb_depth(dtype=torch.float32):
    rgb = rand(3, 24, 32, dtype=dtype)
    depth = 1.0 + rand(24, 32)
    cam = PinholeCamera(30.0, 30.0, 15.5, 11.5, 32, 24)
    return rgb, depth, cam


def fit_f16():
    k = ua3d.fit(rand(1, 3, 48, 40, dtype=torch.float16), (8, 8), steps=5)
    return k.render(rand(1, 2, 8, 8, dtype=torch.float16))


def fit_bf16_vs_f32():
    g = rand(1, 3, 48, 40)
    s = rand(1, 2, 8, 8)
    gb, sb = g.to(torch.bfloat16), s.to(torch.bfloat16)
    a = ua3d.fit(g, (8, 8), steps=5).render(s)
    a_rounded = ua3d.fit(gb.float(), (8, 8), steps=5).render(sb.float())
    b = ua3d.fit(gb, (8, 8), steps=5).render(sb)
    return (
        f"{summary(b)}; max |bf16 - f32 fit of the bf16-rounded inputs| = "
        f"{float((a_rounded - b.float()).abs().max()):.3g} (bf16 resolution {2**-8:.3g}); vs the f32 fit of "
        f"the unrounded inputs {float((a - b.float()).abs().max()):.3g}"
    )


def lift_f16():
    rgb, depth, cam = _lift_rgb_depth(torch.float16)
    lk = fit_rgbd(rgb, depth, cam, (6, 8), FitConfig(steps=3, radius=2))
    return lk.render_2d(rand(1, 4, 6, 8))


def ambiguous_hwc_tensor():
    return ua3d.fit(rand(48, 40, 3), (8, 8), steps=1)


def chw_numpy():
    return ua3d.fit(rand(3, 48, 40).numpy(), (8, 8), steps=1)


def big_guide(v):
    return lambda: ua3d.upsample(rand(1, 3, 24, 20) * v, rand(1, 2, 6, 5), steps=2)


def upsample_depth_case():
    from ua3d.depth.sr import upsample_depth

    d = 1.0 + rand(1, 1, 7, 9)
    out = upsample_depth(d, rand(1, 3, 48, 40))
    return f"{summary(out)} (LR range [{float(d.min()):.3g}, {float(d.max()):.3g}]; bound: depthsr engineer)"


def radius_huge():
    return ua3d.fit(rand(1, 3, 64, 48), (8, 6), radius=1e5, steps=1)


def expanded_guide():
    g = rand(1, 3, 1, 1).expand(1, 3, 30000, 30000)
    est = estimate_fit_memory(1, 3, (30000, 30000), (300, 300), 8.0, contiguous=False)
    old = os.environ.get("UA3D_MEMORY_LIMIT")
    os.environ["UA3D_MEMORY_LIMIT"] = "8e9"
    try:
        t = time.perf_counter()
        try:
            ua3d.fit(g, (300, 300), steps=1)
        except ValueError as e:
            raise ValueError(
                f"{e} [estimate {est['total'] / 2**30:.1f} GiB, refused after "
                f"{time.perf_counter() - t:.1f} s]"
            ) from None
    finally:
        if old is None:
            del os.environ["UA3D_MEMORY_LIMIT"]
        else:
            os.environ["UA3D_MEMORY_LIMIT"] = old
    return "fitted"


def baseline_huge(fn):
    return lambda: fn(rand(1, 3, 32, 32), rand(1, 3, 8, 8), (30000, 30000))


def truncated_jpeg():
    import cv2

    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    p = TMP / "trunc.jpg"
    p.write_bytes(buf.tobytes()[: len(buf) // 2])
    return io.read_color(p)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_bomb():
    """A grey 8-bit PNG of 25000 x 25000 zeros, written row by row (small in memory and on disk)."""
    p = TMP / "bomb.png"
    W = H = 25000
    comp = zlib.compressobj(9)
    row = b"\x00" * (W + 1)
    parts = [comp.compress(row) for _ in range(H)]
    parts.append(comp.flush())
    ihdr = W.to_bytes(4, "big") + H.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )
    try:
        return io.read_color(p)
    except ValueError as e:
        raise ValueError(f"[{p.stat().st_size / 1e3:.0f} KB file] {e}") from None


def intrinsics_row_major():
    p = TMP / "K_row.json"
    p.write_text(
        json.dumps(
            {"width": 640, "height": 480, "intrinsic_matrix": [525.0, 0, 319.5, 0, 525.0, 239.5, 0, 0, 1]}
        )
    )
    return io.read_intrinsics(p)


def skewed_K():
    return PinholeCamera.from_K([[500.0, 3.0, 320.0], [0, 500.0, 240.0], [0, 0, 1]], 640, 480)


def trajectory_nan():
    p = TMP / "traj.log"
    p.write_text("0 0 1\n1 0 0 0\n0 1 0 0\n0 0 1 nan\n0 0 0 1\n")
    return io.read_trajectory_log(p)


def trajectory_scaled():
    p = TMP / "traj2.log"
    p.write_text("0 0 1\n2 0 0 0\n0 2 0 0\n0 0 2 0\n0 0 0 1\n")
    return io.read_trajectory_log(p)


def empty_file(name, loader):
    def run():
        p = TMP / name
        p.write_bytes(b"")
        return loader(p)

    return run


def truncated_npz(name, loader):
    def run():
        p = TMP / name
        np.savez(
            p,
            positions=np.zeros((10, 3), np.float32),
            features=np.zeros((10, 4), np.float32),
            colors=np.zeros((10, 3), np.float32),
        )
        p.write_bytes(p.read_bytes()[:200])
        return loader(p)

    return run


def corrupt_pt(suffix):
    def run():
        p = TMP / f"feat{suffix}"
        torch.save(torch.zeros(4, 5, 6), p)
        p.write_bytes(p.read_bytes()[:100])
        return load_features(p)

    return run


def corrupt_kernel(suffix):
    def run():
        k = ua3d.fit(rand(1, 3, 16, 12), (4, 3), steps=1)
        p = k.save(TMP / f"k{suffix}")
        p.write_bytes(p.read_bytes()[:150])
        return ua3d.Kernel.load(p)

    return run


def lift_volume():
    rgb, depth, cam = _lift_rgb_depth()
    return fit_rgbd(rgb, depth, cam, (6, 8), FitConfig(steps=2, radius=2))


def volume_near_str():
    return render_volume(lift_volume(), rand(1, 4, 6, 8), bins=4, near="1", far=3.0)


def lift_depth_weight_str():
    rgb, depth, cam = _lift_rgb_depth()
    return fit_rgbd(rgb, depth, cam, (6, 8), FitConfig(steps=1), depth_weight="10")


def baseline_nan(fn):
    return lambda: fn(rand(1, 3, 16, 16), torch.full((1, 2, 4, 4), float("nan")))


def baseline_size(fn, size):
    return lambda: fn(rand(1, 3, 16, 16), rand(1, 2, 4, 4), size)


CASES = [
    ("fit: float16 guide + signal", fit_f16),
    ("fit: bfloat16 vs float32", fit_bf16_vs_f32),
    ("lift: float16 image", lift_f16),
    ("fit: HWC tensor torch.rand(48, 40, 3)", ambiguous_hwc_tensor),
    ("fit: CHW float numpy (3, 48, 40)", chw_numpy),
    ("upsample: guide values ~1e18", big_guide(1e18)),
    ("upsample: guide values ~1e30", big_guide(1e30)),
    ("upsample_depth: 48x40 guide over 7x9 depth in [1, 2]", upsample_depth_case),
    ("fit: radius=1e5", radius_huge),
    ("fit: expanded 30000x30000 guide (8 GB machine)", expanded_guide),
    ("bilinear: output 30000x30000", baseline_huge(classic.bilinear)),
    ("bicubic: output 30000x30000", baseline_huge(classic.bicubic)),
    ("nearest: output 30000x30000", baseline_huge(classic.nearest)),
    ("jbu: output 30000x30000", baseline_huge(classic.jbu)),
    ("read_color: truncated JPEG", truncated_jpeg),
    ("read_color: PNG decoding to 25000x25000", png_bomb),
    ("read_intrinsics: row-major JSON", intrinsics_row_major),
    ("PinholeCamera.from_K: skewed K", skewed_K),
    ("read_trajectory_log: NaN pose", trajectory_nan),
    ("read_trajectory_log: scaled (non-rigid) pose", trajectory_scaled),
    ("load_volume: empty .npz", empty_file("vol_empty.npz", io.load_volume)),
    ("load_feature_points: empty .npz", empty_file("pts_empty.npz", io.load_feature_points)),
    ("load_feature_points: truncated .npz", truncated_npz("pts_trunc.npz", io.load_feature_points)),
    ("load_features: truncated .pt", corrupt_pt(".pt")),
    ("load_features: truncated .pth", corrupt_pt(".pth")),
    ("load_features: empty .npz", empty_file("f_empty.npz", load_features)),
    ("Kernel.load: truncated .pt", corrupt_kernel(".pt")),
    ("Kernel.load: truncated .npz", corrupt_kernel(".npz")),
    ("as_depth: depth_scale=inf", lambda: as_depth(np.ones((4, 4)), depth_scale=float("inf"))),
    ("depth_to_metres: depth_scale=inf", lambda: depth_to_metres(np.ones(3), float("inf"))),
    ("PinholeCamera: width=True", lambda: PinholeCamera(1.0, 1.0, 0.0, 0.0, True, 4)),
    ("bilinear: NaN signal", baseline_nan(classic.bilinear)),
    ("jbu: NaN signal", baseline_nan(classic.jbu)),
    ('bilinear: output_size="64"', baseline_size(classic.bilinear, "64")),
    ("bicubic: output_size=(2.7, 20.2)", baseline_size(classic.bicubic, (2.7, 20.2))),
    ("nearest: output_size=(0, 0)", baseline_size(classic.nearest, (0, 0))),
    ("jbu: output_size=(-4, 16)", baseline_size(classic.jbu, (-4, 16))),
    ('FitConfig(lr="0.1")', lambda: FitConfig(lr="0.1")),
    ("FitConfig(seed=-1)", lambda: FitConfig(seed=-1)),
    ("FitConfig(sigma_spatial=(1,))", lambda: FitConfig(sigma_spatial=(1,))),
    ('fit_rgbd(depth_weight="10")', lift_depth_weight_str),
    ('render_volume(near="1")', volume_near_str),
    (
        'DepthSRConfig(radius="2")',
        lambda: __import__("ua3d.depth.sr", fromlist=["x"]).DepthSRConfig(radius="2"),
    ),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, fn in CASES:
        try:
            out = fn()
            res = f"OK: {out if isinstance(out, str) else summary(out)}"
        except Exception as e:  # noqa: BLE001 - the point is to show what every case raises
            res = f"ERROR {type(e).__name__}: {e}"
        rows.append({"case": name, "result": res})
        print(f"| {name} | {res.replace('|', '/')} |", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
