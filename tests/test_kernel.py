"""Core kernel: invariants, brute-force agreement, gradients, API behaviour.

Every property runs on the reference backend and, when numba is present, on the fast one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import random_params

import ua3d
from ua3d.baselines import jbu
from ua3d.core.kernel import (
    init_params,
    kernel_render_reference,
    kernel_weights_reference,
    nearest_anchor,
    resample_guide,
    theta_from_raw,
    window_offsets,
)
from ua3d.core.ops import fast_available, kernel_render

BACKENDS = ["reference"] + (["fast"] if fast_available() else [])


def make_inputs(B=1, Cg=3, h=5, w=4, H=23, W=17, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    guide = torch.rand(B, Cg, H, W, generator=g, dtype=dtype)
    guide_lr = resample_guide(guide, (h, w))
    params = random_params(B, h, w, H, W, seed=seed, dtype=dtype)
    return params, guide, guide_lr


# --------------------------------------------------------------------------- geometry
def test_window_offsets_disc_of_radius_8_has_197_neighbours():
    offs = window_offsets(8.0)
    assert offs.shape == (197, 2)
    assert (offs.pow(2).sum(1) <= 64).all()
    assert ((offs == 0).all(1)).sum() == 1


def test_nearest_anchor_matches_rounding_of_align_corners_false_coordinate():
    for n_hr, n_lr in [(224, 14), (150, 10), (518, 37), (7, 3), (100, 100)]:
        y = np.arange(n_hr)
        u = (y + 0.5) * n_lr / n_hr - 0.5
        expect = np.clip(np.floor(u + 0.5), 0, n_lr - 1).astype(np.int64)
        assert np.array_equal(nearest_anchor(n_hr, n_lr).numpy(), expect)


# --------------------------------------------------------------------------- invariants
def _dense_weights(w: torch.Tensor, flat: torch.Tensor, inside: torch.Tensor, n_cells: int) -> torch.Tensor:
    """Reference weights ``[B, K, H, W]`` scattered onto the LR cells: ``[B, h*w, H, W]``."""
    B, K, H, W = w.shape
    dense = torch.zeros(B, n_cells, H, W, dtype=w.dtype)
    idx = flat.clamp_min(0).expand(B, K, H, W)
    return dense.scatter_add_(1, idx, torch.where(inside, w, torch.zeros((), dtype=w.dtype)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_sum_to_one_and_constant_in_constant_out(backend):
    params, guide, guide_lr = make_inputs(B=2, h=6, w=5, H=29, W=22)
    w, flat, inside = kernel_weights_reference(params, guide, guide_lr, 3.0)
    torch.testing.assert_close(w.sum(1), torch.ones_like(w[:, 0]), rtol=0, atol=1e-12)
    assert (~inside).any() and (w[:, ~inside] == 0).all()
    # the backend's own weights: rendering the one-hot signal of each LR cell gives that cell's weight map
    eye = torch.eye(30, dtype=torch.float64).view(1, 30, 6, 5).expand(2, 30, 6, 5)
    w_backend, _ = kernel_render(params, guide, guide_lr, eye, 3.0, backend=backend)
    assert (w_backend >= 0).all()
    torch.testing.assert_close(w_backend.sum(1), torch.ones_like(w_backend[:, 0]), rtol=0, atol=1e-10)
    torch.testing.assert_close(w_backend, _dense_weights(w, flat, inside, 30), rtol=0, atol=1e-10)
    assert (w_backend > 0).sum(1).max() <= window_offsets(3.0).shape[0]  # only the window's cells
    const = torch.full((2, 4, 6, 5), 0.37, dtype=torch.float64)
    out, sup = kernel_render(params, guide, guide_lr, const, 3.0, backend=backend)
    torch.testing.assert_close(out, torch.full_like(out, 0.37), rtol=0, atol=1e-10)
    assert sup.all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_inside_per_channel_range_of_signal(backend):
    params, guide, guide_lr = make_inputs(B=1, h=7, w=9, H=40, W=51, seed=3)
    sig = torch.randn(1, 6, 7, 9, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64).view(
        1, 6, 1, 1
    )
    out, _ = kernel_render(params, guide, guide_lr, sig, 8.0, backend=backend)
    lo = sig.amin(dim=(2, 3), keepdim=True)
    hi = sig.amax(dim=(2, 3), keepdim=True)
    assert (out >= lo - 1e-12).all() and (out <= hi + 1e-12).all()
    assert torch.isfinite(out).all()


def test_no_nan_with_extreme_parameters():
    params, guide, guide_lr = make_inputs(h=4, w=4, H=16, W=16)
    params[:, 0:2] = -50.0  # tiny sigmas (clamped internally)
    params[:, 3] = -50.0  # tiny sigma_r
    sig = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    out, _ = kernel_render_reference(params, guide, guide_lr, sig, 8.0)
    assert torch.isfinite(out).all()
    params[:, 0:2] = 50.0  # huge sigmas
    params[:, 3] = 50.0
    out, _ = kernel_render_reference(params, guide, guide_lr, sig, 8.0)
    assert torch.isfinite(out).all()
    # huge sigmas: every neighbour weighs the same -> mean over the window
    torch.testing.assert_close(out[0, :, 0, 0], sig[0].mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- brute force
def brute_force_render(params, guide, guide_lr, signal, radius):
    """Independent scatter formulation: a double loop over LR cells (i, j), vectorised over HR pixels.

    Two passes (per-pixel max of the logits, then normalised accumulation) keep memory at O(HW).
    """
    p = params[0].numpy()
    g = guide[0].numpy()
    gl = guide_lr[0].numpy()
    f = signal[0].numpy()
    h, w = p.shape[1:]
    H, W = g.shape[1:]
    yy, xx = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    ay = np.clip(np.floor((yy + 0.5) * h / H), 0, h - 1)
    ax = np.clip(np.floor((xx + 0.5) * w / W), 0, w - 1)
    r = int(radius)

    def cell_logits(i, j):
        sx, sy = np.exp(np.clip(p[0, i, j], -7, 9)), np.exp(np.clip(p[1, i, j], -7, 9))
        th = math.pi / 2 * math.tanh(p[2, i, j])
        sr = np.exp(np.clip(p[3, i, j], -7, 9))
        cy = (i + 0.5) * H / h - 0.5
        cx = (j + 0.5) * W / w - 0.5
        # only rows/columns whose anchor can be within the radius (keeps the loop affordable)
        ys = np.nonzero(np.abs(ay[:, 0] - i) <= r)[0]
        xs = np.nonzero(np.abs(ax[0] - j) <= r)[0]
        sl = np.ix_(ys, xs)
        dx, dy = xx[sl] - cx, yy[sl] - cy
        a = math.cos(th) * dx + math.sin(th) * dy
        b = -math.sin(th) * dx + math.cos(th) * dy
        d2 = ((g[:, ys][:, :, xs] - gl[:, i, j][:, None, None]) ** 2).sum(0)
        lg = -0.5 * (a * a / sx**2 + b * b / sy**2) - 0.5 * d2 / sr**2
        inwin = (ay[sl] - i) ** 2 + (ax[sl] - j) ** 2 <= radius**2 + 1e-9
        return sl, np.where(inwin, lg, -np.inf)

    m = np.full((H, W), -np.inf)
    for i in range(h):
        for j in range(w):
            sl, lg = cell_logits(i, j)
            m[sl] = np.maximum(m[sl], lg)
    num = np.zeros((f.shape[0], H, W))
    den = np.zeros((H, W))
    for i in range(h):
        for j in range(w):
            sl, lg = cell_logits(i, j)
            e = np.exp(lg - m[sl])
            den[sl] += e
            num[(slice(None), *sl)] += e[None] * f[:, i, j][:, None, None]
    return (num / den)[None], None


@pytest.mark.parametrize(
    "lr,hr",
    [((16, 16), (224, 448)), ((37, 37), (518, 518)), ((10, 14), (150, 200))],
    ids=["16x16-224x448", "37x37-518x518", "10x14-150x200"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_brute_force_double_loop(lr, hr, backend):
    (h, w), (H, W) = lr, hr
    g = torch.Generator().manual_seed(h * w)
    guide = torch.rand(1, 3, H, W, generator=g, dtype=torch.float64)
    guide_lr = resample_guide(guide, (h, w))
    params = random_params(1, h, w, H, W, seed=h + w)
    sig = torch.randn(1, 2, h, w, generator=g, dtype=torch.float64)
    radius = 8.0 if h * w < 600 else 3.0
    expect, _ = brute_force_render(params, guide, guide_lr, sig, radius)
    if backend == "fast":
        params, guide, guide_lr, sig = (t.float() for t in (params, guide, guide_lr, sig))
    out, _ = kernel_render(params, guide, guide_lr, sig, radius, backend=backend)
    tol = 1e-9 if out.dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(out.double().numpy(), expect, rtol=tol, atol=tol)


def test_isotropic_limit_equals_brute_force_jbu():
    """Classic JBU computed directly (Kopf 2007) equals the kernel with isotropic, untrained parameters."""
    g = torch.Generator().manual_seed(7)
    H, W, h, w = 18, 15, 6, 5
    guide = torch.rand(1, 3, H, W, generator=g, dtype=torch.float64)
    sig = torch.randn(1, 3, h, w, generator=g, dtype=torch.float64)
    ss, sr, radius = 2.0, 0.15, 2.0
    out = jbu(
        guide,
        sig,
        sigma_spatial=ss,
        sigma_range=sr,
        radius=radius,
        range_centre="bilinear",
        backend="reference",
    )
    # brute force: classic JBU with the guide sampled at the LR centres (integer ratio 3 -> pixel centres)
    gq = guide[0, :, 1::3, 1::3].numpy()  # (i + 0.5) * 3 - 0.5 = 3i + 1
    expect = np.zeros((3, H, W))
    for y in range(H):
        for x in range(W):
            ay, ax = min(h - 1, (2 * y + 1) * h // (2 * H)), min(w - 1, (2 * x + 1) * w // (2 * W))
            num, den = np.zeros(3), 0.0
            for i in range(h):
                for j in range(w):
                    if (i - ay) ** 2 + (j - ax) ** 2 > radius**2:
                        continue
                    d2s = (y - (3 * i + 1)) ** 2 + (x - (3 * j + 1)) ** 2
                    d2r = ((guide[0, :, y, x].numpy() - gq[:, i, j]) ** 2).sum()
                    wt = math.exp(-d2s / (2 * ss**2) - d2r / (2 * sr**2))
                    num += wt * sig[0, :, i, j].numpy()
                    den += wt
            expect[:, y, x] = num / den
    np.testing.assert_allclose(out[0].numpy(), expect, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- gradients
def test_gradcheck_float64_wrt_all_four_parameter_maps():
    params, guide, guide_lr = make_inputs(h=3, w=3, H=7, W=8, seed=5)
    sig = torch.randn(1, 2, 3, 3, dtype=torch.float64)

    def f(p):
        return kernel_render_reference(p, guide, guide_lr, sig, 2.0)[0]

    p = params.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-6)
    # every one of the four maps influences the output
    out = f(p)
    (g,) = torch.autograd.grad(out.sum() + (out**2).sum(), p)
    for c in range(4):
        assert g[:, c].abs().max() > 1e-8, f"parameter map {c} has no gradient"


def test_fit_loss_grad_matches_autograd_of_l1_loss():
    from ua3d.core.kernel import kernel_fit_loss_grad_reference

    params, guide, guide_lr = make_inputs(h=4, w=3, H=13, W=11, seed=9)
    loss, grad = kernel_fit_loss_grad_reference(params, guide, guide_lr, 2.0, rows_per_chunk=3)
    p = params.clone().requires_grad_(True)
    rec, _ = kernel_render_reference(p, guide, guide_lr, guide_lr, 2.0)
    ref = (rec - guide).abs().mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, p.grad)


# --------------------------------------------------------------------------- API
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_two_equals_two_single_runs(backend):
    g = torch.Generator().manual_seed(1)
    guide = torch.rand(2, 3, 30, 26, generator=g)
    sig = torch.randn(2, 5, 6, 5, generator=g)
    k2 = ua3d.fit(guide, (6, 5), steps=3, radius=3, backend=backend)
    out2 = k2.render(sig)
    for b in range(2):
        k1 = ua3d.fit(guide[b : b + 1], (6, 5), steps=3, radius=3, backend=backend)
        torch.testing.assert_close(k1.params, k2.params[b : b + 1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(k1.render(sig[b : b + 1]), out2[b : b + 1], rtol=1e-5, atol=1e-6)


def test_fit_reduces_loss_and_is_reproducible():
    g = torch.Generator().manual_seed(2)
    guide = torch.rand(1, 3, 24, 24, generator=g)
    k = ua3d.fit(guide, (6, 6), steps=6, radius=3)
    assert k.losses[-1] < k.losses[0]
    k2 = ua3d.fit(guide, (6, 6), steps=6, radius=3)
    torch.testing.assert_close(k.params, k2.params, rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_save_load_round_trip(tmp_path, suffix):
    guide = torch.rand(1, 3, 20, 16, generator=torch.Generator().manual_seed(4))
    k = ua3d.fit(guide, (5, 4), steps=2, radius=3, sigma_range=0.2)
    path = k.save(tmp_path / f"k{suffix}")
    k2 = ua3d.Kernel.load(path)
    torch.testing.assert_close(k2.params, k.params, rtol=0, atol=0)
    torch.testing.assert_close(k2.guide_hr, k.guide_hr, rtol=0, atol=0)
    assert k2.radius == k.radius and k2.config == k.config
    sig = torch.randn(1, 3, 5, 4)
    torch.testing.assert_close(k2.render(sig), k.render(sig), rtol=0, atol=0)


def test_numpy_uint8_guide_is_accepted_and_scaled():
    img = (np.random.default_rng(0).random((16, 12, 3)) * 255).astype(np.uint8)
    k = ua3d.fit(
        img, (4, 3), steps=1, radius=2, guide_prefilter="none"
    )  # white noise: "auto" would denoise it
    torch.testing.assert_close(k.guide_hr[0].permute(1, 2, 0), torch.from_numpy(img).float() / 255)


def test_render_with_mask_excludes_holes_and_reports_support():
    guide = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    k = ua3d.fit(guide, (4, 4), steps=0, radius=1)
    sig = torch.ones(1, 1, 4, 4)
    sig[0, 0, 0, 0] = float("nan")  # a hole, masked out
    sig[0, 0, 3, 3] = 1000.0  # a hole with a garbage value, masked out
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0, 0] = mask[0, 0, 3, 3] = False
    out, sup = k.render(sig, mask, return_support=True)
    assert sup.all()
    torch.testing.assert_close(out, torch.ones_like(out))
    mask[:] = False
    mask[0, 0, 3, 3] = True  # only one valid cell: far pixels (radius 1) have no support
    out, sup = k.render(sig, mask, return_support=True)
    assert not sup[0, 0, 0, 0] and torch.isnan(out[0, 0, 0, 0])
    assert sup[0, 0, 15, 15] and out[0, 0, 15, 15] == 1000.0


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: ua3d.fit(torch.rand(1, 3, 8, 8), (9, 4)),
            r"lr_size \(9, 4\) is larger than the guide/output size \(8, 8\)",
        ),
        (lambda: ua3d.fit(torch.rand(1, 3, 8, 8), (0, 4)), r"lr_size must be positive"),
        (lambda: ua3d.fit(torch.rand(1, 3, 8, 8), (2.5, 4)), r"lr_size must hold integers"),
        (
            lambda: ua3d.fit(torch.rand(3, 8), (2, 2)),
            r"guide must have 3 or 4 dimensions, got shape \(3, 8\)",
        ),
        (lambda: ua3d.fit(torch.rand(1, 3, 0, 8), (2, 2)), r"guide is empty"),
        (lambda: ua3d.fit(torch.full((1, 3, 8, 8), float("nan")), (2, 2)), r"guide contains 192 NaN/Inf"),
        (
            lambda: ua3d.fit(torch.zeros(1, 3, 8, 8, dtype=torch.int64), (2, 2)),
            r"guide must be floating point",
        ),
        (
            lambda: ua3d.upsample(torch.rand(2, 3, 8, 8), torch.rand(1, 4, 2, 2)),
            r"batch size of signal \(1, 4, 2, 2\) does not match guide \(2, 3, 8, 8\)",
        ),
        (
            lambda: ua3d.upsample(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 4, 2, 2)),
            r"signal must have 4 dimensions",
        ),
        (lambda: ua3d.fit(torch.rand(1, 3, 8, 8), (2, 2), steps=-1), r"steps must be an integer >= 0"),
        (lambda: ua3d.fit(torch.rand(1, 3, 8, 8), (2, 2), bogus=1), r"unknown FitConfig field"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_render_rejects_wrong_grid_nan_and_batch():
    k = ua3d.fit(torch.rand(1, 3, 8, 8), (2, 2), steps=0)
    with pytest.raises(
        ValueError, match=r"signal grid \(3, 3\) does not match the kernel's LR grid \(2, 2\)"
    ):
        k.render(torch.rand(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"signal contains 1 NaN/Inf"):
        s = torch.rand(1, 4, 2, 2)
        s[0, 1, 1, 1] = float("inf")
        k.render(s)
    with pytest.raises(ValueError, match=r"signal batch 2 does not match the kernel batch 1"):
        k.render(torch.rand(2, 4, 2, 2))


def test_theta_is_bounded():
    t = theta_from_raw(torch.tensor([-1e6, -1.0, 0.0, 1.0, 1e6]))
    assert (t.abs() <= math.pi / 2).all() and t[2] == 0


def test_init_params_uses_per_axis_scale():
    p = init_params(1, (7, 5), (70, 20))
    assert math.isclose(float(p[0, 0, 0, 0].exp()), 4.0, rel_tol=1e-6)  # sigma_x = W / w
    assert math.isclose(float(p[0, 1, 0, 0].exp()), 10.0, rel_tol=1e-6)  # sigma_y = H / h
    assert math.isclose(float(p[0, 3, 0, 0].exp()), 0.12, rel_tol=1e-6)


def test_tto_adam_matches_torch_adam_with_exponential_lr():
    """The TTO loop's written-out Adam is torch's Adam update (the single-tensor path that
    ``torch.optim.Adam`` takes for CPU tensors) with ExponentialLR's multiplicative decay, step
    for step. (The functional form: constructing ``torch.optim.Adam`` imports torch._dynamo and
    triton, which segfaults in a process where Open3D's renderer has run, e.g. after test_cli.)"""
    from torch.optim.adam import adam

    from ua3d.core.tto import _Adam

    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    grads = [torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64) * 10.0 ** (-k % 4) for k in range(12)]
    ref, m, v, step = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0), torch.tensor(0.0)
    mine = p0.clone()
    ours = _Adam(mine, 0.1, 0.9)
    lr = 0.1
    for gr in grads:
        adam(
            [ref],
            [gr],
            [m],
            [v],
            [],
            [step],
            foreach=False,
            capturable=False,
            differentiable=False,
            fused=None,
            grad_scale=None,
            found_inf=None,
            has_complex=False,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=lr,
            weight_decay=0.0,
            eps=1e-8,
            maximize=False,
        )
        lr *= 0.9
        ours.step(gr)
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-15)


def test_decode_params_one_rule_for_tensors_and_arrays():
    from ua3d.core.params import LOG_SIGMA_MAX, LOG_SIGMA_MIN, THETA_MAX, decode_params

    p = random_params(2, 3, 4, 12, 16, G=2, seed=5)
    p[0, 0, 0, 0], p[0, 3, 1, 1] = 50.0, -50.0  # clamped
    t, a = decode_params(p), decode_params(p.numpy())
    for x, y in zip(t, a, strict=True):  # torch's and numpy's tanh may differ in the last bit
        np.testing.assert_allclose(x.numpy(), y, rtol=1e-14, atol=0)
    assert t.log_sigma_x[0, 0, 0] == LOG_SIGMA_MAX and t.log_sigma_r[0, 0, 1, 1] == LOG_SIGMA_MIN
    assert t.log_sigma_r.shape == (2, 2, 3, 4) and bool((t.theta.abs() < THETA_MAX).all())
    torch.testing.assert_close(t.theta, theta_from_raw(p[:, 2]), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"params must be \[B, 3 \+ G, \.\.\.\], got shape \(2, 2, 3, 4\)"):
        decode_params(p[:, :2])
    with pytest.raises(TypeError, match="params must be a torch.Tensor or numpy array, got list"):
        decode_params([1.0, 2.0, 3.0])
