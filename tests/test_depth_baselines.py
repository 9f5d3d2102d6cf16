"""Classic depth SR baselines: Pillow / OpenCV parity, hole handling, units and input checks."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ua3d.depth.baselines import (
    bicubic,
    bilinear,
    guided,
    guided_filter,
    lr_valid_mask,
    nearest,
    output_valid_mask,
    pil_weights,
    resize_pil,
)

RNG = np.random.default_rng(7)
PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def guide_like(h: int, w: int, b: int = 1) -> torch.Tensor:
    return torch.from_numpy(RNG.random((b, 3, h, w)).astype(np.float32))


@pytest.mark.parametrize("kind", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize(
    ("h", "w", "out_h", "out_w"), [(9, 13, 36, 52), (7, 5, 56, 40), (40, 52, 10, 13), (6, 7, 17, 23)]
)
def test_resize_matches_pillow_float_resize(kind, h, w, out_h, out_w):
    x = RNG.uniform(20, 230, (h, w)).astype(np.float32)
    ref = np.asarray(Image.fromarray(x, mode="F").resize((out_w, out_h), PIL_FILTERS[kind]))
    out = resize_pil(torch.from_numpy(x)[None, None], (out_h, out_w), kind)[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_pil_weights_rows_sum_to_one_and_cubic_has_negative_lobes():
    w = pil_weights(10, 40, "bicubic")
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert w.min() < 0  # Keys a = -0.5
    assert (pil_weights(10, 40, "bilinear") >= 0).all()
    with pytest.raises(ValueError, match="kind must be 'nearest', 'bilinear' or 'bicubic', got 'lanczos'"):
        pil_weights(4, 8, "lanczos")


@pytest.mark.parametrize("method", [nearest, bilinear, bicubic])
def test_upsamplers_reproduce_pillow_on_depth(method):
    lr = RNG.uniform(50, 200, (2, 1, 8, 11)).astype(np.float32)
    out = method(torch.from_numpy(lr), guide_like(32, 44, b=2))
    assert out.shape == (2, 1, 32, 44) and out.dtype == torch.float32
    ref = np.asarray(Image.fromarray(lr[1, 0], mode="F").resize((44, 32), PIL_FILTERS[method.__name__]))
    np.testing.assert_allclose(out[1, 0].numpy(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("r", "eps"), [(2, 1e-3), (4, 1e-2), (20, 1e-4)])
def test_guided_filter_matches_opencv(r, eps):
    guide = RNG.random((29, 37, 3)).astype(np.float32)
    src = RNG.uniform(0, 50, (29, 37)).astype(np.float32)
    g = torch.from_numpy(guide).permute(2, 0, 1)[None]
    out = guided_filter(g, torch.from_numpy(src)[None, None], r, eps)[0, 0].numpy()
    np.testing.assert_allclose(out, cv2.ximgproc.guidedFilter(guide, src, r, eps), atol=1e-4)
    grey = np.ascontiguousarray(guide[..., 1])
    out_grey = guided_filter(g[:, 1:2], torch.from_numpy(src)[None, None], r, eps)[0, 0].numpy()
    np.testing.assert_allclose(
        out_grey, cv2.ximgproc.guidedFilter(grey, src, r, eps), atol=2e-3
    )  # float32 cv2


@pytest.mark.parametrize("hole", ["nan", "zero", "mask"])
@pytest.mark.parametrize("method", [nearest, bilinear, bicubic, guided])
def test_holes_are_excluded_never_averaged_as_zero(method, hole):
    depth = torch.full((1, 1, 12, 12), 3.5)
    mask = None
    if hole == "mask":
        mask = torch.ones(1, 1, 12, 12, dtype=torch.bool)
        mask[..., 4:9, 4:9] = False
        mask[..., 3:10, 3:10] = False
    else:
        depth[..., 3:10, 3:10] = math.nan if hole == "nan" else 0.0
    out = method(depth, guide_like(48, 48), mask_lr=mask)
    valid = output_valid_mask(out)
    torch.testing.assert_close(out[valid], torch.full_like(out[valid], 3.5))  # a constant stays constant
    assert not valid[..., 24, 24]  # the middle of a 7x7 LR hole has no support
    assert valid[..., :8, :].all() and valid[..., -4:, :].all()


def test_nearest_nan_exactly_on_the_hole_blocks():
    depth = torch.full((1, 1, 6, 6), 2.0)
    depth[0, 0, 2, 3] = math.nan
    out = nearest(depth, guide_like(24, 24))
    expected = torch.zeros(24, 24, dtype=torch.bool)
    expected[8:12, 12:16] = True
    assert torch.equal(torch.isnan(out[0, 0]), expected)


def test_bicubic_falls_back_to_bilinear_only_near_holes():
    depth = torch.from_numpy(RNG.uniform(1, 2, (1, 1, 16, 16)).astype(np.float32))
    holed = depth.clone()
    holed[0, 0, 5, 5] = math.nan
    guide = guide_like(64, 64)
    full, near_hole = bicubic(depth, guide), bicubic(holed, guide)
    touched = (full != near_hole)[0, 0]
    # HR row y weighs LR row 5 when |5 + 0.5 - (y + 0.5) / 4| < 2 (cubic support), i.e. y = 14..29
    assert touched.nonzero()[:, 0].unique().tolist() == list(range(14, 30))
    assert torch.isfinite(near_hole).all()  # one interior hole leaves every 2x2 bilinear support non-empty
    torch.testing.assert_close(near_hole[0, 0][touched], bilinear(holed, guide)[0, 0][touched])
    assert not torch.isnan(bilinear(holed, guide)).any()
    corner = depth.clone()
    corner[0, 0, 0, 0] = math.nan  # Pillow's border rows use LR pixel 0 alone: no support there
    assert torch.isnan(bicubic(corner, guide)[0, 0]).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


@pytest.mark.parametrize("method", [nearest, bilinear, bicubic, guided])
def test_units_pass_through(method):
    depth = torch.from_numpy(RNG.uniform(1, 4, (1, 1, 10, 10))).double()
    guide = guide_like(40, 40).double()
    out = method(depth, guide)
    assert out.dtype == torch.float64
    # metres -> millimetres: the output scales with the input (and an offset passes through)
    torch.testing.assert_close(method(1000 * depth + 5, guide), 1000 * out + 5)


def test_guided_sharpens_a_step_that_the_guide_sees():
    h = w = 64
    gt = torch.ones(1, 1, h, w)
    gt[..., :, 30:] = 2.0
    guide = torch.zeros(1, 3, h, w)
    guide[..., :, 30:] = 1.0
    lr = np.array(Image.fromarray(gt[0, 0].numpy(), mode="F").resize((8, 8), Image.BICUBIC))
    lr = torch.from_numpy(lr)[None, None]
    up, filtered = bicubic(lr, guide), guided(lr, guide)
    assert (filtered - gt).abs()[..., 20:40].mean() < 0.9 * (up - gt).abs()[..., 20:40].mean()
    # the depth jump across the guide's edge (columns 29 -> 30): bicubic 0.088, guided 0.44
    jump_up = (up[..., 30] - up[..., 29]).mean()
    jump_filtered = (filtered[..., 30] - filtered[..., 29]).mean()
    assert jump_filtered > 4 * jump_up


def test_lr_valid_mask():
    d = torch.tensor([[[[1.0, 0.0], [math.nan, math.inf]]]])
    assert lr_valid_mask(d).tolist() == [[[[True, False], [False, False]]]]
    m = torch.tensor([[[[False, True], [True, True]]]])
    assert not lr_valid_mask(d, m).any()
    neg = torch.tensor([[[[1.0, -2.0]]]])  # the one depth rule: negative depth is an error ...
    with pytest.raises(ValueError, match=r"depth_lr has 1 negative value\(s\) \(min -2"):
        lr_valid_mask(neg)
    assert lr_valid_mask(neg, torch.tensor([[[[True, False]]]])).tolist() == [
        [[[True, False]]]
    ]  # ... unless masked


def test_input_errors():
    d, g = torch.ones(1, 1, 4, 4), torch.ones(1, 3, 16, 16)
    with pytest.raises(
        ValueError, match=r"depth_lr must be a \[B, 1, h, w\] tensor, got torch.Size\(\[4, 4\]\)"
    ):
        bicubic(torch.ones(4, 4), g)
    with pytest.raises(ValueError, match=r"guide_hr must be a \[B, C, H, W\] tensor with B = 1"):
        bicubic(d, torch.ones(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"guide_hr \(1, 3, 2, 2\) must be at least as large as depth_lr"):
        bicubic(d, torch.ones(1, 3, 2, 2))
    with pytest.raises(ValueError, match="guide_hr .* contains NaN or Inf"):
        bicubic(d, torch.full((1, 3, 16, 16), math.nan))
    with pytest.raises(
        ValueError, match=r"mask_lr must have depth_lr's shape \(1, 1, 4, 4\), got \(1, 1, 2, 2\)"
    ):
        bicubic(d, g, mask_lr=torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="depth_lr must be floating point, got torch.int64"):
        bicubic(torch.ones(1, 1, 4, 4, dtype=torch.long), g)
    with pytest.raises(ValueError, match="radius must be a positive integer, got 0"):
        guided_filter(g, g[:, :1], 0, 1e-3)
    with pytest.raises(ValueError, match="src .* contains NaN/Inf; pass mask="):
        guided_filter(g, torch.full((1, 1, 16, 16), math.nan), 2, 1e-3)
