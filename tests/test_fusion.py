"""FeatureMap: geometry of a fused plane, the weighted mean, file round trips, bad input."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from ua3d.core.tto import FitConfig
from ua3d.rgbd.camera import PinholeCamera, check_pose, look_at, pixel_rays
from ua3d.rgbd.fusion import FORMAT_VERSION, FeatureMap, reduce_frame


def _plane_frame(eye, W=64, H=48):
    """Camera at ``eye`` looking at the ground plane y = 0; exact depth and a two-tone texture."""
    cam = PinholeCamera(50.0, 50.0, (W - 1) / 2, (H - 1) / 2, W, H, look_at(eye, (0.0, 0.0, 0.0)))
    o, d = pixel_rays(cam, frame="world", dtype=torch.float64)
    t = -o[..., 1] / d[..., 1]
    hit = o + t[..., None] * d
    rgb = np.where(((hit[..., 0] // 0.25 + hit[..., 2] // 0.25) % 2 == 0)[..., None].numpy(), 0.8, 0.2)
    return np.repeat(rgb, 3, axis=2).astype(np.float32), t.numpy().astype(np.float32), cam


def _small_map(**kw):
    kw.setdefault("fit_config", FitConfig(steps=2))
    return FeatureMap(0.05, 4, torch.float32, work_width=None, **kw)


def test_two_views_of_a_plane_give_the_plane():
    m = _small_map()
    feat = torch.tensor([1.0, -2.0, 0.5, 3.0])[:, None, None].expand(4, 6, 8).contiguous()
    for eye in ((-0.2, 1.0, 0.4), (0.2, 1.1, 0.3)):
        rgb, z, cam = _plane_frame(eye)
        rep = m.integrate(rgb, z, cam, feat)
        assert rep.status == "integrated" and rep.points == 64 * 48
    assert m.frames == 2 and len(m) > 100
    pos = m.positions
    assert float(pos[:, 1].abs().max()) < 1e-4  # every point on y = 0
    # both views overlap: some voxels were seen twice, and every voxel holds its own points
    assert int((m.observations == 2).sum()) > 0.5 * len(m)
    assert torch.equal(m.lookup_points(pos), torch.arange(len(m)))
    # a constant feature field stays constant (the kernel's weights are normalised)
    torch.testing.assert_close(m.features, feat[:, 0, 0].expand(len(m), 4), atol=1e-5, rtol=0)
    sim = m.query(feat[:, 0, 0])
    torch.testing.assert_close(sim, torch.ones(len(m)), atol=1e-5, rtol=0)


def test_point_seen_twice_gets_the_weighted_mean():
    m = FeatureMap(0.1, 3, torch.float32)
    p = torch.tensor([[0.31, 0.52, -0.27]])
    f1, f2 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[-1.0, 0.0, 5.0]])
    m.integrate_points(p, f1, torch.tensor([2.0]), colors=torch.tensor([[1.0, 0.0, 0.0]]))
    # second frame: two points in the same voxel (pooled first), weights 1 and 3
    p2 = torch.tensor([[0.33, 0.55, -0.21], [0.35, 0.51, -0.29]])
    m.integrate_points(p2, torch.cat([f2, f1]), torch.tensor([1.0, 3.0]))
    assert len(m) == 1 and int(m.observations[0]) == 2
    expect = (2 * f1 + 1 * f2 + 3 * f1) / 6
    torch.testing.assert_close(m.features, expect, rtol=0, atol=1e-6)
    assert float(m.weights[0]) == 6.0
    torch.testing.assert_close(m.positions, (2 * p + p2[:1] + 3 * p2[1:]) / 6, rtol=0, atol=1e-6)
    # a point in another voxel does not touch the first one
    m.integrate_points(torch.tensor([[1.0, 1.0, 1.0]]), f2, torch.tensor([5.0]))
    assert len(m) == 2
    torch.testing.assert_close(m.features[0:1], expect, rtol=0, atol=1e-6)


def test_many_voxels_hash_lookup_and_growth():
    g = torch.Generator().manual_seed(0)
    m = FeatureMap(0.01, 2, torch.float16)
    pts = torch.rand(5000, 3, generator=g) * 2 - 1
    f = torch.randn(5000, 2, generator=g)
    for chunk in range(5):
        m.integrate_points(pts[chunk * 1000 : (chunk + 1) * 1000], f[chunk * 1000 : (chunk + 1) * 1000])
    keys = m.points_to_keys(pts)
    assert len(m) == torch.unique(keys).numel()
    slots = m.lookup(keys)
    assert bool((slots >= 0).all()) and torch.equal(m.keys[slots], keys)
    assert int(m.lookup(m.points_to_keys(torch.tensor([[5.0, 5.0, 5.0]])))[0]) == -1
    assert torch.equal(m.voxel_coords(), torch.floor(m.positions.double() / 0.01).long())


def _filled_map():
    g = torch.Generator().manual_seed(1)
    m = FeatureMap(0.02, 5, torch.float16)
    m.integrate_points(
        torch.rand(300, 3, generator=g),
        torch.randn(300, 5, generator=g),
        torch.rand(300, generator=g) + 0.1,
        torch.rand(300, 3, generator=g),
    )
    m.lr_size, m.frames, m.skipped = (6, 8), 3, [(1, "no valid depth")]
    m.poses = [np.eye(4) * (i + 1) for i in range(3)]
    return m


def test_save_load_round_trip_is_exact(tmp_path):
    m = _filled_map()
    path = m.save(tmp_path / "map.npz")
    r = FeatureMap.load(path)
    for name in ("keys", "features", "weights", "positions", "colors", "observations"):
        a, b = getattr(m, name), getattr(r, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (r.voxel_size, r.channels, r.dtype, r.lr_size, r.frames, r.skipped) == (
        0.02,
        5,
        torch.float16,
        (6, 8),
        3,
        [(1, "no valid depth")],
    )
    assert torch.equal(r.lookup(m.keys), m.lookup(m.keys))
    assert all(np.array_equal(a, b) for a, b in zip(r.poses, m.poses)) and len(r.poses) == 3
    # the loaded map keeps integrating
    r.integrate_points(torch.zeros(1, 3), torch.ones(1, 5))


def test_ply_export_has_uchar_pca_colours(tmp_path):
    o3d = pytest.importorskip("open3d")
    m = _filled_map()
    m.save(tmp_path / "map.ply")
    pc = o3d.t.io.read_point_cloud(str(tmp_path / "map.ply"))
    assert pc.point.colors.dtype == o3d.core.uint8
    assert pc.point.positions.shape[0] == len(m)
    np.testing.assert_array_equal(pc.point.colors.numpy(), np.round(m.pca_colors() * 255).astype(np.uint8))
    t = m.to_point_cloud()
    assert t.point.features.shape == (len(m), 5) and t.point.weights.shape == (len(m), 1)


def test_truncated_or_foreign_map_files(tmp_path):
    m = _filled_map()
    path = m.save(tmp_path / "map.npz")
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        FeatureMap.load(tmp_path / "cut.npz")
    st = m.state()
    st["format_version"] = np.array(FORMAT_VERSION + 1)
    np.savez(tmp_path / "v2.npz", **st)
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}"):
        FeatureMap.load(tmp_path / "v2.npz")
    np.savez(tmp_path / "other.npz", positions=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="not a ua3d feature map"):
        FeatureMap.load(tmp_path / "other.npz")
    with zipfile.ZipFile(tmp_path / "z.npz", "w") as z:
        z.writestr("format.npy", b"garbage")
    with pytest.raises(ValueError):
        FeatureMap.load(tmp_path / "z.npz")


def _snapshot(m):
    return [t.clone() for t in (m.keys, m.features, m.weights, m.positions, m.observations)] + [m.frames]


def _same(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_bad_frames_raise_and_keep_the_map():
    m = _small_map()
    rgb, z, cam = _plane_frame((0.0, 1.0, 0.4))
    feat = torch.randn(4, 6, 8)
    m.integrate(rgb, z, cam, feat)
    before = _snapshot(m)
    bad_pose = cam.pose.copy()
    bad_pose[:3, :3] *= 1.1
    cases = [
        ((rgb, z[:40], cam, feat), "depth has size"),
        ((rgb[:40, :60], z[:40, :60], cam, feat), "intrinsics are for"),
        ((rgb, z, cam, torch.randn(4, 8, 6)), "differs from the grid"),
        ((rgb, z, cam, torch.randn(3, 6, 8)), "has 3 channels"),
    ]
    with pytest.raises(ValueError, match="not a rotation"):  # a non-rigid pose never reaches the map
        m.integrate(rgb, z, cam.with_pose(bad_pose), feat)
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            m.integrate(*args)
        assert _same(before, _snapshot(m))
    with pytest.warns(RuntimeWarning, match="no valid depth"):
        rep = m.integrate(rgb, np.zeros_like(z), cam, feat)
    assert rep.status == "skipped" and m.skipped == [(1, "no valid depth")]
    assert _same(before, _snapshot(m))
    rep = m.integrate(rgb, z, cam, feat)  # the run goes on
    assert rep.status == "integrated" and m.frames == 2


def test_transposed_grid_on_first_frame_is_rejected():
    m = _small_map()
    rgb, z, cam = _plane_frame((0.0, 1.0, 0.4))
    with pytest.raises(ValueError, match="aspect ratio"):
        m.integrate(rgb, z, cam, torch.randn(4, 8, 6))
    assert len(m) == 0 and m.lr_size is None


def test_memory_limit_refuses_growth_and_keeps_the_map():
    m = FeatureMap(0.01, 32, torch.float16, max_bytes=FeatureMap.estimate_bytes(1500, 32))
    g = torch.Generator().manual_seed(0)
    m.integrate_points(torch.rand(1000, 3, generator=g) * 10, torch.randn(1000, 32, generator=g))
    before = _snapshot(m)
    with pytest.raises(MemoryError, match="keeps its 1000 voxels"):
        m.integrate_points(torch.rand(1000, 3, generator=g) * 10 + 20, torch.randn(1000, 32, generator=g))
    assert _same(before, _snapshot(m))
    assert FeatureMap.bytes_per_voxel(32, torch.float16) == 112


def test_rigid_pose_check_and_frame_reduction():
    assert check_pose(None) is None
    refl = np.diag([1.0, 1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="det = -1"):
        check_pose(refl)
    depth = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 0.0, 5.0]])[None, None]
    rgb = torch.rand(1, 3, 2, 4)
    cam = PinholeCamera(10, 10, 1.5, 0.5, 4, 2)
    r, d, c = reduce_frame(rgb, depth, cam, 2)
    assert d.flatten().tolist() == [2.0, 5.0]  # lower median of the valid samples, holes ignored
    assert (c.width, c.height, c.fx, c.cx) == (2, 1, 5.0, 0.5)
    torch.testing.assert_close(r[0, :, 0, 0], rgb[0, :, :, :2].mean((1, 2)))


def test_fit_width_fits_a_coarse_guide_only_for_wide_frames():
    m = FeatureMap(0.02, 4, fit_width=320)
    assert m.frame_config(320).coarse_to_fine == 1.0
    cfg = m.frame_config(640)
    assert (cfg.coarse_to_fine, cfg.fine_steps, cfg.steps) == (0.5, 0, m.fit_config.steps)
    assert FeatureMap(0.02, 4, fit_width=None).frame_config(640).coarse_to_fine == 1.0
