"""LR generation protocols A (interval sampling) and B (PIL bicubic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ua3d.depth.protocols import crop_to_multiple, make_lr, pil_resize


def ramp(h: int, w: int) -> np.ndarray:
    return (np.arange(h * w, dtype=np.float32).reshape(h, w) + 1.0) * 0.5


def test_protocol_a_is_interval_sampling():
    hr_in = ramp(10, 13)
    hr, lr = make_lr(hr_in, 4, "A")
    assert hr.shape == (8, 12) and lr.shape == (2, 3)
    np.testing.assert_array_equal(lr, hr_in[3::4, 3::4][:2, :3])
    np.testing.assert_array_equal(
        lr, [[hr_in[3, 3], hr_in[3, 7], hr_in[3, 11]], [hr_in[7, 3], hr_in[7, 7], hr_in[7, 11]]]
    )
    assert np.shares_memory(hr, hr_in)  # the crop is a view, no copy


def test_protocol_b_is_pil_bicubic_bit_for_bit():
    rng = np.random.default_rng(1)
    hr_in = rng.uniform(20, 230, (37, 50)).astype(np.float32)
    hr, lr = make_lr(hr_in, 8, "B")
    assert hr.shape == (32, 48) and lr.shape == (4, 6)
    ref = np.asarray(Image.fromarray(hr_in[:32, :48].copy(), mode="F").resize((6, 4), Image.BICUBIC))
    np.testing.assert_array_equal(lr, ref)


def test_protocol_b_excludes_holes_instead_of_zeros():
    hr_in = np.full((32, 32), 100.0, np.float32)
    hr_in[4:6, 4:6] = np.nan  # small hole: LR stays exactly 100 nearby
    hr_in[16:, 16:] = np.nan  # large hole: LR pixels there have no support
    _, lr = make_lr(hr_in, 4, "B")
    finite = np.isfinite(lr)
    np.testing.assert_allclose(lr[finite], 100.0, rtol=1e-6)
    assert finite[0:2, 0:2].all()
    assert not finite[5:, 5:].any()
    assert finite[:3, :].all() and finite[:, :3].all()


def test_protocol_a_keeps_holes_as_nan():
    hr_in = ramp(8, 8)
    hr_in[3, 3] = np.nan
    _, lr = make_lr(hr_in, 4, "A")
    assert np.isnan(lr[0, 0]) and np.isfinite(lr).sum() == 3


def test_torch_batched_input_keeps_device_and_dtype():
    x = torch.from_numpy(np.stack([ramp(16, 20), 2 * ramp(16, 20)]))[:, None].double()  # [2, 1, 16, 20]
    hr, lr = make_lr(x, 4, "B")
    assert isinstance(lr, torch.Tensor) and lr.shape == (2, 1, 4, 5) and lr.dtype == torch.float64
    ref = pil_resize(ramp(16, 20), (5, 4))
    np.testing.assert_allclose(lr[0, 0].numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(lr[1, 0].numpy(), 2 * ref, rtol=1e-5)  # linear in the depth
    assert hr.shape == (2, 1, 16, 20)


def test_crop_to_multiple():
    assert crop_to_multiple(np.zeros((3, 17, 33)), 16).shape == (3, 16, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": 0}, "scale must be a positive integer, got 0"),
        ({"scale": 2.5}, "scale must be a positive integer, got 2.5"),
        ({"scale": 32}, r"depth of shape \(10, 13\) is smaller than scale 32"),
        ({"scale": 2, "protocol": "C"}, r"protocol must be one of \('A', 'A-start', 'B', 'area'\), got 'C'"),
        ({"scale": 2, "min_coverage": 0.0}, r"min_coverage must be in \(0, 1\], got 0.0"),
    ],
)
def test_make_lr_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_lr(ramp(10, 13), **kwargs)


def test_a_start_and_area_protocols():
    """A-start keeps hr[::s]; area is the mean of the valid pixels of each block (hole below min_coverage)."""
    hr = np.arange(64, dtype=np.float32).reshape(8, 8)
    hr[0, 0] = np.nan
    hr[4:6, 4:6] = np.nan
    _, a0 = make_lr(hr, 2, "A-start")
    assert np.array_equal(a0, hr[::2, ::2], equal_nan=True)
    _, area = make_lr(hr, 2, "area")
    assert area[0, 0] == pytest.approx(np.mean([1, 8, 9]))  # the NaN is left out
    assert np.isnan(area[2, 2])  # a block of 4 holes
    assert area[3, 3] == pytest.approx(np.mean(hr[6:8, 6:8]))
    _, strict = make_lr(hr, 2, "area", min_coverage=1.0)
    assert np.isnan(strict[0, 0]) and strict[3, 3] == area[3, 3]
