"""The RGB-D lift's preprocessing fast paths (:mod:`ua3d.rgbd.fast_prep`, numba) against their torch
references in :mod:`ua3d.rgbd.lift`.

Tolerances: the per-segment medians (``_segment_median``, ``pool_depth``, ``cell_gradients``, the volume's
plane fit) and the depth normaliser are **bit-identical** in float64 and float32 (same values, signs of
zero and NaNs included). The surface normals are compared within 1e-12 (float64) and 1e-6 (float32:
both compute in float64 and round once; the bits agree on the CPUs measured, but torch's cross product
kernel may or may not fuse a multiply-add depending on the CPU, see the module doc). A whole ``fit_rgbd``
gives the same parameters with the fast paths on and off.
"""

from __future__ import annotations

import pytest
import torch

from ua3d.core.kernel import nearest_anchor
from ua3d.core.tto import FitConfig
from ua3d.rgbd import fast_prep, lift
from ua3d.rgbd.camera import PinholeCamera
from ua3d.rgbd.synthetic import make_scene
from ua3d.rgbd.volume import _plane_fit

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not fast_prep.AVAILABLE, reason="numba is not installed: no fast preprocessing"),
]
DTYPES = [torch.float64, torch.float32]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values, with the same signs of zero and the same NaN positions."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = torch.isnan(a)
    return (
        torch.equal(nan, torch.isnan(b))
        and torch.equal(a[~nan], b[~nan])
        and torch.equal(torch.signbit(a[~nan]), torch.signbit(b[~nan]))
    )


def _reference(monkeypatch):
    monkeypatch.setattr(lift, "FAST_PREP", False)


def _holey_depth(B: int, H: int, W: int, dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A slanted, stepped, noisy depth ``[B, 1, H, W]`` with blob holes, an all-invalid row and column,
    and values repeated exactly (ties)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(H, dtype=torch.float64)[:, None]
    x = torch.arange(W, dtype=torch.float64)[None, :]
    z = (
        1.5
        + 0.02 * y
        + 0.01 * x
        + 0.8 * (x > W / 2)
        + 0.003 * torch.randn(B, 1, H, W, generator=g, dtype=torch.float64)
    )
    z = torch.where(torch.rand(B, 1, H, W, generator=g) < 0.2, z.round(decimals=1), z)  # ties
    valid = torch.rand(B, 1, H, W, generator=g) > 0.15
    valid[..., H // 3, :] = False
    valid[..., :, W // 4] = False
    valid[..., 2 : H // 4, W - 5 :] = False  # a hole wider than a cell
    z = torch.where(valid, z, torch.zeros((), dtype=torch.float64))
    return z.to(dtype), valid


# ---------------------------------------------------------------------- per-segment medians
@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_median_is_bit_identical_to_the_torch_reference(dtype):
    g = torch.Generator().manual_seed(0)
    S = 40
    counts = [0, 1, 2, 3, 4, 0, 1, 2] + [int(c) for c in torch.randint(0, 60, (S - 8,), generator=g)]
    segment = torch.cat([torch.full((c,), s, dtype=torch.int64) for s, c in enumerate(counts)])
    segment = segment[torch.randperm(segment.numel(), generator=g)]  # ids in no particular order
    values = (
        torch.randn(segment.numel(), generator=g, dtype=torch.float64).round(decimals=1).to(dtype)
    )  # ties
    values[torch.rand(values.numel(), generator=g) < 0.15] = -0.0  # signed zeros: the stable order decides
    values[torch.rand(values.numel(), generator=g) < 0.15] = 0.0
    values[torch.rand(values.numel(), generator=g) < 0.03] = float("nan")  # NaNs sort last
    want = lift._segment_median_torch(values, segment, S)
    got = fast_prep.segment_median(values, segment, S)
    assert got[0].dtype == dtype and _same_bits(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[1], torch.tensor(counts) > 0)
    assert _same_bits(lift._segment_median(values, segment, S)[0], want[0])  # the dispatcher: the fast path
    # even counts are the mean of the two middle values, empty segments 0 / False
    v = torch.tensor([4.0, 1.0, 7.0, 3.0, 5.0], dtype=dtype)
    s = torch.tensor([2, 2, 0, 2, 2])
    med, has = fast_prep.segment_median(v, s, 4)
    assert med.tolist() == [7.0, 0.0, 3.5, 0.0] and has.tolist() == [True, False, True, False]
    # no values at all
    med, has = fast_prep.segment_median(v[:0], s[:0], 3)
    assert med.tolist() == [0.0] * 3 and not has.any()
    assert _same_bits(med, lift._segment_median_torch(v[:0], s[:0], 3)[0])


def test_segment_median_rejects_ids_out_of_range():
    with pytest.raises(ValueError, match=r"segment ids must lie in \[0, 3\), got 2 outside"):
        fast_prep.segment_median(torch.ones(4), torch.tensor([0, 3, -1, 2]), 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("B", "H", "W", "lr"), [(1, 37, 53, (5, 7)), (2, 24, 32, (6, 8)), (1, 9, 11, (9, 11)), (1, 7, 5, (2, 3))]
)
def test_cell_medians_are_bit_identical_to_the_torch_reference(monkeypatch, dtype, B, H, W, lr):
    """pool_depth, cell_gradients and the volume's plane fit: holes, odd sizes, non-integer ratios, cells
    with no / one / two valid pixels (the 9 x 11 grid on 9 x 11 pixels: one pixel per cell), all-invalid
    rows and columns."""
    z, valid = _holey_depth(B, H, W, dtype, seed=H * W)
    iy, ix = nearest_anchor(H, lr[0]), nearest_anchor(W, lr[1])
    valid[..., (iy == 0)[:, None] & (ix == lr[1] - 1)[None, :]] = False  # an empty cell
    keep = (iy == lr[0] - 1)[:, None] & (ix == 0)[None, :]
    valid[..., keep] &= torch.arange(int(keep.sum())) < 2  # a cell with at most two valid pixels
    f = torch.where(valid, z.clamp_min(1e-12).log(), torch.zeros((), dtype=dtype))
    fast = (
        lift.pool_depth(z, valid, lr),
        lift.cell_gradients(f, valid, lr),
        _plane_fit(f[:1], valid[:1], lr),
    )
    _reference(monkeypatch)
    ref = (lift.pool_depth(z, valid, lr), lift.cell_gradients(f, valid, lr), _plane_fit(f[:1], valid[:1], lr))
    for a, b in zip(
        (fast[0][0], fast[0][1], fast[1], *fast[2]), (ref[0][0], ref[0][1], ref[1], *ref[2]), strict=True
    ):
        assert _same_bits(a, b)
    assert fast[1].is_contiguous() and fast[1].shape == (B, 2, *lr)
    assert not bool(fast[0][1].all())  # some cells are empty


def test_cell_medians_with_one_and_two_values_per_cell_and_no_pairs():
    z = torch.tensor([[1.0, 2.0, 5.0, 9.0], [3.0, 4.0, 6.0, 7.0]], dtype=torch.float64)[None, None]
    valid = torch.tensor([[True, False, True, True], [False, False, True, False]])[None, None]
    zl, vl = lift.pool_depth(z, valid, (1, 2))  # left cell: {1}, right cell: {5, 9, 6}
    assert zl.flatten().tolist() == [1.0, 6.0] and vl.all()
    zl, vl = lift.pool_depth(z, valid & (z != 5), (1, 2))  # right cell: {9, 6}: the mean
    assert zl.flatten().tolist() == [1.0, 7.5]
    g = lift.cell_gradients(z, valid, (1, 2))  # left cell: no valid pair -> 0
    assert g[0, :, 0, 0].tolist() == [0.0, 0.0] and g[0, :, 0, 1].tolist() == [1.0, 4.0]


# ---------------------------------------------------------------------- surface normals
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("H", "W"), [(37, 53), (24, 32), (1, 7), (6, 1), (2, 2)])
def test_surface_normals_match_the_torch_reference(monkeypatch, dtype, H, W):
    cam = PinholeCamera(45.0, 47.0, (W - 1) / 2 + 0.3, (H - 1) / 2 - 0.2, W, H)
    z, valid = _holey_depth(1, H, W, dtype, seed=7 * H + W)
    raw = fast_prep.surface_normals_raw(z[0, 0], valid[0, 0], cam.fx, cam.fy, cam.cx, cam.cy)
    fast = lift.surface_normals(z, valid, cam)
    _reference(monkeypatch)
    ref = lift.surface_normals(z, valid, cam)
    assert fast.dtype == dtype and fast.shape == ref.shape == (1, 3, H, W)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert float((fast - ref).abs().max()) <= tol
    good = raw[1]  # the unfilled normals where they are usable
    if bool(good.any()):
        assert float((raw[0][:, good] - ref[0][:, good].to(torch.float64)).abs().max()) <= tol


def test_surface_normals_without_any_good_pixel_face_the_camera(monkeypatch):
    cam = PinholeCamera(10.0, 10.0, 3.5, 2.5, 8, 6)
    z = torch.full((1, 1, 6, 8), 2.0)
    valid = torch.zeros(1, 1, 6, 8, dtype=torch.bool)
    valid[..., ::2, ::2] = True  # isolated pixels: no difference anywhere
    n = lift.surface_normals(z, valid, cam)
    assert torch.equal(n, torch.tensor([0.0, 0.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 6, 8))
    _reference(monkeypatch)
    assert torch.equal(lift.surface_normals(z, valid, cam), n)


def test_surface_normals_of_a_scene_with_holes(monkeypatch):
    s = make_scene(2, 97, 61, holes=5)
    z = torch.from_numpy(s["depth"])[None, None].double()
    valid = z > 0
    fast = lift.surface_normals(z, valid, s["camera"])
    _reference(monkeypatch)
    assert float((fast - lift.surface_normals(z, valid, s["camera"])).abs().max()) <= 1e-12


# ---------------------------------------------------------------------- normaliser, dispatch, the whole fit
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_normaliser_selection_is_bit_identical_to_torch_quantile(monkeypatch, mode):
    g = torch.Generator().manual_seed(3)
    cases = [torch.tensor([2.0]), torch.tensor([2.0, 1.0]), torch.tensor([3.0, 1.0, 2.0])]
    cases += [torch.rand(n, generator=g, dtype=torch.float64) * 4 + 0.1 for n in (99, 100, 101, 5003)]
    cases.append(torch.full((50,), 1.25))
    fast = [lift._normaliser(z, mode) for z in cases]
    _reference(monkeypatch)
    assert fast == [lift._normaliser(z, mode) for z in cases]


def test_cpu_tensors_take_the_fast_paths_and_the_switch_restores_the_references(monkeypatch):
    calls: list[str] = []

    def spy(module, name):
        fn = getattr(module, name)

        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)

        monkeypatch.setattr(module, name, wrapped)

    for name in ("segment_median", "cell_median", "surface_normals_raw"):
        spy(fast_prep, name)
    for name in ("_segment_median_torch", "_surface_normals_torch"):
        spy(lift, name)
    cam = PinholeCamera(20.0, 20.0, 7.5, 5.5, 16, 12)
    z, valid = _holey_depth(1, 12, 16, torch.float32, seed=1)
    f = torch.where(valid, z.clamp_min(1e-12).log(), torch.zeros(()))
    ids = torch.tensor([0, 1, 1])

    def run():
        calls.clear()
        lift.pool_depth(z, valid, (3, 4))
        lift.cell_gradients(f, valid, (3, 4))
        lift.surface_normals(z, valid, cam)
        lift._segment_median(torch.tensor([1.0, 2.0, 4.0]), ids, 2)
        return list(calls)

    assert run() == ["cell_median", "cell_median", "cell_median", "surface_normals_raw", "segment_median"]
    _reference(monkeypatch)
    assert run() == ["_segment_median_torch"] * 3 + ["_surface_normals_torch", "_segment_median_torch"]
    monkeypatch.setattr(lift, "FAST_PREP", True)
    monkeypatch.setattr(fast_prep, "AVAILABLE", False)  # numba missing: the references, no error
    assert run() == ["_segment_median_torch"] * 3 + ["_surface_normals_torch", "_segment_median_torch"]
    assert not lift._fast_prep(torch.zeros(2, dtype=torch.float16))


@pytest.mark.parametrize("normal_scale", [lift.NORMAL_SCALE, 0.0])
def test_fit_rgbd_is_the_same_with_and_without_the_fast_paths(monkeypatch, normal_scale):
    s = make_scene(1, 53, 37, holes=4)
    cfg = FitConfig(steps=2, radius=2)

    def fit():
        return lift.fit_rgbd(s["rgb"], s["depth"], s["camera"], (5, 7), cfg, normal_scale=normal_scale)

    fast = fit()
    _reference(monkeypatch)
    ref = fit()
    for name in ("depth_lr", "depth_lr_valid", "depth_lr_grad"):
        assert _same_bits(getattr(fast, name), getattr(ref, name))
    assert (fast.depth_lo, fast.depth_spread) == (ref.depth_lo, ref.depth_spread)
    if normal_scale == 0:
        assert _same_bits(fast.params, ref.params)
    else:  # the normals agree to 1e-12 before their float32 rounding (bit for bit where measured)
        torch.testing.assert_close(fast.kernel.guide_hr, ref.kernel.guide_hr, atol=1e-6, rtol=0)
        torch.testing.assert_close(fast.params, ref.params, atol=1e-5, rtol=0)
