"""``ua3d fuse`` and ``ua3d view map`` on a tiny plain sequence; the demo's fused sequence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ua3d.cli import main
from ua3d.io.rgbd import write_color, write_depth, write_intrinsics
from ua3d.rgbd.camera import PinholeCamera, look_at
from ua3d.rgbd.fusion import FeatureMap
from ua3d.rgbd.synthetic import make_layout, render_layout


def _sequence(root, n=3, W=64, H=48, empty=(), bad_size=()):
    layout = make_layout(0, n_objects=2)
    (root / "color").mkdir(parents=True)
    (root / "depth").mkdir()
    poses = []
    for i in range(n):
        cam = PinholeCamera(
            52.5, 52.5, (W - 1) / 2, (H - 1) / 2, W, H, look_at((0.3 * (i - 1), 1.2, 1.6), (0.0, 0.3, -1.0))
        )
        s = render_layout(layout, cam)
        depth = np.zeros_like(s["depth"]) if i in empty else s["depth"]
        if i in bad_size:
            depth = depth[:-2]
        write_color(root / "color" / f"{i:03d}.png", s["rgb"])
        write_depth(root / "depth" / f"{i:03d}.png", depth)
        poses.append(cam.pose)
    np.save(root / "poses.npy", np.stack(poses))
    write_intrinsics(root / "intrinsics.json", PinholeCamera(52.5, 52.5, (W - 1) / 2, (H - 1) / 2, W, H))
    return root


def _fuse(seq, out, *extra):
    return main(
        [
            "fuse",
            "--sequence",
            str(seq),
            "--out",
            str(out),
            "--features",
            "random",
            "--channels",
            "4",
            "--stride",
            "8",
            "--steps",
            "2",
            "--voxel-size",
            "0.05",
            "--quiet",
            *extra,
        ]
    )


def test_fuse_skips_empty_frames_and_writes_a_map(tmp_path):
    seq = _sequence(tmp_path / "seq", empty=(1,))
    out = tmp_path / "map.npz"
    assert _fuse(seq, out) == 0
    m = FeatureMap.load(out)
    assert m.frames == 2 and m.skipped == [(1, "no valid depth")] and m.channels == 4 and len(m) > 50
    log = json.loads(out.with_suffix(".json").read_text())
    assert [f["status"] for f in log["frames"]] == ["integrated", "skipped", "integrated"]
    assert all(f["seconds"]["total"] > 0 for f in log["frames"])


def test_fuse_bad_frame_keeps_what_was_fused(tmp_path, capsys):
    seq = _sequence(tmp_path / "seq", bad_size=(2,))
    out = tmp_path / "map.npz"
    assert _fuse(seq, out) == 2
    err = capsys.readouterr().err
    assert "frame 2: depth has size" in err and "the 2 frames fused before it are saved" in err
    assert FeatureMap.load(out).frames == 2


def test_view_map_png(tmp_path):
    pytest.importorskip("open3d")
    from ua3d.viz.o3d_render import OffscreenRenderer, RenderingUnavailable

    try:
        OffscreenRenderer(32, 32).close()
    except RenderingUnavailable as e:
        pytest.skip(f"headless Open3D rendering unavailable: {e}")
    seq = _sequence(tmp_path / "seq", n=2)
    out = tmp_path / "map.npz"
    assert _fuse(seq, out) == 0
    from ua3d.io.rgbd import read_color

    assert (
        main(
            [
                "view",
                "map",
                str(out),
                "--png",
                str(tmp_path / "pca.png"),
                "--quiet",
                "--width",
                "160",
                "--height",
                "120",
            ]
        )
        == 0
    )
    assert read_color(tmp_path / "pca.png").shape == (120, 160, 3)
    assert (
        main(
            [
                "view",
                "map",
                str(out),
                "--png",
                str(tmp_path / "q.png"),
                "--quiet",
                "--width",
                "160",
                "--height",
                "120",
                "--query-point",
                "0",
                "0",
                "-1",
            ]
        )
        == 0
    )
    q = read_color(tmp_path / "q.png")
    assert q.shape[0] == 120 and q.shape[1] > 160  # the colour scale is appended on the right
    assert (
        main(
            ["view", "map", str(out), "--png", str(tmp_path / "x.png"), "--quiet", "--query-index", "999999"]
        )
        == 2
    )
