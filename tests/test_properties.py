"""Property-based tests (hypothesis) over the public API: random shapes, dtypes, scales, holes,
constant and extreme guides.

Properties: every call either raises a clear ``ValueError`` (exactly when the input is bad: a guide
beyond ``MAX_GUIDE_ABS``, a non-finite unmasked signal) or returns a finite result inside the range of
the valid LR values (per channel: the kernels are convex combinations), holes never leak (values under
the mask do not change the result), a seed makes a run reproducible and the thread count does not
change it.

Profiles (``UA3D_HYPOTHESIS_PROFILE``): ``ci`` (default: few, tiny, derandomised examples; a few seconds
to a minute) and ``large`` (many more examples, random seeds) for local runs::

    UA3D_HYPOTHESIS_PROFILE=large python -m pytest -q tests/test_properties.py --hypothesis-show-statistics
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ua3d
from ua3d.baselines import classic
from ua3d.core.checks import MAX_GUIDE_ABS, as_guide, check_size
from ua3d.core.tto import FitConfig
from ua3d.rgbd.camera import PinholeCamera
from ua3d.rgbd.lift import fit_rgbd

_COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ua3d-ci", max_examples=50, derandomize=True, **_COMMON)
settings.register_profile("ua3d-large", max_examples=1000, **_COMMON)
PROFILE = settings.get_profile("ua3d-" + os.environ.get("UA3D_HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
#: relative tolerance of the range check per output dtype (the output is rounded to it)
_RTOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------------- strategies
@st.composite
def guides(draw, batch: int = 1):
    """A guide ``[B, C, H, W]`` (C in {1, 3}), its LR grid, and its kind."""
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    H, W = draw(st.integers(h, 20)), draw(st.integers(w, 20))
    C = draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["random", "constant", "binary", "scaled"]))
    if kind == "random":
        g = torch.rand(batch, C, H, W, generator=gen, dtype=torch.float64)
    elif kind == "constant":
        g = torch.full((batch, C, H, W), draw(st.floats(-1.0, 2.0)), dtype=torch.float64)
    elif kind == "binary":
        g = (torch.rand(batch, C, H, W, generator=gen, dtype=torch.float64) > 0.5).double()
    else:  # extreme magnitudes, on both sides of MAX_GUIDE_ABS
        g = torch.rand(batch, C, H, W, generator=gen, dtype=torch.float64) * 10.0 ** draw(st.integers(-8, 9))
    return g, (h, w), kind


@st.composite
def signals(draw, batch: int, lr_size: tuple[int, int]):
    """An LR signal ``[B, C, h, w]`` (float64, any scale) and an optional hole mask ``[B, 1, h, w]``."""
    C = draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    s = torch.randn(batch, C, *lr_size, generator=gen, dtype=torch.float64) * 10.0 ** draw(st.integers(-3, 6))
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(batch, 1, *lr_size, generator=gen) < draw(st.floats(0.2, 1.0))
    return s, mask


def _in_range(out: torch.Tensor, sig: torch.Tensor, mask: torch.Tensor | None, what: str) -> None:
    """``out [B, C, H, W]`` is finite where supported and inside ``[min, max]`` of the valid LR values."""
    o = out.double()
    s = sig.double()
    for b in range(s.shape[0]):
        valid = torch.ones(s.shape[-2:], dtype=torch.bool) if mask is None else mask[b, 0]
        if not bool(valid.any()):
            assert bool(torch.isnan(o[b]).all()), f"{what}: an item without valid LR value must render NaN"
            continue
        for c in range(s.shape[1]):
            vals = s[b, c][valid]
            lo, hi = float(vals.min()), float(vals.max())
            tol = _RTOL[out.dtype] * max(abs(lo), abs(hi), 1e-30) + 1e-12
            oc = o[b, c]
            fin = torch.isfinite(oc)
            assert bool(fin.all()) or mask is not None, f"{what}: non-finite output without holes"
            assert bool(fin.any()), f"{what}: no supported pixel although valid LR values exist"
            ov = oc[fin]
            assert float(ov.min()) >= lo - tol and float(ov.max()) <= hi + tol, (
                f"{what}: output [{float(ov.min())}, {float(ov.max())}] outside the valid LR range [{lo}, {hi}]"
            )


def _expect_error(g: torch.Tensor, sig: torch.Tensor, mask) -> bool:
    if float(g.abs().max()) > MAX_GUIDE_ABS:
        return True
    bad = ~torch.isfinite(sig)
    if mask is not None:
        bad = bad & mask.expand_as(sig)
    return bool(bad.any())


# ---------------------------------------------------------------------- fit + render
@PROFILE
@given(
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    steps=st.integers(0, 2),
    radius=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
)
def test_fit_render_error_or_convex_result(data, dtype, steps, radius):
    g64, lr, kind = data.draw(guides())
    s64, mask = data.draw(signals(1, lr))
    g, s = g64.to(dtype), s64.to(dtype)
    if _expect_error(g.double(), s.double(), mask):
        with pytest.raises(
            ValueError, match=r"guide values must be of a sane magnitude|guide contains|signal contains"
        ):
            ua3d.fit(g, lr, steps=steps, radius=radius).render(s, mask)
        return
    k = ua3d.fit(g, lr, steps=steps, radius=radius)
    assert k.params.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    assert bool(torch.isfinite(k.params).all()), f"non-finite parameters for a {kind} guide"
    out, sup = k.render(s, mask, return_support=True)
    assert out.dtype == dtype and out.shape == (1, s.shape[1], *g.shape[-2:])
    assert bool(torch.isfinite(out[sup.expand_as(out)].double()).all())
    _in_range(out, s, mask, f"fit/render ({kind} guide, {dtype})")


@PROFILE
@given(data=st.data())
def test_holes_never_leak(data):
    g, lr, _ = data.draw(guides())
    assume(float(g.abs().max()) <= MAX_GUIDE_ABS)
    s, _ = data.draw(signals(1, lr))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    mask = torch.rand(1, 1, *lr, generator=gen) < 0.6
    k = ua3d.fit(g.float(), lr, steps=1, radius=2.0)
    a = k.render(s.float(), mask)
    poisoned = torch.where(mask, s, torch.full_like(s, data.draw(st.sampled_from([math.nan, 1e30, -7.0]))))
    b = k.render(poisoned.float(), mask)
    torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


@PROFILE
@given(data=st.data(), fraction=st.sampled_from([1.0, 0.5]))
def test_seeded_fit_is_reproducible_and_thread_independent(data, fraction):
    g, lr, _ = data.draw(guides())
    assume(float(g.abs().max()) <= MAX_GUIDE_ABS)
    cfg = FitConfig(steps=2, radius=2.0, pixel_fraction=fraction, seed=data.draw(st.integers(0, 1000)))
    threads = torch.get_num_threads()
    try:
        sig = torch.randn(1, 9, *lr, generator=torch.Generator().manual_seed(1))  # 9 > 8: the blocked render
        torch.set_num_threads(1)
        ka = ua3d.fit(g.float(), lr, cfg)
        a, ra = ka.params, ka.render(sig)
        b = ua3d.fit(g.float(), lr, cfg).params
        torch.set_num_threads(2)
        kc = ua3d.fit(g.float(), lr, cfg)
        c, rc = kc.params, kc.render(sig)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same seed, same result
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)  # the thread count only reorders sums
    torch.testing.assert_close(ra, rc, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- baselines
@PROFILE
@given(
    data=st.data(),
    method=st.sampled_from(["bilinear", "nearest", "jbu", "bicubic"]),
    dtype=st.sampled_from(DTYPES),
)
def test_baselines_error_or_bounded(data, method, dtype):
    g, lr, _ = data.draw(guides())
    s, _ = data.draw(signals(1, lr))
    size = data.draw(st.one_of(st.none(), st.tuples(st.integers(lr[0], 24), st.integers(lr[1], 24))))
    fn = getattr(classic, method)
    gd, sd = g.to(dtype), s.to(dtype)
    if _expect_error(gd.double(), sd.double(), None):
        with pytest.raises(
            ValueError, match=r"guide values must be of a sane magnitude|guide contains|signal contains"
        ):
            fn(gd, sd, size)
        return
    out = fn(gd, sd, size)
    assert out.dtype == dtype
    assert tuple(out.shape[-2:]) == (tuple(g.shape[-2:]) if size is None else size)
    if method == "bicubic":  # cubic overshoot is legitimate; only finiteness is promised
        assert bool(torch.isfinite(out.double()).all())
    else:
        _in_range(out, sd, None, method)


# ---------------------------------------------------------------------- sizes and layouts
_SIZE_ITEMS = st.one_of(
    st.integers(-3, 40),
    st.floats(-3, 40),
    st.just(math.nan),
    st.just(math.inf),
    st.booleans(),
    st.text(max_size=3),
)


@PROFILE
@given(
    size=st.one_of(_SIZE_ITEMS, st.tuples(_SIZE_ITEMS, _SIZE_ITEMS), st.lists(st.integers(1, 9), max_size=3))
)
def test_check_size_returns_exact_positive_ints_or_raises(size):
    try:
        h, w = check_size(size, "output_size")
    except ValueError as e:
        assert "output_size" in str(e)
        return
    items = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    assert type(h) is int and type(w) is int and h > 0 and w > 0
    for got, given_ in zip((h, w), items):
        assert not isinstance(given_, (bool, str)) and float(given_) == got  # never truncated or coerced


@PROFILE
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    kind=st.sampled_from(["torch32", "torch16", "torchint", "np8", "np16", "npf"]),
)
def test_as_guide_layout_is_never_guessed(shape, kind):
    x = torch.rand(*shape)
    if kind == "torch16":
        x = x.half()
    elif kind == "torchint":
        x = (x * 9).long()
    elif kind == "np8":
        x = (x.numpy() * 255).astype(np.uint8)
    elif kind == "np16":
        x = (x.numpy() * 65535).astype(np.uint16)
    elif kind == "npf":
        x = x.numpy()
    try:
        g = as_guide(x)
    except ValueError as e:
        assert "guide" in str(e)
        return
    assert g.ndim == 4 and g.is_floating_point() and g.dtype != torch.float16
    if isinstance(x, torch.Tensor):
        assert tuple(g.shape[-3:]) == tuple(x.shape[-3:]) and not (x.shape[-1] <= 4 < x.shape[-3])
    else:
        hw = x.shape[:2]
        assert tuple(g.shape[-2:]) == tuple(hw) and not (x.ndim == 3 and x.shape[0] <= 4 < x.shape[2])
        assert 0.0 <= float(g.min()) and float(g.max()) <= 1.0


# ---------------------------------------------------------------------- RGB-D lift
@PROFILE
@given(data=st.data())
def test_lift_renders_inside_the_valid_range_and_ignores_holes(data):
    H, W = data.draw(st.integers(6, 16)), data.draw(st.integers(6, 16))
    h, w = data.draw(st.integers(2, min(H, 5))), data.draw(st.integers(2, min(W, 5)))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    rgb = torch.rand(3, H, W, generator=gen)
    depth = 0.5 + 4.5 * torch.rand(H, W, generator=gen) ** data.draw(st.sampled_from([1.0, 4.0]))
    holes = torch.rand(H, W, generator=gen) < data.draw(st.floats(0.0, 0.7))
    depth = torch.where(holes, torch.full_like(depth, data.draw(st.sampled_from([0.0, math.nan]))), depth)
    assume(bool((~holes).any()))
    cam = PinholeCamera(float(W), float(W), (W - 1) / 2, (H - 1) / 2, W, H)
    lk = fit_rgbd(rgb, depth, cam, (h, w), FitConfig(steps=1, radius=2.0))
    feats = torch.randn(1, 3, h, w, generator=gen) * 10.0 ** data.draw(st.integers(-2, 4))
    _in_range(lk.render_2d(feats), feats, None, "lift render_2d")
    z = lk.render_depth()
    valid = depth[~holes]
    fin = torch.isfinite(z)
    assert bool(fin.any())
    tol = 1e-5 * float(valid.max())
    assert float(z[fin].min()) >= float(valid.min()) - tol and float(z[fin].max()) <= float(valid.max()) + tol


# ---------------------------------------------------------------------- depth SR
@PROFILE
@given(data=st.data())
def test_depth_sr_default_is_never_negative(data):
    from ua3d.depth.sr import upsample_depth

    h, w = data.draw(st.integers(2, 9)), data.draw(st.integers(2, 9))
    s = data.draw(st.sampled_from([2, 4, 5.5]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    d = 1.0 + torch.rand(1, 1, h, w, generator=gen)
    out = upsample_depth(d, torch.rand(1, 3, round(h * s), round(w * s), generator=gen))
    fin = out[torch.isfinite(out)]
    assert fin.numel() > 0
    # never negative, and inside the stated bound (issue 19): at least half the smallest valid LR depth,
    # at most the largest LR depth plus the averaging models' 10 % slack of the local LR range
    assert float(fin.min()) >= 0.5 * float(d.min()) - 1e-6
    assert float(fin.max()) <= float(d.max()) + 0.1 * float(d.max() - d.min()) + 1e-5


@PROFILE
@given(data=st.data())
def test_depth_sr_plain_render_stays_in_the_valid_range(data):
    from ua3d.depth.sr import upsample_depth

    h, w = data.draw(st.integers(2, 6)), data.draw(st.integers(2, 6))
    s = data.draw(st.sampled_from([1, 2, 3, 4]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    d = 1.0 + torch.rand(1, 1, h, w, generator=gen) * 10.0 ** data.draw(st.integers(-2, 3))
    holes = torch.rand(1, 1, h, w, generator=gen) < data.draw(st.floats(0.0, 0.5))
    holes.view(-1)[0] = False
    d = torch.where(holes, torch.zeros_like(d), d)
    out = upsample_depth(d, torch.rand(1, 3, h * s, w * s, generator=gen), consistency="none", fit_steps=0)
    valid = d[~holes]
    fin = torch.isfinite(out)
    assert bool(fin.any())
    tol = 1e-5 * float(valid.max())
    assert (
        float(out[fin].min()) >= float(valid.min()) - tol
        and float(out[fin].max()) <= float(valid.max()) + tol
    )
