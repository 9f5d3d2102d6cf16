"""Depth SR metrics: hand-computed values, masks, crop, unit scaling and the edge mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ua3d.depth.metrics import (
    compute_metrics,
    delta_accuracy,
    depth_edge_mask,
    edge_rmse,
    evaluation_mask,
    mae,
    rmse,
)


def test_rmse_mae_hand_values():
    gt = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert rmse(pred, gt) == pytest.approx(1.0)  # sqrt((0 + 0 + 0 + 4) / 4)
    assert mae(pred, gt) == pytest.approx(0.5)
    assert rmse(pred.numpy(), gt.numpy()) == pytest.approx(1.0)  # numpy accepted


def test_invalid_gt_is_excluded_not_scored_as_zero():
    gt = torch.tensor([[1.0, math.nan, 0.0, math.inf, 5.0]])
    pred = torch.tensor([[2.0, 100.0, 100.0, 100.0, 5.0]])
    assert rmse(pred, gt) == pytest.approx(math.sqrt(1 / 2))
    assert evaluation_mask(gt).tolist() == [[True, False, False, False, True]]


def test_nan_prediction_lowers_coverage():
    gt = torch.ones(1, 4)
    pred = torch.tensor([[1.0, 3.0, math.nan, math.nan]])
    m = compute_metrics(pred, gt)
    assert m["coverage"] == pytest.approx(0.5) and m["n_valid"] == 4
    assert m["rmse"] == pytest.approx(math.sqrt(2.0))  # over the two covered pixels: (0 + 4) / 2


def test_crop_scale_clip_and_mask():
    gt = torch.full((10, 10), 2.0)
    pred = gt.clone()
    pred[0, :] = 12.0  # border error, removed by crop=1
    pred[5, 5] = 3.0
    assert rmse(pred, gt, crop=1) == pytest.approx(math.sqrt(1 / 64))
    assert rmse(pred, gt, crop=1, scale=100.0) == pytest.approx(100 * math.sqrt(1 / 64))  # m -> cm
    assert rmse(pred, gt, clip=(0.0, 2.0)) == 0.0
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[5, 5] = True
    assert mae(pred, gt, mask=mask) == pytest.approx(1.0)
    assert math.isnan(rmse(pred, gt, mask=torch.zeros(10, 10, dtype=torch.bool)))


def test_delta_accuracy_hand_values():
    gt = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    pred = torch.tensor([[1.2, 0.7, 1.9, -1.0]])  # ratios 1.2, 1.4286, 1.9, fail
    assert delta_accuracy(pred, gt, 1.25) == pytest.approx(0.25)
    assert delta_accuracy(pred, gt, 1.25**2) == pytest.approx(0.5)
    assert delta_accuracy(pred, gt, 1.25**3) == pytest.approx(0.75)  # 1.9 < 1.953
    assert delta_accuracy(pred * 7, gt * 7, 1.25) == pytest.approx(0.25)  # unit free


def test_edge_mask_marks_both_sides_of_a_step():
    gt = torch.ones(6, 8)
    gt[:, 4:] = 2.0  # a 100 % jump between columns 3 and 4
    gt[:, 0] = 1.01  # a 1 % ripple is no edge
    assert depth_edge_mask(gt, dilate=0).any(0).nonzero().ravel().tolist() == [3, 4]
    assert depth_edge_mask(gt, dilate=1).any(0).nonzero().ravel().tolist() == [2, 3, 4, 5]
    assert depth_edge_mask(gt, abs_threshold=2.0, dilate=0).sum() == 0
    gt[0, 0] = math.nan
    assert not depth_edge_mask(gt)[0, 0]


def test_edge_rmse_only_sees_edges():
    gt = torch.ones(6, 8)
    gt[:, 4:] = 2.0
    pred = gt.clone()
    pred[:, 3] = 1.5  # blurred edge
    pred[:, 7] = 2.5  # error away from the edge
    assert edge_rmse(pred, gt, dilate=0) == pytest.approx(math.sqrt(0.25 / 2))
    m = compute_metrics(pred, gt, dilate=0)
    assert m["edge_rmse"] == pytest.approx(math.sqrt(0.25 / 2))
    assert m["rmse"] == pytest.approx(math.sqrt(2 * 0.25 * 6 / 48))


def test_metrics_errors():
    with pytest.raises(ValueError, match=r"pred and gt must have the same shape, got \(2, 3\) and \(3, 2\)"):
        rmse(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"pred must have at least 2 dims \[..., H, W\], got shape \(4,\)"):
        rmse(torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"crop must be in \[0, 2\] for gt of shape \(5, 6\), got 3"):
        rmse(torch.ones(5, 6), torch.ones(5, 6), crop=3)
    with pytest.raises(ValueError, match="scale must be positive and finite, got 0"):
        rmse(torch.ones(5, 6), torch.ones(5, 6), scale=0)
    with pytest.raises(ValueError, match="threshold must be > 1, got 1.0"):
        delta_accuracy(torch.ones(2, 2), torch.ones(2, 2), 1.0)
    with pytest.raises(ValueError, match=r"pred is empty \(shape \(0, 3\)\)"):
        rmse(np.ones((0, 3)), np.ones((0, 3)))
