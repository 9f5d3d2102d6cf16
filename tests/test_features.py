"""Feature sources: files, ua3d's own DINOv2 ViT, local-checkpoint loading, the random stand-in.

No network and no real weights: every model here is the tiny architecture (``CONFIGS["tiny"]``)
with seeded weights, saved to a temporary checkpoint; ViT-S/14 and ViT-B/14 are built on the
``meta`` device to check their key sets, shapes and parameter counts.
"""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ua3d.features import (
    CONFIGS,
    DINOV2_MODELS,
    CheckpointNotFoundError,
    VisionTransformer,
    dinov2_to_timm,
    extract_features,
    load_features,
    model_input_size,
    random_features,
    save_features,
    timm_to_dinov2,
)
from ua3d.features.files import guess_layout
from ua3d.features.vit import detect_naming

TINY = CONFIGS["tiny"]
TINY_REG = replace(TINY, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)


def seeded_state(model: torch.nn.Module, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Deterministic weights for ``model``'s keys: N(0, scale) drawn in sorted-key order from seed 0."""
    g = torch.Generator().manual_seed(0)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in sorted(model.state_dict().items())}


def tiny_model(cfg=TINY) -> VisionTransformer:
    m = VisionTransformer(cfg)
    m.load_state_dict(seeded_state(m))
    return m.eval()


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture
def no_caches(tmp_path, monkeypatch):
    """Empty torch / Hugging Face caches, no UA3D_WEIGHTS_DIR, and any download attempt fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("UA3D_WEIGHTS_DIR", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("ua3d tried to download something")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    return tmp_path


# =========================================================================== files
FEATS = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6) / 7  # [C=4, h=5, w=6]


def _write(path: Path, arr: np.ndarray) -> None:
    if path.suffix == ".npy":
        np.save(path, arr)
    elif path.suffix == ".npz":
        np.savez(path, arr)
    else:
        torch.save(torch.from_numpy(arr), path)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt"])
@pytest.mark.parametrize(
    ("stored", "layout"),
    [("chw", "chw"), ("hwc", "hwc"), ("1chw", "chw"), ("1hwc", "hwc"), ("chw", "auto"), ("hwc", "auto")],
)
def test_load_features_layouts_round_trip(tmp_path, suffix, stored, layout):
    arr = FEATS.numpy()
    if "hwc" in stored:
        arr = arr.transpose(1, 2, 0)
    if stored.startswith("1"):
        arr = arr[None]
    path = tmp_path / f"f{suffix}"
    _write(path, np.ascontiguousarray(arr))
    feats, used = load_features(path, layout=layout)
    assert used == stored.lstrip("1")
    assert feats.dtype == torch.float32 and feats.shape == (1, 4, 5, 6)
    assert torch.equal(feats[0], FEATS)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".pth"])
def test_save_features_round_trip(tmp_path, suffix):
    path = save_features(tmp_path / "sub" / f"feats{suffix}", FEATS[None].double())
    feats, used = load_features(path, layout="chw")
    assert used == "chw" and torch.equal(feats, FEATS[None])


def test_load_features_two_axes_is_one_channel(tmp_path):
    np.save(tmp_path / "p.npy", np.ones((3, 4), dtype=np.uint8))
    feats, used = load_features(tmp_path / "p.npy")
    assert used == "hw" and feats.shape == (1, 1, 3, 4) and feats.dtype == torch.float32


def test_guess_layout_smallest_axis_rule():
    assert guess_layout((3, 480, 640)) == "chw"
    assert guess_layout((60, 80, 16)) == "hwc"
    assert guess_layout((384, 37, 37)) is None  # channels largest: ambiguous
    assert guess_layout((6, 6, 9)) is None  # tie between the first two axes


def test_load_features_ambiguous_asks_for_layout(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, np.zeros((8, 6, 6), dtype=np.float32))
    with pytest.raises(ValueError) as e:
        load_features(path)
    assert str(e.value) == (
        f"{path}: cannot tell the layout of features with shape (8, 6, 6) (no end axis is strictly the "
        f"smallest); pass layout='chw' for [C, h, w] or layout='hwc' for [h, w, C] (--layout)"
    )
    feats, _ = load_features(path, layout="hwc")
    assert feats.shape == (1, 6, 8, 6)


def test_load_features_dict_and_keys(tmp_path):
    pt = tmp_path / "d.pt"
    torch.save({"feats": FEATS, "note": "x"}, pt)
    assert torch.equal(load_features(pt, layout="chw")[0][0], FEATS)  # the only tensor
    torch.save({"a": FEATS, "b": FEATS * 2}, pt)
    with pytest.raises(ValueError, match=r"holds several arrays \['a', 'b'\]; pass key=NAME \(--key NAME\)"):
        load_features(pt, layout="chw")
    assert torch.equal(load_features(pt, layout="chw", key="b")[0][0], FEATS * 2)
    with pytest.raises(ValueError, match=r"no array named 'c'; the file holds \['a', 'b'\]"):
        load_features(pt, layout="chw", key="c")
    npz = tmp_path / "d.npz"
    np.savez(npz, x=FEATS.numpy(), y=FEATS.numpy() + 1)
    assert torch.equal(load_features(npz, layout="chw", key="y")[0][0], FEATS + 1)
    with pytest.raises(ValueError, match="holds several arrays"):
        load_features(npz, layout="chw")
    np.save(tmp_path / "k.npy", FEATS.numpy())
    with pytest.raises(ValueError, match="applies to .npz and .pt files only"):
        load_features(tmp_path / "k.npy", key="x")


def test_load_features_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.npy"
    with pytest.raises(FileNotFoundError, match=f"^{missing}: no such feature file$"):
        load_features(missing)
    for suffix in (".npy", ".npz", ".pt"):
        bad = tmp_path / f"garbage{suffix}"
        bad.write_bytes(b"this is not an array file")
        with pytest.raises(ValueError, match=f"^{bad}: cannot read it as a {suffix} feature file"):
            load_features(bad)
    cases = {
        "rank1.npy": (np.zeros(5, np.float32), r"features must be \[C, h, w\].*got shape \(5,\)"),
        "rank5.npy": (np.zeros((1, 1, 2, 2, 2), np.float32), r"got shape \(1, 1, 2, 2, 2\)"),
        "batch2.npy": (np.zeros((2, 3, 4, 4), np.float32), r"batch size 1, got shape \(2, 3, 4, 4\)"),
        "empty.npy": (np.zeros((3, 0, 4), np.float32), r"empty \(shape \(3, 0, 4\)\)"),
        "obj.npy": (np.array([{"a": 1}], dtype=object), "cannot read it as a .npy feature file"),
    }
    for name, (arr, msg) in cases.items():
        np.save(tmp_path / name, arr, allow_pickle=True)
        with pytest.raises(ValueError, match=msg):
            load_features(tmp_path / name, layout="chw")
    nan = FEATS.numpy().copy()
    nan[0, 0, 0] = np.nan
    nan[1, 2, 3] = np.inf
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'nan.npy'}: features contain 2 NaN/Inf value\(s\)"):
        load_features(tmp_path / "nan.npy", layout="chw")
    (tmp_path / "f.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=r"unsupported feature file type '.txt'"):
        load_features(tmp_path / "f.txt")
    with pytest.raises(ValueError, match="layout must be one of"):
        load_features(tmp_path / "nan.npy", layout="whc")


# =========================================================================== the ViT
def _documented_vits14_shapes() -> dict[str, tuple[int, ...]]:
    """The official ``dinov2_vits14_pretrain.pth`` keys and shapes (see ua3d/features/vit.py)."""
    d, hidden = 384, 1536
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1370, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, 14, 14),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(12):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "ls1.gamma": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,),
            b + "ls2.gamma": (d,),
        })  # fmt: skip
    return shapes


def test_vits14_state_dict_matches_the_official_release():
    with torch.device("meta"):
        model = VisionTransformer("vits14")
        base = VisionTransformer("vitb14")
        reg = VisionTransformer("vits14_reg")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == _documented_vits14_shapes() and len(shapes) == 175
    n_all = sum(p.numel() for p in model.parameters())
    # 22,056,576 counts the mask token (384 values, unused at inference); 22,056,192 without it.
    assert n_all == 22_056_576
    assert n_all - model.mask_token.numel() == 22_056_192
    assert sum(p.numel() for p in base.parameters()) == 86_580_480
    assert tuple(reg.state_dict()["register_tokens"].shape) == (1, 4, 384)


def test_tiny_vit_matches_official_dinov2_golden_values():
    """Golden values from the official code, facebookresearch/dinov2 at commit b8931f7, made with::

        from dinov2.models.vision_transformer import DinoVisionTransformer
        for reg in (0, 4):
            kw = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0) if reg else {}
            ref = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2,
                                        mlp_ratio=4, init_values=1.0, block_chunks=0, **kw).eval()
            ref.load_state_dict(seeded_state(ref))   # seeded_state as in this file
            x = torch.randn(1, 3, 70, 98, generator=torch.Generator().manual_seed(1))
            out = ref.get_intermediate_layers(x, n=1, reshape=True)[0]
            print(out[0, :4, 1, 2], out[0, :, -1, -1].sum(), out.abs().sum())

    70 x 98 is a 5 x 7 grid, so the bicubic pos-embed resize from 4 x 4 is exercised.
    """
    golden = {
        TINY: ([0.09281, 0.23192, 0.15541, -0.09551], -2.54567, 244.82),
        TINY_REG: ([0.09347, 0.23266, 0.15541, -0.09561], -2.54886, 244.823),
    }
    x = torch.randn(1, 3, 70, 98, generator=torch.Generator().manual_seed(1))
    for cfg, (cell, corner_sum, abs_sum) in golden.items():
        with torch.no_grad():
            out = tiny_model(cfg).forward_features(x)
        assert out.shape == (1, 32, 5, 7)
        torch.testing.assert_close(out[0, :4, 1, 2], torch.tensor(cell), atol=1e-5, rtol=0)
        assert float(out[0, :, -1, -1].sum()) == pytest.approx(corner_sum, abs=1e-4)
        assert float(out.abs().sum()) == pytest.approx(abs_sum, abs=2e-3)


def test_patch_tokens_are_reshaped_row_major():
    """With no blocks, each output cell sees only its own patch: changing patch (1, 3) of a
    3 x 5 grid must change output cell (1, 3) and nothing else."""
    model = tiny_model(replace(TINY, depth=0))
    x = torch.rand(1, 3, 42, 70, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, :, 14:28, 42:56] += 0.5
    with torch.no_grad():
        diff = (model.forward_features(y) - model.forward_features(x)).abs().amax(dim=1)[0]
    changed = (diff > 1e-6).nonzero().tolist()
    assert changed == [[1, 3]]


def test_forward_features_rejects_non_multiple_sizes():
    with pytest.raises(
        ValueError, match=r"image size \(30, 28\) must be a positive multiple of the patch size 14"
    ):
        tiny_model().forward_features(torch.zeros(1, 3, 30, 28))
    with pytest.raises(ValueError, match=r"x must be \[B, 3, H, W\]"):
        tiny_model().forward_features(torch.zeros(3, 28, 28))


@pytest.mark.parametrize("cfg", [TINY, TINY_REG], ids=["plain", "registers"])
def test_timm_and_dinov2_namings_are_equivalent(cfg):
    model = tiny_model(cfg)
    sd = model.state_dict()
    timm_sd = dinov2_to_timm(sd)
    assert "mask_token" not in timm_sd and detect_naming(timm_sd) == "timm" and detect_naming(sd) == "dinov2"
    if cfg.num_register_tokens:
        assert timm_sd["pos_embed"].shape == (1, 16, 32) and "reg_token" in timm_sd
    back = VisionTransformer(cfg).eval()
    back.load_state_dict(timm_to_dinov2(timm_sd), strict=True)
    x = torch.rand(1, 3, 56, 84, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), model.forward_features(x), atol=1e-6, rtol=0)


# =========================================================================== checkpoints
def _save_tiny(path: Path, naming: str = "dinov2", cfg=TINY) -> dict[str, torch.Tensor]:
    sd = tiny_model(cfg).state_dict()
    out = dinov2_to_timm(sd) if naming == "timm" else sd
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    else:
        torch.save(out, path)
    return sd


def test_extract_features_loads_both_namings_strictly(tmp_path, no_caches):
    image = rgb(56, 98)
    sd = _save_tiny(tmp_path / "official.pth", "dinov2")
    _save_tiny(tmp_path / "timm.pth", "timm")
    f1, info = extract_features(image, "dinov2_tiny", checkpoint=tmp_path / "official.pth")
    f2, info2 = extract_features(image, "dinov2_tiny", checkpoint=tmp_path / "timm.pth")
    assert f1.shape == (1, 32, 4, 7) and f1.dtype == torch.float32
    assert info["key_naming"] == "dinov2" and info2["key_naming"] == "timm"
    assert info["grid"] == (4, 7) and info["input_size"] == (56, 98) and info["scale"] == (14.0, 14.0)
    assert info["checkpoint"] == str(tmp_path / "official.pth")
    assert info["num_params"] == sum(v.numel() for v in sd.values())
    torch.testing.assert_close(f1, f2, atol=1e-6, rtol=0)
    f3, _ = extract_features(image, "dinov2_tiny", checkpoint=tmp_path / "official.pth")
    assert torch.equal(f1, f3)  # deterministic
    # the same numbers as running the model by hand on the normalised image
    x = (
        torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    ) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(f1, tiny_model().forward_features(x), atol=1e-6, rtol=0)


def test_extract_features_reads_timm_safetensors_with_registers(tmp_path, no_caches, monkeypatch):
    pytest.importorskip("safetensors")
    monkeypatch.setitem(CONFIGS, "tiny_reg", TINY_REG)
    monkeypatch.setitem(
        DINOV2_MODELS, "dinov2_tiny_reg", replace(DINOV2_MODELS["dinov2_tiny"], arch="tiny_reg")
    )
    _save_tiny(tmp_path / "model.safetensors", "timm", cfg=TINY_REG)
    _save_tiny(tmp_path / "official.pth", "dinov2", cfg=TINY_REG)
    image = rgb(28, 42)
    feats, info = extract_features(image, "dinov2_tiny_reg", checkpoint=tmp_path / "model.safetensors")
    ref, info_ref = extract_features(image, "dinov2_tiny_reg", checkpoint=tmp_path / "official.pth")
    assert (
        feats.shape == (1, 32, 2, 3) and info["key_naming"] == "timm" and info_ref["key_naming"] == "dinov2"
    )
    torch.testing.assert_close(feats, ref, atol=1e-6, rtol=0)


def test_strict_loading_lists_missing_unexpected_and_shapes(tmp_path, no_caches):
    sd = tiny_model().state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as e:
        extract_features(rgb(28, 28), "dinov2_tiny", checkpoint=tmp_path / "broken.pth")
    msg = str(e.value)
    assert msg.startswith(
        f"{tmp_path / 'broken.pth'} (dinov2 naming) for dinov2_tiny: the checkpoint does not"
    )
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in msg and "unexpected keys (1): extra.weight" in msg
    wide = VisionTransformer(replace(TINY, embed_dim=16, num_heads=2)).state_dict()
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(
        ValueError, match=r"shape mismatches \(\d+\): .*cls_token \(1, 1, 16\) vs model \(1, 1, 32\)"
    ):
        extract_features(rgb(28, 28), "dinov2_tiny", checkpoint=tmp_path / "wide.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        extract_features(rgb(28, 28), "dinov2_tiny", checkpoint=tmp_path / "junk.pth")


def test_missing_checkpoint_says_how_to_get_it(no_caches):
    with pytest.raises(CheckpointNotFoundError) as e:
        extract_features(rgb(28, 28), "dinov2_vits14")
    msg = str(e.value)
    hub = no_caches / "torch" / "hub" / "checkpoints"
    for part in (
        "No local weights for dinov2_vits14; ua3d never downloads",
        "dinov2_vits14_pretrain.pth",
        "--checkpoint PATH",
        str(hub),
        "UA3D_WEIGHTS_DIR",
        "timm/vit_small_patch14_dinov2.lvd142m",
    ):
        assert part in msg
    with pytest.raises(
        CheckpointNotFoundError, match=r"checkpoint '/no/such/file.pth' does not exist\. No local"
    ):
        extract_features(rgb(28, 28), "dinov2_vitb14", checkpoint="/no/such/file.pth")


def test_checkpoint_found_in_local_caches(no_caches, monkeypatch):
    image = rgb(28, 42)
    hub = no_caches / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    _save_tiny(hub / "dinov2_tiny_pretrain.pth")
    feats, info = extract_features(image, "dinov2_tiny")
    assert info["checkpoint"] == str(hub / "dinov2_tiny_pretrain.pth")
    (hub / "dinov2_tiny_pretrain.pth").unlink()
    weights = no_caches / "weights"
    weights.mkdir()
    _save_tiny(weights / "dinov2_tiny_pretrain.pth")
    monkeypatch.setenv("UA3D_WEIGHTS_DIR", str(weights))
    assert extract_features(image, "dinov2_tiny")[1]["checkpoint"] == str(
        weights / "dinov2_tiny_pretrain.pth"
    )
    monkeypatch.delenv("UA3D_WEIGHTS_DIR")
    # timm's copy in the Hugging Face cache
    monkeypatch.setitem(
        DINOV2_MODELS, "dinov2_tiny", replace(DINOV2_MODELS["dinov2_tiny"], hf_repo="timm/tiny_test")
    )
    snap = no_caches / "hf" / "hub" / "models--timm--tiny_test" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    _save_tiny(snap / "pytorch_model.bin", "timm")
    feats2, info2 = extract_features(image, "dinov2_tiny")
    assert info2["checkpoint"] == str(snap / "pytorch_model.bin") and info2["key_naming"] == "timm"
    torch.testing.assert_close(feats, feats2, atol=1e-6, rtol=0)


# =========================================================================== preprocessing
def test_model_input_size_rounds_to_patch_multiples():
    assert model_input_size((100, 150), 14) == (98, 154)
    assert model_input_size((100, 150), 14, 224) == (154, 224)
    assert model_input_size((100, 150), 14, (60, 61)) == (56, 56)
    assert model_input_size((5, 3), 14) == (14, 14)  # at least one patch
    with pytest.raises(ValueError, match="image_size must be positive"):
        model_input_size((100, 150), 14, 0)


def test_non_multiple_image_is_resized_to_the_patch_grid(tmp_path, no_caches):
    _save_tiny(tmp_path / "t.pth")
    image = rgb(100, 150)
    feats, info = extract_features(image, "dinov2_tiny", checkpoint=tmp_path / "t.pth")
    assert info["input_size"] == (98, 154) and info["grid"] == (7, 11) and feats.shape == (1, 32, 7, 11)
    assert info["image_size"] == (100, 150) and info["scale"] == pytest.approx((100 / 7, 150 / 11))
    assert info["guide"].startswith("original image 100x150: the 7x11 feature grid is mapped onto it")
    # identical to resizing first (bicubic, antialiased, clamped) and giving the model the resized image
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    resized = F.interpolate(x, size=(98, 154), mode="bicubic", antialias=True, align_corners=False).clamp(
        0, 1
    )
    pre, info2 = extract_features(resized[0].permute(1, 2, 0), "dinov2_tiny", checkpoint=tmp_path / "t.pth")
    assert info2["input_size"] == (98, 154)
    torch.testing.assert_close(feats, pre, atol=1e-6, rtol=0)
    small, info3 = extract_features(image, "dinov2_tiny", checkpoint=tmp_path / "t.pth", image_size=56)
    assert info3["input_size"] == (42, 56) and small.shape == (1, 32, 3, 4)


def test_extract_features_rejects_bad_input(tmp_path, no_caches):
    _save_tiny(tmp_path / "t.pth")
    ck = tmp_path / "t.pth"
    with pytest.raises(ValueError, match=r"image must be \[H, W, 3\] \(RGB\), got shape \(3, 28, 28\)"):
        extract_features(np.zeros((3, 28, 28), np.uint8), "dinov2_tiny", checkpoint=ck)
    with pytest.raises(ValueError, match=r"a float image must be in \[0, 1\], got values in \[255, 255\]"):
        extract_features(np.full((28, 28, 3), 255.0, np.float32), "dinov2_tiny", checkpoint=ck)
    with pytest.raises(ValueError, match="unknown model_name 'dino'"):
        extract_features(rgb(28, 28), "dino")


def test_timm_models_need_timm(no_caches, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match=r"timm models need the optional package 'timm'.*dinov2_vits14"):
        extract_features(rgb(28, 28), "timm:convnext_tiny")


class _FakeTimmViT(VisionTransformer):
    """Stands in for a timm ViT: ``forward_features`` returns tokens ``[B, 1 + h*w, C]``."""

    pretrained_cfg: ClassVar[dict] = {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "classifier": "head",
        "hf_hub_id": None,
    }

    def forward_features(self, x):
        return self.forward_tokens(x)


def test_timm_path_loads_local_file_strictly_with_a_fake_timm(tmp_path, no_caches, monkeypatch):
    calls = []

    def create_model(name, pretrained=True, **kwargs):
        calls.append((name, pretrained, kwargs))
        return _FakeTimmViT(TINY)

    fake_models = types.ModuleType("fake_timm_models")
    fake_models.checkpoint_filter_fn = lambda sd, model: timm_to_dinov2(sd)  # timm's per-architecture filter
    monkeypatch.setitem(sys.modules, "fake_timm_models", fake_models)
    monkeypatch.setattr(_FakeTimmViT, "__module__", "fake_timm_models")
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    sd = dinov2_to_timm(tiny_model().state_dict())
    sd["head.weight"], sd["head.bias"] = torch.zeros(10, 32), torch.zeros(10)  # classifier: dropped
    torch.save(sd, tmp_path / "vit.pth")
    image = rgb(28, 56)
    feats, info = extract_features(image, "timm:vit_tiny_fake", checkpoint=tmp_path / "vit.pth")
    assert calls == [("vit_tiny_fake", False, {"num_classes": 0, "dynamic_img_size": True})]
    assert feats.shape == (1, 32, 2, 4) and info["stride"] == 14 and info["mean"] == (0.5, 0.5, 0.5)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(feats, tiny_model().forward_features(x), atol=1e-6, rtol=0)
    with pytest.raises(CheckpointNotFoundError, match="No local weights for timm:vit_tiny_fake"):
        extract_features(image, "timm:vit_tiny_fake")


# =========================================================================== random stand-in
def test_random_features_are_deterministic_and_labelled():
    image = rgb(64, 100)
    state = torch.random.get_rng_state()
    f1, desc = random_features(image)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    f2, _ = random_features(image)
    f3, _ = random_features(image, seed=1)
    assert f1.shape == (1, 32, 4, 6) and torch.equal(f1, f2) and not torch.allclose(f1, f3)
    assert desc.startswith("RANDOM features (not a trained model)") and "mean nothing semantically" in desc
    torch.testing.assert_close(f1.mean(dim=(2, 3)), torch.zeros(1, 32), atol=1e-5, rtol=0)
    torch.testing.assert_close(f1.std(dim=(2, 3), unbiased=False), torch.ones(1, 32), atol=1e-4, rtol=0)
    g, _ = random_features(rgb(64, 100, seed=5))
    assert not torch.allclose(f1, g)  # it does look at the image
    h, _ = random_features(image, stride=8, channels=4)
    assert h.shape == (1, 4, 8, 12)
    feats, info = extract_features(image, "random")
    assert torch.equal(feats, f1) and info["description"] == desc and info["grid"] == (4, 6)
    with pytest.raises(ValueError, match="stride must be a positive int, got 0"):
        random_features(image, stride=0)
