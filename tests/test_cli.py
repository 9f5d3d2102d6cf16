"""The ``ua3d`` command: each subcommand on small inputs, output files checked, errors are one line + exit 2."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from ua3d.cli import main
from ua3d.io.rgbd import read_depth, write_color, write_depth, write_intrinsics
from ua3d.rgbd.synthetic import make_scene


@pytest.fixture(scope="module")
def scene():
    return make_scene(seed=1, width=96, height=64, n_objects=3)


@pytest.fixture()
def files(tmp_path, scene):
    rgb = (scene["rgb"] * 255).round().astype(np.uint8)
    write_color(tmp_path / "rgb.png", rgb)
    write_depth(tmp_path / "depth.png", scene["depth_gt"], depth_scale=1000.0)
    write_intrinsics(tmp_path / "K.json", scene["camera"])
    lr_depth = scene["depth_gt"][3::4, 3::4]
    write_depth(tmp_path / "depth_lr.png", lr_depth, depth_scale=1000.0)
    feats = np.random.default_rng(0).standard_normal((5, 4, 6)).astype(np.float32)  # [C, h, w]
    np.save(tmp_path / "feats.npy", feats)
    return tmp_path, rgb, feats


def test_upsample_writes_hr_features_inside_the_lr_range(files, capsys):
    d, _rgb, feats = files
    rc = main(["upsample", "--image", str(d / "rgb.png"), "--signal", str(d / "feats.npy"), "--layout", "chw",
               "--out", str(d / "hr.npy"), "--steps", "3", "--radius", "3", "--quiet"])
    assert rc == 0
    hr = np.load(d / "hr.npy")
    assert hr.shape == (5, 64, 96)
    lo, hi = feats.min(axis=(1, 2)), feats.max(axis=(1, 2))
    assert (hr >= lo[:, None, None] - 1e-5).all() and (hr <= hi[:, None, None] + 1e-5).all()


def test_depth_sr_round_trips_16bit_png_in_mm(files, scene):
    d, _, _ = files
    rc = main(["depth-sr", "--rgb", str(d / "rgb.png"), "--depth", str(d / "depth_lr.png"), "--out",
               str(d / "hr.png"), "--steps", "3", "--quiet"])
    assert rc == 0
    raw = cv2.imread(str(d / "hr.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (64, 96)
    hr = read_depth(d / "hr.png", depth_scale=1000.0)
    gt = scene["depth_gt"]
    ok = (hr > 0) & (gt > 0)
    assert ok.mean() > 0.95
    # units pass through (mm in, mm out): a unit slip would be off by 1000x, a shift by far more than 3%
    assert np.median(np.abs(hr[ok] - gt[ok]) / gt[ok]) < 0.03


def test_lift_writes_volume_and_point_cloud(files, scene):
    d, _, _feats = files
    out = d / "lift"
    rc = main(["lift", "--rgb", str(d / "rgb.png"), "--depth", str(d / "depth.png"), "--intrinsics",
               str(d / "K.json"), "--features", str(d / "feats.npy"), "--layout", "chw", "--bins", "6",
               "--steps", "2", "--radius", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    with np.load(out / "volume.npz") as z:
        assert z["volume"].shape == (5, 6, 64, 96)
        assert z["mass"].shape == (6, 64, 96)
        assert np.all(np.diff(z["bin_depths"]) > 0)
    with np.load(out / "points.npz") as z:
        n = int((scene["depth_gt"] > 0).sum())
        assert z["positions"].shape == (n, 3) and z["features"].shape == (n, 5)
        # positions are metric: their z equals the observed depth (mm rounding)
        np.testing.assert_allclose(np.sort(z["positions"][:, 2]), np.sort(scene["depth_gt"][scene["depth_gt"] > 0]),
                                   atol=6e-4)
    assert (out / "points.ply").stat().st_size > 0


def test_eval_depth_sr_on_a_tiny_gdsr_layout(tmp_path, capsys):
    root = tmp_path / "gdsr"
    rng = np.random.default_rng(0)
    for i, name in enumerate(["01_A", "02_B"]):
        (root / name).mkdir(parents=True)
        rgb = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        depth = np.tile(np.linspace(40, 200, 32, dtype=np.float64), (32, 1)).astype(np.uint8)
        cv2.imwrite(str(root / name / f"M_{i:02d}_output_color.png"), rgb[..., ::-1])
        cv2.imwrite(str(root / name / f"M_{i:02d}_output_depth.png"), depth)
    rc = main(["eval", "depth-sr", "--dataset", "middlebury-gdsr", "--root", str(root), "--scales", "4",
               "--protocol", "B", "--methods", "bicubic,nearest", "--json", str(tmp_path / "r.json"),
               "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    text = json.dumps(res)
    assert "bicubic" in text and "nearest" in text
    assert "| bicubic" in capsys.readouterr().out
    assert res["settings"]["device"] == "cpu"  # the common --device reaches the harness


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_passes_device_on_and_refuses_missing_cuda(capsys):
    rc = main(["eval", "depth-sr", "--dataset", "motorcycle", "--scales", "4", "--device", "cuda"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "ua3d: error: --device cuda requested but no CUDA device is available"


def test_view_renders_png_headless(tmp_path):
    pytest.importorskip("open3d")
    from ua3d.viz.o3d_render import RenderingUnavailable, import_open3d

    try:
        import_open3d()
    except RenderingUnavailable as e:  # pragma: no cover
        pytest.skip(str(e))
    rng = np.random.default_rng(0)
    pos = rng.random((500, 3)).astype(np.float32) + np.array([0, 0, 2], np.float32)
    np.savez(tmp_path / "p.npz", positions=pos, colors=rng.random((500, 3)).astype(np.float32),
             features=rng.standard_normal((500, 8)).astype(np.float32))
    rc = main(["view", "points", str(tmp_path / "p.npz"), "--png", str(tmp_path / "p.png")])
    assert rc == 0
    img = cv2.imread(str(tmp_path / "p.png"))
    assert img is not None and img.std() > 1.0  # not blank


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["upsample", "--image", "nope.png", "--signal", "x.npy", "--out", "o.npy"], "nope.png"),
        (["depth-sr", "--rgb", "{d}/rgb.png", "--depth", "{d}/feats.npy", "--out", "{d}/o.png"], "feats.npy"),
        (["upsample", "--image", "{d}/rgb.png", "--signal", "{d}/bad.npy", "--layout", "chw", "--out", "{d}/o.npy"],
         "does not divide the image"),
        (["lift", "--rgb", "{d}/rgb.png", "--depth", "{d}/depth_lr.png", "--intrinsics", "{d}/K.json",
          "--features", "{d}/feats.npy", "--layout", "chw", "--out", "{d}/o"], "does not match the colour image"),
        (["upsample", "--image", "{d}/notimage.png", "--signal", "{d}/feats.npy", "--out", "{d}/o.npy"],
         "notimage.png"),
    ],
    ids=["missing-file", "unreadable-depth", "grid-not-dividing", "mismatched-sizes", "unreadable-image"],
)
def test_bad_input_is_one_line_and_exit_code_2(files, argv, msg, capsys):
    d, _, _ = files
    np.save(d / "bad.npy", np.zeros((2, 5, 7), np.float32))
    (d / "notimage.png").write_bytes(b"this is not a png")
    rc = main([a.format(d=d) for a in argv] + ["--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("ua3d: error:") and msg in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_the_traceback(files):
    d, _, _ = files
    with pytest.raises((FileNotFoundError, ValueError)):
        main(["upsample", "--image", str(d / "missing.png"), "--signal", str(d / "feats.npy"), "--out",
              str(d / "o.npy"), "--debug"])


def test_every_subcommand_has_help(capsys):
    for cmd in ["demo", "upsample", "depth-sr", "lift", "view"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: ua3d" in capsys.readouterr().out


def test_demo_tiny_writes_sensible_outputs(tmp_path):
    out = tmp_path / "demo"
    rc = main(["demo", "--tiny", "--steps", "4", "--bins", "8", "--out", str(out), "--quiet"])
    assert rc == 0
    for f in ["summary.txt", "summary.json", "features.png", "depth_sr.png", "points.ply", "points.npz",
              "volume.npz"]:
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert s["psnr_db"]["ua3d_2d"] > s["psnr_db"]["bicubic"]
    acc = s["label_accuracy"]["all_valid"]
    assert 0.5 < acc["ua3d_rgbd"] <= 1.0
    img = cv2.imread(str(out / "features.png"))
    assert img is not None and img.std() > 5
    torch.testing.assert_close(torch.tensor(s["grid"]), torch.tensor([15, 20]))
