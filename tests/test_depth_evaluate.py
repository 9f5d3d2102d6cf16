"""Evaluation harness: literature-protocol golden values, JSON / table output, registry and CLI."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import ua3d.baselines
from ua3d.depth import baselines
from ua3d.depth.evaluate import available_methods, evaluate, get_method, main, register_method

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(folder: str) -> Path:
    path = SHARED / folder
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (it sits at ../shared/data beside the checkout)")
    return path


def test_bicubic_golden_values_on_middlebury_dev(tmp_path):
    """Protocol B / A bicubic on the 8 dev scenes; the 30-scene literature values are 2.28 / 3.98 / 6.37 (B)
    and 4.43 / 7.57 / 11.87 (A). Golden values made by::

        evaluate("middlebury-gdsr", "../shared/data/middlebury-gdsr-dev", (4, 8, 16), "B", ["bicubic"])
    """
    root = shared("middlebury-gdsr-dev")
    out = tmp_path / "mb.json"
    res = evaluate(
        "middlebury-gdsr", root, (4, 8, 16), "B", ["bicubic"], json_path=out, progress=False, verbose=False
    )
    got = [res["mean"]["bicubic"][s]["rmse"] for s in ("4", "8", "16")]
    assert got == pytest.approx([2.4161437845830456, 4.268289986637534, 6.586973158379511], rel=1e-6)
    res_a = evaluate("middlebury-gdsr", root, (4, 8, 16), "A", "bicubic", progress=False, verbose=False)
    got_a = [res_a["mean"]["bicubic"][s]["rmse"] for s in ("4", "8", "16")]
    assert got_a == pytest.approx([4.598960491210075, 7.804444325405902, 11.916616448891515], rel=1e-6)

    saved = json.loads(out.read_text())
    assert set(saved) == {"settings", "versions", "per_image", "mean", "table"}
    assert len(saved["per_image"]) == 8 * 3
    assert saved["settings"]["units"] == "0-255" and saved["settings"]["crop"] == 0
    assert saved["settings"]["clip"] == [0.0, 255.0] and saved["settings"]["protocol"] == "B"
    first = saved["per_image"][0]
    assert (first["image"], first["scale"], first["method"]) == ("02_Art", 4, "bicubic")
    assert first["rmse"] == pytest.approx(4.5675, abs=1e-4) and first["coverage"] == 1.0
    assert {"mae", "delta1", "delta2", "delta3", "edge_rmse", "time_s"} <= set(first)
    assert "torch" in saved["versions"] and "pillow" in saved["versions"]
    table = res["table"]
    assert (
        "protocol B" in table and "RMSE in 0-255" in table and "| bicubic | 2.416 | 4.268 | 6.587 |" in table
    )


def test_cli_on_nyuv2_reports_cm_with_crop(tmp_path, capsys):
    root = shared("nyuv2-dkn-test")
    out = tmp_path / "nyu.json"
    code = main(
        [
            "--dataset",
            "nyuv2",
            "--root",
            str(root),
            "--scales",
            "4",
            "--methods",
            "nearest,bicubic",
            "--limit",
            "1",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "RMSE in cm, border crop 6 px, 1 images" in printed
    saved = json.loads(out.read_text())
    rmse = {r["method"]: r["rmse"] for r in saved["per_image"]}
    # golden: frame 1000, protocol B x4, metres * 100, 6-px crop
    assert rmse == pytest.approx({"nearest": 3.6806726923956137, "bicubic": 2.529346249709229}, rel=1e-6)
    assert saved["per_image"][0]["n_valid"] == (480 - 12) * (640 - 12)


def test_holes_end_to_end_report_coverage():
    root = shared("tum-open3d")
    res = evaluate("tum", root, (4,), "B", ["nearest", "bicubic", "guided"], progress=False, verbose=False)
    coverage = {rec["method"]: rec["coverage"] for rec in res["per_image"]}
    assert all(0.95 < c <= 1.0 for c in coverage.values())
    assert coverage["nearest"] < coverage["bicubic"] <= coverage["guided"]  # wider support fills more holes
    assert all(math.isfinite(rec["rmse"]) for rec in res["per_image"])
    assert "| nearest | 8.186 (cov 0.992) |" in res["table"] and "RMSE in cm" in res["table"]


def test_cli_errors(capsys):
    assert main(["--dataset", "motorcycle", "--methods", "bicubic,magic", "--no-progress"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dataset", "kitti"])


def test_evaluate_argument_errors():
    with pytest.raises(ValueError, match="unknown dataset name 'kitti'"):
        evaluate("kitti", "/tmp", (4,), "B", "bicubic")
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate("motorcycle", None, (4,), "C", "bicubic")
    with pytest.raises(ValueError, match=r"scales must be positive integers, got \[0\]"):
        evaluate("motorcycle", None, (0,), "B", "bicubic")
    with pytest.raises(ValueError, match="methods is empty"):
        evaluate("motorcycle", None, (4,), "B", " , ")


def test_registry_names():
    assert {"nearest", "bilinear", "bicubic", "guided", "jbu", "ua3d"} <= set(available_methods())
    assert get_method("bicubic") is baselines.bicubic
    with pytest.raises(ValueError, match="give exactly one of method and factory"):
        register_method("x")


def fake_jbu(guide, signal, output_size=None, **options):
    """A linear, positive-weight stand-in for ua3d.baselines.jbu: Pillow bilinear, guide ignored."""
    return baselines.resize_pil(signal, tuple(output_size), "bilinear")


def test_jbu_wrapper_excludes_holes_by_normalised_convolution(monkeypatch):
    monkeypatch.setattr(ua3d.baselines, "jbu", fake_jbu, raising=False)
    method = get_method("jbu")
    depth = torch.rand(1, 1, 10, 12) + 1.0
    depth[..., 2:6, 3:8] = math.nan
    guide = torch.rand(1, 3, 40, 48)
    out = method(depth, guide)
    ref = baselines.bilinear(depth, guide)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out).any()
    torch.testing.assert_close(out[torch.isfinite(out)], ref[torch.isfinite(ref)])


def test_lazy_methods_give_a_clear_error_when_missing(monkeypatch):
    monkeypatch.delattr(ua3d.baselines, "jbu", raising=False)
    with pytest.raises(ImportError, match=r"method 'jbu' needs ua3d.baselines.jbu"):
        get_method("jbu")
    monkeypatch.setitem(sys.modules, "ua3d.depth.sr", None)
    with pytest.raises(ImportError, match=r"method 'ua3d' needs ua3d.depth.sr.upsample_depth"):
        get_method("ua3d")


def test_ua3d_wrapper_passes_the_mask(monkeypatch):
    seen = {}

    def upsample_depth(depth_lr, guide_hr, *, mask_lr=None, steps=10):
        seen.update(mask=mask_lr, steps=steps)
        return baselines.bicubic(depth_lr, guide_hr, mask_lr=mask_lr)

    monkeypatch.setitem(sys.modules, "ua3d.depth.sr", types.SimpleNamespace(upsample_depth=upsample_depth))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    out = get_method("ua3d")(torch.ones(1, 1, 4, 4), torch.rand(1, 3, 16, 16), mask_lr=mask, steps=3)
    assert out.shape == (1, 1, 16, 16) and seen["mask"] is mask and seen["steps"] == 3

    def no_mask(depth_lr, guide_hr):
        return baselines.bicubic(depth_lr, guide_hr)

    monkeypatch.setitem(sys.modules, "ua3d.depth.sr", types.SimpleNamespace(upsample_depth=no_mask))
    holed = torch.ones(1, 1, 4, 4)
    holed[0, 0, 0, 0] = 0.0
    with pytest.raises(ValueError, match="takes no mask_lr, but depth_lr has holes"):
        get_method("ua3d")(holed, torch.rand(1, 3, 16, 16))


# ---------------------------------------------------------------- real sensor sets, add_arguments / run
def test_real_frame_area_protocol_reports_edge_rmse_leaks_and_cpu_time():
    root = shared("redwood-open3d/sample5")
    res = evaluate(
        "redwood",
        root,
        (8,),
        None,
        "bicubic,ua3d",
        limit=1,
        progress=False,
        verbose=False,
        metrics=("rmse", "edge_rmse"),
    )
    st = res["settings"]
    assert st["protocol"] == "area" and st["edge_dilate"] == 3 and st["metrics"] == ["rmse", "edge_rmse"]
    rec = {r["method"]: r for r in res["per_image"]}
    assert rec["ua3d"]["n_leak"] == 0 and rec["ua3d"]["lr_holes"] > 0.02
    assert rec["ua3d"]["pred_min"] > 0 and rec["ua3d"]["cpu_s"] > 0
    assert (
        rec["ua3d"]["rmse"] < rec["bicubic"]["rmse"]
        and rec["ua3d"]["edge_rmse"] < rec["bicubic"]["edge_rmse"]
    )
    cell = res["mean"]["ua3d"]["8"]
    assert cell["worst_vs_bicubic"] == pytest.approx(rec["ua3d"]["rmse"] / rec["bicubic"]["rmse"])
    table = res["table"]
    assert "protocol area" in table and "edge RMSE in cm" in table and "worst / bicubic" in table


def test_park2011_uses_its_own_noisy_inputs_and_confidence(monkeypatch):
    root = shared("middlebury-park2011-noisy")
    seen = {}

    def probe(depth_lr, guide_hr, *, mask_lr=None, confidence=None):
        seen["lr"], seen["conf"] = (
            tuple(depth_lr.shape),
            None if confidence is None else tuple(confidence.shape),
        )
        return baselines.bicubic(depth_lr, guide_hr, mask_lr=mask_lr)

    probe.accepts_confidence = True
    register_method("probe", probe)
    res = evaluate("park2011", root, (16,), None, "bicubic,probe", limit=1, progress=False, verbose=False)
    assert res["settings"]["protocol"] == "given"
    assert seen == {"lr": (1, 1, 68, 86), "conf": (1088, 1376)}
    assert res["mean"]["probe"]["16"]["rmse"] == pytest.approx(res["mean"]["bicubic"]["16"]["rmse"])
    with pytest.raises(ValueError, match=r"has no LR input at x3; available: \[2, 4, 8, 16\]"):
        evaluate("park2011", root, (3,), None, "bicubic", limit=1, progress=False, verbose=False)


def test_add_arguments_and_run_raise_value_errors():
    import argparse

    from ua3d.depth.evaluate import add_arguments, run

    parser = add_arguments(argparse.ArgumentParser(prog="ua3d eval depth-sr"))
    args = parser.parse_args(["--dataset", "motorcycle", "--protocol", "given", "--no-progress"])
    with pytest.raises(
        ValueError, match=r"protocol 'given' needs a dataset that ships LR inputs \(park2011\)"
    ):
        run(args)
    args = parser.parse_args(["--dataset", "motorcycle", "--metrics", "rmse,psnr", "--no-progress"])
    with pytest.raises(ValueError, match=r"metrics must be a non-empty subset of"):
        run(args)
    args = parser.parse_args(["--dataset", "motorcycle", "--option", "ua3d", "--no-progress"])
    with pytest.raises(ValueError, match=r"--option must look like METHOD.NAME=VALUE, got 'ua3d'"):
        run(args)
