"""PCA colouring, colour maps and matplotlib figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from ua3d.viz.colormaps import apply_cmap, colorize_depth, colorize_error, colorize_signed, depth_range
from ua3d.viz.figures import comparison_figure, depth_sr_figure, image_grid
from ua3d.viz.pca import PCABasis


def _two_clusters(n: int = 50) -> torch.Tensor:
    f = torch.zeros(2 * n, 4)
    f[:n, 0] = 2.0
    f[n:, 1] = 1.0
    return f


# ---------------------------------------------------------------------- PCA
def test_pca_golden_two_clusters() -> None:
    f = _two_clusters()
    b = PCABasis.fit(f)
    # one direction of variance, (2, -1, 0, 0)/sqrt(5); its largest entry is made positive
    torch.testing.assert_close(b.components[0], torch.tensor([2.0, -1.0, 0.0, 0.0]) / 5**0.5)
    assert (b.components[1:] == 0).all()  # no variance left: those channels colour as 0.5
    rgb = b.transform(f)
    torch.testing.assert_close(rgb[0], torch.tensor([1.0, 0.5, 0.5]))
    torch.testing.assert_close(rgb[-1], torch.tensor([0.0, 0.5, 0.5]))


def test_pca_deterministic_and_consistent() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(16, 30, 40, generator=g) * torch.tensor([8.0, 4.0, 2.0] + [0.3] * 13)[:, None, None]
    a = PCABasis.fit(feats, seed=3, max_samples=500)
    b = PCABasis.fit(feats, seed=3, max_samples=500)
    for k in ("mean", "components", "low", "high"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    # [C, H, W] and the equivalent rows [N, C] are coloured identically, in the same order
    img = a.transform(feats)
    rows = a.transform(feats.reshape(16, -1).T)
    assert img.shape == (30, 40, 3)
    torch.testing.assert_close(img.reshape(-1, 3), rows)
    # a slice of a volume [C, D, H, W] gets the same colours as the map on its own
    vol = torch.stack([feats, feats * 0.5], dim=1)
    torch.testing.assert_close(a.transform(vol)[0], img)
    # subsampling changes the fit only a little; components agree up to sign by convention
    full = PCABasis.fit(feats, max_samples=10**6)
    assert torch.allclose(full.components.abs(), a.components.abs(), atol=0.1)
    assert float(full.components[0] @ a.components[0]) > 0.95
    assert ((img >= 0) & (img <= 1)).all()
    # percentiles are stored in the basis: about 1% of fitted scores fall below low
    scores = full.project(feats).reshape(-1, 3)
    frac = (scores < full.low).float().mean(0)
    assert torch.all((frac > 0.005) & (frac < 0.02))


def test_pca_roundtrip_dict_dtype_and_mask() -> None:
    f = _two_clusters().double()
    b = PCABasis.fit(f)
    assert b.transform(f).dtype == torch.float64
    c = PCABasis.from_dict({k: v for k, v in b.to_dict().items()})
    assert torch.equal(c.transform(f), b.transform(f))
    assert all(isinstance(v, np.ndarray) for v in b.to_dict().values())
    # mask: fitting on the first cluster only leaves no variance -> all 0.5
    m = PCABasis.fit(f, mask=torch.arange(100) < 50)
    torch.testing.assert_close(m.transform(f), torch.full((100, 3), 0.5, dtype=torch.float64))


def test_pca_few_channels_and_nan_rows() -> None:
    f = torch.tensor([[0.0, 1.0], [1.0, 0.0], [float("nan"), 2.0], [2.0, 2.0]])
    b = PCABasis.fit(f)
    assert b.components.shape == (3, 2) and (b.components[2] == 0).all()
    assert torch.isfinite(b.transform(f[[0, 1, 3]])).all()


def test_pca_errors() -> None:
    with pytest.raises(ValueError, match=r"features has zero channels, shape \(5, 0\)"):
        PCABasis.fit(torch.zeros(5, 0))
    with pytest.raises(ValueError, match=r"features has zero channels, shape \(0, 4, 4\)"):
        PCABasis.fit(torch.zeros(0, 4, 4))
    with pytest.raises(ValueError, match=r"features must have shape \[N, C\] or \[C, \*S\], got \(5,\)"):
        PCABasis.fit(torch.zeros(5))
    b = PCABasis.fit(torch.randn(20, 4))
    with pytest.raises(ValueError, match="features have 3 channels but the PCA basis was fitted on 4"):
        b.transform(torch.randn(2, 3))
    with pytest.raises(ValueError, match="no finite feature rows"):
        PCABasis.fit(torch.full((3, 2), float("inf")))
    with pytest.raises(ValueError, match="PCA basis dict is missing 'low'"):
        PCABasis.from_dict({"mean": np.zeros(2), "components": np.zeros((3, 2)), "high": np.zeros(3)})


# ---------------------------------------------------------------------- colour maps
def test_colorize_depth() -> None:
    d = np.array([[1.0, 2.0, 3.0], [0.0, np.nan, -1.0]])
    rgb = colorize_depth(d, vmin=1.0, vmax=3.0)
    turbo = matplotlib.colormaps["turbo"]
    np.testing.assert_allclose(rgb[0, 0], turbo(0.0)[:3], atol=1e-6)
    np.testing.assert_allclose(rgb[0, 1], turbo(0.5)[:3], atol=1e-6)
    np.testing.assert_allclose(rgb[0, 2], turbo(1.0)[:3], atol=1e-6)
    assert (rgb[1] == 0).all() and rgb.dtype == np.float32  # holes black
    assert depth_range(d) == pytest.approx((1.02, 2.98))
    assert (colorize_depth(np.zeros((2, 2))) == 0).all()  # all holes: black, no error


def test_error_maps() -> None:
    e = np.array([0.0, 0.5, 1.0, np.nan])
    rgb = colorize_error(e, vmax=1.0)
    inferno = matplotlib.colormaps["inferno"]
    np.testing.assert_allclose(rgb[:3], [inferno(x)[:3] for x in (0.0, 0.5, 1.0)], atol=1e-6)
    np.testing.assert_allclose(rgb[3], [0.5, 0.5, 0.5])
    s = colorize_signed(np.array([-1.0, 0.0, 1.0]), vmax=1.0)
    assert s[0, 2] > s[0, 0] and s[2, 0] > s[2, 2] and np.all(s[1] > 0.95)  # blue, white, red
    np.testing.assert_allclose(apply_cmap(np.array([5.0]), 0.0, 1.0, "gray"), [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"depth is empty, shape \(0,\)"):
        colorize_depth(np.zeros(0))


# ---------------------------------------------------------------------- figures
def test_image_grid_writes_png(tmp_path: Path) -> None:
    imgs = [np.zeros((20, 30, 3), np.uint8), np.ones((10, 15, 3), np.float32), np.random.rand(20, 30)]
    out = image_grid(imgs, ["a", "b", "c"], tmp_path / "g.png", panel_size=2.0, dpi=50)
    png = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert out.dtype == np.uint8 and out.shape == png.shape and out.shape[1] == 3 * 2 * 50
    with pytest.raises(ValueError, match="titles has 1 entries for 3 images"):
        image_grid(imgs, ["a"])
    with pytest.raises(ValueError, match=r"images\[0\] must have shape \[H, W\], \[H, W, 3\] or \[3, H, W\]"):
        image_grid([np.zeros((2, 2, 2))])


def test_comparison_figures(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(8, 32, 32, generator=g)
    lr = torch.nn.functional.avg_pool2d(gt[None], 4)[0]
    bil = torch.nn.functional.interpolate(lr[None], size=(32, 32), mode="bilinear")[0]
    guide = torch.rand(3, 32, 32, generator=g)
    out = comparison_figure(guide, lr, bil, gt + 0.01, gt=gt, path=tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").is_file() and out.ndim == 3 and out.std() > 10
    no_gt = comparison_figure(guide, lr, bil, bil)
    assert no_gt.shape[1] < out.shape[1]  # fewer panels
    with pytest.raises(ValueError, match=r"ua3d has shape \(4, 32, 32\); expected \[C=8, H, W\]"):
        comparison_figure(guide, lr, bil, gt[:4])
    d_gt = np.random.default_rng(0).uniform(1, 3, (32, 32))
    d_gt[0, 0] = 0
    d_lr = d_gt[::4, ::4]
    out = depth_sr_figure(guide, d_lr, d_gt + 0.1, d_gt, gt=d_gt, path=tmp_path / "dsr.png", unit="m")
    assert (tmp_path / "dsr.png").is_file() and out.std() > 10
    with pytest.raises(ValueError, match=r"ua3d has shape \(16, 16\), expected \(32, 32\) like bicubic"):
        depth_sr_figure(guide, d_lr, d_gt, d_gt[:16, :16])


def test_depth_sr_figure_has_colour_bars_units_and_no_empty_panels(monkeypatch) -> None:
    """Issue 20.13: full rows (8 panels with GT, 4 without), a depth colour bar in metres on each depth map,
    error bars, and the method named "ua3d"."""
    from ua3d.viz import figures

    calls = []
    real = figures.image_grid

    def spy(images, titles=None, path=None, ncols=None, **kw):
        calls.append({"n": len(images), "titles": list(titles), "ncols": ncols, "bars": kw.get("colorbars")})
        return real(images, titles, path, ncols, **kw)

    monkeypatch.setattr(figures, "image_grid", spy)
    d_gt = np.random.default_rng(0).uniform(1, 3, (32, 32))
    guide = np.zeros((32, 32, 3), np.uint8)
    figures.depth_sr_figure(guide, d_gt[::4, ::4], d_gt + 0.1, d_gt, gt=d_gt)
    figures.depth_sr_figure(guide, d_gt[::4, ::4], d_gt + 0.1, d_gt)
    with_gt, no_gt = calls
    assert with_gt["n"] == 8 and with_gt["ncols"] == 4 and no_gt["n"] == 4 and no_gt["ncols"] == 4
    labels = [b[3] for b in with_gt["bars"] if b is not None]
    assert labels.count("depth (m)") == 4 and "abs. error (m)" in labels
    assert any(t.startswith("ua3d (RMSE") for t in with_gt["titles"]) and not any(
        "ours" in t for t in with_gt["titles"]
    )


# ---------------------------------------------------------------------- one draw, fixed layout (issue 16: the demo)
def test_figures_draw_once_without_tight_layout_and_write_the_returned_pixels(
    tmp_path: Path, monkeypatch
) -> None:
    """The figure is drawn once (no ``tight_layout``, no second draw in ``savefig``): the PNG holds
    exactly the returned pixels; other formats still go through ``savefig``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ua3d.viz import figures

    draws = []
    real_draw = FigureCanvasAgg.draw
    monkeypatch.setattr(FigureCanvasAgg, "draw", lambda self: (draws.append(1), real_draw(self))[1])

    def no_tight(self, *a, **k):
        raise AssertionError("tight_layout called")

    monkeypatch.setattr(Figure, "tight_layout", no_tight)
    d_gt = np.random.default_rng(0).uniform(1, 3, (32, 32))
    guide = np.zeros((32, 32, 3), np.uint8)
    out = figures.depth_sr_figure(guide, d_gt[::4, ::4], d_gt + 0.1, d_gt, gt=d_gt, path=tmp_path / "d.png")
    assert len(draws) == 1
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "d.png").convert("RGB")), out)
    ann = figures.annotated_render(guide, tmp_path / "a.png", title="t", labels=[(3.0, 4.0, "z = 1 m")])
    assert len(draws) == 2
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), ann)
    image_grid([guide], ["g"], tmp_path / "g.pdf")
    assert (tmp_path / "g.pdf").read_bytes()[:4] == b"%PDF"


def test_grid_layout_keeps_panels_inside_the_figure_and_shrinks_long_titles() -> None:
    from ua3d.viz.figures import _grid_layout, _title_size

    for size, rows, cols, bars in (
        ((12.0, 2.65), 1, 4, False),
        ((12.8, 5.2), 2, 4, True),
        ((4.0, 2.0), 1, 1, False),
    ):
        lay = _grid_layout(size, rows, cols, True, True, bars)
        assert 0 < lay["left"] < lay["right"] < 1 and 0 < lay["bottom"] < lay["top"] < 1
        assert lay["wspace"] > 0 and lay["hspace"] > 0
    assert _title_size("guide", 2.5) == 9.0
    long = "error ua3d - bicubic (blue: ua3d closer)"
    assert 6.0 <= _title_size(long, 2.3) < 9.0 and _title_size(long * 5, 2.3) == 6.0
