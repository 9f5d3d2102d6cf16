"""Tests of ``ua3d.depth.sr.upsample_depth``: holes, units, shapes, bad input, the consistency solve.

Real-hole tests use a Redwood frame from ``../shared/data`` (skipped when absent); the rest is synthetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ua3d.depth import baselines
from ua3d.depth.protocols import pil_resize
from ua3d.depth.sr import (
    FAST,
    DepthSRConfig,
    consistency_solve,
    downsample_depth,
    fill_missing,
    upsample_depth,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REDWOOD = DATA / "redwood-open3d" / "sample5"
# Cheap settings for the tests that check structure rather than accuracy.
QUICK = {"iters": 3, "fit_steps": 2}


def _scene(h: int = 24, w: int = 32, scale: int = 4, seed: int = 0):
    """A step edge in depth and colour: LR depth [1, 1, h, w], HR guide [1, 3, H, W], HR depth."""
    gen = torch.Generator().manual_seed(seed)
    H, W = h * scale, w * scale
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    inside = (xx - 0.6 * yy) > W * 0.3
    depth_hr = torch.where(inside, 1500.0, 2500.0)[None, None] + 20 * torch.rand(1, 1, H, W, generator=gen)
    step = inside.float()
    guide = torch.stack([step * 0.6 + 0.2, 0.5 - 0.3 * step, torch.full((H, W), 0.4)])[None]
    guide = (guide + 0.02 * torch.rand(1, 3, H, W, generator=gen)).clamp(0, 1)
    depth_lr = downsample_depth(depth_hr, (h, w))[0]
    return depth_lr, guide, depth_hr


# --------------------------------------------------------------------------- helpers
def test_downsample_depth_bicubic_is_pil_bicubic():
    """The forward model of protocol B: PIL float BICUBIC resizing, to float32 precision."""
    rng = np.random.default_rng(0)
    x = (rng.random((96, 120)) * 100).astype(np.float32)
    for s in (2, 4, 8):
        pil = pil_resize(x, (120 // s, 96 // s))
        ours, ok = downsample_depth(torch.from_numpy(x)[None, None], (96 // s, 120 // s))
        assert bool(ok.all())
        np.testing.assert_allclose(ours[0, 0].numpy(), pil, atol=5e-5)


def test_downsample_depth_interval_is_protocol_a():
    x = torch.rand(1, 1, 24, 40)
    out, ok = downsample_depth(x, (6, 10), "interval")
    assert torch.equal(out, x[..., 3::4, 3::4]) and bool(ok.all())
    start, _ = downsample_depth(x, (6, 10), "interval", phase="start")
    assert torch.equal(start, x[..., ::4, ::4])


def test_downsample_depth_with_support_ignores_unsupported_values():
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    sup = torch.ones_like(x, dtype=torch.bool)
    sup[..., :2, :2] = False
    a, ok_a = downsample_depth(x, (4, 4), "area", sup)
    b, ok_b = downsample_depth(torch.where(sup, x, torch.tensor(1e9)), (4, 4), "area", sup)
    assert torch.equal(a, b) and torch.equal(ok_a, ok_b)
    assert not bool(ok_a[0, 0, 0, 0]) and bool(ok_a[0, 0, 1:, 1:].all())
    assert torch.allclose(a[0, 0, 1:, 1:], torch.nn.functional.avg_pool2d(x, 2)[0, 0, 1:, 1:])


def test_fill_missing_keeps_valid_and_fills_everything():
    x = torch.rand(2, 1, 13, 17)
    valid = torch.rand(2, 1, 13, 17) > 0.8
    out = fill_missing(torch.where(valid, x, torch.tensor(float("nan"))), valid)
    assert torch.isfinite(out).all()
    assert torch.equal(out[valid], x[valid])
    # values under the holes are never read
    out2 = fill_missing(torch.where(valid, x, torch.tensor(-1e6)), valid)
    assert torch.equal(out, out2)
    # a constant field stays constant
    c = fill_missing(torch.where(valid, torch.tensor(3.0), torch.tensor(0.0)), valid)
    assert torch.allclose(c, torch.full_like(c, 3.0))


def test_consistency_solve_reduces_the_residual():
    """GMRES / Richardson coefficients make down(render(c)) closer to the LR depth than c = d_lr."""
    d_lr, guide, _ = _scene()
    valid = torch.ones_like(d_lr, dtype=torch.bool)
    from ua3d.depth.sr import _Problem

    prob = _Problem(guide, d_lr, valid, DepthSRConfig())
    params = prob.start_params()

    def render(c):
        return prob.render(params, c)

    def residual(c):
        out, _ = render(c)
        return float((downsample_depth(out, d_lr.shape[-2:])[0] - prob.t).norm())

    r0 = residual(prob.t)
    for solver in ("gmres", "richardson"):
        c, out, sup = consistency_solve(render, prob.t, valid, "bicubic", 6, solver)
        assert residual(c) < 0.5 * r0, solver
        # the returned render is render(c), assembled without rendering c again
        torch.testing.assert_close(out, render(c)[0], rtol=0, atol=1e-5)
        assert bool(sup.all())
    c, out, _ = consistency_solve(render, prob.t, valid, "none", 6)
    assert torch.equal(c, prob.t) and torch.equal(out, render(prob.t)[0])


# --------------------------------------------------------------------------- behaviour
def test_output_shape_units_and_dtype():
    d_lr, guide, depth_hr = _scene()
    out_mm = upsample_depth(d_lr, guide, **QUICK)
    assert out_mm.shape == depth_hr.shape and out_mm.dtype == torch.float32
    assert torch.isfinite(out_mm).all()
    # units pass through: the method commutes with a change of units (mm -> m)
    out_m = upsample_depth(d_lr / 1000.0, guide, **QUICK)
    torch.testing.assert_close(out_m * 1000.0, out_mm, rtol=1e-4, atol=1e-2)
    # 2-D numpy input, uint8 numpy guide
    g8 = (guide[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out_np = upsample_depth(d_lr[0, 0].numpy(), g8, **QUICK)
    assert out_np.shape == depth_hr.shape
    # float64 in, float64 out
    assert upsample_depth(d_lr.double(), guide.double(), **QUICK).dtype == torch.float64


def test_non_integer_and_per_axis_ratios():
    d_lr, guide, _ = _scene()
    g = torch.nn.functional.interpolate(guide, size=(84, 120), mode="bilinear", antialias=True)  # 3.5 x 3.75
    out = upsample_depth(d_lr, g, **QUICK)
    assert out.shape == (1, 1, 84, 120) and torch.isfinite(out).all()
    assert float(out.min()) >= float(d_lr.min()) - 200 and float(out.max()) <= float(d_lr.max()) + 200
    g35 = torch.nn.functional.interpolate(guide, size=(84, 112), mode="bilinear", antialias=True)
    assert upsample_depth(d_lr, g35, scale=3.5, **QUICK).shape == (1, 1, 84, 112)


def test_float16_depth_is_computed_in_float32_and_returned_in_float16():
    d_lr, guide, _ = _scene()
    out = upsample_depth(d_lr.half(), guide, **QUICK)
    assert out.dtype == torch.float16
    torch.testing.assert_close(
        out.float(), upsample_depth(d_lr.half().float(), guide, **QUICK), rtol=2e-3, atol=1.0
    )


def test_beats_bicubic_on_a_step_edge():
    d_lr, guide, depth_hr = _scene()
    ours = upsample_depth(d_lr, guide)
    bic = baselines.bicubic(d_lr, guide)
    err = float((ours - depth_hr).pow(2).mean().sqrt())
    err_bic = float((bic - depth_hr).pow(2).mean().sqrt())
    assert err < 0.7 * err_bic, (err, err_bic)


def test_constant_depth_stays_exactly_constant():
    _, guide, _ = _scene()
    d = torch.full((1, 1, 24, 32), 1234.5)
    out = upsample_depth(d, guide, **QUICK)
    assert torch.equal(out, torch.full_like(out, 1234.5))


def test_batch_items_are_independent():
    d1, g1, _ = _scene(seed=1)
    d2, g2, _ = _scene(seed=2)
    both = upsample_depth(torch.cat([d1, d2 * 2]), torch.cat([g1, g2]), **QUICK)
    torch.testing.assert_close(both[:1], upsample_depth(d1, g1, **QUICK))
    torch.testing.assert_close(both[1:], upsample_depth(d2 * 2, g2, **QUICK))


def test_synthetic_holes_never_leak_and_support_is_reported():
    d_lr, guide, _ = _scene()
    holes = torch.zeros_like(d_lr, dtype=torch.bool)
    holes[..., 5:14, 8:20] = True  # a 9 x 12 cell hole: its centre is farther than the window radius (2)
    zero_filled = torch.where(holes, torch.tensor(0.0), d_lr)
    out0, sup0 = upsample_depth(zero_filled, guide, return_support=True, **QUICK)
    out1, sup1 = upsample_depth(
        torch.where(holes, torch.tensor(9e9), d_lr), guide, mask_lr=~holes, return_support=True, **QUICK
    )
    out2 = upsample_depth(torch.where(holes, torch.tensor(float("nan")), d_lr), guide, **QUICK)
    assert torch.equal(sup0, sup1)
    assert not bool(sup0.all()) and bool(sup0.any())
    assert torch.equal(torch.isnan(out0), ~sup0)
    torch.testing.assert_close(out0, out1, equal_nan=True)
    torch.testing.assert_close(out0, out2, equal_nan=True)
    filled, sup_f = upsample_depth(zero_filled, guide, fill_holes=True, return_support=True, **QUICK)
    assert torch.isfinite(filled).all() and torch.equal(sup_f, sup0)
    assert torch.equal(filled[sup0], out0[sup0])


def test_config_and_options():
    d_lr, guide, _ = _scene()
    a = upsample_depth(d_lr, guide, config=FAST)
    b = upsample_depth(d_lr, guide, **FAST.to_dict())
    assert torch.equal(a, b)
    assert DepthSRConfig().replace(iters=2).iters == 2
    plain = upsample_depth(d_lr, guide, consistency="none", fit_steps=0)
    assert torch.isfinite(plain).all()


# --------------------------------------------------------------------------- bad input
D, G = torch.rand(1, 1, 10, 12) + 1, torch.rand(1, 3, 40, 48)


@pytest.mark.parametrize(
    ("depth", "guide", "kwargs", "match"),
    [
        (D, torch.rand(1, 3, 40, 50), {"scale": 4}, r"times scale 4 does not give guide_hr"),
        (D, G, {"scale": 3.5}, r"times scale 3.5 does not give"),
        (torch.rand(1, 1, 10, 12) + 1, torch.rand(1, 3, 8, 48), {}, r"guide_hr .* is smaller than depth_lr"),
        (torch.zeros(1, 1, 10, 12), torch.rand(1, 3, 40, 48), {}, r"depth_lr item 0 has no valid value"),
        (torch.full((1, 1, 10, 12), float("nan")), torch.rand(1, 3, 40, 48), {}, r"no valid value"),
        (-torch.rand(1, 1, 10, 12) - 1, torch.rand(1, 3, 40, 48), {}, r"depth_lr has 120 negative value"),
        (torch.rand(1, 1, 10, 12) + 1, torch.rand(2, 3, 40, 48), {}, r"batch size of guide_hr"),
        (torch.rand(1, 2, 10, 12) + 1, torch.rand(1, 3, 40, 48), {}, r"depth_lr must be \[B, 1, h, w\]"),
        (torch.rand(1, 1, 0, 12), torch.rand(1, 3, 40, 48), {}, r"depth_lr is empty"),
        ([[1.0]], torch.rand(1, 3, 40, 48), {}, r"depth_lr must be a torch.Tensor or numpy array"),
        (torch.rand(1, 1, 10, 12) + 1, torch.full((1, 3, 40, 48), float("nan")), {}, r"guide_hr contains"),
        (D, G, {"mask_lr": torch.ones(1, 1, 5, 6, dtype=torch.bool)}, r"mask_lr must have depth_lr's shape"),
        (D, G, {"iterz": 3}, r"unknown DepthSRConfig option"),
        (D, G, {"consistency": "lanczos"}, r"consistency must be"),
        (D, G, {"sigma_range": 0.0}, r"sigma_range must be"),
        (D, G, {"config": {"iters": 2}}, r"config must be"),
    ],
)
def test_bad_input_raises_a_clear_value_error(depth, guide, kwargs, match):
    with pytest.raises(ValueError, match=match):
        upsample_depth(depth, guide, **kwargs)


def test_negative_values_under_the_mask_are_allowed():
    d_lr, guide, _ = _scene()
    m = torch.ones_like(d_lr, dtype=torch.bool)
    m[..., :2, :2] = False
    out = upsample_depth(torch.where(m, d_lr, torch.tensor(-5.0)), guide, mask_lr=m, **QUICK)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- real holes (Redwood)
def _redwood_pair(scale: int = 4, min_valid: float = 0.75):
    """Redwood frame 0, top-right quarter (240 x 320, 16 % holes, to keep the tests fast): HR depth (mm,
    NaN = hole), LR depth by block averaging over valid pixels (an LR cell is a hole when less than
    ``min_valid`` of its block is valid), HR guide."""
    if not REDWOOD.is_dir():
        pytest.skip(f"Redwood sample not found at {REDWOOD} (../shared/data beside the checkout)")
    raw = np.asarray(Image.open(REDWOOD / "depth" / "00000.png")).astype(np.float32)[:240, 320:]
    rgb = np.asarray(Image.open(REDWOOD / "color" / "00000.jpg").convert("RGB"))[:240, 320:]
    hr = torch.from_numpy(np.where(raw > 0, raw, np.nan))[None, None]
    valid = torch.isfinite(hr)
    pool = torch.nn.functional.avg_pool2d
    frac = pool(valid.float(), scale)
    mean = pool(torch.where(valid, hr, torch.tensor(0.0)), scale) / frac.clamp_min(1e-6)
    lr = torch.where(frac >= min_valid, mean, torch.tensor(0.0))  # 0 = hole, as the sensor writes it
    guide = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255.0
    return hr, lr, guide


@pytest.fixture(scope="module")
def redwood():
    hr, lr, guide = _redwood_pair()
    out, sup = upsample_depth(lr, guide, return_support=True, config=FAST)
    return hr, lr, guide, out, sup


def test_redwood_real_holes_do_not_contaminate(redwood):
    _, lr, guide, out, sup = redwood
    holes = lr == 0
    assert 0.02 < float(holes.float().mean()) < 0.5  # the frame really has holes
    # same result whatever the hole cells hold (sentinel + mask, NaN): no hole value enters a weighted sum
    big = upsample_depth(torch.where(holes, torch.tensor(65535.0), lr), guide, mask_lr=~holes, config=FAST)
    nan = upsample_depth(torch.where(holes, torch.tensor(float("nan")), lr), guide, config=FAST)
    torch.testing.assert_close(big, out, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(nan, out, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(torch.isnan(out), ~sup)


def test_redwood_constant_region_next_to_holes_stays_constant():
    _, lr, guide = _redwood_pair()
    holes = lr == 0
    const = torch.where(holes, torch.tensor(0.0), torch.tensor(1500.0))
    out, sup = upsample_depth(const, guide, return_support=True, config=FAST)
    assert bool(sup.any()) and not bool(sup.all())
    torch.testing.assert_close(out[sup], torch.full_like(out[sup], 1500.0), rtol=0, atol=1e-3)


def test_redwood_valid_rmse_beats_hole_aware_bicubic(redwood):
    hr, lr, guide, out, _ = redwood
    bic = baselines.bicubic(lr, guide)  # hole-aware (0 = invalid), PIL bicubic
    both = torch.isfinite(hr) & torch.isfinite(out) & torch.isfinite(bic)
    assert float(both.float().mean()) > 0.7
    err = float((out - hr)[both].pow(2).mean().sqrt())
    err_bic = float((bic - hr)[both].pow(2).mean().sqrt())
    assert err < err_bic, (err, err_bic)
