"""Synthetic RGB-D scenes: exact depth, ids, determinism, and the bundled sample data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("open3d")

from ua3d.io.rgbd import read_color, read_depth, read_ids, read_intrinsics, read_trajectory_log
from ua3d.rgbd.camera import PinholeCamera, backproject, look_at
from ua3d.rgbd.synthetic import (
    GROUND_ID,
    WALL_ID,
    SceneLayout,
    make_layout,
    make_scene,
    render_layout,
    surface_distance,
)

SAMPLE = Path(__file__).resolve().parents[1] / "ua3d" / "sample_data"


@pytest.fixture(scope="module")
def scene() -> dict:
    return make_scene(0, 160, 120, holes=4)


def _analytic_layout() -> tuple[SceneLayout, PinholeCamera, dict]:
    """Ground + wall + one floating sphere on the optical axis of a level camera 1 m above ground."""
    base = make_layout(0, n_objects=1, camouflage=False)
    sphere = {
        "id": 3,
        "name": "s",
        "kind": "sphere",
        "center": np.array([0.0, 1.0, -1.5]),
        "radius": 0.3,
        "texture": base.objects[2]["texture"]
        if base.objects[2]["kind"] == "sphere"
        else {"type": "rings", "count": 4, "radius": 0.3, "colors": [[1, 0, 0], [0, 0, 1]], "frame": "local"},
        "camouflage": False,
    }
    layout = SceneLayout(objects=base.objects[:2] + [sphere], light=base.light)
    cam = PinholeCamera(200.0, 200.0, 160.0, 120.0, 321, 241, look_at([0.0, 1.0, 0.0], [0.0, 1.0, -1.0]))
    return layout, cam, sphere


def test_depth_matches_analytic_plane_and_sphere() -> None:
    layout, cam, _ = _analytic_layout()
    out = render_layout(layout, cam)
    depth, ids = out["depth"].astype(np.float64), out["ids"]
    v, u = np.mgrid[0:241, 0:321].astype(np.float64)
    # level camera 1 m above the ground, wall 2.5 m ahead: ground depth = h fy / (v - cy)
    with np.errstate(divide="ignore"):
        ground = np.where(v > 120, 1.0 * 200.0 / (v - 120), np.inf)
    planes = np.minimum(ground, 2.5)
    # sphere: centre (0, 0, 1.5) in the camera frame; rays d = ((u - cx)/f, (v - cy)/f, 1)
    d = np.stack([(u - 160) / 200, (v - 120) / 200, np.ones_like(u)], -1)
    c = np.array([0.0, 0.0, 1.5])
    dc, dd = d @ c, (d * d).sum(-1)
    disc = dc**2 - dd * (c @ c - 0.3**2)
    with np.errstate(invalid="ignore"):
        t_sph = np.where(disc >= 0, (dc - np.sqrt(disc)) / dd, np.inf)
    expected = np.minimum(planes, t_sph)
    exp_ids = np.where(t_sph < planes, 3, np.where(ground < 2.5, GROUND_ID, WALL_ID))
    away = np.abs(t_sph - planes) > 1e-3  # ignore exact ties
    np.testing.assert_allclose(depth[away], expected[away], rtol=2e-6, atol=0)
    np.testing.assert_array_equal(ids[away], exp_ids[away])
    assert depth[120, 160] == pytest.approx(1.2, abs=1e-6) and ids[120, 160] == 3
    assert depth[10, 10] == pytest.approx(2.5, abs=1e-6) and ids[10, 10] == WALL_ID
    assert depth[240, 160] == pytest.approx(200.0 / 120.0, rel=1e-6) and ids[240, 160] == GROUND_ID


def test_open3d_pinhole_rays_are_half_pixel_shifted_but_z_depth() -> None:
    """Checks the platform facts this module relies on: Open3D's create_rays_pinhole puts pixel
    centres at u + 0.5 (hence our own rays) and its t_hit along those rays is the z-depth."""
    import open3d as o3d

    K = np.array([[100.0, 0, 31.5], [0, 100.0, 23.5], [0, 0, 1]])
    rays = o3d.t.geometry.RaycastingScene.create_rays_pinhole(
        o3d.core.Tensor(K), o3d.core.Tensor(np.eye(4)), 64, 48
    ).numpy()
    np.testing.assert_allclose(rays[0, 0, 3:], [(0.5 - 31.5) / 100, (0.5 - 23.5) / 100, 1.0], atol=1e-6)
    np.testing.assert_allclose(rays[..., 5], 1.0)  # unit z component: t_hit is z-depth
    plane = o3d.t.geometry.TriangleMesh.create_box(10.0, 10.0, 0.1).translate([-5.0, -5.0, 2.0])
    rc = o3d.t.geometry.RaycastingScene()
    rc.add_triangles(plane)
    t = rc.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy()
    np.testing.assert_allclose(t, 2.0, rtol=1e-6)


def test_points_lie_on_true_surfaces_and_ids_match(scene: dict) -> None:
    pts, pix = backproject(scene["depth_gt"], scene["camera"], frame="world")
    ids = scene["ids"][pix[:, 0].numpy(), pix[:, 1].numpy()]
    pts = pts.numpy().astype(np.float64)
    seen = set()
    for obj in scene["objects"]:
        sel = ids == obj["id"]
        if sel.any():
            seen.add(obj["id"])
            assert surface_distance(pts[sel], obj).max() < 1e-4, obj["name"]
    assert seen == {o["id"] for o in scene["objects"]}  # every object is visible
    # ids are the closest surface: no pixel's point lies on a *different* object
    for obj in scene["objects"][2:]:
        sel = ids != obj["id"]
        assert (surface_distance(pts[sel], obj) > 1e-4).mean() > 0.999


def test_scene_contents(scene: dict) -> None:
    assert scene["rgb"].shape == (120, 160, 3) and scene["rgb"].dtype == np.float32
    assert 0.0 <= scene["rgb"].min() and scene["rgb"].max() <= 1.0
    assert scene["depth"].dtype == np.float32 and scene["ids"].dtype == np.int32
    cam = scene["camera"]
    assert (cam.width, cam.height, cam.fx) == (160, 120, 525 * 160 / 640) and cam.pose is not None
    # holes: only in depth, elliptic blobs set to 0; depth_gt complete
    holes = (scene["depth"] == 0) & (scene["depth_gt"] > 0)
    assert 0 < holes.mean() < 0.2 and (scene["depth_gt"] > 0).all()
    np.testing.assert_array_equal(scene["depth"][~holes], scene["depth_gt"][~holes])
    np.testing.assert_array_equal(scene["valid"], scene["depth"] > 0)
    normals = scene["normals"].reshape(-1, 3)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)


def test_texture_edges_are_not_depth_edges(scene: dict) -> None:
    rgb, ids = scene["rgb"], scene["ids"]
    for pid in (GROUND_ID, WALL_ID):  # flat planes carry several texture colours
        colours = np.unique(np.round(rgb[ids == pid] * 64), axis=0)
        assert len(colours) >= 2
    # colour jumps inside one plane: strong gradients where the depth is smooth
    grad = np.abs(np.diff(rgb, axis=1)).sum(-1)
    same = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] == WALL_ID)
    assert (grad[same] > 0.2).sum() > 20


def test_camouflage_object_matches_background_colours() -> None:
    s = make_scene(1, 160, 120)
    camo = [o for o in s["objects"][2:] if o["camouflage"]]
    assert camo and camo[0]["texture"] is s["objects"][1]["texture"]  # the wall's texture
    rgb, ids = s["rgb"], s["ids"]
    wall = rgb[ids == WALL_ID][::7]
    obj = rgb[ids == camo[0]["id"]]
    dist = np.linalg.norm(obj[:, None] - wall[None], axis=-1).min(1)
    assert np.median(dist) < 0.08  # its colours are wall colours (up to shading)


def test_deterministic_and_seeded() -> None:
    a, b = make_scene(3, 64, 48, holes=2), make_scene(3, 64, 48, holes=2)
    for k in ("rgb", "depth", "depth_gt", "ids", "normals"):
        np.testing.assert_array_equal(a[k], b[k])
    c = make_scene(4, 64, 48, holes=2)
    assert not np.array_equal(a["rgb"], c["rgb"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_objects must be in 1..8, got 9"):
        make_layout(0, n_objects=9)
    with pytest.raises(ValueError, match="width and height must be positive, got 0x10"):
        make_scene(0, 0, 10)
    with pytest.raises(ValueError, match="holes must be >= 0"):
        make_scene(0, 16, 12, holes=-1)


def test_sample_data_is_the_documented_scene() -> None:
    files = [
        "rgb.png",
        "depth.png",
        "depth_holes.png",
        "ids.png",
        "intrinsics.json",
        "trajectory.log",
        "README.md",
    ]
    for f in files:
        assert (SAMPLE / f).is_file(), f"sample_data/{f} missing: run scripts/make_sample_data.py"
    assert sum((SAMPLE / f).stat().st_size for f in files) < 3e6
    cam = read_intrinsics(SAMPLE / "intrinsics.json").with_pose(
        read_trajectory_log(SAMPLE / "trajectory.log")[0]
    )
    ref = make_scene(0, 640, 480, n_objects=4, holes=8)
    assert cam.with_pose(None) == ref["camera"].with_pose(None)
    np.testing.assert_allclose(cam.pose, ref["camera"].pose, atol=1e-12)
    depth = read_depth(SAMPLE / "depth.png")
    close = np.abs(depth - ref["depth_gt"]) <= 0.0005 + 1e-6
    assert close.mean() > 0.999
    assert (read_ids(SAMPLE / "ids.png") == ref["ids"]).mean() > 0.999
    assert (np.abs(read_color(SAMPLE / "rgb.png") / 255.0 - ref["rgb"]) <= 1 / 255).mean() > 0.999
    holes = read_depth(SAMPLE / "depth_holes.png")
    assert ((holes == 0) == (ref["depth"] == 0)).mean() > 0.999
    # the stored frame back-projects onto the scene surfaces (mm rounding only)
    pts, pix = backproject(torch.from_numpy(depth), cam, frame="world")
    ids = ref["ids"][pix[:, 0].numpy(), pix[:, 1].numpy()]
    for obj in ref["objects"]:
        sel = ids == obj["id"]
        assert np.percentile(surface_distance(pts.numpy()[sel], obj), 99) < 1e-3
