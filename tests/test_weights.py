"""Weight loading: DINOv2- and timm-format round trips give the source model's outputs exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov2_patho.errors import UserError
from dinov2_patho.models import VisionTransformer, build_backbone, load_pretrained, to_dinov2_state_dict
from dinov2_patho.models.weights import import_timm, timm_model_kwargs, timm_to_ours, to_timm_state_dict

timm = import_timm()
SwiGLUPacked = timm.layers.SwiGLUPacked
TimmViT = timm.models.vision_transformer.VisionTransformer


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every tensor away from its init so that a wrongly mapped one changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def ours(**kwargs) -> VisionTransformer:
    args = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32)
    return VisionTransformer(**(args | kwargs))


def outputs(vit: VisionTransformer, x: torch.Tensor, masks=None) -> torch.Tensor:
    with torch.no_grad():
        out = vit.forward_features(x, masks)
        return out["x_norm_clstoken"], out["x_prenorm"]


def assert_same(a, b, **tol):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **(tol or dict(rtol=0, atol=0)))


@pytest.mark.parametrize("kwargs", [{}, dict(num_register_tokens=4, ffn="swiglu", layerscale_init=1.0)])
def test_dinov2_file_round_trip(tmp_path, kwargs):
    src = perturb(ours(**kwargs))
    path = tmp_path / "hub.pth"
    torch.save(to_dinov2_state_dict(src), path)
    dst = ours(**kwargs)
    report = load_pretrained(dst, path)
    assert report.complete and report.format == "dinov2" and len(report.loaded) == len(src.state_dict())
    x, m = torch.randn(2, 3, 32, 32), torch.rand(2, 16) < 0.4
    assert_same(outputs(dst, x, m), outputs(src, x, m))


def test_training_checkpoint_teacher_chunked_and_wrapped():
    src = perturb(ours(depth=4))
    teacher = {}
    for k, v in to_dinov2_state_dict(src).items():
        # DINOv2 block_chunks=2: blocks.<chunk>.<global index>; DDP adds module.
        k = k.replace("blocks.", f"blocks.{int(k.split('.')[1]) // 2}.") if k.startswith("blocks.") else k
        teacher[f"module.backbone.{k}"] = v
    teacher["module.dino_head.last_layer.weight_g"] = torch.ones(3, 1)
    ckpt = {"teacher": teacher, "iteration": torch.tensor(5)}
    dst = ours(depth=4)
    report = load_pretrained(dst, ckpt, format="dinov2")
    assert report.skipped == ["dino_head.last_layer.weight_g"] and report.complete
    x = torch.randn(2, 3, 32, 32)
    assert_same(outputs(dst, x), outputs(src, x))


def test_pos_embed_grid_resampled_like_the_source_forward():
    # a source trained at 48 px (6x6 grid) loaded into a 32 px model (4x4) computes what the source
    # computes on 32 px inputs: the load-time resampling is the forward-time one
    src = perturb(ours(img_size=48))
    dst = ours(img_size=32)
    report = load_pretrained(dst, to_dinov2_state_dict(src))
    assert report.resized == {"pos_embed": ((1, 37, 64), (1, 17, 64))}
    x = torch.randn(2, 3, 32, 32)
    assert_same(outputs(dst, x), outputs(src, x))


def timm_vit(**kwargs) -> TimmViT:
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, init_values=1e-5,
                num_classes=0, global_pool="token", dynamic_img_size=True)
    return perturb(TimmViT(**(args | kwargs)))


def timm_outputs(model: TimmViT, x: torch.Tensor):
    with torch.no_grad():
        tokens = model.forward_features(x)
        return model.forward_head(tokens, pre_logits=True), tokens


TIMM_CASES = {
    "uni_like": (dict(), dict()),
    "registers_no_embed_class": (dict(reg_tokens=4, no_embed_class=True), dict(num_register_tokens=4)),
    "registers_in_pos_embed": (dict(reg_tokens=2), dict(num_register_tokens=2)),
    "swiglu_packed": (dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2 * 176 / 64),
                      dict(ffn="swiglu")),
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_weights_give_timm_outputs(tmp_path, case):
    timm_kw, our_kw = TIMM_CASES[case]
    src = timm_vit(**timm_kw)
    path = tmp_path / "timm.bin"
    torch.save(src.state_dict(), path)
    dst = ours(layerscale_init=1e-5, **our_kw)
    report = load_pretrained(dst, path)
    assert report.format == "timm" and report.complete and report.kept_init == ["mask_token"]
    x = torch.randn(2, 3, 32, 32)
    cls, tokens = timm_outputs(src, x)
    our_cls, prenorm = outputs(dst, x)
    torch.testing.assert_close(our_cls, cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dst.norm(prenorm), tokens, rtol=1e-5, atol=1e-5)


def test_timm_interpolation_matches_with_timm_settings():
    src = timm_vit()
    dst = ours(layerscale_init=1e-5, interpolate_offset=0.0, interpolate_antialias=True)
    load_pretrained(dst, src.state_dict())
    x = torch.randn(2, 3, 48, 24)
    torch.testing.assert_close(outputs(dst, x)[0], timm_outputs(src, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, dict(num_register_tokens=3), dict(ffn="swiglu")])
def test_export_to_timm_loads_strict_and_matches(kwargs):
    src = perturb(ours(**kwargs))
    timm_model = TimmViT(**timm_model_kwargs(src)).eval()
    timm_model.load_state_dict(to_timm_state_dict(src), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(timm_outputs(timm_model, x)[0], outputs(src, x)[0], rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(registers=st.integers(0, 3), grid=st.integers(1, 4), seed=st.integers(0, 50))
def test_timm_export_import_is_exact(registers, grid, seed):
    torch.manual_seed(seed)
    src = perturb(ours(depth=1, img_size=8 * grid, num_register_tokens=registers), seed)
    dst = ours(depth=1, img_size=8 * grid, num_register_tokens=registers)
    load_pretrained(dst, to_timm_state_dict(src), format="timm")
    x = torch.randn(1, 3, 8 * grid, 8 * grid)
    assert_same(outputs(dst, x), outputs(src, x))


def test_uni_architecture_maps_one_to_one():
    # UNI is timm vit_large_patch16_224 with init_values 1e-5: every tensor has our counterpart
    with torch.device("meta"):
        uni = timm.create_model("vit_large_patch16_224", init_values=1e-5, num_classes=0,
                                dynamic_img_size=True, pretrained=False)
        vit = build_backbone("vit_large", patch_size=16, layerscale_init=1e-5)
    mapped, kept_init = timm_to_ours(uni.state_dict(), vit)
    own = vit.state_dict()
    assert set(mapped) | set(kept_init) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in mapped)


def test_partial_load_refused_with_key_names():
    src = ours(layerscale_init=None)
    with pytest.raises(UserError, match=r"missing \(blocks\.0\.ls1\.gamma"):
        load_pretrained(ours(layerscale_init=1e-5), to_dinov2_state_dict(src))
    sd = to_dinov2_state_dict(ours()) | {"head.weight": torch.zeros(3, 64)}
    with pytest.raises(UserError, match=r"1 unexpected \(head\.weight\)"):
        load_pretrained(ours(), sd)
    dst = ours()
    before = dst.blocks[0].attn.qkv.weight.clone()
    report = load_pretrained(dst, sd, strict=False)
    assert report.unexpected == ["head.weight"] and not report.missing
    assert not torch.equal(dst.blocks[0].attn.qkv.weight, before)


def test_shape_mismatch_names_key():
    with pytest.raises(UserError, match=r"cls_token \[1, 1, 32\] vs model \[1, 1, 64\]"):
        load_pretrained(ours(), to_dinov2_state_dict(ours(embed_dim=32)))


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_pretrained(ours(), tmp_path / "nope.pth")
    pickled = tmp_path / "code.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a module: not allowed by weights_only
    with pytest.raises(UserError, match="weights-only"):
        load_pretrained(ours(), pickled)
    with pytest.raises(UserError, match="format"):
        load_pretrained(ours(), to_dinov2_state_dict(ours()), format="hf")
    with pytest.raises(UserError, match="no state dict found"):
        load_pretrained(ours(), {"epoch": 3, "args": {"lr": 1.0}})


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = perturb(ours())
    save_file({k: v.contiguous() for k, v in to_timm_state_dict(src).items()}, tmp_path / "w.safetensors")
    dst = ours()
    assert load_pretrained(dst, tmp_path / "w.safetensors").format == "timm"
    x = torch.randn(1, 3, 32, 32)
    assert_same(outputs(dst, x), outputs(src, x))
