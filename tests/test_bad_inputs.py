"""The bad inputs of issue 15, one assertion each on the exact message (``scripts/check_bad_inputs.py``
prints the same cases as a table, with the large-memory ones)."""

from __future__ import annotations

import json
import zlib

import cv2
import numpy as np
import pytest
import torch

import ua3d
from ua3d.baselines import classic
from ua3d.core.memory import MemoryEstimateError
from ua3d.core.tto import FitConfig
from ua3d.io import rgbd as io
from ua3d.rgbd.camera import PinholeCamera, depth_to_metres
from ua3d.rgbd.lift import as_depth, fit_rgbd
from ua3d.rgbd.volume import render_volume

G = torch.rand(1, 3, 16, 16)
S = torch.rand(1, 2, 4, 4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: ua3d.fit(torch.rand(48, 40, 3), (8, 8)),
            r"guide of shape \(48, 40, 3\) looks like an \[H, W, C\] image",
        ),
        (
            lambda: ua3d.fit(np.random.rand(3, 48, 40), (8, 8)),
            r"guide numpy array of shape \(3, 48, 40\) looks like \[C, H, W\]",
        ),
        (
            lambda: ua3d.upsample(G * 1e18, S),
            r"guide values must be of a sane magnitude .* found values in \[.*e\+1\d\]",
        ),
        (lambda: ua3d.upsample(G * 1e30, S), r"guide values must be of a sane magnitude"),
        (lambda: ua3d.fit(G, (4, 4), radius=1e5), r"radius=6 already covers all of it: pass radius <= 6"),
        (
            lambda: classic.bilinear(G, torch.full_like(S, float("nan"))),
            r"signal contains 32 NaN/Inf value\(s\)",
        ),
        (lambda: classic.jbu(G, torch.full_like(S, float("nan"))), r"signal contains 32 NaN/Inf value\(s\)"),
        (
            lambda: classic.bilinear(G, S, "64"),
            r"output_size must be an int or a \(height, width\) pair of ints, got the string '64'",
        ),
        (lambda: classic.bicubic(G, S, (2.7, 20.2)), r"output_size must hold integers, got \(2.7, 20.2\)"),
        (lambda: classic.nearest(G, S, (0, 0)), r"output_size must be positive, got \(0, 0\)"),
        (lambda: classic.jbu(G, S, (-4, 16)), r"output_size must be positive, got \(-4, 16\)"),
        (lambda: classic.nearest(G, S, (True, 8)), r"output_size must hold integers"),
        (lambda: FitConfig(lr="0.1"), r"lr must be a number, got str '0.1'"),
        (lambda: FitConfig(seed=-1), r"seed must be an integer >= 0, got -1"),
        (lambda: FitConfig(seed=1.5), r"seed must be an integer, got float 1.5"),
        (
            lambda: FitConfig(sigma_spatial=(1,)),
            r"sigma_spatial must be None, a number or an \(x, y\) pair, got \(1,\)",
        ),
        (lambda: FitConfig(sigma_range="0.1"), r"sigma_range must be a number, got str"),
        (lambda: FitConfig(channel_weights=(1, "x")), r"channel_weights must be a number, got str 'x'"),
        (
            lambda: as_depth(np.ones((4, 4)), depth_scale=float("inf")),
            r"depth_scale must be a positive finite number, got inf",
        ),
        (lambda: depth_to_metres(np.ones(3), float("inf")), r"depth_scale must be a finite number, got inf"),
        (
            lambda: PinholeCamera(1.0, 1.0, 0.0, 0.0, True, 4),
            r"width must be a positive integer, got bool True",
        ),
        (lambda: PinholeCamera("1", 1.0, 0.0, 0.0, 4, 4), r"fx must be a number, got str '1'"),
        (
            lambda: PinholeCamera.from_K([[500.0, 3.0, 320.0], [0, 500.0, 240.0], [0, 0, 1]], 640, 480),
            r"K has skew K\[0, 1\] = 3",
        ),
        (
            lambda: PinholeCamera.from_K([[500.0, 0, 0], [0, 500.0, 0], [320, 240, 1]], 640, 480),
            r"looks transposed",
        ),
        (
            lambda: PinholeCamera(1.0, 1.0, 0.0, 0.0, 4, 4, np.diag([2.0, 2.0, 2.0, 1.0])),
            r"pose must be a rigid camera-to-world transform",
        ),
    ],
)
def test_bad_input_gives_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_low_precision_is_computed_in_float32_and_returned_in_the_callers_dtype():
    g = torch.rand(1, 3, 24, 20)
    s = torch.rand(1, 2, 6, 5)
    ref = ua3d.fit(g.half().float(), (6, 5), steps=3).render(s.half().float())
    for dt in (torch.float16, torch.bfloat16):
        k = ua3d.fit(g.to(dt), (6, 5), steps=3)
        assert k.params.dtype == torch.float32 and bool(torch.isfinite(k.params).all())
        out = k.render(s.to(dt))
        assert out.dtype == dt and bool(torch.isfinite(out).all())
        if dt == torch.float16:  # same rounded inputs: the float32 fit, up to the output's rounding
            torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-3)
        assert classic.bilinear(g.to(dt), s.to(dt)).dtype == dt
    cam = PinholeCamera(20.0, 20.0, 9.5, 11.5, 20, 24)
    lk = fit_rgbd(g[0].half(), 1 + torch.rand(24, 20), cam, (6, 5), FitConfig(steps=2, radius=2))
    assert bool(torch.isfinite(lk.params).all()) and bool(torch.isfinite(lk.render_2d(s)).all())


def test_config_strings_fail_at_construction_by_name():
    cam = PinholeCamera(20.0, 20.0, 9.5, 11.5, 20, 24)
    with pytest.raises(ValueError, match=r"depth_weight must be a number, got str '10'"):
        fit_rgbd(torch.rand(3, 24, 20), 1 + torch.rand(24, 20), cam, (6, 5), depth_weight="10")
    lk = fit_rgbd(torch.rand(3, 24, 20), 1 + torch.rand(24, 20), cam, (6, 5), FitConfig(steps=1, radius=2))
    with pytest.raises(ValueError, match=r"near must be a number, got str '1'"):
        render_volume(lk, torch.rand(1, 2, 6, 5), bins=4, near="1", far=3.0)


def test_memory_is_checked_before_allocating(monkeypatch):
    from ua3d.core import memory

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 64 << 20)
    with pytest.raises(
        MemoryEstimateError,
        match=r"upsampling 3 channels to 3000x3000 needs about 0\.\d+ GiB .*use a smaller output_size",
    ):
        classic.bilinear(G, torch.rand(1, 3, 4, 4), (3000, 3000))
    expanded = torch.rand(1, 3, 1, 1).expand(1, 3, 4000, 4000)  # 192 MB once made contiguous
    with pytest.raises(
        MemoryEstimateError, match=r"fitting a kernel to a 3-channel guide of 4000x4000 .*guide copy"
    ):
        ua3d.fit(expanded, (40, 40), steps=1)


# ---------------------------------------------------------------------- readers
def test_truncated_jpeg_is_refused(tmp_path):
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    full, cut = tmp_path / "full.jpg", tmp_path / "cut.jpg"
    full.write_bytes(buf.tobytes())
    cut.write_bytes(buf.tobytes()[: len(buf) // 2])
    assert io.read_color(full).shape == (64, 64, 3)
    with pytest.raises(ValueError, match=r"could not read colour image .*cut\.jpg: truncated JPEG"):
        io.read_color(cut)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ValueError, match=r"junk\.png"):
        io.read_color(junk)


def _png(path, W, H):
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * W for _ in range(H)), 9)
    ihdr = W.to_bytes(4, "big") + H.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


def test_decoded_size_limit_with_override(tmp_path, monkeypatch):
    p = _png(tmp_path / "big.png", 300, 200)
    with pytest.raises(
        ValueError, match=r"big\.png decodes to 300x200 = 0 M pixels .* pass max_pixels=60000"
    ):
        io.read_color(p, max_pixels=50_000)
    assert io.read_color(p, max_pixels=60_000).shape == (200, 300, 3)
    monkeypatch.setenv("UA3D_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ValueError, match="above the limit"):
        io.read_color(p)


def test_intrinsics_must_be_column_major(tmp_path):
    good = io.write_intrinsics(tmp_path / "k.json", PinholeCamera(525.0, 525.0, 319.5, 239.5, 640, 480))
    assert io.read_intrinsics(good).cx == 319.5
    bad = tmp_path / "row.json"
    bad.write_text(
        json.dumps({"width": 640, "height": 480, "intrinsic_matrix": [525, 0, 319.5, 0, 525, 239.5, 0, 0, 1]})
    )
    with pytest.raises(
        ValueError, match=r"row\.json is row-major .*principal point \(319.5, 239.5\).* column-major: write"
    ):
        io.read_intrinsics(bad)


def test_trajectory_poses_must_be_finite_rigid(tmp_path):
    eye = "1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n"
    ok = tmp_path / "ok.log"
    ok.write_text("0 0 1\n" + eye + "1 1 2\n" + eye)
    assert io.read_trajectory_log(ok).shape == (2, 4, 4)
    nan = tmp_path / "nan.log"
    nan.write_text("0 0 1\n" + eye + "1 1 2\n1 0 0 0\n0 1 0 0\n0 0 1 nan\n0 0 0 1\n")
    with pytest.raises(ValueError, match=r"nan\.log: pose 1 \(frame 1\) has NaN/Inf entries"):
        io.read_trajectory_log(nan)
    scaled = tmp_path / "scaled.log"
    scaled.write_text("0 0 1\n2 0 0 0\n0 2 0 0\n0 0 2 0\n0 0 0 1\n")
    with pytest.raises(ValueError, match=r"scaled\.log: pose 0 must be a rigid camera-to-world transform"):
        io.read_trajectory_log(scaled)


def test_corrupted_files_name_the_file(tmp_path):
    from ua3d.features.files import load_features

    k = ua3d.fit(torch.rand(1, 3, 16, 12), (4, 3), steps=1)
    for suffix in (".pt", ".npz"):
        p = k.save(tmp_path / f"k{suffix}")
        p.write_bytes(p.read_bytes()[:150])
        with pytest.raises(ValueError, match=rf"k\{suffix}'?: cannot read it as a kernel \{suffix} file"):
            ua3d.Kernel.load(p)
    for suffix in (".pt", ".pth"):
        p = tmp_path / f"f{suffix}"
        torch.save(torch.zeros(4, 5, 6), p)
        p.write_bytes(p.read_bytes()[:100])
        with pytest.raises(ValueError, match=rf"f\{suffix}: cannot read it as a \{suffix} feature file"):
            load_features(p)
    npy = tmp_path / "f.npy"
    np.save(npy, np.zeros((4, 5, 6), np.float32))
    npy.write_bytes(npy.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"f\.npy: truncated \.npy file"):
        load_features(npy)
