"""Tests of feature point clouds (:mod:`ua3d.rgbd.points`): geometry on true surfaces, holes,
features, colours, Open3D conversion, .npz/.ply round trips, and parity with Open3D's
``create_from_depth_image`` on a real Redwood frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ua3d.core.tto import FitConfig
from ua3d.rgbd.camera import project
from ua3d.rgbd.lift import fit_rgbd
from ua3d.rgbd.points import FeaturePointCloud, pca_colors, render_points
from ua3d.rgbd.synthetic import make_scene, surface_distance

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REDWOOD = SHARED / "data" / "redwood-open3d" / "sample5"
CFG = FitConfig(steps=2, radius=2, backend="reference")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scene():
    return make_scene(2, 64, 48, holes=3)


@pytest.fixture(scope="module")
def lifted(scene):
    return fit_rgbd(scene["rgb"], scene["depth"], scene["camera"], (6, 8), CFG)


@pytest.fixture(scope="module")
def feats():
    return torch.randn(1, 5, 6, 8, generator=torch.Generator().manual_seed(1))


def test_pixel_points_lie_on_the_true_surfaces(scene, lifted, feats):
    pc = render_points(lifted, feats, frame="world")
    ids = scene["ids"][pc.pixels[:, 0].numpy(), pc.pixels[:, 1].numpy()]
    objects = {o["id"]: o for o in scene["objects"]}
    pos = pc.positions.numpy()
    err = max(float(surface_distance(pos[ids == i], objects[i]).max()) for i in np.unique(ids))
    assert err < 1e-4, err
    assert pc.frame == "world"


def test_holes_give_no_points_and_features_match_render_2d(lifted, feats):
    pc = render_points(lifted, feats)
    valid = lifted.depth_valid[0, 0]
    assert len(pc) == int(valid.sum()) and valid.sum() < valid.numel()  # the scene has holes
    v, u = pc.pixels[:, 0], pc.pixels[:, 1]
    assert valid[v, u].all()
    assert torch.equal(pc.pixels, torch.nonzero(valid))  # row-major order, like Open3D
    hr = lifted.render_2d(feats)[0]
    torch.testing.assert_close(pc.features, hr[:, v, u].T)
    # camera frame: projecting a point gives back its pixel and its observed depth
    uv, z = project(pc.positions.double(), lifted.camera)
    torch.testing.assert_close(uv, torch.stack([u, v], 1).double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.float(), lifted.depth[0, 0][v, u], atol=1e-6, rtol=1e-6)


def test_colors(lifted, feats):
    rgb = render_points(lifted, feats, colors="rgb")
    v, u = rgb.pixels[:, 0], rgb.pixels[:, 1]
    torch.testing.assert_close(rgb.colors, lifted.rgb[0][:, v, u].T)
    pca = render_points(lifted, feats, colors="pca")
    assert pca.colors.shape == (len(pca), 3) and pca.colors.min() >= 0 and pca.colors.max() <= 1
    assert pca.colors.std(0).min() > 0.05
    # PCA colours: the first component orders the points along the main direction of the features
    f = torch.tensor([[0.0, 0.0], [1.0, 0.1], [2.0, -0.1], [3.0, 0.0]])
    c = pca_colors(f)
    assert c[:, 0].argsort().tolist() in ([0, 1, 2, 3], [3, 2, 1, 0])
    torch.testing.assert_close(c[:, 2], torch.full((4,), 0.5))  # only two components exist


def test_voxel_points(lifted, feats):
    pc = render_points(lifted, feats, mode="voxels", bins=8, colors="rgb")
    H, W = lifted.out_size
    assert len(pc) == H * W  # one voxel per pixel at its mass peak, holes included
    assert pc.bins is not None and pc.bin_depths is not None and pc.bin_depths.numel() == 8
    uv, z = project(pc.positions.double(), lifted.camera)
    torch.testing.assert_close(uv, pc.pixels.flip(1).double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(z, pc.bin_depths[pc.bins].double(), atol=1e-5, rtol=1e-6)
    volume, mass, _ = __import__("ua3d.rgbd.volume", fromlist=["render_volume"]).render_volume(
        lifted, feats, bins=8
    )
    d, v, u = pc.bins, pc.pixels[:, 0], pc.pixels[:, 1]
    assert torch.equal(d, mass.argmax(0)[v, u])
    torch.testing.assert_close(pc.features, volume[:, d, v, u].T)
    dense = render_points(lifted, feats, mode="voxels", bins=8, mass_threshold=0.05)
    assert len(dense) == int((mass >= 0.05).sum())


def test_open3d_and_file_round_trips(lifted, feats, tmp_path):
    o3d = pytest.importorskip("open3d")
    pc = render_points(lifted, feats.double())
    assert pc.features.dtype == torch.float64
    t = pc.to_open3d()
    assert isinstance(t, o3d.t.geometry.PointCloud)
    assert tuple(t.point.features.shape) == (len(pc), 5)
    np.testing.assert_array_equal(t.point.positions.numpy(), pc.positions.numpy())
    a = FeaturePointCloud.load(pc.save(tmp_path / "pc.npz"))
    assert torch.equal(a.features, pc.features) and torch.equal(a.pixels, pc.pixels)  # lossless
    assert torch.equal(a.positions, pc.positions) and torch.equal(a.colors, pc.colors)
    b = FeaturePointCloud.load(pc.save(tmp_path / "pc.ply"))
    assert torch.equal(b.features, pc.features.float()) and torch.equal(b.positions, pc.positions)
    torch.testing.assert_close(b.colors, pc.colors, atol=0.5 / 255, rtol=0)  # uchar colours in the PLY
    assert torch.equal(b.pixels, pc.pixels) and b.color_mode == pc.color_mode == "rgb"
    header = (tmp_path / "pc.ply").read_bytes()[:900].decode("latin-1")
    assert "property float features_0" in header and "property float features_4" in header
    assert "property uchar red" in header and "comment ua3d colors rgb" in header
    # the .npz is also what Open3D's own reader and ua3d.io read
    r = o3d.t.io.read_point_cloud(str(tmp_path / "pc.npz"))
    assert tuple(r.point.features.shape) == (len(pc), 5)
    with pytest.raises(ValueError, match=r"must end in .ply, .npz or .pcd"):
        pc.save(tmp_path / "pc.xyz")


def test_bad_arguments(lifted, feats):
    for kw, msg in [
        ({"mode": "mesh"}, "mode must be one of"),
        ({"frame": "lidar"}, "frame must be one of"),
        ({"colors": "depth"}, "colors must be one of"),
        ({"bins": 8}, r"volume options \['bins'\] apply only to mode='voxels'"),
        ({"mode": "voxels", "mass_threshold": 2.0}, "no voxel has mass >= mass_threshold=2.0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            render_points(lifted, feats, **kw)
    with pytest.raises(ValueError, match="does not match the kernel's LR grid"):
        render_points(lifted, torch.zeros(1, 5, 3, 4))


def test_redwood_frame_matches_open3d_create_from_depth_image():
    if not REDWOOD.is_dir():
        pytest.skip(f"real data not found at {REDWOOD} (the shared data folder beside the checkout)")
    o3d = pytest.importorskip("open3d")
    from ua3d.io.rgbd import read_color, read_depth_raw, read_intrinsics, read_trajectory_log

    raw = read_depth_raw(REDWOOD / "depth" / "00000.png")
    rgb = read_color(REDWOOD / "color" / "00000.jpg")
    pose = read_trajectory_log(REDWOOD / "trajectory.log")[0]
    cam = read_intrinsics(REDWOOD / "camera_primesense.json").with_pose(pose)
    lk = fit_rgbd(
        rgb, raw, cam, (30, 40), FitConfig(steps=0, radius=1, backend="reference"), depth_scale=1000.0
    )
    feats = torch.randn(1, 3, 30, 40, generator=torch.Generator().manual_seed(0))
    intr = cam.to_open3d()
    for frame, extrinsic in (("camera", np.eye(4)), ("world", np.linalg.inv(pose))):
        pc = render_points(lk, feats, frame=frame, colors="rgb")
        ref = o3d.geometry.PointCloud.create_from_depth_image(
            o3d.geometry.Image(raw), intr, extrinsic, depth_scale=1000.0, depth_trunc=1000.0
        )
        pts = np.asarray(ref.points)
        assert pts.shape == (len(pc), 3) and len(pc) == int((raw > 0).sum())
        np.testing.assert_allclose(pc.positions.numpy(), pts, rtol=0, atol=2e-6)
