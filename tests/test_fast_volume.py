"""Fused volume engine (``ua3d.core.fast_volume``): parity with the tensor reference of
:func:`ua3d.rgbd.volume.render_volume`, float16 rounding, batching, threads, errors.

Tolerances: float64 kernels agree with the float64 reference within 1e-10 (measured ~1e-14); a
float32 kernel agrees with the float64 reference within 5e-5 absolute on unit-scale features
(measured ~1e-5, the float32 reference itself is as far); log-masses are float32 in both (1e-5).
The float16 converter is bit-exact against numpy. Sizes are tiny; the first call compiles the
kernels (cached on disk afterwards).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ua3d.core.ops import fast_available
from ua3d.core.tto import FitConfig
from ua3d.rgbd.lift import fit_rgbd
from ua3d.rgbd.synthetic import make_scene
from ua3d.rgbd.volume import estimate_volume_bytes, render_volume

pytestmark = [
    pytest.mark.skipif(not fast_available(), reason="numba is not installed: no fast engine to test"),
    pytest.mark.usefixtures("one_thread"),
]


def _lift(seed, W, H, lr, radius, dtype, hole=True):
    s = make_scene(seed, W, H, holes=2)
    depth = torch.from_numpy(s["depth"]).to(dtype)
    if hole:  # a hole larger than an LR cell: cells without depth (their depth term is dropped)
        depth[: H // 3, : W // 3] = 0
    rgb = torch.from_numpy(s["rgb"]).permute(2, 0, 1)[None].to(dtype)
    return fit_rgbd(rgb, depth, s["camera"], lr, FitConfig(steps=2, radius=radius, backend="reference"))


@pytest.fixture(scope="module")
def lk64():
    """Non-integer HR/LR ratios (blocks of different sizes), radius 3, LR cells without depth."""
    lk = _lift(2, 37, 29, (5, 6), 3.0, torch.float64)
    assert not bool(lk.kernel.valid_lr[0, 1].all())
    return lk


@pytest.fixture(scope="module")
def feats64():
    return torch.randn(1, 5, 5, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _both(lk, f, **kw):
    ref = render_volume(lk, f, backend="reference", **kw)
    out = render_volume(lk, f, backend="fast", **kw)
    return ref, out


@pytest.mark.parametrize("model", ["planar", "constant"])
@pytest.mark.parametrize(
    ("band", "spacing", "mass_mode"),
    [(None, "uniform", "raw"), (2, "inverse", "normalized"), (0, "uniform", "raw")],
)
def test_float64_parity(lk64, feats64, model, band, spacing, mass_mode):
    (v0, m0, b0), (v1, m1, b1) = _both(
        lk64, feats64, bins=9, depth_model=model, band=band, spacing=spacing, mass_mode=mass_mode
    )
    assert v1.dtype == torch.float64 and v1.shape == (5, 9, 29, 37)
    torch.testing.assert_close(v1, v0, atol=1e-10, rtol=0)
    torch.testing.assert_close(m1, m0, atol=1e-5, rtol=1e-5)  # log M is float32 in both
    assert torch.equal(b0, b1)
    if band is not None:
        assert bool(((v1 != 0).any(0).sum(0) <= 2 * band + 1).all())


def test_float32_parity_against_float64_reference():
    lk32 = _lift(3, 40, 30, (6, 5), 2.5, torch.float32)
    lk64 = _lift(3, 40, 30, (6, 5), 2.5, torch.float64)
    torch.testing.assert_close(lk32.params.double(), lk64.params, atol=1e-4, rtol=1e-4)
    lk32.kernel.params = lk64.params.float()  # same kernel, float32 arithmetic
    f = torch.randn(1, 3, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, ref_mass, _ = render_volume(lk64, f, bins=7, backend="reference", mass_mode="raw")
    out, mass, _ = render_volume(lk32, f.float(), bins=7, backend="fast", mass_mode="raw")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=0)
    torch.testing.assert_close(mass.double(), ref_mass.double(), atol=1e-4, rtol=1e-4)


def test_half_rounding_is_bit_exact():
    from ua3d.core.fast_volume import half_bits

    g = np.random.default_rng(0)
    x = (g.standard_normal(200_000) * 10.0 ** g.uniform(-9, 5.5, 200_000)).astype(np.float32)
    specials = [
        0.0,
        -0.0,
        np.inf,
        -np.inf,
        65504.0,
        65519.99,
        65520.0,
        1e6,
        2.0**-24,
        2.0**-25,
        1.5 * 2.0**-25,
        2.0**-14,
        2.0**-14 * (1 - 2.0**-11),
        1 + 2.0**-11,
        1 + 3 * 2.0**-11,
    ]  # ties round to even
    x = np.concatenate([x, np.array(specials, np.float32), -np.array(specials, np.float32)])
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(half_bits(x), x.astype(np.float16).view(np.uint16))
    assert np.isnan(half_bits(np.array([np.nan], np.float32)).view(np.float16)).all()


def test_float16_and_memmap_outputs(lk64, feats64, tmp_path):
    ref, ref_mass, _ = render_volume(lk64, feats64, bins=6, backend="reference", out_dtype=torch.float16)
    out, mass, _ = render_volume(
        lk64, feats64, bins=6, backend="fast", out_dtype=torch.float16, out=tmp_path / "v.npy"
    )
    assert out.dtype == torch.float16
    # float64 -> float16 (reference) vs float64 -> float32 -> float16 (engine): equal or one half ulp apart
    diff = (out.double() - ref.double()).abs()
    assert float(diff.max()) <= 2.0**-10 * float(ref.double().abs().max())
    assert float((diff > 0).double().mean()) < 1e-3
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), out.numpy())
    torch.testing.assert_close(mass, ref_mass)


def test_batches_bins_and_threads_do_not_change_the_result(lk64, feats64):
    full, fm, _ = render_volume(lk64, feats64, bins=11, backend="fast", band=4)
    # a tiny budget: one anchor row and one chunk of bins per batch
    small, sm, _ = render_volume(lk64, feats64, bins=11, backend="fast", band=4, budget_bytes=1)
    torch.testing.assert_close(small, full, atol=1e-13, rtol=0)
    assert torch.equal(sm, fm)
    torch.set_num_threads(2)
    two, tm, _ = render_volume(lk64, feats64, bins=11, backend="fast", band=4)
    torch.set_num_threads(1)
    torch.testing.assert_close(two, full, atol=1e-13, rtol=0)
    torch.testing.assert_close(tm, fm, atol=1e-7, rtol=1e-6)  # torch's threaded softmax of log M


def test_progress_and_estimate(lk64, feats64):
    seen = []
    render_volume(
        lk64, feats64, bins=3, backend="fast", budget_bytes=1, progress=lambda r, n: seen.append((r, n))
    )
    assert seen[-1] == (29, 29) and [r for r, _ in seen] == sorted({r for r, _ in seen})
    est = estimate_volume_bytes(64, 64, (480, 640), torch.float16, radius=8, lr_size=(30, 40), backend="fast")
    ref = estimate_volume_bytes(
        64, 64, (480, 640), torch.float16, radius=8, lr_size=(30, 40), backend="reference"
    )
    assert est.volume == ref.volume and 0 < est.working <= 256 << 20


def test_errors(lk64, feats64):
    with pytest.raises(ValueError, match="backend='fast' writes float16/32/64 volumes"):
        render_volume(lk64, feats64, bins=3, backend="fast", out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend must be one of"):
        render_volume(lk64, feats64, bins=3, backend="gpu")
    # auto falls back to the reference for a dtype the engine does not write
    v, _, _ = render_volume(lk64, feats64, bins=3, out_dtype=torch.bfloat16)
    assert v.dtype == torch.bfloat16
    from ua3d.core.fast_volume import kernel_render_volume

    k = lk64.kernel
    with pytest.raises(ValueError, match="kernel_render_volume needs one frame with a depth group"):
        kernel_render_volume(
            k.params,
            k.guide_hr,
            k.guide_lr,
            k.valid_lr[:, :1],
            feats64,
            k.radius,
            None,
            torch.zeros(3),
            torch.zeros(29, 37, dtype=torch.int64),
            3,
            torch.zeros(5, 3, 29, 37),
            torch.zeros(3, 29, 37),
        )
    with pytest.raises(ValueError, match=r"volume must be \[5, 3, 29, 37\]"):
        kernel_render_volume(
            k.params,
            k.guide_hr,
            k.guide_lr,
            k.valid_lr,
            feats64,
            k.radius,
            None,
            torch.zeros(3),
            torch.zeros(29, 37, dtype=torch.int64),
            3,
            torch.zeros(5, 3, 29, 36),
            torch.zeros(3, 29, 37),
        )


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the CUDA path (reference) is not tested"
)
def test_cuda_inputs_use_the_reference_path(lk64, feats64):
    import copy

    cpu, cpu_mass, _ = render_volume(lk64, feats64, bins=5, backend="fast")
    lc = copy.copy(lk64)
    lc.kernel = copy.copy(lk64.kernel)
    for name in ("params", "guide_hr", "guide_lr", "valid_hr", "valid_lr"):
        setattr(lc.kernel, name, getattr(lk64.kernel, name).cuda())
    for name in ("depth", "depth_valid", "depth_lr", "depth_lr_valid", "depth_lr_grad"):
        setattr(lc, name, getattr(lk64, name).cuda())
    v, m, _ = render_volume(lc, feats64.cuda(), bins=5)
    assert v.device.type == "cuda"
    torch.testing.assert_close(v.cpu(), cpu, atol=1e-10, rtol=0)
    torch.testing.assert_close(m.cpu(), cpu_mass, atol=1e-5, rtol=1e-5)


def test_batched_bmm_path_matches_the_fused_one(lk64, feats64, monkeypatch):
    """The fallback without scipy's BLAS (batches of weights, ``torch.bmm``) renders the same volume."""
    from ua3d.core import fast_volume

    fused, fm, _ = render_volume(lk64, feats64, bins=7, backend="fast", band=2, out_dtype=torch.float16)
    ref, _, _ = render_volume(lk64, feats64, bins=7, backend="fast", band=2)
    monkeypatch.setattr(fast_volume, "FUSED", False)
    for budget in (256 << 20, 1):  # one batch; one block and one chunk of bins per batch
        batched, bm, _ = render_volume(lk64, feats64, bins=7, backend="fast", band=2, budget_bytes=budget)
        torch.testing.assert_close(batched, ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(bm, fm)
    b16, _, _ = render_volume(lk64, feats64, bins=7, backend="fast", band=2, out_dtype=torch.float16)
    # two BLAS libraries (MKL, OpenBLAS) may round the float64 products apart: at most one half ulp
    torch.testing.assert_close(b16.float(), fused.float(), atol=2.0**-10 * float(fused.abs().max()), rtol=0)
