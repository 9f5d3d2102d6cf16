"""The guide pre-filter's fast paths: the numba bilateral pass (``ua3d.core.fast.prefilter``) against its
torch reference ``tto._bilateral_torch`` (float64 within 1e-13, float32 within 2e-6 absolute on [0, 1]
guides: a few ulps, ``exp`` differs), and the impulse step, which now gathers only the candidate pixels'
neighbourhoods, against a copy of the dense formulation it replaced (bit-identical)."""

from __future__ import annotations

import pytest
import torch

from ua3d.core import tto
from ua3d.core.ops import fast_available


def _dense_remove_impulses(guide: torch.Tensor, force: bool) -> torch.Tensor:
    """The dense impulse step (every pixel's 3x3 medians), as it was before the sparse one."""
    lo, hi = 1.0 / 255, 254.0 / 255
    cand = (guide <= lo).all(1, keepdim=True) | (guide >= hi).all(1, keepdim=True)
    share = cand.flatten(1).float().mean(1)
    if not force and not bool((share > tto.IMPULSE_SHARE).any()):
        return guide
    B, C, H, W = guide.shape
    pad = torch.nn.functional.pad
    g = pad(guide, (1, 1, 1, 1), mode="replicate").unfold(2, 3, 1).unfold(3, 3, 1).reshape(B, C, H, W, 9)
    c = pad(cand.to(guide.dtype), (1, 1, 1, 1), mode="replicate").unfold(2, 3, 1).unfold(3, 3, 1)
    c = c.reshape(B, 1, H, W, 9) > 0.5
    med = torch.where(c, torch.full((), float("nan"), dtype=guide.dtype), g).nanmedian(-1).values
    med = torch.where(torch.isnan(med), g.median(-1).values, med)
    imp = cand & ((guide - med).abs().amax(1, keepdim=True) > 0.25)
    if not force and not bool((imp.flatten(1).float().mean(1) > tto.IMPULSE_SHARE).any()):
        return guide
    return torch.where(imp, med, guide)


def _salt_pepper(B, C, H, W, frac, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(B, C, H, W, generator=g, dtype=dtype)
    img[:, :, : H // 3, : W // 2] = 0.0  # a black region: many candidates that are not impulses
    m = torch.rand(B, 1, H, W, generator=g) < frac
    v = (torch.rand(B, 1, H, W, generator=g) < 0.5).to(dtype).expand(B, C, H, W)
    return torch.where(m, v, img)


@pytest.mark.parametrize("frac", [0.0, 0.003, 0.1, 0.3])
@pytest.mark.parametrize("force", [False, True])
def test_sparse_impulse_step_equals_the_dense_one(frac, force):
    for dtype in (torch.float32, torch.float64):
        g = _salt_pepper(2, 3, 29, 37, frac, seed=int(frac * 100), dtype=dtype)
        g[1] = torch.rand(3, 29, 37, generator=torch.Generator().manual_seed(1), dtype=dtype)  # a clean item
        want = _dense_remove_impulses(g, force)
        got = tto._remove_impulses(g, force)
        assert torch.equal(got, want)
        assert (got is g) == (want is g)  # a clean guide comes back as the same tensor


@pytest.mark.skipif(not fast_available(), reason="numba is not installed: no fast bilateral pass")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_bilateral_matches_the_torch_reference(dtype):
    g = torch.rand(2, 3, 23, 31, generator=torch.Generator().manual_seed(4), dtype=dtype)
    g[:, :, :, 15:] += 0.5  # an edge
    sigma = torch.tensor([0.08, 0.3], dtype=dtype)
    for radius, sigma_s in ((3, 1.5), (1, 0.7)):
        ref = tto._bilateral_torch(g, sigma, sigma_s, radius)
        out = tto._bilateral(g, sigma, sigma_s, radius)
        assert out.dtype == dtype and out.shape == g.shape
        tol = 1e-13 if dtype == torch.float64 else 2e-6
        assert float((out - ref).abs().max()) < tol
    one = torch.rand(1, 1, 5, 4, generator=torch.Generator().manual_seed(5), dtype=dtype)  # 1 channel, tiny
    s1 = torch.tensor([0.2], dtype=dtype)
    assert float((tto._bilateral(one, s1) - tto._bilateral_torch(one, s1)).abs().max()) < 1e-5
