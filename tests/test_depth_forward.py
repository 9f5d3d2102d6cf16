"""Forward models of depth SR: brute-force parity at any ratio, blur/shift recovery, the automatic choice,
robust handling of flying pixels, the output bound (never negative), and the real-frame CLI case."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ua3d.depth.protocols import make_lr, pil_resize
from ua3d.depth.sr import (
    BLEND_MIN_SCALE,
    BLEND_SHARE,
    NOISE_LEVEL,
    POINT_MIXING,
    DepthSRConfig,
    downsample_depth,
    edge_mixing,
    estimate_forward_model,
    fit_blur_shift,
    lr_noise,
    upsample_depth,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REDWOOD = DATA / "redwood-open3d" / "sample5"
QUICK = {"iters": 3, "fit_steps": 2}


def _scene(H: int = 96, W: int = 128, seed: int = 0, box: bool = True):
    """Piecewise-constant depth (a slanted step and a box) with a guide whose colour edges are the depth edges."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij"
    )
    a = (xx - 0.4 * yy) > 0.45 * W
    b = ((yy - 0.3 * H).abs() < 0.15 * H) & ((xx - 0.25 * W).abs() < 0.12 * W) & box
    depth = torch.full((H, W), 2.0)
    depth[a] = 1.0
    depth[b] = 1.5
    guide = torch.stack([a.float() * 0.6 + 0.2, b.float() * 0.5 + 0.2, torch.full((H, W), 0.4)])[None]
    guide = (guide + 0.01 * torch.rand(1, 3, H, W, generator=gen)).clamp(0, 1)
    return depth[None, None], guide


# --------------------------------------------------------------------------- brute force at any ratio
def _brute_area(x: np.ndarray, h: int, w: int) -> np.ndarray:
    H, W = x.shape
    out = np.zeros((h, w))
    ry, rx = H / h, W / w
    for i in range(h):
        for j in range(w):
            acc = 0.0
            for p in range(H):
                oy = max(0.0, min(p + 1, (i + 1) * ry) - max(p, i * ry))
                if oy == 0:
                    continue
                for q in range(W):
                    ox = max(0.0, min(q + 1, (j + 1) * rx) - max(q, j * rx))
                    acc += oy * ox * x[p, q]
            out[i, j] = acc / (ry * rx)
    return out


@pytest.mark.parametrize(("H", "W", "h", "w"), [(48, 40, 18, 15), (30, 25, 10, 10), (16, 16, 4, 4)])
def test_area_and_point_models_match_brute_force_at_non_integer_and_per_axis_ratios(H, W, h, w):
    """(48, 40) -> (18, 15) is 2.67x on both axes; (30, 25) -> (10, 10) is 3x by 2.5x."""
    rng = np.random.default_rng(0)
    x = rng.random((H, W))
    t = torch.from_numpy(x)[None, None]
    area, ok = downsample_depth(t, (h, w), "area")
    assert bool(ok.all())
    np.testing.assert_allclose(area[0, 0].numpy(), _brute_area(x, h, w), rtol=0, atol=1e-12)
    end = downsample_depth(t, (h, w), "point", phase="end")[0][0, 0].numpy()
    start = downsample_depth(t, (h, w), "interval", phase="start")[0][0, 0].numpy()
    for i in range(h):
        for j in range(w):
            assert end[i, j] == x[math.floor((i + 1) * H / h) - 1, math.floor((j + 1) * W / w) - 1]
            assert start[i, j] == x[math.floor(i * H / h), math.floor(j * W / w)]
    if H % h == 0 and W % w == 0:  # integer ratios: the two protocols exactly
        s = H // h
        assert np.array_equal(end, x[s - 1 :: s, s - 1 :: s]) and np.array_equal(start, x[::s, ::s])


def test_bicubic_model_is_pil_at_a_non_integer_ratio():
    x = (np.random.default_rng(1).random((48, 40)) * 100).astype(np.float32)
    ours = downsample_depth(torch.from_numpy(x)[None, None], (18, 15), "bicubic")[0][0, 0].numpy()
    np.testing.assert_allclose(ours, pil_resize(x, (15, 18)), atol=2e-4)


def test_gauss_model_with_zero_blur_and_integer_shift_is_a_point_sample():
    x = torch.rand(1, 1, 24, 32, dtype=torch.float64)
    # at x4 the cell centre is 1.5 px before the last pixel of its block: shift +1.5 = hr[3::4]
    g, _ = downsample_depth(x, (6, 8), "gauss", sigma=0.0, shift=(1.5, 1.5))
    assert torch.allclose(g, x[..., 3::4, 3::4])


def test_upsample_at_a_non_integer_ratio_matches_its_forward_model():
    """2.67x per axis: the output explains the LR depth through the area model (consistency solve)."""
    depth, guide = _scene(48, 40)
    lr = downsample_depth(depth.double(), (18, 15), "area")[0].float()
    out = upsample_depth(lr, guide, consistency="area", fit_steps=0, iters=8, bound="none")
    back = downsample_depth(out.double(), (18, 15), "area")[0]
    plain = upsample_depth(lr, guide, consistency="none", fit_steps=0, bound="none")
    back0 = downsample_depth(plain.double(), (18, 15), "area")[0]
    assert float((back - lr).abs().mean()) < 0.5 * float((back0 - lr).abs().mean())


# --------------------------------------------------------------------------- the estimated model
def test_known_blur_and_shift_are_recovered():
    """LR = Gaussian blur (sigma 1.2 px) + shift (+1.0, -0.75) px at x4: recovered within 0.35 px (sigma)
    and 0.25 px (shift), the search grid's resolution."""
    depth, guide = _scene()
    lr, _ = downsample_depth(depth.double(), (24, 32), "gauss", sigma=1.2, shift=(1.0, -0.75))
    (m,) = fit_blur_shift(lr.float(), guide)
    assert m.mode == "gauss"
    assert abs(m.sigma - 1.2) <= 0.35, m
    assert abs(m.shift[0] - 1.0) <= 0.25 and abs(m.shift[1] + 0.75) <= 0.25, m


@pytest.mark.parametrize(("mode", "phase"), [("point", "end"), ("point", "start"), ("area", "end")])
def test_auto_detects_how_the_lr_depth_was_made(mode, phase):
    depth, guide = _scene(192, 256)
    lr, _ = downsample_depth(depth.double(), (24, 32), mode, phase=phase)  # x8
    (m,) = estimate_forward_model(lr.float(), guide)
    if mode == "point":
        assert (m.mode, m.phase) == ("point", phase), m
        assert m.mixing < POINT_MIXING["hole-free"]
    else:
        assert m.mode in ("area", "bicubic", "gauss") and m.mixing > POINT_MIXING["hole-free"], m


def test_edge_mixing_separates_point_from_area_sampling():
    depth, _ = _scene(192, 256)
    point = make_lr(depth[0, 0].numpy(), 8, "A")[1]
    area = make_lr(depth[0, 0].numpy(), 8, "area")[1]
    mp, n_p = edge_mixing(
        torch.from_numpy(point)[None, None], torch.ones(1, 1, *point.shape, dtype=torch.bool)
    )
    ma, n_a = edge_mixing(torch.from_numpy(area)[None, None], torch.ones(1, 1, *area.shape, dtype=torch.bool))
    assert n_p >= 10 and n_a >= 10
    assert mp < 0.1 and ma > 0.5


def test_interval_phase_choice_matters_and_auto_finds_it():
    """hr[::s] input: the end-phase model is worse than the start-phase model; auto matches the right one."""
    depth, guide = _scene()
    lr = depth[..., ::4, ::4]
    err = {}
    for phase in ("end", "start", "auto"):
        out = upsample_depth(lr, guide, consistency="point", interval_phase=phase, **QUICK)
        err[phase] = float((out - depth).pow(2).mean().sqrt())
    assert err["start"] < err["end"]
    assert err["auto"] == pytest.approx(err["start"])


# --------------------------------------------------------------------------- robust term, flying pixels
def test_flying_pixels_and_holes_do_not_reach_the_output():
    """Point-sampled step (1 m / 2 m) with 12 flying pixels (1.5 m) on the edge and holes (0)."""
    depth, guide = _scene(box=False)
    lr = depth[..., 3::4, 3::4].clone()
    gen = torch.Generator().manual_seed(3)
    edge = (
        torch.nn.functional.max_pool2d(lr, 3, 1, 1) - (-torch.nn.functional.max_pool2d(-lr, 3, 1, 1))
    ) > 0.4
    idx = torch.nonzero(edge[0, 0])
    pick = idx[torch.randperm(len(idx), generator=gen)[:12]]
    lr[0, 0, pick[:, 0], pick[:, 1]] = 1.5
    lr[0, 0, 2:4, 20:23] = 0.0  # holes
    out, sup = upsample_depth(lr, guide, robust="tukey", return_support=True)
    assert bool(sup.all())

    # the scene has only the depths 1 and 2: mid values occur where the output crosses the edge (0.2 % of
    # the pixels for the clean input, a little more where an edge cell was dropped); without the robust
    # term the flying pixels are rendered (over 1 %)
    def mid(x):
        return float(((x - 1.5).abs() < 0.2).float().mean())

    clean = upsample_depth(depth[..., 3::4, 3::4], guide, robust="tukey")
    plain = upsample_depth(lr, guide)
    assert mid(out) < 0.01 and mid(out) < 0.5 * mid(plain), (mid(out), mid(plain), mid(clean))
    assert mid(plain) > mid(clean) + 0.005, (mid(plain), mid(clean))
    assert float(out.min()) >= 1.0 - 1e-5 and float(out.max()) <= 2.0 + 1e-5


# --------------------------------------------------------------------------- physically possible output
@pytest.mark.parametrize("seed", range(3))
def test_worst_case_random_guide_over_tiny_depth_stays_in_the_lr_range(seed):
    """Issue 15: a 48x40 guide over a 7x9 depth with LR values in [1, 2] gave [-2.5, 5.4]."""
    gen = torch.Generator().manual_seed(seed)
    lr = 1 + torch.rand(1, 1, 7, 9, generator=gen)
    guide = torch.rand(1, 3, 48, 40, generator=gen)
    for consistency in ("auto", "bicubic", "area", "point"):
        out = upsample_depth(lr, guide, consistency=consistency)
        lo, hi, span = float(lr.min()), float(lr.max()), float(lr.max() - lr.min())
        grow = 0.0 if consistency == "point" else DepthSRConfig().overshoot * span
        assert float(out.min()) >= max(lo - grow, lo / 2) - 1e-5, consistency
        assert float(out.max()) <= hi + grow + 1e-5, consistency
    free = upsample_depth(lr, guide, consistency="bicubic", bound="none")
    glob = upsample_depth(lr, guide, consistency="bicubic", bound="global")
    assert float(glob.min()) >= max(float(lr.min()) - 0.1 * float(lr.max() - lr.min()), 0.5) - 1e-5
    assert float(free.min()) <= float(glob.min()) + 1e-6


def test_noisy_guide_over_smooth_depth_is_never_negative():
    """Issue 15: a noisy guide over a smooth depth at x4 gave a minimum of -0.75."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 32), indexing="ij")
    lr = (0.05 + 0.3 * (xx + yy))[None, None]
    guide = torch.rand(1, 3, 96, 128, generator=gen)
    out = upsample_depth(lr, guide)
    assert float(out.min()) > 0 and float(out.min()) >= 0.025 - 1e-6
    assert float(out.max()) <= float(lr.max()) * 1.2


def test_confidence_weights_and_zero_confidence_is_a_hole():
    depth, guide = _scene()
    lr = downsample_depth(depth, (24, 32), "area")[0]
    conf = torch.ones_like(lr)
    conf[..., :6, :6] = 0
    bad = torch.where(conf > 0, lr, torch.tensor(1e3))  # garbage under zero confidence
    a = upsample_depth(bad, guide, confidence=conf, consistency="area", **QUICK)
    b = upsample_depth(lr, guide, mask_lr=conf > 0, consistency="area", **QUICK)
    torch.testing.assert_close(a, b, equal_nan=True)
    hr_conf = torch.nn.functional.interpolate(conf, size=(96, 128), mode="nearest")
    c = upsample_depth(bad, guide, confidence=hr_conf, consistency="area", **QUICK)
    torch.testing.assert_close(c, b, equal_nan=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"interval_phase": "middle"},
            r"interval_phase must be one of \('auto', 'end', 'start'\), got 'middle'",
        ),
        ({"robust": "cauchy"}, r"robust must be one of \('none', 'huber', 'tukey'\), got 'cauchy'"),
        ({"bound": "clip"}, r"bound must be one of \('local', 'global', 'none'\), got 'clip'"),
        ({"blur_shift": (1.0,)}, r"blur_shift must be a pair of finite numbers \(dy, dx\) in HR pixels"),
        ({"blur_sigma": -1.0}, r"blur_sigma must be a finite number >= 0, got -1.0"),
        ({"overshoot": float("inf")}, r"overshoot must be a finite number >= 0, got inf"),
        ({"robust_k": True}, r"robust_k must be a positive finite number, got True"),
        (
            {"post_filter": "median"},
            r"post_filter must be one of \('auto', 'guided', 'none'\), got 'median'",
        ),
        ({"post_eps": 0.0}, r"post_eps must be a positive finite number, got 0.0"),
        ({"post_radius": -1.0}, r"post_radius must be a finite number >= 0, got -1.0"),
        ({"fit_rounds": -1}, r"fit_rounds must be an integer >= 0, got -1"),
        ({"fit_rounds": 1.5}, r"fit_rounds must be an integer >= 0, got 1.5"),
        ({"colour_blend": 1.5}, r"colour_blend must be 'auto' or a number in \[0, 1\], got 1.5"),
        ({"colour_blend": "yes"}, r"colour_blend must be 'auto' or a number in \[0, 1\], got 'yes'"),
        ({"colour_blend": True}, r"colour_blend must be 'auto' or a number in \[0, 1\], got True"),
        (
            {"confidence": torch.ones(1, 1, 5, 5)},
            r"confidence of size \(5, 5\) is smaller than depth_lr \(10, 12\)",
        ),
        ({"confidence": -torch.ones(1, 1, 10, 12)}, r"confidence must be finite and >= 0"),
        (
            {"confidence": torch.zeros(1, 1, 10, 12)},
            r"depth_lr item 0 has no valid value with a confidence > 0",
        ),
        ({"confidence": torch.ones(2, 1, 10, 12)}, r"confidence must be \[B, 1, h, w\] or \[h, w\]"),
    ],
)
def test_bad_forward_model_options_raise_exact_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        upsample_depth(torch.rand(1, 1, 10, 12) + 1, torch.rand(1, 3, 40, 48), **kwargs)


def test_downsample_depth_bad_arguments():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        downsample_depth(x, (4, 4), "lanczos")
    with pytest.raises(ValueError, match=r"phase must be one of \('end', 'start'\)"):
        downsample_depth(x, (4, 4), "point", phase="centre")
    with pytest.raises(
        ValueError, match=r"size must be between \(1, 1\) and the HR size \(8, 8\), got \(9, 4\)"
    ):
        downsample_depth(x, (9, 4), "area")


# --------------------------------------------------------------------------- real frame (Redwood)
def _redwood():
    if not REDWOOD.is_dir():
        pytest.skip(f"Redwood sample not found at {REDWOOD} (../shared/data beside the checkout)")
    raw = np.asarray(Image.open(REDWOOD / "depth" / "00000.png"))
    return raw, REDWOOD / "color" / "00000.jpg"


@pytest.mark.parametrize("protocol", ["area", "A-start"])
def test_real_frame_x8_is_positive_within_bound_and_hole_free(protocol):
    raw, _ = _redwood()
    rgb = np.asarray(Image.open(REDWOOD / "color" / "00000.jpg").convert("RGB"))
    hr = np.where(raw > 0, raw / 1000.0, np.nan).astype(np.float32)
    _, lr = make_lr(hr, 8, protocol)
    guide = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    d = torch.from_numpy(np.nan_to_num(lr))[None, None]
    out = upsample_depth(d, guide, config=DepthSRConfig(iters=3, fit_steps=2))
    fin = torch.isfinite(out)
    vals = d[d > 0]
    assert float(fin.float().mean()) > 0.8
    assert float(out[fin].min()) >= 0.5 * float(vals.min())  # no hole (0) leaked in, never negative
    assert float(out[fin].max()) <= float(vals.max()) * 1.0 + 0.1 * float(vals.max() - vals.min()) + 1e-6


def test_cli_depth_sr_on_a_real_redwood_frame_at_x8(tmp_path, capsys):
    """Issue 20 item 2: ``ua3d depth-sr`` on a Redwood frame downsampled x8 failed with negative depth."""
    from ua3d.cli import main

    raw, color = _redwood()
    lr = raw[::8, ::8]
    Image.fromarray(lr.astype(np.uint16)).save(tmp_path / "depth_lr_x8.png")
    out = tmp_path / "o.png"
    args = [
        "depth-sr",
        "--rgb",
        str(color),
        "--depth",
        str(tmp_path / "depth_lr_x8.png"),
        "--depth-scale",
        "1000",
        "--out",
        str(out),
        "--steps",
        "2",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "forward model point (hr[::s])" in text, text
    hr = np.asarray(Image.open(out)).astype(np.float64)
    assert hr.shape == raw.shape and hr.max() <= lr.max() + 1
    assert hr[hr > 0].min() >= 0.5 * lr[lr > 0].min()
    assert main(args + ["--consistency", "point", "--interval-phase", "end", "--quiet"]) == 0
    with pytest.raises(SystemExit):
        main(args + ["--interval-phase", "middle"])


def test_lr_noise_flags_noisy_inputs_and_widens_the_spatial_sigma():
    depth, guide = _scene()
    lr = downsample_depth(depth, (24, 32), "area")[0]
    valid = torch.ones_like(lr, dtype=torch.bool)
    noisy = lr + 0.04 * torch.randn(lr.shape, generator=torch.Generator().manual_seed(0))
    assert lr_noise(lr, valid) < NOISE_LEVEL < lr_noise(noisy, valid)
    (m_clean,) = estimate_forward_model(lr, guide)
    (m_noisy,) = estimate_forward_model(noisy, guide)
    assert m_clean.sigma_spatial == DepthSRConfig().sigma_spatial
    assert m_noisy.sigma_spatial == DepthSRConfig().noisy_sigma_spatial
    (m_off,) = estimate_forward_model(noisy, guide, denoise="off")
    assert m_off.sigma_spatial == DepthSRConfig().sigma_spatial


def test_noisy_input_gets_a_smoother_output_without_hole_leaks():
    """The guided-filter stage (``post_filter="auto"``: noisy LR only) removes noise in flat regions, brings
    the output closer to the clean scene, keeps the holes' support rule and the bound."""
    depth, guide = _scene()
    lr = downsample_depth(depth, (24, 32), "area")[0]
    gen = torch.Generator().manual_seed(1)
    noisy = lr + 0.05 * torch.randn(lr.shape, generator=gen)
    noisy[..., 10:13, 4:7] = 0.0  # a hole
    (m,) = estimate_forward_model(noisy, guide)
    assert m.noise > NOISE_LEVEL
    out, sup = upsample_depth(noisy, guide, return_support=True, **QUICK)
    raw, sup_raw = upsample_depth(noisy, guide, post_filter="none", return_support=True, **QUICK)
    assert torch.equal(sup, sup_raw)
    assert bool(torch.isfinite(out[sup]).all()) and bool(torch.isnan(out[~sup]).all())

    def rmse(x):
        keep = torch.isfinite(x)
        return float((x - depth)[keep].pow(2).mean().sqrt())

    def wiggle(x):  # mean absolute step inside the flat far region (depth 2, away from its edges)
        flat = -torch.nn.functional.max_pool2d(-(depth == 2.0).float(), 9, 1, 4) > 0.5
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs()[flat[..., :, 1:] & flat[..., :, :-1]]
        return float(dx[torch.isfinite(dx)].mean())

    assert rmse(out) < 0.9 * rmse(raw), (rmse(out), rmse(raw))
    assert wiggle(out) < 0.75 * wiggle(raw), (wiggle(out), wiggle(raw))
    valid = noisy > 0
    lo, hi = float(noisy[valid].min()), float(noisy[valid].max())
    assert float(out[sup].min()) >= max(lo - 0.1 * (hi - lo), lo / 2) - 1e-5
    assert float(out[sup].max()) <= hi + 0.1 * (hi - lo) + 1e-5
    clean = upsample_depth(lr, guide, **QUICK)  # clean input: the stage stays off
    assert torch.equal(clean, upsample_depth(lr, guide, post_filter="none", **QUICK))


def test_second_self_supervised_round_moves_the_output_towards_the_scene():
    """``fit_rounds``: 0 = the first consistent solve only (= ``fit_steps=0``); each further round fits the
    kernel to the previous output and solves again; on the synthetic step scene (x4, PIL bicubic LR)
    the second round is closer to the HR truth than the first, and the first than the plain solve."""
    depth, guide = _scene()
    lr = torch.from_numpy(pil_resize(depth[0, 0].numpy(), (32, 24)))[None, None]
    outs = {k: upsample_depth(lr, guide, consistency="bicubic", fit_rounds=k) for k in (0, 1, 2)}
    torch.testing.assert_close(outs[0], upsample_depth(lr, guide, consistency="bicubic", fit_steps=0))
    err = {k: float((v - depth).pow(2).mean().sqrt()) for k, v in outs.items()}
    assert err[2] < err[1] < err[0], err


def test_colour_blend_runs_only_for_sensor_depth_with_holes_at_large_scales():
    """``colour_blend="auto"``: the colour-free solution is averaged in (share ``BLEND_SHARE``) only when the
    LR depth has holes and the scale is >= ``BLEND_MIN_SCALE``; otherwise the output is bit-identical to
    ``colour_blend=0``. The blend is the convex combination of the two solutions (checked without the
    bound), keeps the support and stays within the bound."""
    depth, guide = _scene(128, 160)
    lr16 = downsample_depth(depth, (8, 10), "area")[0]
    holed = lr16.clone()
    holed[..., 2:4, 6:8] = 0.0
    lr8 = downsample_depth(depth, (16, 20), "area")[0]
    lr8[..., 4:7, 12:15] = 0.0
    assert BLEND_MIN_SCALE <= 16 and 8 < BLEND_MIN_SCALE
    for lr in (lr16, lr8):  # hole-free x16, holes at x8: no blend
        out, (m,) = upsample_depth(lr, guide, return_model=True, **QUICK)
        assert m.blend == 0.0
        assert torch.equal(out, upsample_depth(lr, guide, colour_blend=0.0, **QUICK))
    out, sup, (m,) = upsample_depth(holed, guide, return_support=True, return_model=True, **QUICK)
    assert m.blend == BLEND_SHARE
    colour, sup0 = upsample_depth(holed, guide, colour_blend=0.0, return_support=True, **QUICK)
    assert torch.equal(sup, sup0) and not torch.equal(out, colour)
    valid = holed > 0
    lo, hi = float(holed[valid].min()), float(holed[valid].max())
    assert float(out[sup].min()) >= max(lo - 0.1 * (hi - lo), lo / 2) - 1e-5
    assert float(out[sup].max()) <= hi + 0.1 * (hi - lo) + 1e-5
    free = {"bound": "none", "post_filter": "none", **QUICK}
    a = upsample_depth(holed, guide, colour_blend=0.0, **free)
    b = upsample_depth(holed, guide, colour_blend=1.0, **free)
    torch.testing.assert_close(
        upsample_depth(holed, guide, **free), (1 - BLEND_SHARE) * a + BLEND_SHARE * b, equal_nan=True
    )
