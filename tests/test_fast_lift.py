"""The fit's expanded form for any range-group layout (``ua3d.core.fast.expanded``: the RGB-D lift's
colour + normals and depth groups, other multi-channel guides) and the loss-channel restriction of the
reconstruction (channels of zero loss weight only enter the range distance).

Twins: the reference :func:`ua3d.core.kernel.kernel_fit_loss_grad_reference` and the engine's direct form
(``fast.inputs.EXPANDED = False``). Tolerances: float64 loss within 1e-12 relative and every gradient map
within 1e-10 of its largest entry (measured ~1e-15); float32 against the float64 reference: loss 1e-5
relative, gradient 2e-4 of its largest entry (as tests/test_fast.py), and never worse than twice the
direct form's float32 error on the same case.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import random_params

from ua3d.core.fast import expanded, inputs
from ua3d.core.kernel import kernel_fit_loss_grad_reference, resample_guide
from ua3d.core.ops import fast_available, kernel_fit_loss_grad

pytestmark = pytest.mark.skipif(not fast_available(), reason="numba is not installed: no fast engine to test")

F64 = torch.float64


def lift_case(groups=(5, 1), weights=(2.0, 2.0, 2.0, 0.0, 0.0, 0.0), B=1, h=5, w=6, H=34, W=41, seed=0):
    """A lift-like fit: colour channels (then zero-weight extra channels) and a depth channel, the depth
    group with holes (HR and LR validity), separate LR values, smooth depth with one step."""
    g = torch.Generator().manual_seed(seed + 200)
    Cg = sum(groups)
    guide = torch.rand(B, Cg, H, W, generator=g, dtype=F64)
    yy = torch.linspace(0, 1, H, dtype=F64)[:, None]
    xx = torch.linspace(0, 1, W, dtype=F64)[None, :]
    guide[:, -1] = 0.3 + 0.4 * xx + 0.1 * yy + 0.3 * (xx > 0.55)  # a slanted surface and a depth step
    guide_lr = resample_guide(guide, (h, w))
    values_lr = resample_guide(guide, (h, w), "area")
    G = len(groups)
    params = random_params(B, h, w, H, W, G=G, seed=seed, dtype=F64)
    vhr = torch.ones(B, G, H, W, dtype=torch.bool)
    vlr = torch.ones(B, G, h, w, dtype=torch.bool)
    vhr[:, -1] = torch.rand(B, H, W, generator=g) > 0.15
    vlr[:, -1] = torch.rand(B, h, w, generator=g) > 0.15
    cw = torch.tensor(weights, dtype=F64)
    return {
        "params": params,
        "guide_hr": guide,
        "guide_lr": guide_lr,
        "groups": groups,
        "valid_hr": vhr,
        "valid_lr": vlr,
        "channel_weights": cw,
        "values_lr": values_lr,
    }


def rel_err(a, b):
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _fit(c, radius, backend, dtype=F64, pixel_mask=None):
    cv = {
        k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in c.items()
    }
    if backend == "reference":
        return kernel_fit_loss_grad_reference(
            cv["params"],
            cv["guide_hr"],
            cv["guide_lr"],
            radius,
            cv["groups"],
            cv["valid_hr"],
            cv["valid_lr"],
            cv["channel_weights"],
            pixel_mask,
            values_lr=cv["values_lr"],
        )
    return kernel_fit_loss_grad(
        cv["params"],
        cv["guide_hr"],
        cv["guide_lr"],
        radius,
        cv["groups"],
        cv["valid_hr"],
        cv["valid_lr"],
        cv["channel_weights"],
        pixel_mask,
        backend="fast",
        values_lr=cv["values_lr"],
    )


# the lift today (colour + 0.7 x normals n_x, n_y at weight 0; depth at weight 0), the lift with depth weight,
# normals without weight and no depth weight but three normal channels, a 4-channel 2D guide, two small
# groups, a single channel
LAYOUTS = {
    "lift-5-1-depth-weight-0": ((5, 1), (2.0, 2.0, 2.0, 0.0, 0.0, 0.0)),
    "lift-5-1-depth-weight-1": ((5, 1), (2.0, 2.0, 2.0, 0.0, 0.0, 2.0)),
    "lift-6-1-three-normals": ((6, 1), (2.3, 2.3, 2.3, 0.0, 0.0, 0.0, 0.0)),
    "lift-3-1-no-normals": ((3, 1), (1.3, 1.3, 1.3, 0.0)),
    "4ch-one-group": ((4,), (1.0, 1.0, 1.0, 1.0)),
    "groups-2-2-1-mixed-weights": ((2, 2, 1), (1.0, 0.0, 0.5, 2.0, 0.0)),
    "1ch": ((1,), (1.0,)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expanded_fit_matches_reference_and_direct_form_float64(name, monkeypatch):
    groups, weights = LAYOUTS[name]
    c = lift_case(groups, weights, seed=len(name))
    radius = 4.0
    lr_, gr = _fit(c, radius, "reference")
    assert expanded.n_features(groups) <= expanded.MAX_FEATURES  # the case takes the expanded form
    lf, gf = _fit(c, radius, "fast")
    monkeypatch.setattr(inputs, "EXPANDED", False)
    ld, gd = _fit(c, radius, "fast")
    for loss, grad in ((lf, gf), (ld, gd)):
        assert loss.dtype == F64 and grad.shape == gr.shape
        assert abs(float(loss) - float(lr_)) <= 1e-12 * abs(float(lr_))
        for ch in range(gr.shape[1]):  # every parameter map
            assert rel_err(grad[:, ch], gr[:, ch]) < 1e-10, f"parameter map {ch}"


def test_expanded_fit_with_pixel_weights_batch_and_no_masks_matches_reference():
    groups, weights = LAYOUTS["lift-5-1-depth-weight-1"]
    c = lift_case(groups, weights, B=2, seed=7)
    c["valid_hr"] = c["valid_lr"] = None
    pm = torch.rand(2, 1, 34, 41, generator=torch.Generator().manual_seed(3), dtype=F64)
    pm[pm < 0.3] = 0
    lr_, gr = _fit(c, 5.0, "reference", pixel_mask=pm)
    lf, gf = _fit(c, 5.0, "fast", pixel_mask=pm)
    assert abs(float(lf) - float(lr_)) <= 1e-12 * abs(float(lr_))
    assert rel_err(gf, gr) < 1e-10


def test_zero_weight_channels_only_enter_the_distance():
    """The reconstruction ignores zero-weight channels (their values may be anything), the range distance
    does not (changing their HR values changes the gradient); no loss channel at all: zero loss and
    gradient."""
    groups, weights = LAYOUTS["lift-5-1-depth-weight-0"]
    c = lift_case(groups, weights, seed=3)
    l0, g0 = _fit(c, 4.0, "fast")
    c2 = dict(c)
    c2["values_lr"] = c["values_lr"].clone()
    c2["values_lr"][:, 3:] = 1e3  # values of the zero-weight channels: never rendered in the fit
    l1, g1 = _fit(c2, 4.0, "fast")
    assert float(l1) == float(l0) and torch.equal(g1, g0)
    c3 = dict(c)
    c3["guide_hr"] = c["guide_hr"].clone()
    c3["guide_hr"][:, 3:5] = 0.5  # flat normals: a different distance
    _, g3 = _fit(c3, 4.0, "fast")
    assert rel_err(g3, g0) > 1e-3
    c4 = dict(c)
    c4["channel_weights"] = torch.zeros(6, dtype=F64)
    l4, g4 = _fit(c4, 4.0, "fast")
    lr4, gr4 = _fit(c4, 4.0, "reference")
    assert float(l4) == 0.0 == float(lr4) and not g4.any() and not gr4.any()


@pytest.mark.parametrize("name", ["lift-5-1-depth-weight-0", "4ch-one-group"])
def test_expanded_fit_float32_agrees_with_float64_reference(name, monkeypatch):
    groups, weights = LAYOUTS[name]
    c = lift_case(groups, weights, seed=11)
    lr_, gr = _fit(c, 6.0, "reference")
    lf, gf = _fit(c, 6.0, "fast", torch.float32)
    assert lf.dtype == torch.float32 and gf.dtype == torch.float32
    assert abs(float(lf) - float(lr_)) < 1e-5 * float(lr_)
    err = rel_err(gf.double(), gr)
    assert err < 2e-4
    monkeypatch.setattr(inputs, "EXPANDED", False)
    _, gd = _fit(c, 6.0, "fast", torch.float32)
    assert err <= 2 * rel_err(gd.double(), gr) + 1e-6


def test_feature_count_and_the_direct_form_beyond_it(monkeypatch):
    assert expanded.n_features((5, 1)) == 16  # 5 spatial + 7 + 3
    assert expanded.n_features((3,)) == 16  # (RGB itself takes the 10-feature RGB kernel)
    assert expanded.n_features((1,)) == 8
    assert expanded.n_features((40, 1)) > expanded.MAX_FEATURES
    # a 41-channel guide takes the direct form and still matches the reference
    c = lift_case((40, 1), (1.0,) * 20 + (0.0,) * 21, h=3, w=3, H=13, W=14, seed=5)
    lr_, gr = _fit(c, 2.0, "reference")
    lf, gf = _fit(c, 2.0, "fast")
    assert abs(float(lf) - float(lr_)) <= 1e-12 * abs(float(lr_))
    assert rel_err(gf, gr) < 1e-10
