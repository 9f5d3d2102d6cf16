"""Dataset readers: layouts, unit conversions (hand-computed values) and the shared real data."""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ua3d.depth.datasets import (
    DATASETS,
    disparity_to_depth,
    load_dataset,
    read_nyuv2,
    read_pfm,
    sample_to_tensors,
    scaled_depth_png,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(folder: str) -> Path:
    path = SHARED / folder
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (it sits at ../shared/data beside the checkout)")
    return path


# ---------------------------------------------------------------- conversions, hand-computed values


def test_disparity_to_depth_middlebury2005_formula():
    # 160 * 3740 / (100 + 200) = 598400 / 300; 598400 / 424 = 1411.3207...
    out = disparity_to_depth(np.array([0.0, 100.0, 224.0]), 3740.0, 160.0, 200.0)
    assert np.isnan(out[0])
    np.testing.assert_allclose(out[1:], [1994.6667, 1411.3208], rtol=1e-6)
    assert out.dtype == np.float32


def test_disparity_to_depth_unknown_codes():
    out = disparity_to_depth(
        np.array([np.inf, np.nan, 0.0, -50.0, 110.0]), 1870.0, 160.0, 100.0, zero_invalid=False
    )
    # inf / nan unknown; 0 is a real disparity when zero_invalid=False: 299200 / 100; d + doffs <= 0 -> NaN
    assert np.isnan(out[[0, 1]]).all()
    np.testing.assert_allclose(out[2], 2992.0)
    np.testing.assert_allclose(out[3], 299200.0 / 50.0)  # -50 + 100 > 0 is a valid disparity here
    np.testing.assert_allclose(out[4], 299200.0 / 210.0, rtol=1e-6)  # 1424.7619
    assert np.isnan(disparity_to_depth(np.array([-150.0]), 1870.0, 160.0, 100.0, zero_invalid=False)[0])


def test_disparity_to_depth_rejects_bad_calibration():
    with pytest.raises(ValueError, match="focal_px and baseline must be positive"):
        disparity_to_depth(np.ones(3), 0.0, 160.0)


def test_scaled_depth_png_hand_values(tmp_path):
    raw = np.array([[0, 1000], [5000, 65535]], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), raw)
    tum = scaled_depth_png(tmp_path / "d.png", 5000.0)
    assert np.isnan(tum[0, 0])
    np.testing.assert_allclose(tum[[0, 1, 1], [1, 0, 1]], [0.2, 1.0, 13.107], rtol=1e-6)
    redwood = scaled_depth_png(tmp_path / "d.png", 1000.0)
    np.testing.assert_allclose(redwood[1, 0], 5.0)


def test_read_pfm_flips_rows_and_handles_byte_order(tmp_path):
    data = np.arange(6, dtype=np.float32).reshape(2, 3)  # top-to-bottom
    for scale, dtype in ((-1.0, "<f4"), (1.0, ">f4")):
        path = tmp_path / f"x{scale}.pfm"
        header = f"Pf\n3 2\n{scale}\n".encode()
        path.write_bytes(header + np.flipud(data).astype(dtype).tobytes())  # PFM stores bottom row first
        np.testing.assert_array_equal(read_pfm(path), data)


# ---------------------------------------------------------------- registry and layout errors


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match=r"unknown dataset name 'kitti'; expected one of middlebury-gdsr, "):
        load_dataset("kitti", "/tmp")
    assert set(DATASETS) == {
        "middlebury-gdsr",
        "middlebury2005",
        "middlebury2014",
        "nyuv2",
        "nyu-raw",
        "park2011",
        "sunrgbd",
        "redwood",
        "tum",
        "motorcycle",
    }


def test_load_dataset_layout_mismatch_names_folder_and_expectation(tmp_path):
    (tmp_path / "scene").mkdir()
    with pytest.raises(ValueError, match=r"middlebury2005: folder '.*' does not match .*dmin\.txt"):
        load_dataset("middlebury2005", tmp_path)
    with pytest.raises(ValueError, match=r"redwood: folder .* color/ and depth/"):
        load_dataset("redwood", tmp_path)
    with pytest.raises(ValueError, match="the folder does not exist"):
        load_dataset("tum", tmp_path / "missing")
    with pytest.raises(ValueError, match="needs a root folder"):
        load_dataset("nyuv2", None)


def test_gdsr_flat_layout_pairs_by_prefix(tmp_path):
    (tmp_path / "RGB").mkdir()
    (tmp_path / "Depth").mkdir()
    for i in (2, 1):
        Image.fromarray(np.full((4, 5, 3), i, np.uint8)).save(
            tmp_path / "RGB" / f"Middlebury_0{i}_output_color.png"
        )
        Image.fromarray(np.full((4, 5), 10 * i, np.uint8)).save(
            tmp_path / "Depth" / f"Middlebury_0{i}_output_depth.png"
        )
    samples = load_dataset("middlebury-gdsr", tmp_path)
    assert [s.name for s in samples] == ["Middlebury_01", "Middlebury_02"]
    rgb, depth = samples[1].load()
    assert rgb[0, 0, 0] == 2 and depth[0, 0] == 20.0 and depth.dtype == np.float32


def test_tum_timestamp_layout(tmp_path):
    (tmp_path / "rgb").mkdir()
    (tmp_path / "depth").mkdir()
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "rgb" / "100.000000.png")
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "rgb" / "100.500000.png")
    cv2.imwrite(str(tmp_path / "depth" / "100.010000.png"), np.full((3, 4), 5000, np.uint16))
    cv2.imwrite(
        str(tmp_path / "depth" / "100.300000.png"), np.full((3, 4), 5000, np.uint16)
    )  # no rgb in 20 ms
    samples = load_dataset("tum", tmp_path)
    assert [s.name for s in samples] == ["100.010000"]
    assert samples[0].meta.source[0].endswith("100.000000.png")
    np.testing.assert_allclose(samples[0].load()[1], 1.0)


def test_nyuv2_labelled_mat_is_transposed_back(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (3, 4, 5, 3), dtype=np.uint8)  # [N, H, W, 3]
    depth = rng.uniform(0.5, 9.0, (3, 4, 5)).astype(np.float32)
    depth[1, 0, 0] = 0.0
    with h5py.File(tmp_path / "nyu_depth_v2_labeled.mat", "w") as f:  # MATLAB v7.3 as h5py sees it
        f["images"] = rgb.transpose(0, 3, 2, 1)  # [N, 3, W, H]
        f["depths"] = depth.transpose(0, 2, 1)  # [N, W, H]
    samples = read_nyuv2(tmp_path, indices=[1, 2, 7])
    assert [s.name for s in samples] == ["0001", "0002"]
    got_rgb, got_depth = samples[0].load()
    np.testing.assert_array_equal(got_rgb, rgb[1])
    assert np.isnan(got_depth[0, 0])
    np.testing.assert_array_equal(got_depth.ravel()[1:], depth[1].ravel()[1:])
    assert samples[0].meta.units == "m" and samples[0].meta.intrinsics[0, 0] == pytest.approx(518.8579)
    with pytest.raises(ValueError, match="has 3 frames; none of the DKN test split 1000-1448"):
        read_nyuv2(tmp_path / "nyu_depth_v2_labeled.mat")


def test_sample_to_tensors_shapes_and_range():
    rgb = np.full((2, 3, 3), 255, np.uint8)
    guide, depth = sample_to_tensors(rgb, np.ones((2, 3), np.float32))
    assert guide.shape == (1, 3, 2, 3) and depth.shape == (1, 1, 2, 3)
    assert guide.dtype == torch.float32 and float(guide.max()) == 1.0
    with pytest.raises(ValueError, match=r"rgb must be \[H, W, 3\]"):
        sample_to_tensors(rgb, np.ones((3, 3), np.float32))


# ---------------------------------------------------------------- shared real data


def test_middlebury_gdsr_dev():
    samples = load_dataset("middlebury-gdsr", shared("middlebury-gdsr-dev"))
    assert [s.name for s in samples] == [
        "02_Art",
        "06_Books",
        "13_Cones",
        "14_Dolls",
        "18_Laundry",
        "21_Moebius",
        "27_Teddy",
        "30_Venus",
    ]
    rgb, depth = samples[0].load()
    assert rgb.shape == (370, 463, 3) and rgb.dtype == np.uint8
    assert depth.shape == (370, 463) and depth.dtype == np.float32 and samples[0].meta.units == "0-255"
    raw = np.asarray(Image.open(samples[0].meta.source[1]))
    np.testing.assert_array_equal(depth, raw.astype(np.float32))
    assert (depth.min(), depth.max()) == (71.0, 230.0)


def test_middlebury2005_third():
    samples = load_dataset("middlebury2005", shared("middlebury2005-third"))
    assert [s.name for s in samples] == ["Art", "Books", "Dolls", "Laundry", "Moebius"]
    assert [s.meta.extra["dmin"] for s in samples] == [200.0, 200.0, 200.0, 230.0, 200.0]
    _, depth = samples[0].load()
    disp = np.asarray(Image.open(samples[0].meta.source[1]))
    np.testing.assert_array_equal(np.isnan(depth), disp == 0)
    v = int(disp[185, 230])
    np.testing.assert_allclose(depth[185, 230], 160 * 3740 / (v + 200), rtol=1e-6)
    assert 1300 < np.nanmin(depth) and np.nanmax(depth) < 3000  # Art is 1.4-2.2 m from the cameras


def test_middlebury2014_art_half():
    samples = load_dataset("middlebury2014", shared("middlebury2014fmt-ArtL-H"))
    assert [s.name for s in samples] == ["ArtL"]
    rgb, depth = samples[0].load()
    assert rgb.shape == (554, 694, 3) and depth.shape == (554, 694)
    # the first float of the file (bottom-left pixel) is 110.0: 160 * 1870 / (110 + 100)
    np.testing.assert_allclose(depth[-1, 0], 299200.0 / 210.0, rtol=1e-6)
    disp_pil = np.asarray(Image.open(samples[0].meta.source[1]))  # PIL reads PFM top-to-bottom
    np.testing.assert_array_equal(np.isnan(depth), ~np.isfinite(disp_pil))
    np.testing.assert_array_equal(read_pfm(samples[0].meta.source[1]), disp_pil)
    np.testing.assert_array_equal(samples[0].meta.intrinsics, [[1870, 0, 297], [0, 1870, 277], [0, 0, 1]])


def test_nyuv2_dkn_frames():
    samples = load_dataset("nyuv2", shared("nyuv2-dkn-test"))
    assert [s.name for s in samples] == ["1000", "1001", "1002"]
    rgb, depth = samples[0].load()
    assert rgb.shape == (480, 640, 3) and depth.shape == (480, 640) and samples[0].meta.units == "m"
    np.testing.assert_allclose([depth.min(), depth.max()], [0.7139339, 4.01679], rtol=1e-6)


def test_redwood_sample5():
    samples = load_dataset("redwood", shared("redwood-open3d/sample5"))
    assert [s.name for s in samples] == ["00000", "00001", "00002", "00003", "00004"]
    _, depth = samples[0].load()
    raw = cv2.imread(samples[0].meta.source[1], cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(np.isnan(depth), raw == 0)
    np.testing.assert_allclose(depth[raw > 0], raw[raw > 0] / 1000.0, rtol=1e-6)
    k = samples[0].meta.intrinsics
    np.testing.assert_array_equal(k, [[525.0, 0, 319.5], [0, 525.0, 239.5], [0, 0, 1]])


def test_tum_open3d_frame():
    samples = load_dataset("tum", shared("tum-open3d"))
    assert [s.name for s in samples] == ["frame0/TUM_depth"]
    _, depth = samples[0].load()
    np.testing.assert_allclose(np.nanmax(depth), 46655 / 5000.0, rtol=1e-6)
    assert 0.15 < np.isnan(depth).mean() < 0.25  # 19.2 % of this frame are sensor holes


def test_motorcycle_from_skimage():
    pytest.importorskip("skimage")
    samples = load_dataset("motorcycle")
    rgb, depth = samples[0].load()
    assert rgb.shape == (500, 741, 3) and depth.shape == (500, 741)
    from skimage.data import stereo_motorcycle

    disp = stereo_motorcycle()[2]
    np.testing.assert_array_equal(np.isnan(depth), ~np.isfinite(disp))
    i, j = 250, 370
    np.testing.assert_allclose(depth[i, j], 193.001 * 994.978 / (disp[i, j] + 31.086), rtol=1e-6)
