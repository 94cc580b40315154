import pytest
import torch

from dinov2_patho.data.augment import MultiCropAugmentation
from dinov2_patho.data.collate import collate_multicrop
from dinov2_patho.data.masking import MaskingGenerator
from dinov2_patho.errors import UserError
from dinov2_patho.train.config import load_train_config
from dinov2_patho.train.ssl_meta_arch import SSLMetaArch, autocast_dtype

TINY = [
    "student.embed_dim=64", "student.depth=2", "student.num_heads=2", "student.patch_size=14",
    "student.drop_path_rate=0.0", "crops.global_crops_size=56", "crops.local_crops_size=28",
    "crops.local_crops_number=2", "dino.head_n_prototypes=64", "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32", "ibot.head_n_prototypes=48", "ibot.head_hidden_dim=64",
    "ibot.head_bottleneck_dim=32", "compute_precision.amp=off",
]


def tiny_cfg(*overrides):
    return load_train_config(None, [*TINY, *overrides])


def synthetic_tiles(n, seed=0):
    """H&E-ish tiles: pink background with purple blobs at random places."""
    g = torch.Generator().manual_seed(seed)
    tiles = []
    yy, xx = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    for _ in range(n):
        tile = torch.tensor([235.0, 190.0, 215.0]).view(3, 1, 1).expand(3, 112, 112).clone()
        for _ in range(int(torch.randint(3, 9, (), generator=g))):
            cy, cx = torch.rand(2, generator=g) * 112
            r = 4 + 10 * torch.rand((), generator=g)
            blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).unsqueeze(0)
            tile = torch.where(blob, torch.tensor([110.0, 60.0, 150.0]).view(3, 1, 1), tile)
        tiles.append(tile.to(torch.uint8))
    return tiles


def make_batch(cfg, tiles, seed=0):
    torch.manual_seed(seed)
    aug = MultiCropAugmentation.from_config(cfg)
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    return collate_multicrop([(aug(t), i) for i, t in enumerate(tiles)],
                             mask_ratio_min_max=tuple(cfg.ibot.mask_ratio_min_max),
                             mask_probability=cfg.ibot.mask_sample_probability,
                             mask_generator=MaskingGenerator(grid, max_num_patches=0.5 * grid * grid))


@pytest.fixture(scope="module")
def tiles():
    return synthetic_tiles(8)


def test_teacher_gets_no_gradients_and_student_does(tiles):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    arch = SSLMetaArch(cfg).train()
    assert not arch.teacher.training and arch.student.training
    losses = arch.forward_backward(make_batch(cfg, tiles), teacher_temp=0.07)
    assert set(losses) >= {"total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss",
                           "ibot_loss"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert all(p.grad is None and not p.requires_grad for p in arch.teacher.parameters())
    grads = {n: p.grad for n, p in arch.student.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert grads["backbone.mask_token"].abs().sum() > 0  # iBOT reaches the mask token


def test_teacher_starts_as_student_and_follows_by_ema(tiles):
    torch.manual_seed(0)
    arch = SSLMetaArch(tiny_cfg())
    for s, t in zip(arch.student.parameters(), arch.teacher.parameters()):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr()
    before = [t.clone() for t in arch.teacher.parameters()]
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(1.0)
    arch.update_teacher(0.9)
    for t0, s, t in zip(before, arch.student.parameters(), arch.teacher.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)


@pytest.mark.parametrize("centering,separate", [("sinkhorn_knopp", False), ("centering", True)])
def test_a_few_steps_lower_the_loss(tiles, centering, separate):
    torch.manual_seed(0)
    cfg = tiny_cfg(f"teacher.centering={centering}", f"ibot.separate_head={separate}")
    arch = SSLMetaArch(cfg).train()
    assert ("ibot_head" in arch.student) == separate
    batch = make_batch(cfg, tiles[:4])
    optimizer = torch.optim.AdamW(arch.get_params_groups(), lr=2e-3, weight_decay=0.0)
    totals = []
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        totals.append(arch.forward_backward(batch, teacher_temp=0.07)["total_loss"])
        optimizer.step()
        arch.update_teacher(0.9)
    assert totals[-1] < totals[0] - 0.1, totals


def test_without_local_crops_or_masks(tiles):
    torch.manual_seed(0)
    cfg = tiny_cfg("crops.local_crops_number=0", "ibot.mask_sample_probability=0.0")
    arch = SSLMetaArch(cfg).train()
    batch = make_batch(cfg, tiles[:2])
    assert batch["n_local_crops"] == 0 and batch["n_masked_patches"] == 0
    losses = arch.forward_backward(batch, teacher_temp=0.04)
    assert losses["dino_local_crops_loss"] == 0.0 and losses["ibot_loss"] == 0.0
    assert losses["dino_global_crops_loss"] > 0 and torch.isfinite(torch.tensor(losses["total_loss"]))


def test_one_sample_per_rank_has_no_nan(tiles):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    arch = SSLMetaArch(cfg).train()
    losses = arch.forward_backward(make_batch(cfg, tiles[:1]), teacher_temp=0.07)
    assert losses["koleo_loss"] == 0.0  # one image per view: no neighbour
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in arch.student.parameters() if p.grad is not None)


def test_params_groups_decay_and_markers():
    cfg = tiny_cfg("optim.layerwise_decay=0.5", "optim.patch_embed_lr_mult=0.2",
                   "student.num_register_tokens=2")
    arch = SSLMetaArch(cfg)
    groups = arch.get_params_groups()
    seen = {}
    for g in groups:
        for name in g["names"]:
            assert name not in seen
            seen[name] = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
    assert set(seen) == {n for n, p in arch.student.named_parameters() if p.requires_grad}
    # 2 blocks: block i gets 0.5 ** (2 - i), embeddings 0.5 ** 3, the final norm and heads 1
    assert seen["backbone.blocks.0.attn.qkv.weight"] == (0.25, 1.0, False)
    assert seen["backbone.blocks.1.mlp.fc1.weight"] == (0.5, 1.0, False)
    assert seen["backbone.blocks.1.mlp.fc1.bias"] == (0.5, 0.0, False)
    assert seen["backbone.blocks.0.ls1.gamma"] == (0.25, 0.0, False)
    assert seen["backbone.patch_embed.proj.weight"] == (pytest.approx(0.125 * 0.2), 1.0, False)
    for token in ("cls_token", "pos_embed", "mask_token", "register_tokens"):
        assert seen[f"backbone.{token}"] == (0.125, 0.0, False)
    assert seen["backbone.norm.weight"] == (1.0, 0.0, False)
    assert seen["dino_head.last_layer.weight_v"][2] is True
    assert seen["dino_head.mlp.0.weight"] == (1.0, 1.0, False)


def test_token_weight_decay_switch_decays_only_the_tokens():
    def multipliers(*overrides):
        groups = SSLMetaArch(tiny_cfg("student.num_register_tokens=2", *overrides)).get_params_groups()
        return {name: (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
                for g in groups for name in g["names"]}

    default, decayed = multipliers(), multipliers("optim.token_weight_decay=true")
    tokens = {f"backbone.{t}" for t in ("cls_token", "pos_embed", "mask_token", "register_tokens")}
    assert {n for n in default if default[n] != decayed[n]} == tokens
    for name in tokens:  # DINOv2 decays them like any weight
        assert default[name][1] == 0.0 and decayed[name] == (default[name][0], 1.0, False)
    with pytest.raises(UserError, match="optim.token_weight_decay"):
        SSLMetaArch(tiny_cfg("optim.token_weight_decay=sometimes")).get_params_groups()


def test_config_errors_name_the_key():
    with pytest.raises(UserError, match="teacher.centering"):
        SSLMetaArch(tiny_cfg("teacher.centering=sinkhorn"))
    with pytest.raises(UserError, match="crops.local_crops_size=30"):
        SSLMetaArch(tiny_cfg("crops.local_crops_size=30"))
    with pytest.raises(UserError, match="ibot.mask_ratio_min_max"):
        SSLMetaArch(tiny_cfg("ibot.mask_ratio_min_max=[0.5,0.1]"))
    with pytest.raises(UserError, match="compute_precision.amp"):
        SSLMetaArch(tiny_cfg("compute_precision.amp=fp8"))


def test_precision_bf16_on_gpu_fp32_on_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", gpu) is torch.bfloat16
    assert autocast_dtype(False, gpu) is None and autocast_dtype("off", gpu) is None
    assert autocast_dtype("fp16", gpu) is torch.float16 and autocast_dtype("bf16", cpu) is torch.bfloat16


@pytest.mark.parametrize("n_local", [0, 2])
def test_dino_term_is_the_mean_cross_entropy_over_crop_pairs(tiles, n_local):
    """Each global crop pairs with the teacher's other view, each local crop with both: 2 + 2 n_local
    pairs, averaged. DINOv2 divides by max(2 n_local, 1) + 2, 3 without local crops (its DINO term is
    then 2/3 of this one: dino.loss_weight=0.667 gives its weighting)."""
    from dinov2_patho.loss.centering import sinkhorn_knopp

    torch.manual_seed(0)
    cfg = tiny_cfg(f"crops.local_crops_number={n_local}", "ibot.loss_weight=0", "dino.koleo_loss_weight=0")
    arch = SSLMetaArch(cfg).train()
    batch = make_batch(cfg, tiles[:4])
    total = arch.forward_backward(batch, teacher_temp=0.07)["total_loss"]
    with torch.no_grad():
        teacher = arch.teacher["dino_head"](arch.teacher["backbone"](batch["global_crops"]))
        targets = sinkhorn_knopp(teacher, 0.07).chunk(2)
        student = arch.student["backbone"]
        views = arch.student["dino_head"](student(batch["global_crops"], batch["masks"])).chunk(2)
        crops = arch.student["dino_head"](student(batch["local_crops"])).chunk(n_local) if n_local else ()

    def ce(t, s):
        return -(t * torch.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    pairs = [ce(targets[1], views[0]), ce(targets[0], views[1])]
    pairs += [ce(t, crop) for crop in crops for t in targets]
    assert len(pairs) == 2 + 2 * n_local
    assert total == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-5)
