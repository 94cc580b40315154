"""Backbones and heads: shapes for every architecture, SDPA against plain attention, crop sizes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov2_patho.layers import Attention, add_residual_on_subset, swiglu_hidden_dim
from dinov2_patho.models import BACKBONES, DINOHead, build_backbone, build_ssl_heads
from dinov2_patho.models.vision_transformer import resample_patch_pos_embed

# DINOv2's published sizes: (embed_dim, depth, heads).
SIZES = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16),
         "vit_giant2": (1536, 40, 24)}


def tiny(**kwargs):
    """A 2-block ViT with 64-dim tokens: the whole code path, milliseconds per forward."""
    args = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32)
    args.update(kwargs)
    from dinov2_patho.models import VisionTransformer

    model = VisionTransformer(**args)
    with torch.no_grad():  # away from the init so that mistakes in any tensor show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("patch_size", [14, 16])
@pytest.mark.parametrize("registers", [0, 4])
def test_every_architecture_shapes(name, patch_size, registers):
    dim, depth, heads = SIZES[name]
    with torch.device("meta"):
        vit = build_backbone(name, patch_size=patch_size, num_register_tokens=registers)
        out = vit.forward_features(torch.empty(2, 3, 224, 224))
    n = (224 // patch_size) ** 2
    assert (vit.embed_dim, vit.n_blocks, vit.num_heads, vit.patch_size) == (dim, depth, heads, patch_size)
    assert out["x_norm_clstoken"].shape == (2, dim)
    assert out["x_norm_regtokens"].shape == (2, registers, dim)
    assert out["x_norm_patchtokens"].shape == (2, n, dim)
    assert out["x_prenorm"].shape == (2, 1 + registers + n, dim)
    assert vit.pos_embed.shape == (1, 1 + n, dim)


def test_giant_uses_dinov2_swiglu_width():
    with torch.device("meta"):
        vit = build_backbone("vit_giant2")
    # DINOv2 ViT-g: hidden 4096 (2/3 of 4*1536, multiple of 8), packed into w12 as 2*4096.
    assert vit.blocks[0].mlp.w12.weight.shape == (8192, 1536)
    assert vit.blocks[0].mlp.w3.weight.shape == (1536, 4096)
    assert swiglu_hidden_dim(1536, 4.0) == 4096


def test_registry_names():
    assert set(BACKBONES.names()) >= {"vit_small", "vit_base", "vit_large", "vit_giant", "vit_giant2"}


def test_unknown_backbone_suggests_name():
    with pytest.raises(KeyError, match="vit_large"):
        build_backbone("vit_lrge")


def plain_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).split(c, dim=-1)
    q, k, v = (t.view(b, n, h, c // h).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // h), dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 20), heads=st.sampled_from([1, 2, 4]), seed=st.integers(0, 99))
def test_sdpa_matches_plain_attention(b, n, heads, seed):
    torch.manual_seed(seed)
    attn = Attention(32, heads).double()
    x = torch.randn(b, n, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x), plain_attention(attn, x), rtol=1e-10, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), antialias=st.booleans())
def test_pos_embed_resample_shape_and_constant(h, w, antialias):
    pos = torch.full((1, 16, 8), 0.25)
    out = resample_patch_pos_embed(pos, (h, w), offset=0.0 if antialias else 0.1, antialias=antialias)
    assert out.shape == (1, h * w, 8)
    # bicubic weights sum to one: a constant embedding stays constant at any size
    torch.testing.assert_close(out, torch.full_like(out, 0.25))


def test_pos_embed_native_grid_untouched_and_any_crop_size():
    vit = tiny().eval()
    torch.testing.assert_close(vit.pos_embed_for((4, 4)), vit.pos_embed, rtol=0, atol=0)
    for size in [(16, 16), (24, 40), (56, 56)]:
        out = vit.forward_features(torch.randn(2, 3, *size))
        assert out["x_norm_patchtokens"].shape == (2, (size[0] // 8) * (size[1] // 8), 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit(torch.randn(1, 3, 30, 32))


def test_mask_token_replaces_masked_patches_only():
    vit = tiny(num_register_tokens=2).eval()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    tokens = vit.prepare_tokens(x, masks)
    plain = vit.prepare_tokens(x)
    patch_pos = vit.pos_embed[0, 1:]
    expected = vit.mask_token[0] + patch_pos[[1, 5]]
    torch.testing.assert_close(tokens[0, 3 + torch.tensor([1, 5])], expected)
    keep = ~masks[0]
    torch.testing.assert_close(tokens[0, 3:][keep], plain[0, 3:][keep])
    torch.testing.assert_close(tokens[1], plain[1])
    # registers sit after CLS, without position embedding
    torch.testing.assert_close(tokens[:, 1:3], vit.register_tokens.expand(2, -1, -1))


def test_list_input_equals_separate_calls():
    vit = tiny().eval()
    g, loc = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)
    m = torch.rand(2, 16) < 0.5
    outs = vit.forward_features([g, loc], [m, None])
    torch.testing.assert_close(outs[0]["x_prenorm"], vit.forward_features(g, m)["x_prenorm"])
    torch.testing.assert_close(outs[1]["x_norm_clstoken"], vit(loc))


def test_subset_residual_changes_exactly_kept_rows():
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4)
    out = add_residual_on_subset(x, torch.ones_like, rate=0.4)
    changed = (out != x).flatten(1).any(1)
    assert int(changed.sum()) == 6
    # the kept rows are rescaled by b / kept so the expectation equals the full residual
    torch.testing.assert_close(out[changed], x[changed] + 10 / 6)


@pytest.mark.parametrize("rate", [0.05, 0.4])
def test_stochastic_depth_train_only_and_gradients(rate):
    vit = tiny(drop_path_rate=rate, drop_path_uniform=True, ffn="swiglu")
    x = torch.randn(8, 3, 32, 32)
    vit.eval()
    torch.testing.assert_close(vit(x), vit(x), rtol=0, atol=0)
    vit.train()
    torch.manual_seed(1)
    a = vit.forward_features(x, torch.rand(8, 16) < 0.3)
    (a["x_norm_clstoken"].sum() + a["x_norm_patchtokens"].sum()).backward()
    assert all(p.grad is not None for p in vit.parameters())
    torch.manual_seed(2)
    assert not torch.equal(vit(x), a["x_norm_clstoken"])


def test_drop_path_linear_decay():
    vit = tiny(depth=5, drop_path_rate=0.4)
    assert [b.drop_path_rate for b in vit.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_no_layerscale_and_bf16_autocast():
    vit = tiny(layerscale_init=None).eval()
    assert not any("ls1" in k for k in vit.state_dict())
    seen = []
    vit.blocks[1].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vit(torch.randn(2, 3, 32, 32))
    # matmuls run in bf16; the residual stream and LayerNorm outputs stay float32 under autocast
    assert seen == [torch.bfloat16]
    assert torch.isfinite(out).all()


def test_dino_head_normalised_prototypes_and_names():
    head = DINOHead(64, 100, hidden_dim=32, bottleneck_dim=16, nlayers=3)
    assert set(head.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                      "mlp.4.weight", "mlp.4.bias", "last_layer.weight_g",
                                      "last_layer.weight_v"}
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.rand(100, 1) * 5)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(100))
    out = head(torch.randn(5, 64) * 100)
    assert out.shape == (5, 100)
    # inputs are L2-normalised before unit-norm prototypes: logits are cosines
    assert out.abs().max() <= 1 + 1e-5
    single = DINOHead(64, 10, bottleneck_dim=16, nlayers=1)
    assert "mlp.weight" in single.state_dict()


def test_ibot_head_shared_or_separate():
    cfg = dict(out_dim=50, hidden_dim=32, bottleneck_dim=16)
    dino, ibot = build_ssl_heads(64, cfg)
    assert dino is ibot
    dino, ibot = build_ssl_heads(64, cfg, dict(cfg, out_dim=70), separate_ibot_head=True)
    assert dino is not ibot and ibot.last_layer.weight_v.shape == (70, 16)
    with pytest.raises(ValueError, match="separate"):
        build_ssl_heads(64, cfg, separate_ibot_head=True)
