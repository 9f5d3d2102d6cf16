"""``ua3d eval depth-sr --methods ...,anyup --anyup-checkpoint PATH``: wiring, load-once, missing weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ua3d.baselines.anyup as anyup_module
from ua3d.depth.evaluate import evaluate, main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, anyup_parity) -> Path:
    """The parity fixture's weights saved as a bare state dict, like the released ``anyup_*.pth``."""
    path = tmp_path_factory.mktemp("weights") / "anyup_fixture.pth"
    torch.save(anyup_parity["state_dict"], path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two 64x48 scenes in the middlebury-gdsr layout (``<scene>/<name>_output_{color,depth}.png``)."""
    root = tmp_path_factory.mktemp("mb")
    yy, xx = np.mgrid[0:48, 0:64]
    for i, name in enumerate(["01_A", "02_B"]):
        rgb = np.zeros((48, 64, 3), np.uint8)
        rgb[..., 0] = (xx * 4).astype(np.uint8)
        rgb[..., 1] = (yy * 5).astype(np.uint8)
        inside = (xx - 20 - 8 * i) ** 2 + (yy - 24) ** 2 < 150
        rgb[inside] = (230, 40, 40)
        depth = (60 + yy + 0.5 * xx).astype(np.float64)
        depth[inside] = 200 - 30 * i  # a near disc with edges that line up with the colour edges
        (root / name).mkdir()
        Image.fromarray(rgb).save(root / name / f"{name}_output_color.png")
        Image.fromarray(depth.astype(np.uint8)).save(root / name / f"{name}_output_depth.png")
    return root


def _argv(dataset: Path, *extra: str) -> list[str]:
    return ["--dataset", "middlebury-gdsr", "--root", str(dataset), "--scales", "4", "--no-progress", *extra]


def test_anyup_is_a_registered_lazy_method():
    """Registered but not imported: a fresh interpreter lists ``anyup`` without importing the AnyUp
    package; resolving it imports the package and gives a method that refuses to run without weights."""
    code = (
        "import sys\n"
        "from ua3d.depth.evaluate import ANYUP_WEIGHTS_HINT, available_methods, get_method\n"
        "assert 'anyup' in available_methods(), available_methods()\n"
        "assert 'ua3d.baselines.anyup' not in sys.modules, 'anyup imported eagerly'\n"
        "method = get_method('anyup')\n"
        "assert 'ua3d.baselines.anyup' in sys.modules\n"
        "import torch\n"
        "try:\n"
        "    method(torch.ones(1, 1, 4, 4), torch.zeros(1, 3, 16, 16))\n"
        "except ValueError as err:\n"
        "    assert str(err) == ANYUP_WEIGHTS_HINT, err\n"
        "else:\n"
        "    raise AssertionError('ran without a checkpoint')\n"
        "print('ok')\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_cli_runs_anyup_with_a_local_checkpoint(dataset, checkpoint, tmp_path, monkeypatch, capsys):
    loads = []
    real_load = anyup_module.load_anyup

    def counting_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(anyup_module, "load_anyup", counting_load)
    out = tmp_path / "res.json"
    code = main(
        _argv(
            dataset, "--methods", "bicubic,anyup", "--anyup-checkpoint", str(checkpoint), "--json", str(out)
        )
    )
    assert code == 0, capsys.readouterr().err
    assert len(loads) == 1  # once per evaluation, not per image
    res = json.loads(out.read_text())
    assert res["settings"]["options"] == {"anyup": {"checkpoint": str(checkpoint)}}
    rows = [r for r in res["per_image"] if r["method"] == "anyup"]
    assert [r["image"] for r in rows] == ["01_A", "02_B"]
    for r in rows:
        assert math.isfinite(r["rmse"]) and r["rmse"] < 100 and r["coverage"] == 1.0
        assert r["hr_shape"] == [48, 64] and r["lr_shape"] == [12, 16]
    assert math.isfinite(res["mean"]["anyup"]["4"]["rmse"])
    assert "| anyup |" in capsys.readouterr().out


def test_anyup_through_evaluate_matches_anyup_depth(dataset, checkpoint):
    """The harness adds nothing of its own: same numbers as calling anyup_depth on the same LR input."""
    from ua3d.depth.datasets import load_dataset, sample_to_tensors
    from ua3d.depth.metrics import compute_metrics
    from ua3d.depth.protocols import make_lr

    res = evaluate(
        "middlebury-gdsr",
        dataset,
        (4,),
        "B",
        ["anyup"],
        options={"anyup": {"checkpoint": str(checkpoint)}},
        progress=False,
        verbose=False,
    )
    sample = load_dataset("middlebury-gdsr", dataset)[0]
    rgb, depth = sample.load()
    hr, lr = make_lr(depth, 4, "B")
    guide, gt = sample_to_tensors(rgb[: hr.shape[0], : hr.shape[1]], hr)
    model = anyup_module.load_anyup(checkpoint)
    pred = anyup_module.anyup_depth(torch.from_numpy(lr)[None, None], guide, model=model)
    expected = compute_metrics(pred[0, 0], gt[0, 0], crop=0, scale=1.0, clip=(0.0, 255.0))["rmse"]
    assert res["per_image"][0]["rmse"] == pytest.approx(expected, rel=1e-6)


def test_missing_checkpoint_is_a_one_line_error(dataset, capsys):
    code = main(_argv(dataset, "--methods", "bicubic,anyup"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ua3d: error: method 'anyup' needs AnyUp weights")
    for needle in ("anyup_paper.pth", "anyup_multi_backbone.pth", "wimmerth/anyup", "--anyup-checkpoint"):
        assert needle in err


def test_checkpoint_path_that_does_not_exist(dataset, tmp_path, capsys):
    missing = tmp_path / "anyup_paper.pth"
    code = main(_argv(dataset, "--methods", "anyup", "--anyup-checkpoint", str(missing)))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"AnyUp checkpoint not found: {missing}" in err


def test_python_api_without_checkpoint_names_the_option(dataset):
    with pytest.raises(ValueError, match=r"needs AnyUp weights.*'checkpoint': PATH"):
        evaluate("middlebury-gdsr", dataset, (4,), "B", ["anyup"], progress=False, verbose=False)
