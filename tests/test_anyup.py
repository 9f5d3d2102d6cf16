"""AnyUp baseline: parity with the official model, tiling invariance, loading and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ua3d.baselines.anyup import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOFTMAX_FLOOR,
    AnyUp,
    _floored_softmax,
    _Moments,
    anyup,
    anyup_depth,
    load_anyup,
    window_bounds,
)

N_PARAMS = 878_080


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture(anyup_parity) -> dict:
    return anyup_parity


@pytest.fixture(scope="module")
def fixture_model(fixture) -> AnyUp:
    model = AnyUp(window_ratio=fixture["model_config"]["window_ratio"])
    model.load_state_dict(fixture["state_dict"], strict=True)
    return model.eval()


def _perturbed_model(seed: int = 0, **kwargs) -> AnyUp:
    """Random AnyUp whose parameters are all perturbed (non-trivial norms, biases and RoPE)."""
    torch.manual_seed(seed)
    model = AnyUp(**kwargs).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            sigma = 0.25 if p.ndim == 1 else 0.5 * max(float(p.std()), 0.02)
            p.add_(sigma * torch.randn(p.shape, generator=g))
    return model


def _inputs(b=2, c=6, h=7, w=9, H=40, W=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    guide = torch.randn(b, 3, H, W, generator=g)
    feats = torch.randn(b, c, h, w, generator=g)
    return guide, feats


# ------------------------------------------------------------------------------------------------
# parity with the official implementation (fixture)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["a", "b", "c", "d"])
def test_parity_with_official(fixture, fixture_model, index):
    case = fixture["cases"][index]
    with torch.no_grad():
        out = fixture_model(
            case["guide"],
            case["features"],
            output_size=case["output_size"],
            q_chunk_size=case["q_chunk_size"],
        )
    torch.testing.assert_close(out, case["expected"], rtol=1e-5, atol=1e-5)
    # every output is a convex combination of the same channel's LR values
    lo = case["features"].amin(dim=(2, 3))[..., None, None]
    hi = case["features"].amax(dim=(2, 3))[..., None, None]
    assert bool((out >= lo - 1e-5).all()) and bool((out <= hi + 1e-5).all())


def test_state_dict_matches_official_layout(fixture):
    model = AnyUp()
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    ours = model.state_dict()
    theirs = fixture["state_dict"]
    assert list(ours) == list(theirs)  # same keys in the same order
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert sum(t.numel() for t in theirs.values()) == N_PARAMS


def test_parameter_count_without_fixture():
    assert sum(p.numel() for p in AnyUp().parameters()) == N_PARAMS
    assert len(AnyUp().state_dict()) == 73


def test_window_bounds_float32_quirk():
    # fixture README: output row 52 of 150 over 8 LR rows starts at LR row 2 in float32 (1 in float64)
    start, end = window_bounds(150, 8, 0.1)
    assert int(start[52]) == 2
    centre64 = (52 + 0.5) / 150
    assert math.floor((centre64 - 0.1) * 8) == 1
    # independent numpy float32 arithmetic for a few sizes
    for n_out, n_lr in [(224, 16), (70, 10), (98, 14), (200, 12), (1024, 64), (37, 41)]:
        c = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) / np.float32(n_out)
        s = np.floor(np.clip(c - np.float32(0.1), 0, 1).astype(np.float32) * np.float32(n_lr)).astype(
            np.int64
        )
        e = np.ceil(np.clip(c + np.float32(0.1), 0, 1).astype(np.float32) * np.float32(n_lr)).astype(np.int64)
        start, end = window_bounds(n_out, n_lr, 0.1)
        np.testing.assert_array_equal(start.numpy(), s)
        np.testing.assert_array_equal(end.numpy(), e)
        assert bool((start < end).all())


# ------------------------------------------------------------------------------------------------
# tiled attention against a dense, global-mask reference
# ------------------------------------------------------------------------------------------------
def _dense_reference(
    model: AnyUp, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ratio: float = 0.1
) -> torch.Tensor:
    """Official-style attention: one H'W' x hw logit matrix per head, global boolean window mask."""
    B, D, H, W = q.shape
    _, C, h, w = v.shape
    heads = model.num_heads
    att = model.cross_decode.cross_attn
    wq, wk, _ = att.attention.in_proj_weight.chunk(3)
    bq, bk, _ = att.attention.in_proj_bias.chunk(3)
    qt = F.rms_norm(q.flatten(2).transpose(1, 2), (D,), att.norm_q.weight)
    kt = F.rms_norm(k.flatten(2).transpose(1, 2), (D,), att.norm_k.weight)
    qp = F.linear(qt, wq, bq).view(B, H * W, heads, D // heads).transpose(1, 2)
    kp = F.linear(kt, wk, bk).view(B, h * w, heads, D // heads).transpose(1, 2)
    logits = qp @ kp.transpose(-1, -2) / math.sqrt(D // heads)

    def ok(n_out, n_lr):
        if ratio <= 0:  # the official code passes no mask at all
            return torch.ones(n_out, n_lr, dtype=torch.bool)
        c = (torch.arange(n_out, dtype=torch.float32) + 0.5) / n_out
        s = ((c - ratio).clamp(0, 1) * n_lr).floor()
        e = ((c + ratio).clamp(0, 1) * n_lr).ceil()
        idx = torch.arange(n_lr)
        return (idx >= s[:, None]) & (idx < e[:, None])

    allowed = (ok(H, h)[:, None, :, None] & ok(W, w)[None, :, None, :]).reshape(H * W, h * w)
    attn = logits.masked_fill(~allowed, float("-inf")).softmax(-1).mean(1)
    return (attn @ v.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)


@pytest.mark.parametrize(
    ("out_size", "q_chunk"), [((40, 56), 37), ((61, 45), 100), ((13, 17), 3)], ids=["same", "odd", "small"]
)
def test_tiled_attention_matches_dense_reference(out_size, q_chunk):
    model = _perturbed_model()
    guide, feats = _inputs()
    with torch.no_grad():
        q, k = model.encode(guide, feats, out_size)
        ref = _dense_reference(model, q, k, feats)
        for kwargs in [{}, {"q_chunk_size": q_chunk}, {"tile_budget_bytes": 20_000}]:
            out = model.attend(q, k, feats, **kwargs)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
        full = model(guide, feats, output_size=out_size)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_other_window_ratios_match_dense_reference(ratio):
    model = _perturbed_model(window_ratio=ratio)
    guide, feats = _inputs(b=1)
    with torch.no_grad():
        q, k = model.encode(guide, feats, (33, 47))
        ref = _dense_reference(model, q, k, feats, ratio=ratio)
        out = model.attend(q, k, feats, q_chunk_size=200)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


def test_chunked_rope_and_feature_unification_match_single_pass():
    big = _perturbed_model()
    small = AnyUp(tile_budget_bytes=2048).eval()  # forces RoPE rows and LFU rows in chunks
    small.load_state_dict(big.state_dict())
    guide, feats = _inputs(b=1, c=5, h=6, w=8, H=24, W=32)
    lfu = big.key_features_encoder[0]
    unit = F.normalize(feats, dim=1)
    with torch.no_grad():
        torch.testing.assert_close(lfu(unit, 2048), lfu(unit, 2**30), rtol=1e-6, atol=1e-7)
        enc = torch.randn(1, 128, 24, 32)
        torch.testing.assert_close(big.rope(enc, 2048), big.rope(enc, 2**30), rtol=0, atol=0)
        q1, k1 = big.encode(guide, feats, (24, 32))
        q2, k2 = small.encode(guide, feats, (24, 32))
        o1, o2 = big(guide, feats), small(guide, feats)
    torch.testing.assert_close(q2, q1, rtol=1e-6, atol=1e-6)
    # the GroupNorm after the feature unification sees a tiny variance and amplifies rounding
    torch.testing.assert_close(k2, k1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)


def test_output_inside_channel_range_and_batch_independent():
    model = _perturbed_model(seed=3)
    guide, feats = _inputs(b=2, c=4, h=5, w=6, H=30, W=20, seed=5)
    with torch.no_grad():
        out = model(guide, feats, output_size=(45, 33))
    assert out.shape == (2, 4, 45, 33)
    lo = feats.amin(dim=(2, 3))[..., None, None]
    hi = feats.amax(dim=(2, 3))[..., None, None]
    assert bool((out >= lo - 1e-6).all()) and bool((out <= hi + 1e-6).all())
    # batch independence in float64: float32 convolutions may block a batch of 2 differently from a
    # batch of 1 (oneDNN picks by shape and threads), which moves single values by a few ulps
    m64 = model.double()
    with torch.no_grad():
        both64 = m64(guide.double(), feats.double(), output_size=(45, 33))
        one64 = m64(guide[1:].double(), feats[1:].double(), output_size=(45, 33))
    torch.testing.assert_close(both64[1:], one64, rtol=0, atol=1e-12)
    model.float()
    # constant features stay constant
    with torch.no_grad():
        const = model(guide, torch.full_like(feats, 0.7))
    torch.testing.assert_close(const, torch.full_like(const, 0.7), rtol=0, atol=1e-6)


def test_float64_model_follows_input_dtype():
    model = _perturbed_model()
    guide, feats = _inputs(b=1, c=3, h=5, w=6, H=20, W=24)
    with torch.no_grad():
        out32 = model(guide, feats, output_size=(25, 30))
        out64 = model.double()(guide.double(), feats.double(), output_size=(25, 30))
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-5)


def test_gradients_flow():
    model = _perturbed_model()
    guide, feats = _inputs(b=1, c=3, h=4, w=4, H=16, W=16)
    feats.requires_grad_(True)
    model(guide, feats).square().mean().backward()
    assert feats.grad is not None and bool(torch.isfinite(feats.grad).all())
    assert model.rope.freqs.grad is not None


# ------------------------------------------------------------------------------------------------
# the baseline entry point and loading
# ------------------------------------------------------------------------------------------------
def test_anyup_normalises_rgb_guide():
    model = _perturbed_model()
    rgb = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    feats = torch.randn(1, 5, 4, 5, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((rgb - mean) / std, feats, output_size=(30, 25))
    out = anyup(rgb, feats, (30, 25), model=model)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not out.requires_grad
    normed = (rgb - mean) / std
    torch.testing.assert_close(anyup(normed, feats, (30, 25), model=model, normalize_guide=False), expected)
    assert anyup(rgb, feats, model=model).shape == (1, 5, 24, 20)


def test_load_anyup_from_fixture_derived_checkpoint(fixture, fixture_model, tmp_path):
    path = tmp_path / "anyup_fixture.pth"
    torch.save(fixture["state_dict"], path)  # a bare state dict, like the released checkpoints
    model = load_anyup(path)
    assert not model.training
    for key, value in fixture["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    case = fixture["cases"][2]
    out = anyup(case["guide"], case["features"], case["output_size"], checkpoint=path, normalize_guide=False)
    torch.testing.assert_close(out, case["expected"], rtol=1e-5, atol=1e-5)
    # a {"state_dict": ...} wrapper (like the fixture itself) loads too
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": fixture["state_dict"], "note": "x"}, wrapped)
    assert torch.equal(load_anyup(wrapped).rope.freqs, fixture["state_dict"]["rope.freqs"])


def test_load_anyup_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(
        FileNotFoundError, match=r"AnyUp checkpoint not found: .*nope\.pth \(ua3d never downloads"
    ):
        load_anyup(missing)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth: cannot read the checkpoint"):
        load_anyup(junk)
    sd = AnyUp().state_dict()
    sd.pop("rope.freqs")
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(
        ValueError,
        match=r"AnyUp checkpoint .*bad\.pth: the checkpoint does not match the AnyUp; missing keys \(1\): rope\.freqs; unexpected keys \(1\): extra\.weight$",
    ):
        load_anyup(bad)
    sd = AnyUp().state_dict()
    sd["rope.freqs"] = torch.zeros(2, 64)
    torch.save(sd, bad)
    with pytest.raises(
        ValueError, match=r"shape mismatches \(1\): rope\.freqs \(2, 64\) vs model \(2, 128\)$"
    ):
        load_anyup(bad)
    torch.save([1, 2, 3], bad)
    with pytest.raises(ValueError, match=r"bad\.pth: not a state dict of tensors \(found list\)"):
        load_anyup(bad)


def test_input_errors():
    model = AnyUp().eval()
    guide, feats = _inputs(b=2, c=3, h=4, w=4, H=16, W=16)
    with pytest.raises(ValueError, match=r"image must have 4 dimensions, got shape \(3, 16, 16\)"):
        model(guide[0], feats)
    with pytest.raises(ValueError, match=r"features must have 4 dimensions, got shape \(3, 4, 4\)"):
        model(guide, feats[0])
    with pytest.raises(
        ValueError, match=r"batch size of features \(1, 3, 4, 4\) does not match image \(2, 3, 16, 16\)"
    ):
        model(guide, feats[:1])
    with pytest.raises(
        ValueError, match=r"image must have 3 channels \[B, 3, H, W\], got shape \(2, 4, 16, 16\)"
    ):
        model(torch.randn(2, 4, 16, 16), feats)
    with pytest.raises(
        ValueError, match=r"features must be at least 2x2 spatially, got shape \(2, 3, 1, 4\)"
    ):
        model(guide, feats[:, :, :1])
    with pytest.raises(ValueError, match=r"output_size must be positive"):
        model(guide, feats, output_size=(0, 4))
    nan = feats.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"features contains 1 NaN/Inf value"):
        model(guide, nan)
    with pytest.raises(
        ValueError, match=r"must share one floating dtype, got torch.float32 and torch.float64"
    ):
        model(guide, feats.double())
    with pytest.raises(
        ValueError, match=r"model parameters are torch.float32 on cpu but the inputs are torch.float64"
    ):
        model(guide.double(), feats.double())
    with pytest.raises(ValueError, match=r"q_chunk_size must be positive, got 0"):
        model(guide, feats, q_chunk_size=0)
    with pytest.raises(ValueError, match=r"vis_attn=True is not supported"):
        model(guide, feats, None, True)
    # the baseline entry point names the guide
    rgb = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"exactly one of model= \(an AnyUp\) or checkpoint="):
        anyup(rgb, feats)
    with pytest.raises(
        ValueError, match=r"batch size of features \(1, 3, 4, 4\) does not match guide \(2, 3, 16, 16\)"
    ):
        anyup(rgb, feats[:1], model=model)
    with pytest.raises(ValueError, match=r"guide must have 4 dimensions, got shape \(3, 16, 16\)"):
        anyup(rgb[0], feats, model=model)
    with pytest.raises(ValueError, match=r"guide must be RGB in \[0, 1\] when normalize_guide=True"):
        anyup(rgb * 255, feats, model=model)
    with pytest.raises(FileNotFoundError, match=r"AnyUp checkpoint not found"):
        anyup(rgb, feats, checkpoint="/nonexistent/anyup_paper.pth")


# ------------------------------------------------------------------------------------------------
# the fused inference path against the module-by-module reference
# ------------------------------------------------------------------------------------------------
def _reference_forward(model: AnyUp, guide, feats, size):
    """The autograd path: reference encoders, projected queries, tiled attention."""
    with torch.enable_grad():
        q, k = model._encode_reference(guide, feats, size)
        out = model._attend_projected(model._project_queries(q), k, feats, None, None)
    return q.detach(), k.detach(), out.detach()


@pytest.mark.parametrize(
    ("kernel_size", "batch", "out_size"),
    [(1, 2, (26, 33)), (3, 1, (20, 28))],
    ids=["1x1-stem-pooled", "3x3-stem"],
)
def test_fused_encoder_matches_reference(kernel_size, batch, out_size):
    # 37-pixel strips: many strips and a ragged last one, so the strip statistics are merged
    model = _perturbed_model(seed=4, kernel_size=kernel_size, strip_bytes=37 * 128 * 4)
    guide, feats = _inputs(b=batch, c=6, h=5, w=7, H=20, W=28, seed=9)
    q_ref, k_ref, out_ref = _reference_forward(model, guide, feats, out_size)
    with torch.no_grad():
        q, k = model.encode(guide, feats, out_size)
        qp, k2 = model._attention_inputs(guide, feats, out_size)
        out = model(guide, feats, output_size=out_size)
    assert q.shape == (batch, 128, *out_size) and qp.shape == (batch, *out_size, 128)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k2, k)
    torch.testing.assert_close(qp, model._project_queries(q), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)


def test_strip_moments_are_exact_for_offset_data():
    # mean 1000, std 1e-2 (mean / std = 1e5): E[x^2] - E[x]^2 in float32 loses every digit of the variance
    g = torch.Generator().manual_seed(0)
    x = 1000.0 + 1e-2 * torch.randn(16, 1000, generator=g)
    moments = _Moments(groups=4)
    ones, scratch = torch.ones(300), torch.empty(16, 300)
    for s in range(0, 1000, 300):
        moments.add(x[:, s : s + 300], ones, scratch[:, : min(300, 1000 - s)])
    mean, var = moments.finalize()
    x64 = x.double().view(4, -1)
    torch.testing.assert_close(mean, x64.mean(1), rtol=1e-7, atol=0)  # float32 strip means
    torch.testing.assert_close(var, x64.var(1, correction=0), rtol=1e-3, atol=0)
    naive = x.view(4, -1).square().mean(1) - x.view(4, -1).mean(1).square()  # what is avoided
    assert not torch.allclose(naive.double(), x64.var(1, correction=0), rtol=0.5)


def test_fused_feature_unification_matches_grouped_conv():
    model = _perturbed_model(seed=2)
    lfu = model.key_features_encoder[0]
    with torch.no_grad():
        lfu.basis.mul_(4)  # peaky softmax, as in the parity fixture
        unit = F.normalize(torch.randn(2, 11, 9, 13, generator=torch.Generator().manual_seed(3)), dim=1)
        ref = lfu(unit)
        for block in (11 * 128 * 4 * 5, 2**21):  # 5 pixels per block (rows split) / all at once
            torch.testing.assert_close(lfu.fused(unit, block), ref, rtol=1e-5, atol=1e-8)


def test_floored_softmax_keeps_exp_out_of_the_denormal_range():
    x = torch.tensor([[0.0, -10.0, -150.0, float("-inf")], [3.0, 2.0, -400.0, 1.0]])
    y = _floored_softmax(x.clone(), -1, inplace=True)
    ref = x.double().softmax(-1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-30)
    # entries more than SOFTMAX_FLOOR below the row max (and masked ones) weigh exp(-80) ~ 1.8e-35
    floor = math.exp(-SOFTMAX_FLOOR)
    assert ref[0, 2] < 1e-60 and ref[0, 3] == 0
    assert y[0, 2].item() / floor == pytest.approx(1 / (1 + math.exp(-10)), rel=1e-5)
    assert y[0, 3].item() / floor == pytest.approx(1 / (1 + math.exp(-10)), rel=1e-5)


def test_features_enter_weights_only_through_l2_normalisation():
    """anyup(g, s * f) = s * anyup(g, f) for s > 0: the model is scale-equivariant in the features."""
    model = _perturbed_model(seed=6)
    guide, feats = _inputs(b=1, c=5, h=6, w=7, H=24, W=28, seed=1)
    with torch.no_grad():
        base = model(guide, feats)
        for s in (1e-3, 1000.0):
            torch.testing.assert_close(model(guide, s * feats), s * base, rtol=2e-5, atol=1e-6 * s)


def test_plan_tiles_respects_caps():
    model = AnyUp()
    tr, tc = model._plan_tiles((300, 400), (20, 25), 1, 384, 2**24, None)
    assert 1 <= tr <= 300 and 1 <= tc <= 400
    tr, tc = model._plan_tiles((300, 400), (20, 25), 1, 384, 2**24, 50)
    assert tr * tc <= 50
    assert model._plan_tiles((300, 400), (20, 25), 1, 384, 10, None) == (1, 1)  # nothing fits
    glob = AnyUp(window_ratio=0.0)
    tr, tc = glob._plan_tiles((64, 64), (8, 8), 1, 16, 2**24, None)
    assert tr * tc > 64  # global attention: no window waste, so large tiles win


# ------------------------------------------------------------------------------------------------
# depth through AnyUp
# ------------------------------------------------------------------------------------------------
def _depth_case(seed=0, holes=True):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(1, 3, 32, 40, generator=g)
    depth = 1.0 + 2.0 * torch.rand(1, 1, 8, 10, generator=g)  # metres
    if holes:
        depth[0, 0, 2:5, 3:6] = 0.0
        depth[0, 0, 0, 0] = float("nan")
    return rgb, depth


def test_anyup_depth_without_holes_is_anyup_on_the_depth_map():
    model = _perturbed_model(seed=7)
    rgb, depth = _depth_case(holes=False)
    out = anyup_depth(depth, rgb, model=model)
    torch.testing.assert_close(out, anyup(rgb, depth, model=model), rtol=1e-5, atol=1e-6)
    assert out.shape == (1, 1, 32, 40) and bool(torch.isfinite(out).all())


def test_anyup_depth_excludes_holes_and_is_unit_free():
    model = _perturbed_model(seed=7)
    rgb, depth = _depth_case()
    out = anyup_depth(depth, rgb, model=model)
    valid = torch.isfinite(depth) & (depth > 0)
    lo, hi = depth[valid].min(), depth[valid].max()
    finite = torch.isfinite(out)
    assert finite.float().mean() > 0.9
    assert bool((out[finite] >= lo - 1e-5).all()) and bool((out[finite] <= hi + 1e-5).all())
    # what is stored in a hole does not matter
    other = depth.clone()
    other[0, 0, 2:5, 3:6] = float("inf")  # a hole of another kind (negative depth is refused: test below)
    other[0, 0, 0, 0] = 0.0
    torch.testing.assert_close(anyup_depth(other, rgb, model=model), out, equal_nan=True)
    # metres vs millimetres (and a shift): f(s d + t) = s f(d) + t
    mm = anyup_depth(depth * 1000.0, rgb, model=model)
    torch.testing.assert_close(mm, out * 1000.0, rtol=1e-5, atol=1e-3, equal_nan=True)
    shifted = anyup_depth(torch.where(valid, depth + 5.0, 0.0), rgb, model=model)
    torch.testing.assert_close(shifted, out + 5.0, rtol=1e-5, atol=1e-5, equal_nan=True)
    # mask_lr acts like a hole; a window with no valid pixel at all gives NaN
    mask = torch.ones_like(depth, dtype=torch.bool)
    mask[..., :, :5] = False
    masked = anyup_depth(depth, rgb, model=model, mask_lr=mask)
    assert bool(torch.isnan(masked[..., :, :4]).all())
    assert bool(torch.isfinite(masked[..., :, 24:]).all())
    # values under the mask do not matter: anything there (even NaN or huge) gives the same output,
    # which is the output with those cells made holes
    junk = depth.clone()
    junk[..., :, :5] = torch.linspace(-1e6, 1e6, 40).view(1, 1, 8, 5)
    junk[0, 0, 3, 1] = float("nan")
    torch.testing.assert_close(anyup_depth(junk, rgb, model=model, mask_lr=mask), masked, equal_nan=True)
    holed = torch.where(mask, depth, torch.zeros_like(depth))
    torch.testing.assert_close(anyup_depth(holed, rgb, model=model), masked, rtol=0, atol=0, equal_nan=True)
    assert not torch.allclose(masked[..., :, 24:], out[..., :, 24:])  # and the mask did change the output


def test_anyup_depth_input_errors():
    model = AnyUp().eval()
    rgb, depth = _depth_case()
    with pytest.raises(
        ValueError,
        match=r"depth_lr must be a floating \[B, 1, h, w\] tensor, got torch.float32 \(1, 2, 8, 10\)",
    ):
        anyup_depth(depth.repeat(1, 2, 1, 1), rgb, model=model)
    with pytest.raises(
        ValueError, match=r"mask_lr must have the shape of depth_lr \(1, 1, 8, 10\), got \(8, 10\)"
    ):
        anyup_depth(depth, rgb, model=model, mask_lr=torch.ones(8, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"exactly one of model="):
        anyup_depth(depth, rgb)


def test_anyup_depth_follows_the_one_depth_rule():
    """Negative depth is refused (as in every other layer), unless masked out, where it is never read."""
    model = _perturbed_model(seed=7)
    rgb, depth = _depth_case(holes=True)
    depth[0, 0, 6, 7] = -0.25
    with pytest.raises(ValueError, match=r"^depth_lr has 1 negative value\(s\) \(min -0.25"):
        anyup_depth(depth, rgb, model=model)
    keep = torch.ones_like(depth, dtype=torch.bool)
    keep[0, 0, 6, 7] = False
    masked = anyup_depth(depth, rgb, model=model, mask_lr=keep)
    depth[0, 0, 6, 7] = 5.0  # the masked value does not matter
    torch.testing.assert_close(anyup_depth(depth, rgb, model=model, mask_lr=keep), masked, equal_nan=True)
