"""The one depth-validity rule, across layers: 0, NaN and +/-Inf are holes; a negative depth that is
not masked out is an error (``ValueError`` naming the argument and the count), in the camera, the
RGB-D lift, depth SR, the depth baselines and the depth writer; displays paint it as a hole."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ua3d.core.checks import depth_valid_mask
from ua3d.core.tto import FitConfig
from ua3d.depth import baselines as depth_baselines
from ua3d.depth.sr import upsample_depth
from ua3d.io.rgbd import write_depth
from ua3d.rgbd.camera import PinholeCamera, backproject, depth_validity
from ua3d.rgbd.lift import as_depth, fit_rgbd
from ua3d.viz.colormaps import colorize_depth

CAM = PinholeCamera(8.0, 8.0, 3.5, 2.5, 8, 6)
NEG = r"has 1 negative value\(s\) \(min -0.5"


def _depth(bad: float | None = None) -> torch.Tensor:
    d = 1.0 + torch.arange(48, dtype=torch.float32).reshape(6, 8) / 48
    if bad is not None:
        d[2, 3] = bad
    return d


def test_the_rule_itself():
    d = np.array([0.0, np.nan, np.inf, -np.inf, 2.0, 7.0])
    assert depth_valid_mask(d).tolist() == [False, False, False, False, True, True]
    assert depth_valid_mask(d, depth_max=5.0).tolist() == [False, False, False, False, True, False]
    assert depth_valid_mask(torch.from_numpy(d)).tolist() == [False, False, False, False, True, True]
    with pytest.raises(
        ValueError, match=r"^depth_lr has 2 negative value\(s\) \(min -3, shape \(3,\)\); depth must"
    ):
        depth_valid_mask(np.array([-1.0, -3.0, 1.0]), "depth_lr")
    masked = depth_valid_mask(np.array([-1.0, 2.0]), mask=np.array([False, True]))  # masked out: ignored
    assert masked.tolist() == [False, True]
    assert depth_valid_mask(np.array([-1.0, 2.0]), negative="hole").tolist() == [False, True]


@pytest.mark.parametrize("hole", [0.0, math.nan, math.inf])
def test_holes_are_holes_in_every_layer(hole):
    d = _depth(hole)
    assert not bool(depth_validity(d)[2, 3]) and int(depth_validity(d).sum()) == 47
    pts, pix = backproject(d, CAM)
    assert len(pts) == 47 and not bool(((pix[:, 0] == 2) & (pix[:, 1] == 3)).any())
    lk = fit_rgbd(torch.rand(3, 6, 8), d, CAM, (3, 4), FitConfig(steps=1, radius=1))
    assert not bool(lk.depth_valid[0, 0, 2, 3]) and float(lk.depth[0, 0, 2, 3]) == 0.0
    lr = d[None, None, ::2, ::2].clone()
    lr[0, 0, 1, 1] = hole
    out = upsample_depth(lr, torch.rand(1, 3, 6, 8), fit_steps=0, consistency="none")
    assert bool(torch.isfinite(out).any())
    base = depth_baselines.bilinear(lr, torch.rand(1, 3, 6, 8))
    assert bool(torch.isfinite(base).any())


def test_negative_depth_is_an_error_in_every_layer(tmp_path):
    d = _depth(-0.5)
    with pytest.raises(ValueError, match="depth " + NEG):
        depth_validity(d)
    with pytest.raises(ValueError, match="depth " + NEG):
        backproject(d, CAM)
    with pytest.raises(ValueError, match="depth " + NEG):
        as_depth(d)
    with pytest.raises(ValueError, match="depth " + NEG):
        fit_rgbd(torch.rand(3, 6, 8), d, CAM, (3, 4), FitConfig(steps=1))
    lr = d[None, None, ::2, 1::2]  # holds the negative pixel at (1, 1)
    with pytest.raises(ValueError, match=r"depth_lr has 1 negative value"):
        upsample_depth(lr, torch.rand(1, 3, 6, 8))
    for method in (depth_baselines.nearest, depth_baselines.bilinear, depth_baselines.bicubic):
        with pytest.raises(ValueError, match="depth_lr " + NEG):
            method(lr, torch.rand(1, 3, 6, 8))
    with pytest.raises(ValueError, match="depth has negative values"):
        write_depth(tmp_path / "d.png", d.numpy())
    # ... unless masked out, where the value is never read
    keep = torch.ones_like(lr, dtype=torch.bool)
    keep[0, 0, 1, 1] = False
    assert bool(torch.isfinite(depth_baselines.bilinear(lr, torch.rand(1, 3, 6, 8), mask_lr=keep)).all())
    assert bool(torch.isfinite(upsample_depth(lr, torch.rand(1, 3, 6, 8), mask_lr=keep, fit_steps=0)).any())
    # a display paints it as a hole instead of refusing to draw
    rgb = colorize_depth(d.numpy())
    assert (rgb[2, 3] == 0).all() and (rgb[0, 0] != 0).any()
