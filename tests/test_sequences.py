"""Sequence readers: Redwood poses agree with Open3D, TUM association and quaternions, plain folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ua3d.io.rgbd import write_color, write_depth, write_intrinsics
from ua3d.io.sequences import detect_format, open_sequence, quaternion_to_matrix, read_tum
from ua3d.rgbd.camera import PinholeCamera

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REDWOOD = SHARED / "data" / "redwood-open3d" / "sample5"


def _redwood() -> Path:
    if not (REDWOOD / "trajectory.log").is_file():
        pytest.skip(
            f"Redwood sample data not found at {REDWOOD} (shared data is read from ../shared beside the repo)"
        )
    return REDWOOD


def test_redwood_poses_agree_with_open3d():
    o3d = pytest.importorskip("open3d")
    root = _redwood()
    seq = open_sequence(root)
    assert seq.format == "redwood" and len(seq) == 5
    traj = o3d.io.read_pinhole_camera_trajectory(str(root / "trajectory.log"))
    assert len(traj.parameters) == len(seq)
    for i, par in enumerate(traj.parameters):
        np.testing.assert_allclose(seq.poses[i], np.linalg.inv(par.extrinsic), rtol=0, atol=1e-12)
    fr = seq[2]
    intr = o3d.io.read_pinhole_camera_intrinsic(str(root / "camera_primesense.json"))
    np.testing.assert_allclose(fr.camera.K, intr.intrinsic_matrix)
    np.testing.assert_array_equal(fr.camera.pose, seq.poses[2])
    assert fr.rgb.shape == (480, 640, 3) and fr.depth.dtype == np.float32
    # the same world points as Open3D's own back-projection with that extrinsic
    depth = o3d.io.read_image(str(root / "depth" / "00002.png"))
    pc = o3d.geometry.PointCloud.create_from_depth_image(
        depth, intr, traj.parameters[2].extrinsic, depth_scale=1000.0, depth_trunc=1e9
    )
    from ua3d.rgbd.camera import backproject

    pts, _ = backproject(fr.depth, fr.camera, frame="world")
    np.testing.assert_allclose(pts.numpy(), np.asarray(pc.points), atol=1e-4)


def test_quaternion_matches_open3d():
    o3d = pytest.importorskip("open3d")
    rng = np.random.default_rng(0)
    for _ in range(5):
        q = rng.normal(size=4)  # (qx, qy, qz, qw)
        qn = q / np.linalg.norm(q)
        ref = o3d.geometry.get_rotation_matrix_from_quaternion(np.array([qn[3], qn[0], qn[1], qn[2]]))
        np.testing.assert_allclose(quaternion_to_matrix(q), ref, atol=1e-12)


def _frames(root: Path, n: int, W: int = 8, H: int = 6, scale: float = 1000.0, sub: str = "color"):
    (root / sub).mkdir(parents=True)
    (root / "depth").mkdir()
    for i in range(n):
        write_color(root / sub / f"{i:05d}.png", np.full((H, W, 3), 10 * i, np.uint8))
        write_depth(root / "depth" / f"{i:05d}.png", np.full((H, W), 1.0 + i, np.float32), scale)


def test_tum_association_and_units(tmp_path):
    root = tmp_path / "tum"
    root.mkdir()
    (root / "rgb").mkdir()
    (root / "depth").mkdir()
    t_rgb = [10.00, 10.10, 10.20, 10.30]
    t_dep = [10.005, 10.112, 10.26, 10.302]  # frame 2 has no depth within 0.02 s
    for i, (tr, td) in enumerate(zip(t_rgb, t_dep)):
        write_color(root / "rgb" / f"{tr:.6f}.png", np.full((6, 8, 3), 20 * i, np.uint8))
        write_depth(root / "depth" / f"{td:.6f}.png", np.full((6, 8), 0.5 * (i + 1), np.float32), 5000.0)
    (root / "rgb.txt").write_text("# color images\n" + "".join(f"{t:.6f} rgb/{t:.6f}.png\n" for t in t_rgb))
    (root / "depth.txt").write_text("# depth\n" + "".join(f"{t:.6f} depth/{t:.6f}.png\n" for t in t_dep))
    gt = ["# timestamp tx ty tz qx qy qz qw"]
    for k in range(40):  # 100 Hz ground truth, a rotation about z growing with time
        t = 9.95 + 0.01 * k
        a = 0.1 * k
        gt.append(f"{t:.4f} {k * 0.01} 1.0 2.0 0 0 {np.sin(a / 2)} {np.cos(a / 2)}")
    (root / "groundtruth.txt").write_text("\n".join(gt) + "\n")
    write_intrinsics(root / "intrinsics.json", PinholeCamera(5, 5, 3.5, 2.5, 8, 6))
    assert detect_format(root) == "tum"
    seq = read_tum(root)
    assert len(seq) == 3 and seq.timestamps == [10.0, 10.1, 10.3]
    depths = [float(f.depth[0, 0]) for f in seq]
    assert depths == [0.5, 1.0, 2.0]  # value / 5000, frame 2 dropped
    k = round((10.1 - 9.95) / 0.01)  # nearest ground truth of frame 1
    a = 0.1 * k
    np.testing.assert_allclose(seq.poses[1][:3, 3], [k * 0.01, 1.0, 2.0])
    np.testing.assert_allclose(
        seq.poses[1][:2, :2], [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], atol=1e-12
    )


def test_plain_folder_and_errors(tmp_path):
    root = tmp_path / "plain"
    _frames(root, 3, sub="rgb")
    poses = np.stack([np.eye(4)] * 3)
    poses[:, 0, 3] = [0.0, 0.1, 0.2]
    np.save(root / "poses.npy", poses)
    cam = PinholeCamera(5, 5, 3.5, 2.5, 8, 6)
    with pytest.raises(ValueError, match="no intrinsics given"):
        open_sequence(root)
    seq = open_sequence(root, intrinsics=cam)
    assert seq.format == "plain" and len(seq) == 3
    assert float(seq[1].camera.pose[0, 3]) == 0.1 and float(seq[-1].depth[0, 0]) == 3.0
    np.save(root / "poses.npy", poses[:2])
    with pytest.raises(ValueError, match="3 colour images, 3 depth images and 2 poses"):
        open_sequence(root, "plain", intrinsics=cam)
    with pytest.raises(ValueError, match="format must be one of"):
        open_sequence(root, "kitti", intrinsics=cam)
    with pytest.raises(FileNotFoundError):
        open_sequence(tmp_path / "missing", "redwood")
