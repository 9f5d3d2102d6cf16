"""The ``ua3d`` command: each subcommand on small inputs, output files checked, errors are one line + exit 2.

Most tests call ``ua3d.cli.main([...])`` in-process; a few run the real command in a subprocess (progress
bars on stderr, ``--png`` pictures, the wheel). Items of issue 20 are named ``[20.N]`` in the docstrings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ua3d.cli import build_parser, main
from ua3d.io.rgbd import read_depth, write_color, write_depth, write_intrinsics
from ua3d.rgbd.synthetic import make_scene

ROOT = Path(__file__).resolve().parents[1]


def _ua3d(*args, cwd=None, env_path=None, timeout=300):
    """Run the real ``ua3d`` command (``python -m ua3d.cli``) in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(env_path or ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ua3d.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _open3d_renders():
    pytest.importorskip("open3d")
    from ua3d.viz.o3d_render import RenderingUnavailable, import_open3d

    try:
        import_open3d()
    except RenderingUnavailable as e:  # pragma: no cover
        pytest.skip(str(e))


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


def _lift_args(d, out, *extra):
    return [
        "lift",
        "--rgb",
        d / "rgb.png",
        "--depth",
        d / "depth.png",
        "--intrinsics",
        d / "K.json",
        "--features",
        d / "feats.npy",
        "--bins",
        "4",
        "--steps",
        "2",
        "--radius",
        "2",
        "--out",
        out,
        *extra,
    ]


# --------------------------------------------------------------------------- upsample
def test_upsample_writes_hr_features_inside_the_lr_range(files, capsys):
    d, _rgb, feats = files
    rc = main(
        [
            "upsample",
            "--image",
            str(d / "rgb.png"),
            "--signal",
            str(d / "feats.npy"),
            "--layout",
            "chw",
            "--out",
            str(d / "hr.npy"),
            "--steps",
            "3",
            "--radius",
            "3",
            "--quiet",
        ]
    )
    assert rc == 0
    hr = np.load(d / "hr.npy")
    assert hr.shape == (5, 64, 96)
    lo, hi = feats.min(axis=(1, 2)), feats.max(axis=(1, 2))
    assert (hr >= lo[:, None, None] - 1e-5).all() and (hr <= hi[:, None, None] + 1e-5).all()


def test_upsample_png_figure_in_a_real_run(files):
    """[20.1] --png used to fail on every run (PCA colours were passed where features belong); [20.7] the
    fit shows a bar naming its stage on stderr."""
    d, _, _ = files
    r = _ua3d(
        "upsample",
        "--image",
        d / "rgb.png",
        "--signal",
        d / "feats.npy",
        "--out",
        d / "hr.npy",
        "--png",
        d / "fig.png",
        "--steps",
        "3",
        "--radius",
        "3",
    )
    assert r.returncode == 0, r.stderr
    img = cv2.imread(str(d / "fig.png"))
    assert img is not None and img.std() > 5
    assert "upsample: fit (TTO steps)" in r.stderr
    assert "upsampled 5 channels (chw) 6x4 -> 96x64" in r.stdout  # sizes W x H


def test_upsample_any_grid_ratio_and_layout_by_aspect(files):
    """[20.9] a grid that does not divide the image (the API handles it) is accepted; [20.10] --layout auto
    reads an [h, w, C] array by the image's aspect ratio, not the smallest axis."""
    d, _, _ = files
    np.save(d / "odd.npy", np.random.default_rng(1).standard_normal((3, 5, 7)).astype(np.float32))  # 7x5 grid
    assert (
        main(
            [
                "upsample",
                "--image",
                str(d / "rgb.png"),
                "--signal",
                str(d / "odd.npy"),
                "--out",
                str(d / "odd_hr.npy"),
                "--steps",
                "2",
                "--radius",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert np.load(d / "odd_hr.npy").shape == (3, 64, 96)
    # [h=8, w=12, C=30]: the smallest-axis rule would read C=8 on a 30x12 grid; the 12x8 grid has the image's 3:2
    np.save(d / "hwc.npy", np.random.default_rng(2).standard_normal((8, 12, 30)).astype(np.float32))
    assert (
        main(
            [
                "upsample",
                "--image",
                str(d / "rgb.png"),
                "--signal",
                str(d / "hwc.npy"),
                "--out",
                str(d / "hwc_hr.npy"),
                "--steps",
                "2",
                "--radius",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert np.load(d / "hwc_hr.npy").shape == (30, 64, 96)


# --------------------------------------------------------------------------- depth-sr
def test_depth_sr_round_trips_16bit_png_in_mm(files, scene):
    d, _, _ = files
    rc = main(
        [
            "depth-sr",
            "--rgb",
            str(d / "rgb.png"),
            "--depth",
            str(d / "depth_lr.png"),
            "--out",
            str(d / "hr.png"),
            "--steps",
            "3",
            "--quiet",
        ]
    )
    assert rc == 0
    raw = cv2.imread(str(d / "hr.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (64, 96)
    hr = read_depth(d / "hr.png", depth_scale=1000.0)
    gt = scene["depth_gt"]
    ok = (hr > 0) & (gt > 0)
    assert ok.mean() > 0.95
    # units pass through (mm in, mm out): a unit slip would be off by 1000x, a shift by far more than 3%
    assert np.median(np.abs(hr[ok] - gt[ok]) / gt[ok]) < 0.03


# --------------------------------------------------------------------------- lift
def test_lift_writes_volume_and_point_cloud(files, scene):
    """[20.11] the volume stores the guide rgb/depth; [20.14] --half is what is saved; [20.4] the PLY has
    uchar colours (the image's) and the features, and Open3D reads them."""
    o3d = pytest.importorskip("open3d")
    d, rgb, _feats = files
    out = d / "lift"
    assert main([str(a) for a in _lift_args(d, out, "--half", "--quiet")]) == 0
    with np.load(out / "volume.npz") as z:
        assert z["volume"].shape == (5, 4, 64, 96) and z["volume"].dtype == np.float16
        assert z["mass"].shape == (4, 64, 96)
        assert np.all(np.diff(z["bin_depths"]) > 0)
        np.testing.assert_array_equal(z["rgb"], rgb)
        np.testing.assert_allclose(z["depth"], scene["depth_gt"], atol=6e-4)
    header = (out / "points.ply").read_bytes()[:1200].decode("latin-1")
    assert "property uchar red" in header and "comment ua3d colors rgb" in header
    assert "property float features_4" in header
    pcd = o3d.io.read_point_cloud(str(out / "points.ply"))
    valid = scene["depth_gt"] > 0
    assert len(pcd.points) == int(valid.sum())
    cols = np.asarray(pcd.colors)
    assert cols.max() > 0.5  # real colours (up to 1.0), not float colours read back as 1/255 steps
    np.testing.assert_allclose(cols, rgb[valid] / 255.0, atol=1e-6)  # row-major valid pixels
    np.testing.assert_allclose(
        np.sort(np.asarray(pcd.points)[:, 2]), np.sort(scene["depth_gt"][valid]), atol=6e-4
    )
    t = o3d.t.io.read_point_cloud(str(out / "points.ply"))
    assert {"features_0", "features_4"} <= set(t.point)


def test_lift_pca_colours_and_pcd_format(files):
    """[20.4] PCA colours on request, said in the file; --format pcd states what it drops."""
    d, _, _ = files
    out = d / "lift_pcd"
    r = _ua3d(*_lift_args(d, out, "--format", "pcd", "--colors", "pca"))
    assert r.returncode == 0, r.stderr
    assert "note: .pcd drops the pixel indices" in r.stdout
    from ua3d.rgbd.formats import read_point_cloud

    p = read_point_cloud(out / "points.pcd")
    assert p["features"].shape[1] == 5 and p["colors"].std(0).min() > 0.05
    # [20.7] the long stages of lift show bars naming the running stage
    for stage in ("lift: fit (TTO steps)", "lift: volume (4 bins)", "lift: writing files"):
        assert stage in r.stderr, stage


def test_view_reads_what_lift_wrote(files, capsys):
    """[20.5] `view points` reads the .ply lift wrote; `view volume --show-rgbd` shows the stored frame;
    [20.16] query by pixel (u, v)."""
    _open3d_renders()
    d, _, _ = files
    out = d / "lift"
    assert main([str(a) for a in _lift_args(d, out, "--quiet")]) == 0
    assert (
        main(
            [
                "view",
                "points",
                str(out / "points.ply"),
                "--png",
                str(d / "p.png"),
                "--query-pixel",
                "40",
                "30",
                "--width",
                "160",
                "--height",
                "120",
            ]
        )
        == 0
    )
    assert "6144 points" in capsys.readouterr().out
    assert (
        main(
            [
                "view",
                "volume",
                str(out / "volume.npz"),
                "--png",
                str(d / "v.png"),
                "--show-rgbd",
                "--width",
                "160",
                "--height",
                "120",
                "--quiet",
            ]
        )
        == 0
    )
    for f in ("p.png", "v.png"):
        img = cv2.imread(str(d / f))
        assert img is not None and img.std() > 5
    rc = main(
        ["view", "points", str(out / "points.ply"), "--png", str(d / "q.png"), "--query-pixel", "500", "3"]
    )
    assert rc == 2 and "no point at pixel (u=500, v=3)" in capsys.readouterr().err


def test_npz_readers_name_a_file_of_the_wrong_kind(files, capsys):
    """[20.5] a PNG or a point cloud given as a volume: one clear message, not 'pickled (object) data'."""
    d, _, _ = files
    np.savez(d / "pts.npz", positions=np.zeros((3, 3), np.float32), features=np.zeros((3, 2), np.float32))
    assert main(["view", "volume", str(d / "rgb.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("ua3d: error:")
        and "rgb.png is a PNG image: expected a ua3d feature volume .npz" in err
    )
    assert main(["view", "volume", str(d / "pts.npz")]) == 2
    assert "pts.npz is a ua3d feature point cloud, not a feature volume" in capsys.readouterr().err
    assert main(["view", "points", str(d / "rgb.png")]) == 2
    assert "must end in .ply, .npz or .pcd" in capsys.readouterr().err


def test_lift_refuses_a_large_volume_before_any_work(files, capsys):
    """[20.12] the estimate is printed and a volume over the limit is refused before the fit; [20.14] the
    refused run leaves no output folder."""
    d, _, _ = files
    out = d / "big"
    t0 = time.perf_counter()
    rc = main([str(a) for a in _lift_args(d, out, "--max-volume-gib", "1e-6")])
    cap = capsys.readouterr()
    assert rc == 2 and "over --max-volume-gib" in cap.err
    assert "volume 5 channels x 4 bins x 96x64 float32" in cap.out
    assert not out.exists() and "lift: fit" not in cap.err
    assert time.perf_counter() - t0 < 30


def test_model_random_runs_without_weights_and_missing_weights_name_it(files, monkeypatch, capsys):
    """[20.14] --model random works without weights; missing weights or timm: one line naming the models."""
    d, _, _ = files
    base = [
        "lift",
        "--rgb",
        str(d / "rgb.png"),
        "--depth",
        str(d / "depth.png"),
        "--intrinsics",
        str(d / "K.json"),
        "--bins",
        "2",
        "--steps",
        "1",
        "--radius",
        "1",
        "--quiet",
    ]
    assert main([*base, "--model", "random", "--out", str(d / "r")]) == 0
    assert (d / "r" / "points.ply").is_file()
    monkeypatch.setenv("TORCH_HOME", str(d / "no-cache"))
    monkeypatch.setenv("HF_HOME", str(d / "no-cache"))
    assert main([*base, "--model", "dinov2_vits14", "--out", str(d / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ua3d: error:") and "random" in err and len(err.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed
    assert main([*base, "--model", "timm:vit_small_patch16_224", "--out", str(d / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ua3d: error:") and "Traceback" not in err and "--model random" in err


# --------------------------------------------------------------------------- eval
def test_eval_depth_sr_on_a_tiny_gdsr_layout(tmp_path, capsys):
    root = tmp_path / "gdsr"
    rng = np.random.default_rng(0)
    for i, name in enumerate(["01_A", "02_B"]):
        (root / name).mkdir(parents=True)
        rgb = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        depth = np.tile(np.linspace(40, 200, 32, dtype=np.float64), (32, 1)).astype(np.uint8)
        cv2.imwrite(str(root / name / f"M_{i:02d}_output_color.png"), rgb[..., ::-1])
        cv2.imwrite(str(root / name / f"M_{i:02d}_output_depth.png"), depth)
    rc = main(
        [
            "eval",
            "depth-sr",
            "--dataset",
            "middlebury-gdsr",
            "--root",
            str(root),
            "--scales",
            "4",
            "--protocol",
            "B",
            "--methods",
            "bicubic,nearest",
            "--json",
            str(tmp_path / "r.json"),
            "--quiet",
        ]
    )
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
    assert (
        capsys.readouterr().err.strip()
        == "ua3d: error: --device cuda requested but no CUDA device is available"
    )


def test_eval_errors_and_transfer_guard(capsys):
    """[20.6] eval errors use the one format; a missing task module is one clear line."""
    assert main(["eval", "depth-sr", "--dataset", "motorcycle", "--scales", "4", "--option", "nonsense"]) == 2
    assert capsys.readouterr().err.startswith("ua3d: error:")
    import importlib.util

    try:
        missing = importlib.util.find_spec("ua3d.eval.transfer") is None
    except ModuleNotFoundError:  # no ua3d.eval package at all
        missing = True
    if missing:
        assert main(["eval", "transfer"]) == 2
        assert capsys.readouterr().err.strip() == (
            "ua3d: error: ua3d eval transfer needs the module ua3d.eval.transfer, which this installation does not have"
        )


# --------------------------------------------------------------------------- view
def test_view_renders_png_headless(tmp_path):
    _open3d_renders()
    rng = np.random.default_rng(0)
    pos = rng.random((500, 3)).astype(np.float32) + np.array([0, 0, 2], np.float32)
    np.savez(
        tmp_path / "p.npz",
        positions=pos,
        colors=rng.random((500, 3)).astype(np.float32),
        features=rng.standard_normal((500, 8)).astype(np.float32),
    )
    rc = main(["view", "points", str(tmp_path / "p.npz"), "--png", str(tmp_path / "p.png")])
    assert rc == 0
    img = cv2.imread(str(tmp_path / "p.png"))
    assert img is not None and img.std() > 1.0  # not blank


def test_interactive_view_without_display_is_one_ua3d_error(tmp_path, monkeypatch, capsys):
    """[20.6] the interactive viewer's error has the ua3d prefix too."""
    pytest.importorskip("open3d")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "p.npz",
        positions=rng.random((50, 3)).astype(np.float32) + 2,
        features=rng.standard_normal((50, 4)).astype(np.float32),
    )
    assert main(["view", "points", str(tmp_path / "p.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ua3d: error:") and "use --png" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- errors and checks
@pytest.mark.parametrize(
    "argv,msg",
    [
        (["upsample", "--image", "nope.png", "--signal", "x.npy", "--out", "o.npy"], "nope.png"),
        (["depth-sr", "--rgb", "{d}/rgb.png", "--depth", "{d}/feats.npy", "--out", "{d}/o.png"], "feats.npy"),
        (
            [
                "upsample",
                "--image",
                "{d}/rgb.png",
                "--signal",
                "{d}/bad.npy",
                "--layout",
                "chw",
                "--out",
                "{d}/o.npy",
            ],
            "grid 7x200 is larger than the image 96x64 (WxH)",
        ),
        (
            [
                "lift",
                "--rgb",
                "{d}/rgb.png",
                "--depth",
                "{d}/depth_lr.png",
                "--intrinsics",
                "{d}/K.json",
                "--features",
                "{d}/feats.npy",
                "--layout",
                "chw",
                "--out",
                "{d}/o",
            ],
            "depth 24x16 does not match the colour image 96x64 (WxH)",
        ),
        (
            ["upsample", "--image", "{d}/notimage.png", "--signal", "{d}/feats.npy", "--out", "{d}/o.npy"],
            "notimage.png",
        ),
        (["lift", "--rgb", "{d}/rgb.png"], "the following arguments are required"),
    ],
    ids=[
        "missing-file",
        "unreadable-depth",
        "grid-too-large",
        "mismatched-sizes",
        "unreadable-image",
        "argparse",
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(files, argv, msg, capsys):
    d, _, _ = files
    np.save(d / "bad.npy", np.zeros((2, 200, 7), np.float32))
    (d / "notimage.png").write_bytes(b"this is not a png")
    try:
        rc = main([a.format(d=d) for a in argv] + ["--quiet"])
    except SystemExit as e:  # argparse errors exit
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("ua3d: error:") and msg in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,msg",
    [
        (
            ["upsample", "--image", "{d}/rgb.png", "--signal", "{d}/feats.npy", "--out", "{d}/x.txt"],
            "--out {d}/x.txt: unsupported file type '.txt'",
        ),
        (
            [
                "upsample",
                "--image",
                "{d}/rgb.png",
                "--signal",
                "{d}/feats.npy",
                "--out",
                "{d}/x.npy",
                "--png",
                "{d}/f.txt",
            ],
            "--png {d}/f.txt: unsupported file type",
        ),
        (
            ["depth-sr", "--rgb", "{d}/rgb.png", "--depth", "{d}/depth_lr.png", "--out", "{d}/x.jpg"],
            "--out {d}/x.jpg: unsupported file type '.jpg'",
        ),
        (["demo", "--bins", "0", "--out", "{d}/demo"], "--bins must be > 0, got 0"),
        (
            [
                "lift",
                "--rgb",
                "{d}/rgb.png",
                "--depth",
                "{d}/depth.png",
                "--intrinsics",
                "{d}/K.json",
                "--features",
                "{d}/feats.npy",
                "--bins",
                "0",
                "--out",
                "{d}/lift0",
            ],
            "--bins must be > 0, got 0",
        ),
        (["view", "volume", "{d}/missing.npz"], "view {d}/missing.npz: file not found"),
    ],
    ids=["upsample-out", "upsample-png", "depth-sr-out", "demo-bins", "lift-bins", "view-missing"],
)
def test_bad_options_fail_before_any_work(files, argv, msg, capsys):
    """[20.8] options and output paths are checked before any work: no bar started, no output folder."""
    d, _, _ = files
    rc = main([a.format(d=d) for a in argv])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and err.strip().startswith("ua3d: error: " + msg.format(d=d))
        and len(err.strip().splitlines()) == 1
    )
    assert "fit (TTO steps)" not in err and "demo:" not in err
    assert not (d / "demo").exists() and not (d / "lift0").exists()


def test_a_real_bad_option_fails_at_once_and_errors_start_a_line(files):
    """[20.8] by timing in a real process; [20.7] an error during a stage is not printed onto the bar's line."""
    d, _, _ = files
    t0 = time.perf_counter()
    r = _ua3d(
        "upsample",
        "--image",
        d / "rgb.png",
        "--signal",
        d / "feats.npy",
        "--out",
        d / "x.txt",
        "--steps",
        "100000",
    )
    assert r.returncode == 2 and time.perf_counter() - t0 < 60 and "TTO" not in r.stderr
    r = _ua3d(
        *_lift_args(d, d / "holes", "--depth-max", "0.001")
    )  # every pixel a hole: fails inside the fit stage
    assert r.returncode == 2
    lines = re.split(r"[\r\n]", r.stderr)
    assert any(ln.startswith("ua3d: error:") and "no valid pixel" in ln for ln in lines)
    assert not any("lift:" in ln and "ua3d: error" in ln for ln in lines)


def test_debug_shows_the_traceback(files):
    d, _, _ = files
    with pytest.raises((FileNotFoundError, ValueError)):
        main(
            [
                "upsample",
                "--image",
                str(d / "missing.png"),
                "--signal",
                str(d / "feats.npy"),
                "--out",
                str(d / "o.npy"),
                "--debug",
            ]
        )


# --------------------------------------------------------------------------- help, version, start-up
def test_every_subcommand_has_help(capsys):
    """[20.6] `ua3d eval --help` and every (sub-)subcommand's --help work."""
    for cmd in [
        [],
        ["demo"],
        ["upsample"],
        ["depth-sr"],
        ["lift"],
        ["eval"],
        ["eval", "depth-sr"],
        ["view"],
        ["view", "volume"],
        ["view", "points"],
    ]:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0, cmd
        assert "usage: ua3d" in capsys.readouterr().out


def test_every_option_has_help_text_and_lift_lists_the_models(capsys):
    """[20.14] no option without help; `lift --help` names random, dinov2_tiny and the *_reg models."""
    parser = build_parser()
    sub = parser._subparsers._group_actions[0]
    for name in ("demo", "upsample", "depth-sr", "lift"):
        for a in sub.choices[name]._actions:
            assert a.help, f"ua3d {name} {a.option_strings} has no help"
    with pytest.raises(SystemExit):
        main(["lift", "--help"])
    text = capsys.readouterr().out
    for m in ("random", "dinov2_tiny", "dinov2_vits14_reg", "dinov2_vitb14_reg"):
        assert m in text


def test_version_and_fast_start(capsys):
    """[20.6] --version from the package metadata; `ua3d --help` imports neither torch nor numpy (< 1 s)."""
    import ua3d

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ua3d {ua3d.__version__}"
    code = (
        "import sys, contextlib, io, ua3d.cli as c\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: c.main(['--help'])\n    except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'open3d') if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_fit_callback_reports_every_step():
    """The CLI's bar uses ua3d.fit(callback=...) instead of a private fit loop."""
    import ua3d

    seen = []
    ua3d.fit(torch.rand(1, 3, 16, 16), (4, 4), steps=3, callback=lambda s, loss: seen.append((s, loss)))
    assert len(seen) == 3 and all(np.isfinite(loss) for _, loss in seen)


# --------------------------------------------------------------------------- README
def test_readme_matches_ci_and_the_command():
    """[20.16] the README's apt list is .ci/run's, the set-up starts from a clone, and the options it names exist."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    pkgs = re.search(r'pkgs="([^"]+)"', ci).group(1).split()
    apt = re.search(r"apt-get install (?:-y )?([^`\n]+)", readme).group(1).split()
    assert sorted(apt) == sorted(pkgs)
    for step in ("git clone", "python -m venv", "ua3d demo", "python -m pytest"):
        assert step in readme, step
    assert "pip install torch==" not in readme  # torch is unpinned: the README does not pin it either
    for text in ("--model random", "--query-pixel", "protocol A", "interval"):
        assert text in readme, text


# --------------------------------------------------------------------------- the demo's parts (issue 16)
def test_demo_label_accuracy_takes_each_argmax_once_and_matches_the_direct_count():
    from ua3d.demo import _label_accuracy

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 4, (12, 16), generator=g)
    probs = {k: torch.rand(1, 4, 12, 16, generator=g) for k in ("a", "b")}
    masks = {"all": torch.ones(12, 16, dtype=torch.bool), "some": torch.rand(12, 16, generator=g) > 0.5}
    acc = _label_accuracy(probs, ids, masks)
    for m, mask in masks.items():
        for k, p in probs.items():
            keep = mask & (ids >= 0)
            assert acc[m][k] == pytest.approx(float((p.argmax(1)[0][keep] == ids[keep]).float().mean()))
    assert np.isnan(_label_accuracy(probs, ids, {"none": torch.zeros(12, 16, dtype=torch.bool)})["none"]["a"])


def test_demo_background_errors_are_raised_and_its_threads_end(tmp_path, monkeypatch):
    """A failing figure (drawn in the demo's figures thread) is raised by run_demo, and no demo thread
    is left running."""
    import threading

    import ua3d.demo as demo
    from ua3d.viz import figures

    def broken(*a, **k):
        raise ValueError("figure broke")

    monkeypatch.setattr(figures, "comparison_figure", broken)
    with pytest.raises(ValueError, match="^figure broke$"):
        demo.run_demo(out=tmp_path / "d", steps=1, bins=2, tiny=True, quiet=True)
    assert not [t for t in threading.enumerate() if t.name.startswith("ua3d-demo")]


# --------------------------------------------------------------------------- the demo, from a built wheel
def test_demo_from_a_built_wheel_outside_the_tree(tmp_path):
    """[14.1] the wheel carries the viewers and the sample scene, so `ua3d demo` works from any directory
    without the source tree; [20.4] the demo PLY opens in Open3D with the real colours; [20.7] the demo bar
    names the running stage; [20.12] the demo states its file sizes and writes a float16 volume."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (the dev extra has it)")
    o3d = pytest.importorskip("open3d")
    wheels = tmp_path / "wheels"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    whl = next(wheels.glob("ua3d-*.whl"))
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    for f in (
        "ua3d/sample_data/rgb.png",
        "ua3d/sample_data/depth_holes.png",
        "ua3d/sample_data/intrinsics.json",
        "ua3d/viz/volume_slices.py",
        "ua3d/viz/feature_points.py",
        "ua3d/rgbd/formats.py",
    ):
        assert f in names, f
    run = tmp_path / "elsewhere"
    run.mkdir()
    r = _ua3d(
        "demo", "--tiny", "--steps", "4", "--bins", "6", "--out", "demo", cwd=run, env_path=tmp_path / "site"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = run / "demo"
    for f in ["summary.txt", "summary.json", "features.png", "depth_sr.png", "points.ply", "volume.npz"]:
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert s["data"].startswith(str(tmp_path / "site"))  # the packaged sample, not the source tree's
    assert s["psnr_db"]["ua3d_2d"] > s["psnr_db"]["bicubic"]
    assert 0.5 < s["label_accuracy"]["all_valid"]["ua3d_rgbd"] <= 1.0
    torch.testing.assert_close(torch.tensor(s["grid"]), torch.tensor([15, 20]))
    assert "files: " in r.stdout and "volume.npz" in r.stdout and "total" in r.stdout
    assert s["files_bytes"]["volume.npz"] == (out / "volume.npz").stat().st_size
    assert "demo: lift (RGB-D fit" in r.stderr and "demo: fit-2d" in r.stderr
    with np.load(out / "volume.npz") as z:
        assert z["volume"].dtype == np.float16
    pcd = o3d.io.read_point_cloud(str(out / "points.ply"))
    cols = np.asarray(pcd.colors)
    rgb = cv2.imread(str(ROOT / "ua3d" / "sample_data" / "rgb.png"))[..., ::-1] / 255.0
    assert len(cols) > 1000 and cols.max() > 0.5  # the image's colours (up to 1.0), not 1/255-steps
    np.testing.assert_allclose(cols.mean(0), rgb.reshape(-1, 3).mean(0), atol=0.05)
    img = cv2.imread(str(out / "features.png"))
    assert img is not None and img.std() > 5
    # [14 acceptance] every picture, and a viewer run from the installed package, outside the tree
    assert {"volume_slices.png", "points.png"} <= set(s["pictures"]), s.get("viewer_pictures_skipped")
    r = _ua3d("view", "volume", "demo/volume.npz", "--png", "slices.png", cwd=run, env_path=tmp_path / "site")
    assert r.returncode == 0, r.stderr[-3000:]
    img = cv2.imread(str(run / "slices.png"))
    assert img is not None and img.std() > 5
