"""Headless Open3D rendering: shared helpers, the volume-slice viewer and the feature-point viewer.

Pictures are checked at places found by projecting known 3D points with the returned view camera.
Never calls draw_geometries/draw (they block without a display).
"""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

pytest.importorskip("open3d")

from ua3d.io.rgbd import load_feature_points, load_volume, read_color, save_feature_points, save_volume
from ua3d.rgbd.camera import PinholeCamera, backproject, look_at, project
from ua3d.viz import feature_points as fp
from ua3d.viz import o3d_render as r3d
from ua3d.viz import volume_slices as vs

TOL = 2.5 / 255  # 8-bit framebuffer


def _at(img: np.ndarray, cam: PinholeCamera, point: np.ndarray) -> np.ndarray:
    uv, _ = project(torch.tensor(point, dtype=torch.float64)[None], cam, frame="world")
    u, v = (round(x) for x in uv[0].tolist())
    return img[v, u]


# ---------------------------------------------------------------------- shared helpers
def test_missing_rendering_libraries_give_install_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args, **kwargs):
        if name == "open3d" or name.startswith("open3d."):
            raise ImportError("libEGL.so.1: cannot open shared object file: No such file or directory")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "open3d", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(r3d.RenderingUnavailable, match="libegl1 libgl1 libx11-6 libusb-1.0-0") as info:
        r3d.OffscreenRenderer(32, 32)
    assert "libEGL.so.1" in str(info.value) and "apt-get install" in str(info.value)


def test_offscreen_renderer_exact_colours_and_depth() -> None:
    cam = PinholeCamera(100.0, 100.0, 39.5, 29.5, 80, 60)  # identity pose: camera frame = world
    small = PinholeCamera(10.0, 10.0, 3.5, 2.5, 8, 6)  # the same view at 1/10 size
    colors = np.zeros((6, 8, 3))
    colors[:, :4] = [0.2, 0.4, 0.6]
    colors[:, 4:] = [1.0, 0.0, 0.0]
    keep = np.ones((6, 8), bool)
    keep[0, 0] = False
    mesh = r3d.pixel_quads(small, 2.0, colors, keep)
    with r3d.OffscreenRenderer(80, 60, background=(0.0, 1.0, 0.0)) as ren:
        rgb, depth = ren.render([mesh], cam)
    assert rgb.shape == (60, 80, 3) and depth.shape == (60, 80)
    # each small-camera pixel becomes a 10x10 block of the view
    np.testing.assert_allclose(rgb[30, 20], [0.2, 0.4, 0.6], atol=TOL)
    np.testing.assert_allclose(rgb[30, 60], [1.0, 0.0, 0.0], atol=TOL)
    np.testing.assert_allclose(rgb[5, 5], [0.0, 1.0, 0.0], atol=TOL)  # the dropped quad: background
    assert depth[30, 20] == pytest.approx(2.0, rel=1e-4) and depth[5, 5] == 0
    with pytest.raises(ValueError, match="principal point"), r3d.OffscreenRenderer(80, 60) as ren:
        ren.render([mesh], PinholeCamera(100.0, 100.0, 30.0, 29.5, 80, 60))


def test_composite_layers_golden() -> None:
    red, blue = np.zeros((1, 2, 3)), np.zeros((1, 2, 3))
    red[..., 0], blue[..., 2] = 1.0, 1.0
    near, far = np.array([[1.0, 1.0]]), np.array([[2.0, 0.0]])  # blue is missing at pixel 1
    a = np.full((1, 2), 0.5)
    out = r3d.composite_layers([red, blue], [a, a], [near, far], background=(1.0, 1.0, 1.0))
    # pixel 0: white, then blue at 0.5, then red at 0.5 on top (order given: red first, but it is nearer)
    np.testing.assert_allclose(out[0, 0], [0.5 + 0.25, 0.25, 0.25 + 0.25])
    np.testing.assert_allclose(out[0, 1], [1.0, 0.5, 0.5])


# ---------------------------------------------------------------------- volume slices
def _staircase_volume(alpha_mass: float = 1.0):
    """C=2, D=3, H=6, W=9: slice d has mass only in columns 3d..3d+2, feature (d, 0) there.

    PCA by hand: one direction (1, 0); scores d - 1 in {-1, 0, 1}; 1st/99th percentiles -1, 1;
    so slice colours are (0, .5, .5), (.5, .5, .5), (1, .5, .5) (no variance left for G, B).
    """
    C, D, H, W = 2, 3, 6, 9
    vol = np.zeros((C, D, H, W), np.float32)
    mass = np.zeros((D, H, W), np.float32)
    for d in range(D):
        vol[0, d, :, 3 * d : 3 * d + 3] = d
        mass[d, :, 3 * d : 3 * d + 3] = 1.0
    mass[2, :, 6:] = alpha_mass
    cam = PinholeCamera(6.0, 6.0, 4.0, 2.5, W, H, look_at([0.2, 0.1, -0.5], [0.0, 0.0, 2.0]))
    return vol, mass, np.array([1.0, 1.5, 2.0]), cam


EXPECTED = np.array([[0.0, 0.5, 0.5], [0.5, 0.5, 0.5], [1.0, 0.5, 0.5]])


def test_volume_slices_head_on_known_colours_and_fade() -> None:
    vol, mass, bins, cam = _staircase_volume(alpha_mass=0.5)  # 99th percentile of the mass stays 1
    layers, _ = vs.slice_layers(vol, mass, bins, cam, alpha_max=0.8)
    assert len(layers) == 3 and [L.depth for L in layers] == [1.0, 1.5, 2.0]
    for d in range(3):
        np.testing.assert_allclose(layers[d].colors[3, 3 * d + 1], EXPECTED[d], atol=1e-6)
    view = cam.scaled(10.0)  # the volume camera itself at 90x60: slice d covers columns 30d..30d+29
    img, used = vs.render_volume(layers, cam, width=90, height=60, background=(1.0, 1.0, 1.0), view=view)
    assert img.shape == (60, 90, 3) and used is view
    white = np.ones(3)
    for d, alpha in ((0, 0.8), (1, 0.8), (2, 0.4)):  # slice 2 has half the mass: half the alpha
        np.testing.assert_allclose(img[30, 30 * d + 15], alpha * EXPECTED[d] + (1 - alpha) * white, atol=TOL)


def test_volume_slices_oblique_view_and_rgbd_cloud() -> None:
    vol, mass, bins, cam = _staircase_volume()
    layers, _ = vs.slice_layers(vol, mass, bins, cam, alpha_max=1.0)
    img, view = vs.render_volume(layers, cam, width=160, height=120, yaw=30, pitch=15, background=(0, 0, 0))
    assert img.shape == (120, 160, 3)
    assert (img.sum(-1) > 0).mean() > 0.1  # not blank
    for d in range(3):  # the centre of each slice's region, opaque, shows the slice colour
        centre = backproject(torch.full((6, 9), bins[d], dtype=torch.float64), cam, frame="world")[0]
        np.testing.assert_allclose(_at(img, view, centre[2 * 9 + 3 * d + 1].numpy()), EXPECTED[d], atol=TOL)
    # an opaque red RGB-D frame behind everything shows through the semi-transparent slices
    rgb = np.zeros((60, 90, 3), np.uint8)
    rgb[..., 0] = 255
    cloud = vs.rgbd_cloud(rgb, np.full((60, 90), 3.0, np.float32), cam)
    layers, _ = vs.slice_layers(vol, mass, bins, cam, alpha_max=0.5)
    img, _ = vs.render_volume(
        layers, cam, cloud=cloud, width=90, height=60, view=cam.scaled(10.0), point_size=2
    )
    for d in range(3):
        np.testing.assert_allclose(
            img[30, 30 * d + 15], 0.5 * EXPECTED[d] + 0.5 * np.array([1.0, 0, 0]), atol=TOL
        )


def test_volume_file_roundtrip_and_errors(tmp_path: Path) -> None:
    vol, mass, bins, cam = _staircase_volume()
    p = save_volume(
        tmp_path / "v.npz", vol, mass, bins, cam, rgb=np.zeros((12, 18, 3), np.uint8), depth=np.ones((12, 18))
    )
    data = load_volume(p)
    np.testing.assert_array_equal(data["volume"], vol)
    np.testing.assert_array_equal(data["mass"], mass)
    assert data["camera"] == cam and data["normalized"] and data["depth"].shape == (12, 18)
    # a file without mass is refused with a clear message
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files if k != "mass"}
    np.savez(tmp_path / "nomass.npz", **arrays)
    with pytest.raises(ValueError, match=r"nomass.npz has no 'mass' array: not a ua3d feature volume"):
        load_volume(tmp_path / "nomass.npz")
    with pytest.raises(
        ValueError, match=r"mass is required: a feature volume needs its weight mass \[D, H, W\]"
    ):
        vs.slice_layers(vol, None, bins, cam)
    with pytest.raises(
        ValueError, match=r"volume must have at least one channel and non-empty D, H, W, got \(0,"
    ):
        vs.slice_layers(np.zeros((0, 3, 6, 9)), mass, bins, cam)
    with pytest.raises(ValueError, match=r"mass must have shape \[D, H, W\] = \(3, 6, 9\), got \(3, 6, 8\)"):
        save_volume(tmp_path / "x.npz", vol, mass[..., :8], bins, cam)
    with pytest.raises(ValueError, match="bin_depths must be positive, finite and strictly increasing"):
        save_volume(tmp_path / "x.npz", vol, mass, bins[::-1], cam)
    with pytest.raises(
        ValueError, match=r"volume has size 6x9 \(HxW\) but the camera intrinsics are for 12x18"
    ):
        save_volume(tmp_path / "x.npz", vol, mass, bins, cam.scaled(2.0))
    with pytest.raises(ValueError, match="mass is zero everywhere"):
        vs.slice_layers(vol, np.zeros_like(mass), bins, cam)


def test_volume_not_normalized_divides_by_mass() -> None:
    vol, mass, bins, cam = _staircase_volume()
    a, _ = vs.slice_layers(vol, mass, bins, cam)
    b, _ = vs.slice_layers(vol * 4.0, mass * 4.0, bins, cam, normalized=False)
    for la, lb in zip(a, b):
        np.testing.assert_allclose(la.colors, lb.colors, atol=1e-6)
        np.testing.assert_allclose(la.alpha, lb.alpha, atol=1e-6)


def test_volume_viewer_cli_png(tmp_path: Path) -> None:
    vol, mass, bins, cam = _staircase_volume()
    p = save_volume(tmp_path / "v.npz", vol, mass, bins, cam)
    out = tmp_path / "v.png"
    assert vs.main([str(p), "--png", str(out), "--width", "120", "--height", "90", "--stride", "3"]) == 0
    img = read_color(out)  # the 120x90 view plus a title strip
    assert img.shape[1] == 120 and img.shape[0] > 90 and img.std() > 5


# ---------------------------------------------------------------------- feature points
def _cloud():
    """Points at the pixel centres of a 160x120 view at z = 2: cluster A left (feature (2, 0)),
    cluster B right (feature (0, 1)), a gap between them."""
    view = PinholeCamera(100.0, 100.0, 79.5, 59.5, 160, 120)
    depth = torch.full((120, 160), 2.0, dtype=torch.float64)
    u = torch.arange(160)[None].expand(120, 160)
    depth[(u >= 70) & (u < 90)] = 0
    pts, pix = backproject(depth, view)
    a = pix[:, 1] < 70
    feats = np.where(a[:, None].numpy(), [2.0, 0.0], [0.0, 1.0]).astype(np.float32)
    colors = np.where(a[:, None].numpy(), [0.1, 0.2, 0.3], [0.9, 0.8, 0.7])
    return view, pts.numpy(), feats, colors, pix.numpy()


def test_feature_points_pca_and_rgb_colours() -> None:
    view, pts, feats, colors, _ = _cloud()
    pca, _ = fp.pca_colors(feats)
    np.testing.assert_allclose(pca[0], [1.0, 0.5, 0.5], atol=1e-6)  # A: positive score by sign convention
    np.testing.assert_allclose(pca[-1], [0.0, 0.5, 0.5], atol=1e-6)
    again, _ = fp.pca_colors(feats, seed=0)
    np.testing.assert_array_equal(pca, again)
    img, used = fp.render_points(pts, pca, 160, 120, background=(1.0, 1.0, 1.0), point_size=2, view=view)
    assert img.shape == (120, 160, 3) and used is view
    np.testing.assert_allclose(img[60, 30], [1.0, 0.5, 0.5], atol=TOL)
    np.testing.assert_allclose(img[60, 130], [0.0, 0.5, 0.5], atol=TOL)
    np.testing.assert_allclose(img[60, 80], [1.0, 1.0, 1.0], atol=TOL)  # the gap
    img, _ = fp.render_points(pts, colors, 160, 120, point_size=2, view=view)
    np.testing.assert_allclose(img[60, 30], [0.1, 0.2, 0.3], atol=TOL)


def test_feature_points_similarity_query() -> None:
    view, pts, feats, _, pix = _cloud()
    q = int(np.flatnonzero((pix[:, 0] == 30) & (pix[:, 1] == 20))[0])
    sims = fp.cosine_similarity_to(feats, q)
    assert sims[q] == pytest.approx(1.0) and sims[-1] == pytest.approx(0.0)
    cols = fp.similarity_colors(feats, q)
    img, _ = fp.render_points(pts, cols, 160, 120, point_size=2, marker_index=q, view=view)
    turbo = matplotlib.colormaps["turbo"]
    np.testing.assert_allclose(img[100, 40], turbo(1.0)[:3], atol=TOL)  # same cluster: similarity 1
    np.testing.assert_allclose(img[60, 130], turbo(0.0)[:3], atol=TOL)  # other cluster: similarity 0
    np.testing.assert_allclose(img[30, 20], fp.MARKER_COLOR, atol=TOL)  # the query marker
    with pytest.raises(ValueError, match="query index 19200 out of range for 16800 points"):
        fp.cosine_similarity_to(feats, 19200)


def test_feature_points_errors_and_cli(tmp_path: Path) -> None:
    _, pts, feats, colors, _ = _cloud()
    with pytest.raises(ValueError, match=r"features must have at least one channel, got shape \(16800, 0\)"):
        fp.pca_colors(np.zeros((len(pts), 0)))
    with pytest.raises(ValueError, match=r"features must have at least one channel, got shape \(16800, 0\)"):
        save_feature_points(tmp_path / "x.npz", pts, np.zeros((len(pts), 0)))
    with pytest.raises(ValueError, match=r"colors must have shape \(16800, 3\), got \(3, 3\)"):
        fp.render_points(pts, colors[:3])
    c8 = np.round(colors * 255).astype(np.uint8)
    p = save_feature_points(tmp_path / "c.npz", pts, feats, c8)
    data = load_feature_points(p)
    np.testing.assert_array_equal(data["features"], feats)
    np.testing.assert_allclose(data["colors"], c8 / 255.0, atol=1e-7)
    out = tmp_path / "q.png"
    assert fp.main([str(p), "--png", str(out), "--query-index", "5", "--width", "100", "--height", "80"]) == 0
    img = read_color(out)  # the 100x80 view plus a title and the similarity colour bar
    assert img.shape[1] > 100 and img.shape[0] > 80 and img.std() > 5


def test_interactive_mode_without_display_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Open3D's windows would fall back to an invisible context and block forever; the viewers
    refuse instead and point to --png."""
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    vol, mass, bins, cam = _staircase_volume()
    p = save_volume(tmp_path / "v.npz", vol, mass, bins, cam)
    assert vs.main([str(p)]) == 2
    _, pts, feats, colors, _ = _cloud()
    assert fp.main([str(save_feature_points(tmp_path / "c.npz", pts, feats, colors))]) == 2
    assert capsys.readouterr().err.count("use --png") == 2


def test_downsample_volume_pools_blocks_and_keeps_geometry() -> None:
    vol, mass, _, cam = _staircase_volume()
    mass[1, 0, 3] = 3.0  # one heavier voxel in a block of slice 1 ...
    vol[0, 1, 0, 3] = 5.0  # ... with another feature: the block mean is mass-weighted
    v2, m2, c2 = vs.downsample_volume(vol, mass, cam, 3)
    assert v2.shape == (2, 3, 2, 3) and m2.shape == (3, 2, 3)
    assert (c2.width, c2.height, c2.fx, c2.cx, c2.cy) == (3, 2, 2.0, 1.0, 0.5)
    np.testing.assert_allclose(m2[1, 0, 1], (8 + 3) / 9)
    np.testing.assert_allclose(v2[0, 1, 0, 1], (8 * 1.0 + 3 * 5.0) / 11, rtol=1e-6)
    np.testing.assert_allclose(v2[0, 2, 1, 2], 2.0)
    # the coarse voxel centre is the centroid of its fine voxels (half-pixel rule)
    fine = backproject(torch.full((6, 9), 1.0, dtype=torch.float64), cam)[0].reshape(6, 9, 3)
    coarse = backproject(torch.full((2, 3), 1.0, dtype=torch.float64), c2)[0].reshape(2, 3, 3)
    torch.testing.assert_close(coarse[0, 1], fine[0:3, 3:6].reshape(-1, 3).mean(0))
    # weighted sums (not normalized): volume / mass is preserved as well
    v3, m3, _ = vs.downsample_volume(vol * mass[None], mass, cam, 3, normalized=False)
    np.testing.assert_allclose(v3[0, 1, 0, 1] / m3[1, 0, 1], v2[0, 1, 0, 1], rtol=1e-6)
    assert vs.auto_stride(480, 640) == 4 and vs.auto_stride(120, 160) == 1
    with pytest.raises(ValueError, match="stride 7 is larger than the volume grid 6x9"):
        vs.downsample_volume(vol, mass, cam, 7)


# ---------------------------------------------------------------------- readable pictures (issue 20.13)
def test_render_png_pictures_have_titles_depth_labels_and_colour_bars(tmp_path: Path, monkeypatch) -> None:
    """The slice picture labels slice depths and has a title; the similarity picture has a colour bar."""
    from ua3d.viz import figures

    seen: list[dict] = []
    real = figures.annotated_render

    def spy(image, path=None, title="", colorbar=None, labels=(), note="", dpi=100):
        seen.append({"title": title, "colorbar": colorbar, "labels": list(labels), "note": note})
        return real(image, path, title, colorbar, labels, note, dpi)

    monkeypatch.setattr(figures, "annotated_render", spy)
    vol, mass, bins, cam = _staircase_volume()
    p = save_volume(tmp_path / "v.npz", vol, mass, bins, cam)
    info = vs.render_png(p, tmp_path / "v.png", width=160, height=120, stride=1)
    assert info["slices"] == 3 and (tmp_path / "v.png").is_file()
    v = seen[-1]
    assert v["title"].startswith("ua3d feature volume: 3 depth slices 1.00-2.00 m")
    assert sorted(t for _, _, t in v["labels"]) == ["z = 1.00 m", "z = 1.50 m", "z = 2.00 m"]
    assert all(0 <= x < 160 and 0 <= y < 120 for x, y, _ in v["labels"])
    _, pts, feats, colors, pix = _cloud()
    d = {"positions": pts, "features": feats, "colors": colors, "pixels": pix}
    fp.render_png(d, tmp_path / "q.png", query_pixel=(20, 30), width=160, height=120)
    q = seen[-1]
    assert q["colorbar"] == ("turbo", 0.0, 1.0, "cosine similarity to the query")
    assert "pixel (u=20, v=30)" in q["title"] and "16800 points" in q["title"]
    fp.render_png(d, tmp_path / "pca.png", width=160, height=120)
    assert seen[-1]["colorbar"] is None and "PCA" in seen[-1]["title"]
    img = read_color(tmp_path / "q.png")
    assert img.shape[1] > 160 and img.std() > 5


# ---------------------------------------------------------------------- in memory (issue 16: the demo's pictures)
def test_volume_drawn_from_memory_equals_the_file_and_any_compress_level_loads(tmp_path: Path) -> None:
    """The demo draws the float16 volume it just rendered (no file round trip); the picture is the one
    of the file, whatever zlib level wrote it; a bad level is refused."""
    from ua3d.io.rgbd import volume_record

    vol, mass, bins, cam = _staircase_volume()
    vol16 = vol.astype(np.float16)
    rec = volume_record(vol16, mass, bins, cam, rgb=np.zeros((12, 18, 3), np.uint8), depth=np.ones((12, 18)))
    assert rec["volume"] is vol16 and rec["volume"].dtype == np.float16  # no copy, no float32 cast
    for bad in (np.inf, -np.inf, np.nan):  # the float16 finiteness test (exponent bits) refuses each
        v = vol16.copy()
        v[1, 2, 3, 4] = bad
        with pytest.raises(ValueError, match=r"^volume and mass must be finite \(no NaN/Inf\)$"):
            volume_record(v, mass, bins, cam)
    for level in (None, 1, 9):
        p = save_volume(
            tmp_path / f"v{level}.npz", vol16, mass, bins, cam, compressed=True, compress_level=level
        )
        d = load_volume(p)
        np.testing.assert_array_equal(d["volume"], vol16.astype(np.float32))
        np.testing.assert_array_equal(d["mass"], mass)
        assert d["camera"] == cam
    with pytest.raises(
        ValueError, match=r"^compress_level must be None or 1..9 with compressed=True, got 0$"
    ):
        save_volume(tmp_path / "x.npz", vol16, mass, bins, cam, compressed=True, compress_level=0)
    with pytest.raises(
        ValueError, match=r"^compress_level must be None or 1..9 with compressed=True, got 1$"
    ):
        save_volume(tmp_path / "x.npz", vol16, mass, bins, cam, compress_level=1)
    kw = dict(width=120, height=90, stride=3)
    vs.render_png(rec, tmp_path / "mem.png", **kw)
    vs.render_png(tmp_path / "v1.npz", tmp_path / "file.png", **kw)
    np.testing.assert_array_equal(read_color(tmp_path / "mem.png"), read_color(tmp_path / "file.png"))
    # display pooling of a float16 volume equals that of its float32 copy (channel by channel, no full copy)
    a = vs.downsample_volume(vol16, mass, cam, 3)
    b = vs.downsample_volume(vol16.astype(np.float32), mass, cam, 3)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].dtype == np.float32


def test_points_drawn_from_a_feature_point_cloud_object(tmp_path: Path) -> None:
    from ua3d.rgbd.points import FeaturePointCloud

    _, pts, feats, colors, pix = _cloud()
    cloud = FeaturePointCloud(
        torch.from_numpy(pts).float(),
        torch.from_numpy(colors).float(),
        torch.from_numpy(feats),
        torch.from_numpy(pix),
    )
    d = fp.cloud_dict(cloud)
    assert set(d) >= {"positions", "colors", "features", "pixels", "color_mode", "frame"}
    info = fp.render_png(cloud, tmp_path / "obj.png", query_pixel=[20, 30], width=160, height=120)
    fp.render_png(
        {"positions": pts, "features": feats, "colors": colors, "pixels": pix},
        tmp_path / "dict.png",
        query_pixel=(20, 30),
        width=160,
        height=120,
    )
    assert info["points"] == len(pts) and (info["width"], info["height"]) == (160, 120)
    np.testing.assert_array_equal(read_color(tmp_path / "obj.png"), read_color(tmp_path / "dict.png"))
    with pytest.raises(
        ValueError, match=r"^data must be a point cloud file, a dict or a FeaturePointCloud, got int$"
    ):
        fp.cloud_dict(3)


def test_viewer_cli_png_line_names_size_and_time(tmp_path: Path, capsys) -> None:
    vol, mass, bins, cam = _staircase_volume()
    p = save_volume(tmp_path / "v.npz", vol, mass, bins, cam)
    assert (
        vs.main(
            [
                str(p),
                "--png",
                str(tmp_path / "v.png"),
                "--width",
                "120",
                "--height",
                "90",
                "--slice",
                "0",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith(
        f"wrote {tmp_path / 'v.png'} (120x90, 2 slices, stride 1, "
    ) and out.rstrip().endswith(" s)")
    assert (
        fp.main(
            [
                "--demo",
                "--png",
                str(tmp_path / "p.png"),
                "--width",
                "64",
                "--height",
                "48",
                "--query-pixel",
                "5",
                "6",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'p.png'} (64x48 view, ") and " points, " in out


def test_load_volume_keeps_float16_or_casts_on_request(tmp_path: Path) -> None:
    """[issue 16] ``load_volume`` returns the stored float16 volume without a float32 copy (the viewer
    pools it channel by channel); ``dtype=np.float32`` casts; the picture is the same either way."""
    from ua3d.io.rgbd import volume_record, write_volume_record

    vol, mass, bins, cam = _staircase_volume()
    vol16 = vol.astype(np.float16)
    p = save_volume(tmp_path / "v16.npz", vol16, mass, bins, cam, compressed=True, compress_level=1)
    d16 = load_volume(p)
    assert d16["volume"].dtype == np.float16
    d32 = load_volume(p, dtype=np.float32)
    assert d32["volume"].dtype == np.float32
    np.testing.assert_array_equal(d32["volume"], vol16.astype(np.float32))
    assert load_volume(save_volume(tmp_path / "v32.npz", vol, mass, bins, cam))["volume"].dtype == np.float32
    with pytest.raises(ValueError, match=r"^dtype must be None or a float dtype, got <class 'numpy.int32'>$"):
        load_volume(p, dtype=np.int32)
    kw = dict(width=120, height=90, stride=3)
    vs.render_png(d16, tmp_path / "a.png", **kw)
    vs.render_png(d32, tmp_path / "b.png", **kw)
    np.testing.assert_array_equal(read_color(tmp_path / "a.png"), read_color(tmp_path / "b.png"))
    # a checked record written as it is: the same file content as save_volume's
    rec = volume_record(vol16, mass, bins, cam)
    q = write_volume_record(tmp_path / "rec.npz", rec, compressed=True, compress_level=1)
    with np.load(q) as a, np.load(p) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])


def test_render_png_annotate_hook_gets_the_picture_and_its_result_is_returned(tmp_path: Path) -> None:
    """The demo hands the title/label drawing to its figures thread through ``annotate``."""
    from ua3d.viz.figures import annotated_render

    calls = []

    def annotate(image, path, title="", **kw):
        calls.append((image.shape, str(path), title))
        return annotated_render(image, path, title, **kw)

    vol, mass, bins, cam = _staircase_volume()
    info = vs.render_png(
        {"volume": vol, "mass": mass, "bin_depths": bins, "camera": cam, "normalized": True},
        tmp_path / "v.png",
        width=160,
        height=120,
        stride=1,
        annotate=annotate,
    )
    assert calls[0][0] == (120, 160, 3) and calls[0][2].startswith("ua3d feature volume: 3 depth slices")
    assert info["annotation"].shape[2] == 3 and (tmp_path / "v.png").is_file()
    _, pts, feats, colors, pix = _cloud()
    info = fp.render_png(
        {"positions": pts, "features": feats, "colors": colors, "pixels": pix},
        tmp_path / "p.png",
        width=160,
        height=120,
        annotate=annotate,
    )
    assert len(calls) == 2 and "feature point cloud" in calls[1][2] and info["annotation"].ndim == 3


@pytest.mark.parametrize("normalized", [True, False])
def test_fused_display_pooling_matches_the_torch_reference(normalized: bool) -> None:
    """The numba pooling (``backend="fast"``, the default for numpy input) against the torch
    reference: float32 rounding (<= 2 ulp of the largest value), the same mass, the same camera;
    a float16 volume and its float32 copy pool identically; voxels without mass are skipped exactly."""
    from ua3d.viz import fast_pool

    if not fast_pool.AVAILABLE:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(0)
    C, D, H, W = 3, 4, 13, 18  # not multiples of the stride: the crop is exercised
    vol = rng.standard_normal((C, D, H, W)).astype(np.float16)
    mass = rng.uniform(0, 2, (D, H, W)).astype(np.float32)
    mass[rng.random((D, H, W)) < 0.6] = 0.0  # a band: most voxels without mass
    mass[:, :5, :5] = 0.0  # a block without any mass (at every stride tried)
    cam = PinholeCamera(10.0, 10.0, 9.0, 6.5, W, H)
    for s in (2, 3, 5):
        fv, fm, fc = vs.downsample_volume(vol, mass, cam, s, normalized, backend="fast")
        rv, rm, rc = vs.downsample_volume(vol, mass, cam, s, normalized, backend="reference")
        assert fv.shape == rv.shape == (C, D, H // s, W // s) and fv.dtype == np.float32 and fc == rc
        np.testing.assert_allclose(fm, rm, rtol=0, atol=2 * np.finfo(np.float32).eps * float(rm.max()))
        np.testing.assert_allclose(
            fv, rv, rtol=0, atol=2 * np.finfo(np.float32).eps * float(np.abs(rv).max())
        )
        f32 = vs.downsample_volume(vol.astype(np.float32), mass, cam, s, normalized, backend="fast")
        np.testing.assert_array_equal(f32[0], fv)
    if normalized:
        assert (fv[:, :, 0, 0] == 0).all()  # no mass in the block: 0, as the reference
    with pytest.raises(ValueError, match=r"^backend must be 'auto', 'fast' or 'reference', got 'gpu'$"):
        vs.downsample_volume(vol, mass, cam, 2, backend="gpu")
    with pytest.raises(ValueError, match=r"^backend 'fast' needs numba and a numpy float16/float32 volume$"):
        vs.downsample_volume(torch.from_numpy(vol.astype(np.float32)), mass, cam, 2, backend="fast")
