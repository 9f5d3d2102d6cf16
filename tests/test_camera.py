"""Camera model, depth back-projection/projection and RGB-D file I/O."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ua3d.io.rgbd import (
    read_color,
    read_depth,
    read_depth_raw,
    read_ids,
    read_intrinsics,
    read_trajectory_log,
    write_color,
    write_depth,
    write_ids,
    write_intrinsics,
    write_trajectory_log,
)
from ua3d.rgbd.camera import (
    PinholeCamera,
    backproject,
    depth_to_metres,
    depth_validity,
    look_at,
    pixel_rays,
    project,
    transform_points,
    unproject,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REDWOOD = SHARED / "data" / "redwood-open3d" / "sample5"


def _redwood() -> Path:
    if not (REDWOOD / "camera_primesense.json").is_file():
        pytest.skip(
            f"Redwood sample data not found at {REDWOOD} (shared data is read from ../shared beside the repo)"
        )
    return REDWOOD


def _cam(w: int = 8, h: int = 6, pose: np.ndarray | None = None) -> PinholeCamera:
    return PinholeCamera(10.0, 12.0, (w - 1) / 2, (h - 1) / 2, w, h, pose)


# ---------------------------------------------------------------------- Open3D parity on real data
@pytest.mark.parametrize("frame_index", [0, 3])
@pytest.mark.parametrize("with_pose", [False, True])
def test_backproject_matches_open3d_on_redwood(frame_index: int, with_pose: bool) -> None:
    o3d = pytest.importorskip("open3d")
    root = _redwood()
    cam = read_intrinsics(root / "camera_primesense.json")
    assert (cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height) == (525.0, 525.0, 319.5, 239.5, 640, 480)
    raw = read_depth_raw(root / "depth" / f"{frame_index:05d}.png")
    assert raw.dtype == np.uint16 and (raw == 0).any()
    if with_pose:
        cam = cam.with_pose(read_trajectory_log(root / "trajectory.log")[frame_index])
    ref = o3d.geometry.PointCloud.create_from_depth_image(
        o3d.geometry.Image(raw), cam.to_open3d(), cam.world_to_camera, depth_scale=1000.0
    )
    pts, pix = backproject(depth_to_metres(raw, 1000.0), cam, frame="world" if with_pose else "camera")
    ref_pts = np.asarray(ref.points)
    assert pts.dtype == torch.float32 and pts.shape == ref_pts.shape == (int((raw > 0).sum()), 3)
    np.testing.assert_allclose(pts.numpy(), ref_pts, atol=2e-6, rtol=0)
    # pixel indices: row-major valid pixels, the order Open3D uses
    np.testing.assert_array_equal(pix.numpy(), np.argwhere(raw > 0))


def test_redwood_trajectory_and_colour() -> None:
    root = _redwood()
    poses, meta = read_trajectory_log(root / "trajectory.log", return_metadata=True)
    assert poses.shape == (5, 4, 4) and meta.tolist()[0] == [0, 0, 1]
    np.testing.assert_allclose(
        poses[:, :3, :3] @ poses[:, :3, :3].transpose(0, 2, 1), np.eye(3)[None].repeat(5, 0), atol=1e-9
    )
    rgb = read_color(root / "color" / "00000.jpg")
    assert rgb.shape == (480, 640, 3) and rgb.dtype == np.uint8


# ---------------------------------------------------------------------- camera model
def test_scaled_half_pixel_rule() -> None:
    cam = PinholeCamera(525.0, 525.0, 319.5, 239.5, 640, 480)
    half = cam.scaled(0.5)
    assert (half.fx, half.fy, half.cx, half.cy, half.width, half.height) == (
        262.5,
        262.5,
        159.5,
        119.5,
        320,
        240,
    )
    # pixel edges scale: a point at u projects to (u + 0.5) * s - 0.5 in the resized image
    p = torch.tensor([[0.3, -0.2, 2.0], [-1.0, 0.5, 4.0]], dtype=torch.float64)
    uv, _ = project(p, cam)
    for s in (0.25, 0.5, 3.0):
        uv_s, _ = project(p, cam.scaled(s))
        torch.testing.assert_close(uv_s, (uv + 0.5) * s - 0.5)
    r = cam.resized(100, 75)
    assert (r.width, r.height) == (100, 75)
    assert r.cx == pytest.approx((319.5 + 0.5) * 100 / 640 - 0.5)


def test_unproject_project_roundtrip_and_world_frame() -> None:
    pose = look_at([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    cam = _cam(pose=pose)
    depth = torch.linspace(1, 3, 48, dtype=torch.float64).reshape(6, 8)
    pts_c, pix = backproject(depth, cam)
    pts_w, _ = backproject(depth, cam, frame="world")
    torch.testing.assert_close(pts_w, transform_points(pts_c, pose))
    uv, z = project(pts_w, cam, frame="world")
    torch.testing.assert_close(uv, pix.flip(1).to(torch.float64))
    torch.testing.assert_close(z, depth.reshape(-1))
    # formula of the convention
    p = unproject(torch.tensor(7.0), torch.tensor(0.0), torch.tensor(2.0), cam)
    torch.testing.assert_close(p, torch.tensor([(7 - 3.5) * 2 / 10, (0 - 2.5) * 2 / 12, 2.0]))


def test_project_behind_camera_is_nan() -> None:
    uv, z = project(torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]), _cam())
    assert torch.isnan(uv[0]).all() and not torch.isnan(uv[1]).any() and z.tolist() == [-1.0, 1.0]


def test_backproject_batch_matches_single() -> None:
    cam = _cam()
    d = torch.rand(2, 1, 6, 8) + 0.5
    d[0, 0, 1, 2] = 0
    d[1, 0, 4, 4] = float("nan")
    pts, pix = backproject(d, cam)
    assert pix.shape == (2 * 48 - 2, 3)
    for b in range(2):
        p1, x1 = backproject(d[b, 0], cam)
        torch.testing.assert_close(pts[pix[:, 0] == b], p1)
        torch.testing.assert_close(pix[pix[:, 0] == b, 1:], x1)


def test_backproject_mask_and_depth_max() -> None:
    cam = _cam()
    d = torch.full((6, 8), 2.0)
    d[0, 0] = 5.0
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[:2] = True
    pts, pix = backproject(d, cam, mask=mask, depth_max=4.0)
    assert len(pts) == 15 and not ((pix[:, 0] == 0) & (pix[:, 1] == 0)).any()


def test_pixel_rays_give_z_depth_parameter() -> None:
    cam = _cam(pose=look_at([0.5, 1.0, -2.0], [0.0, 0.0, 1.0]))
    o, d = pixel_rays(cam, frame="world", dtype=torch.float64)
    z = torch.full((6, 8), 2.5, dtype=torch.float64)
    pts, _ = backproject(z, cam, frame="world")
    torch.testing.assert_close((o + 2.5 * d).reshape(-1, 3), pts)


def test_depth_validity_and_units() -> None:
    d = np.array([0.0, np.nan, np.inf, -np.inf, 1.0, 6.0], dtype=np.float32)
    assert depth_validity(d).tolist() == [False, False, False, False, True, True]
    with pytest.raises(ValueError, match=r"depth has 1 negative value\(s\) \(min -1, shape \(2,\)\)"):
        depth_validity(np.array([-1.0, 1.0]))  # the one depth rule: negative is an error, not a hole
    assert depth_validity(d, depth_max=5.0).tolist() == [False, False, False, False, True, False]
    t = depth_validity(torch.from_numpy(d))
    assert isinstance(t, torch.Tensor) and t.tolist() == [False, False, False, False, True, True]
    raw = np.array([0, 1000, 65535], dtype=np.uint16)
    np.testing.assert_allclose(depth_to_metres(raw, 1000.0), [0.0, 1.0, 65.535])
    np.testing.assert_allclose(depth_to_metres(raw, 5000.0), [0.0, 0.2, 13.107])
    assert depth_to_metres(raw).dtype == np.float32
    assert depth_to_metres(torch.tensor([5000]), 5000.0).tolist() == [1.0]


def test_look_at_is_rigid_and_aims() -> None:
    pose = look_at([1.0, 2.0, 3.0], [0.0, 0.5, -1.0])
    R = pose[:3, :3]
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    aim = np.array([0.0, 0.5, -1.0]) - [1.0, 2.0, 3.0]
    np.testing.assert_allclose(R[:, 2], aim / np.linalg.norm(aim))
    assert R[1, 1] < 0  # image down is world down for up = +y


def test_open3d_conversions() -> None:
    pytest.importorskip("open3d")
    pose = look_at([1.0, 0.0, 0.0], [0.0, 0.0, 2.0])
    cam = PinholeCamera(500.0, 510.0, 300.0, 200.0, 640, 480, pose)
    assert PinholeCamera.from_open3d(cam.to_open3d()) == cam.with_pose(None)
    back = PinholeCamera.from_open3d(cam.to_open3d_parameters())
    np.testing.assert_allclose(back.pose, pose, atol=1e-12)
    assert PinholeCamera.from_dict(json.loads(json.dumps(cam.to_dict()))) == cam


# ---------------------------------------------------------------------- errors
def test_bad_input_errors() -> None:
    cam = _cam()
    with pytest.raises(ValueError, match=r"depth has size 5x8 \(HxW\) but the camera intrinsics are for 6x8"):
        backproject(torch.ones(5, 8), cam)
    with pytest.raises(ValueError, match=r"depth has 48 negative value\(s\)"):
        backproject(-torch.ones(6, 8), cam)
    with pytest.raises(ValueError, match=r"depth of shape \(6, 8\) has no valid pixel \(all holes\)"):
        backproject(torch.zeros(6, 8), cam)
    pts, pix = backproject(torch.zeros(6, 8), cam, allow_empty=True)
    assert pts.shape == (0, 3) and pix.shape == (0, 2)
    with pytest.raises(ValueError, match=r"depth must have shape \[H, W\] or \[B, 1, H, W\], got \(6,\)"):
        backproject(torch.ones(6), cam)
    with pytest.raises(ValueError, match="depth must be floating-point metres, got dtype torch.int32"):
        backproject(torch.ones(6, 8, dtype=torch.int32), cam)
    with pytest.raises(ValueError, match="frame must be 'camera' or 'world'"):
        backproject(torch.ones(6, 8), cam, frame="ndc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fx and fy must be positive"):
        PinholeCamera(0.0, 1.0, 0.0, 0.0, 4, 4)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        PinholeCamera(1.0, 1.0, 0.0, 0.0, 0, 4)
    with pytest.raises(ValueError, match=r"pose must be a 4x4 camera-to-world matrix, got shape \(3, 3\)"):
        PinholeCamera(1.0, 1.0, 0.0, 0.0, 4, 4, np.eye(3))
    with pytest.raises(ValueError, match=r"points must have shape \[\.\.\., 3\], got \(4, 2\)"):
        project(torch.ones(4, 2), cam)
    with pytest.raises(ValueError, match="depth_scale must be positive"):
        depth_to_metres(np.ones(3), 0.0)


# ---------------------------------------------------------------------- I/O
def test_depth_png_roundtrip(tmp_path: Path) -> None:
    d = np.array([[0.0, 1.2344], [np.nan, 65.535]], dtype=np.float32)
    p = write_depth(tmp_path / "d.png", d)
    raw = read_depth_raw(p)
    assert raw.dtype == np.uint16 and raw.tolist() == [[0, 1234], [0, 65535]]
    np.testing.assert_allclose(read_depth(p), [[0.0, 1.234], [0.0, 65.535]], rtol=1e-6)
    np.testing.assert_allclose(
        read_depth(write_depth(tmp_path / "t.png", d[:1], 5000.0), 5000.0), [[0.0, 1.2344]]
    )
    with pytest.raises(ValueError, match="does not fit in 16 bits with depth_scale=1000"):
        write_depth(tmp_path / "x.png", np.full((2, 2), 70.0))
    with pytest.raises(ValueError, match="depth has negative values"):
        write_depth(tmp_path / "x.png", -np.ones((2, 2)))


def test_colour_ids_intrinsics_trajectory_roundtrip(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_color(write_color(tmp_path / "c.png", rgb)), rgb)
    ids = np.array([[0, 3], [300, 7]])
    np.testing.assert_array_equal(read_ids(write_ids(tmp_path / "i.png", ids)), ids)
    cam = PinholeCamera(500.0, 510.0, 300.25, 200.5, 640, 480)
    p = write_intrinsics(tmp_path / "k.json", cam)
    assert json.loads(p.read_text())["intrinsic_matrix"] == [
        500.0,
        0.0,
        0.0,
        0.0,
        510.0,
        0.0,
        300.25,
        200.5,
        1.0,
    ]
    assert read_intrinsics(p) == cam
    poses = np.stack([look_at([0, 0, 0], [0, 0, 1]), look_at([1, 2, 3], [0, 0, 0])])
    back, meta = read_trajectory_log(write_trajectory_log(tmp_path / "t.log", poses), return_metadata=True)
    np.testing.assert_array_equal(back, poses)
    assert meta.tolist() == [[0, 0, 1], [1, 1, 2]]


def test_io_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=f"depth file not found: {missing}"):
        read_depth(missing)
    with pytest.raises(FileNotFoundError, match="intrinsics file not found"):
        read_intrinsics(tmp_path / "k.json")
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    with pytest.raises(ValueError, match=f"could not read colour image {junk}"):
        read_color(junk)
    c8 = write_color(tmp_path / "c8.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="must be single-channel 16-bit, got dtype uint8"):
        read_depth(c8)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match=f"could not parse Open3D intrinsics JSON {bad}"):
        read_intrinsics(bad)
    log = tmp_path / "bad.log"
    log.write_text("0 0 1\n1 0 0 0\n")
    with pytest.raises(ValueError, match="must have 5 non-empty lines per entry"):
        read_trajectory_log(log)
