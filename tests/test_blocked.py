"""The blocked torch engine (``ua3d.core.blocked``, backend ``"blocked"``) against the pure-PyTorch reference.

Tolerances: float64 forward and gradient 1e-10 (measured ~1e-15); float32 forward 2e-5 absolute on
values in [0, 1] / unit normals, float32 gradient 2e-4 of the gradient's largest entry (both engines
sum the same terms in different orders). CUDA: the same float64/float32 checks on a CUDA device,
skipped where there is none.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _helpers import random_params

from ua3d.core import blocked, ops
from ua3d.core.kernel import kernel_fit_loss_grad_reference, kernel_render_reference, resample_guide

pytestmark = pytest.mark.usefixtures("one_thread")

#: (H, W, h, w, groups): integer ratio one group; non-integer ratios two groups (RGB + depth); a
#: non-square grid with unequal blocks and a single-channel guide
CASES = [
    (20, 28, 5, 7, (3,)),
    (23, 37, 5, 7, (3, 1)),
    (17, 11, 4, 3, (1,)),
]


def make(H, W, h, w, groups, B=2, seed=0, dtype=torch.float64, masks=True):
    g = torch.Generator().manual_seed(seed)
    Cg, G = sum(groups), len(groups)
    guide = torch.rand(B, Cg, H, W, generator=g, dtype=dtype)
    guide_lr = resample_guide(guide, (h, w))
    params = random_params(B, h, w, H, W, G=G, seed=seed, dtype=dtype)
    vhr = (torch.rand(B, G, H, W, generator=g) > 0.2) if masks else None
    vlr = (torch.rand(B, G, h, w, generator=g) > 0.2) if masks else None
    return params, guide, guide_lr, vhr, vlr


def _same(a, b, tol):
    """Equal NaN patterns and values within ``tol``."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb)
    err = (a[fa].double() - b[fb].double()).abs().max().item() if fa.any() else 0.0
    assert err <= tol, err


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("radius", [1.5, 3.0])
@pytest.mark.parametrize("masked", [False, True])
def test_render_matches_reference_float64(case, radius, masked):
    H, W, h, w, gs = case
    p, ghr, glr, vhr, vlr = make(H, W, h, w, gs, masks=masked)
    g = torch.Generator().manual_seed(1)
    sig = torch.randn(2, 6, h, w, generator=g, dtype=torch.float64)
    sm = None
    if masked:  # random, and the first 4 LR columns invalid: some pixels have no valid LR value at all
        sm = torch.rand(2, 1, h, w, generator=g) > 0.4
        sm[..., :4] = False
    o1, s1 = kernel_render_reference(p, ghr, glr, sig, radius, gs, vhr, vlr, sm, rows_per_chunk=5)
    o2, s2 = blocked.kernel_render(p, ghr, glr, sig, radius, gs, vhr, vlr, sm)
    assert o2.dtype == torch.float64 and o2.shape == o1.shape
    assert torch.equal(s1, s2)
    if masked:
        assert not s2.all()  # the case does exercise pixels without a valid LR value (NaN)
    _same(o1, o2, 1e-10)


def test_render_float32_and_out_dtype():
    H, W, h, w, gs = CASES[1]
    p, ghr, glr, vhr, vlr = make(H, W, h, w, gs, dtype=torch.float32)
    sig = torch.randn(2, 5, h, w, generator=torch.Generator().manual_seed(2))
    o1, _ = kernel_render_reference(p, ghr, glr, sig, 2.0, gs, vhr, vlr)
    o2, _ = blocked.kernel_render(p, ghr, glr, sig, 2.0, gs, vhr, vlr)
    _same(o1, o2, 2e-5)
    o3, _ = blocked.kernel_render(p, ghr, glr, sig, 2.0, gs, vhr, vlr, out_dtype=torch.float16)
    assert o3.dtype == torch.float16
    _same(o2.half(), o3, 0.0)  # computed in float32, rounded once


@pytest.mark.parametrize("sigmas", [0.7, 2.0])
def test_support_cut_matches_the_cut_reference(sigmas):
    H, W, h, w, gs = CASES[1]
    p, ghr, glr, vhr, vlr = make(H, W, h, w, gs)
    sig = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sm = torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(4)) > 0.3
    kw = dict(groups=gs, valid_hr=vhr, valid_lr=vlr, support_sigmas=sigmas)
    o1, s1 = ops.kernel_render(p, ghr, glr, sig, 3.0, signal_mask=sm, backend="reference", **kw)
    o2, s2 = blocked.kernel_render(p, ghr, glr, sig, 3.0, signal_mask=sm, **kw)
    assert torch.equal(s1, s2)
    _same(o1, o2, 1e-10)
    l1, g1 = ops.kernel_fit_loss_grad(p, ghr, glr, 3.0, backend="reference", **kw)
    l2, g2 = blocked.kernel_fit_loss_grad(p, ghr, glr, 3.0, **kw)
    assert abs(float(l1 - l2)) < 1e-10
    assert (g1 - g2).abs().max() < 1e-10


# --------------------------------------------------------------------------- gradient
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("extras", [False, True])
def test_fit_loss_and_gradient_match_reference_float64(case, extras):
    H, W, h, w, gs = case
    p, ghr, glr, vhr, vlr = make(H, W, h, w, gs, masks=extras)
    g = torch.Generator().manual_seed(5)
    kw = {}
    if extras:
        kw = dict(
            channel_weights=torch.rand(sum(gs), generator=g, dtype=torch.float64) + 0.5,
            pixel_mask=(torch.rand(2, 1, H, W, generator=g) > 0.5).double(),
            values_lr=torch.randn(2, sum(gs), h, w, generator=g, dtype=torch.float64),
        )
    l1, g1 = kernel_fit_loss_grad_reference(p, ghr, glr, 2.5, gs, vhr, vlr, rows_per_chunk=4, **kw)
    l2, g2 = blocked.kernel_fit_loss_grad(p, ghr, glr, 2.5, gs, vhr, vlr, **kw)
    assert g2.shape == p.shape and g2.dtype == torch.float64
    assert abs(float(l1 - l2)) < 1e-10
    assert (g1 - g2).abs().max() < 1e-10
    assert g1.abs().max() > 1e-3  # not a vanishing gradient


def test_fit_float32_gradient_within_stated_tolerance():
    H, W, h, w, gs = CASES[1]
    p, ghr, glr, vhr, vlr = make(H, W, h, w, gs, dtype=torch.float32)
    l1, g1 = kernel_fit_loss_grad_reference(p, ghr, glr, 2.0, gs, vhr, vlr)
    l2, g2 = blocked.kernel_fit_loss_grad(p, ghr, glr, 2.0, gs, vhr, vlr)
    assert abs(float(l1 - l2)) < 1e-5 * float(l1)
    assert (g1 - g2).abs().max() < 2e-4 * g1.abs().max()


def test_gradient_matches_finite_differences_float64():
    """The returned gradient is the derivative of the returned loss (central differences, tiny case)."""
    p, ghr, glr, vhr, vlr = make(7, 9, 3, 3, (2, 1), B=1)
    loss = lambda q: float(blocked.kernel_fit_loss_grad(q, ghr, glr, 1.5, (2, 1), vhr, vlr)[0])
    _, grad = blocked.kernel_fit_loss_grad(p, ghr, glr, 1.5, (2, 1), vhr, vlr)
    eps = 1e-6
    num = torch.zeros_like(p)
    for idx in range(p.numel()):
        d = torch.zeros_like(p).view(-1)
        d[idx] = eps
        d = d.view_as(p)
        num.view(-1)[idx] = (loss(p + d) - loss(p - d)) / (2 * eps)
    assert (num - grad).abs().max() < 1e-7 * max(1.0, float(grad.abs().max()))


# --------------------------------------------------------------------------- chunks and memory
def test_one_block_per_chunk_equals_all_at_once():
    H, W, h, w, gs = CASES[1]
    p, ghr, glr, vhr, vlr = make(H, W, h, w, gs)
    sig = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sm = torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(7)) > 0.3
    args = (p, ghr, glr, sig, 2.0, gs, vhr, vlr, sm)
    o1, s1 = blocked.kernel_render(*args, blocks_per_chunk=1)
    o2, s2 = blocked.kernel_render(*args, blocks_per_chunk=h * w)
    assert torch.equal(s1, s2) and torch.equal(o1.nan_to_num(9.0), o2.nan_to_num(9.0))
    l1, g1 = blocked.kernel_fit_loss_grad(p, ghr, glr, 2.0, gs, vhr, vlr, blocks_per_chunk=1)
    l2, g2 = blocked.kernel_fit_loss_grad(p, ghr, glr, 2.0, gs, vhr, vlr, blocks_per_chunk=h * w)
    assert abs(float(l1 - l2)) < 1e-13 and (g1 - g2).abs().max() < 1e-13


def test_memory_estimate_is_linear_in_pixels():
    est = [blocked.estimate_memory(1, 384, (n, n), (n // 16, n // 16), 8.0) for n in (512, 1024, 2048)]
    for small, big in itertools.pairwise(est):
        assert big["output"] == pytest.approx(4 * small["output"], rel=1e-6)  # 2x the side: 4x the pixels
        assert big["working"] <= blocked.WORK_BYTES and big["total"] <= 4 * small["total"]
    assert est[-1]["total"] < 8 * 2**30  # issue 16: 2048 px with 384 channels under 8 GB
    fit = [blocked.estimate_memory(1, 3, (n, n), (n // 16, n // 16), 8.0, fit=True) for n in (512, 2048)]
    assert fit[1]["output"] == pytest.approx(16 * fit[0]["output"], rel=0.01)
    assert fit[1]["working"] == fit[0]["working"] <= blocked.WORK_BYTES


def test_chunk_size_follows_the_budget():
    n, K = 256, 197
    one = blocked._block_bytes(n, K, 64, 4, False)
    assert blocked._blocks_per_chunk(n, K, 64, 4, False, 10 * one) == 10
    assert blocked._blocks_per_chunk(n, K, 64, 4, False, one // 2) == 1  # at least one block
    assert blocked._block_bytes(n, K, 3, 4, True) > blocked._block_bytes(n, K, 3, 4, False)


# --------------------------------------------------------------------------- dispatch and errors
def test_dispatch_auto_picks_blocked_off_cpu_and_blocked_is_selectable_on_cpu():
    assert "blocked" in ops.BACKENDS
    assert ops.resolve_backend("auto", torch.device("cuda")) == "blocked"
    assert ops.resolve_backend("blocked", torch.device("cpu")) == "blocked"
    assert ops.resolve_backend("reference", torch.device("cuda")) == "reference"
    H, W, h, w, gs = CASES[0]
    p, ghr, glr, vhr, vlr = make(H, W, h, w, gs)
    sig = torch.randn(2, 3, h, w, dtype=torch.float64)
    o1, _ = ops.kernel_render(p, ghr, glr, sig, 2.0, gs, vhr, vlr, backend="blocked")
    o2, _ = blocked.kernel_render(p, ghr, glr, sig, 2.0, gs, vhr, vlr)
    assert torch.equal(o1, o2)
    l1, g1 = ops.kernel_fit_loss_grad(p, ghr, glr, 2.0, gs, vhr, vlr, backend="blocked")
    l2, g2 = blocked.kernel_fit_loss_grad(p, ghr, glr, 2.0, gs, vhr, vlr)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_a_fit_runs_on_the_blocked_backend():
    import ua3d

    guide = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    kw = dict(steps=3, seed=0, radius=2.0)
    k_ref = ua3d.fit(guide, (4, 4), backend="reference", **kw)
    k_blk = ua3d.fit(guide, (4, 4), backend="blocked", **kw)
    # float32, 3 Adam steps: Adam's normalised step magnifies gradient round-off where a gradient is ~0
    assert (k_ref.params - k_blk.params).abs().max() < 1e-3


def test_refuses_what_it_does_not_support():
    H, W, h, w, gs = CASES[0]
    p, ghr, glr, _, _ = make(H, W, h, w, gs)
    sig = torch.randn(2, 3, h, w, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"^the blocked engine computes in float32 or float64 \(the dtype of params\), got torch.float16$",
    ):
        blocked.kernel_render(p.half(), ghr, glr, sig, 2.0)
    with pytest.raises(ValueError, match=r"^signal_mask must have shape \(2, 1, 5, 7\), got \(2, 1, 5, 6\)$"):
        blocked.kernel_render(p, ghr, glr, sig, 2.0, signal_mask=torch.ones(2, 1, 5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^guide_hr is on meta but params on cpu: use one device$"):
        blocked.kernel_render(p, ghr.to("meta"), glr, sig, 2.0)
    with pytest.raises(
        ValueError, match=r"^support_sigmas must be a positive finite number or None, got -1$"
    ):
        blocked.kernel_fit_loss_grad(p, ghr, glr, 2.0, support_sigmas=-1)
    with pytest.raises(ValueError, match=r"^groups \(2,\) must be positive channel counts summing to 3"):
        blocked.kernel_fit_loss_grad(p, ghr, glr, 2.0, groups=(2,))


# --------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_cuda_matches_the_cpu_reference(dtype, tol):
    H, W, h, w, gs = CASES[1]
    p, ghr, glr, vhr, vlr = make(H, W, h, w, gs, dtype=dtype)
    sig = torch.randn(2, 8, h, w, dtype=dtype)
    sm = torch.rand(2, 1, h, w) > 0.3
    o1, s1 = kernel_render_reference(p, ghr, glr, sig, 3.0, gs, vhr, vlr, sm)
    l1, g1 = kernel_fit_loss_grad_reference(p, ghr, glr, 3.0, gs, vhr, vlr)
    cu = [t.cuda() for t in (p, ghr, glr, sig, vhr, vlr, sm)]
    o2, s2 = ops.kernel_render(*cu[:4], 3.0, gs, cu[4], cu[5], cu[6])  # "auto" picks the blocked engine
    l2, g2 = ops.kernel_fit_loss_grad(*cu[:3], 3.0, gs, cu[4], cu[5])
    assert o2.device.type == "cuda" and g2.device.type == "cuda"
    assert torch.equal(s1, s2.cpu())
    _same(o1, o2.cpu(), tol)
    assert abs(float(l1 - l2.cpu())) < tol * max(1.0, float(l1))
    assert (g1 - g2.cpu()).abs().max() < (tol if dtype == torch.float64 else 2e-4) * max(
        1.0, float(g1.abs().max())
    )
