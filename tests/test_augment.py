import colorsys
import math

import pytest
import torch
import torch.nn.functional as F
from augment_reference import reference_augment
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from dinov2_patho.data.augment import (
    AugmentConfig,
    MultiCropAugmentation,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    hed_jitter,
    random_resized_crop_box,
    solarize,
)
from dinov2_patho.errors import UserError

# Everything random switched off: a crop is a (full-tile) resize plus normalisation.
PLAIN = dict(global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0,
             vflip_p=0.0, rot90=False, color_jitter_p=0.0, hed_jitter_p=0.0, grayscale_p=0.0,
             blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _tile(seed=0, size=224):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)


def test_output_shapes_dtypes_and_normalisation():
    aug = MultiCropAugmentation(AugmentConfig.defaults(local_crops_number=3))
    out = aug(_tile())
    assert [t.shape for t in out["global_crops"]] == [(3, 224, 224)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, 98, 98)] * 3
    assert all(t.dtype == torch.float32 for t in out["global_crops"] + out["local_crops"])
    # ImageNet-normalised values of a [0, 1] image lie in [-mean/std, (1-mean)/std]
    assert out["global_crops"][0].min() >= -0.485 / 0.229 - 1e-4 and out["global_crops"][0].max() <= 2.65


def test_deterministic_under_manual_seed():
    aug, tile = MultiCropAugmentation(AugmentConfig.defaults(local_crops_number=2)), _tile()
    torch.manual_seed(3)
    a = aug(tile)
    torch.manual_seed(3)
    b = aug(tile)
    c = aug(tile)
    assert all(torch.equal(x, y) for x, y in zip(a["global_crops"] + a["local_crops"],
                                                  b["global_crops"] + b["local_crops"]))
    assert not torch.equal(b["global_crops"][0], c["global_crops"][0])


def test_everything_off_is_a_plain_resize():
    tile = _tile()
    aug = MultiCropAugmentation(AugmentConfig.defaults(**PLAIN, global_crops_size=224, local_crops_number=1))
    out = aug(tile)
    assert torch.allclose(out["global_crops"][0], tile.float() / 255, atol=1e-5)
    assert torch.allclose(out["global_crops"][1], out["global_crops"][0])
    assert out["local_crops"][0].shape == (3, 98, 98)


def test_rotation_and_flips_are_dihedral():
    tile = _tile(size=56)
    cfg = {**PLAIN, "rot90": True, "hflip_p": 0.5, "vflip_p": 0.5, "global_crops_size": 56,
           "local_crops_number": 0}
    aug = MultiCropAugmentation(AugmentConfig.defaults(**cfg))
    base = tile.float() / 255
    variants = [torch.rot90(b, k, dims=(1, 2)) for b in (base, base.flip(-1)) for k in range(4)]
    torch.manual_seed(0)
    seen = set()
    for _ in range(80):
        crop = aug(tile)["global_crops"][0]
        matches = [i for i, v in enumerate(variants) if torch.allclose(crop, v, atol=1e-5)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 8  # all eight symmetries of the square show up


def _colorsys_hue(x, shift):
    """Python's colorsys, pixel by pixel: the independent definition of an HSV hue rotation."""
    pixels = [colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
              for h, s, v in (colorsys.rgb_to_hsv(*p) for p in x.reshape(3, -1).t().tolist())]
    return torch.tensor(pixels).t().reshape(x.shape)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.integers(1, 12), shift=st.floats(-0.5, 0.5),
       levels=st.sampled_from([None, 4]))
def test_hue_matches_colorsys(seed, size, shift, levels):
    x = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))
    if levels:  # few levels: ties between channels and grey pixels
        x = (x * levels).floor() / levels
    assert torch.allclose(adjust_hue(x, shift), _colorsys_hue(x, shift), atol=1e-5)
    assert torch.allclose(adjust_hue(x, 0.0), x, atol=1e-5)


def test_hue_of_primaries():
    red_green_blue = torch.eye(3).view(3, 3, 1)  # pixel j is primary j
    assert torch.allclose(adjust_hue(red_green_blue, 1 / 3), torch.eye(3)[[2, 0, 1]].view(3, 3, 1), atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.integers(2, 24), n=st.integers(1, 4))
def test_batched_ops_equal_one_image_at_a_time(seed, size, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    sigmas, factors = torch.rand(n, generator=g) * 3, torch.rand(n, generator=g) * 2
    shifts = torch.rand(n, generator=g) - 0.5
    scale, bias = 0.8 + 0.4 * torch.rand(n, 3, generator=g), 0.1 * torch.rand(n, 3, generator=g) - 0.05
    batched = [gaussian_blur(x, sigmas), adjust_hue(x, shifts), adjust_contrast(x, factors),
               adjust_saturation(x, factors), hed_jitter(x, scale, bias)]
    for i in range(n):
        single = [gaussian_blur(x[i], sigmas[i].item()), adjust_hue(x[i], shifts[i].item()),
                  adjust_contrast(x[i], factors[i].item()), adjust_saturation(x[i], factors[i].item()),
                  hed_jitter(x[i], scale[i].tolist(), bias[i].tolist())]
        for b, s in zip(batched, single):
            assert torch.allclose(b[i], s, atol=1e-5)


def test_hed_jitter_identity_and_effect():
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(min=1 / 255)
    assert torch.allclose(hed_jitter(x, [1, 1, 1], [0, 0, 0]), x, atol=1e-5)
    # a stained pixel: non-negative H, E, D concentrations mixed by the stain OD vectors
    stains = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    stains = stains / stains.norm(dim=1, keepdim=True)
    conc = torch.rand(16, 3, generator=torch.Generator().manual_seed(1))
    tissue = torch.exp(-(conc @ stains)).t().reshape(3, 4, 4)
    more_h = hed_jitter(tissue, [1.5, 1, 1], [0, 0, 0])
    # more haematoxylin absorbs more light in every channel (its OD vector is positive): darker
    assert (more_h <= tissue + 1e-6).all() and (more_h < tissue - 1e-3).any()
    expected = torch.exp(-(conc * torch.tensor([1.5, 1, 1]) @ stains)).t().reshape(3, 4, 4)
    assert torch.allclose(more_h, expected, atol=1e-5)
    white = torch.ones(3, 2, 2)
    assert torch.allclose(hed_jitter(white, [2, 0.5, 1], [0, 0, 0]), white)  # no stain stays no stain


def test_blur_and_solarize():
    x = torch.zeros(3, 21, 21)
    x[:, 10, 10] = 1.0
    y = gaussian_blur(x, 1.0)
    assert y.sum().item() == pytest.approx(3.0, rel=1e-4)  # mass kept
    assert y[0, 10, 10] < 1 and y[0, 10, 11] == pytest.approx(y[0, 11, 10])
    assert y[0, 10, 11] / y[0, 10, 10] == pytest.approx(math.exp(-0.5), rel=1e-4)
    assert torch.allclose(solarize(torch.tensor([0.2, 0.5, 0.9]), 0.5), torch.tensor([0.2, 0.5, 0.1]))


@settings(max_examples=50, deadline=None)
@given(h=st.integers(8, 300), w=st.integers(8, 300), lo=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_random_resized_crop_box_stays_inside(h, w, lo, seed):
    top, left, ch, cw = random_resized_crop_box(h, w, (lo, 1.0), (3 / 4, 4 / 3),
                                                torch.Generator().manual_seed(seed))
    assert top >= 0 and left >= 0 and ch >= 1 and cw >= 1
    assert top + ch <= h and left + cw <= w


def test_from_config_reads_crops_and_augmentation_and_rejects_bad_values():
    cfg = OmegaConf.create({"crops": {"global_crops_size": 112, "local_crops_number": 2,
                                      "local_crops_size": 42, "global_crops_scale": [0.5, 1.0]},
                            "augmentation": {"hed_jitter_p": 1.0, "blur_p": [0.5, 0.5, 0.5]}})
    aug = MultiCropAugmentation.from_config(cfg)
    assert aug.config.global_crops_scale == (0.5, 1.0) and aug.config.hed_jitter_p == 1.0
    out = aug(_tile())
    assert out["global_crops"][0].shape == (3, 112, 112) and len(out["local_crops"]) == 2
    with pytest.raises(UserError, match="unknown key augmentation.hed_jiter_p"):
        AugmentConfig.from_config({"augmentation": {"hed_jiter_p": 0.5}})
    with pytest.raises(UserError, match=r"augmentation.grayscale_p=1.5"):
        AugmentConfig.defaults(grayscale_p=1.5)
    with pytest.raises(UserError, match=r"crops.local_crops_scale"):
        AugmentConfig.defaults(local_crops_scale=(0.3, 0.1))


def test_blur_kernel_size_fixes_the_taps_as_torchvision():
    """blur_kernel_size=9: a 9 x 9 Gaussian (torchvision's GaussianBlur(9), DINOv2's), written here as
    one 2-D convolution; the default keeps ceil(3 sigma) taps each side, so at sigma 2 it differs."""
    x = torch.rand(3, 30, 30, generator=torch.Generator().manual_seed(0))
    sigma = 2.0
    t = torch.arange(-4.0, 5.0)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k2 = torch.outer(k1, k1) / k1.sum() ** 2
    padded = torch.nn.functional.pad(x.unsqueeze(0), (4, 4, 4, 4), mode="reflect")
    expected = torch.nn.functional.conv2d(padded, k2.expand(3, 1, 9, 9), groups=3).squeeze(0)
    assert torch.allclose(gaussian_blur(x, sigma, kernel_size=9), expected, atol=1e-6)
    assert not torch.allclose(gaussian_blur(x, sigma), expected, atol=1e-4)
    assert AugmentConfig.from_config({"augmentation": {"blur_kernel_size": 9}}).blur_kernel_size == 9
    for bad in (8, 1, "9"):
        with pytest.raises(UserError, match="augmentation.blur_kernel_size"):
            AugmentConfig.defaults(blur_kernel_size=bad)


def test_blur_p_is_the_odds_each_crop_is_blurred(monkeypatch):
    """blur_p [0.0, 0.9, 0.5] reproduces what DINOv2's GaussianBlur(p=1.0 / 0.1 / 0.5) does (1 - p)."""
    import dinov2_patho.data.augment as augment

    blurred = []
    monkeypatch.setattr(augment, "gaussian_blur", lambda x, *_: blurred.extend([x.shape[-1]] * len(x)) or x)
    cfg = AugmentConfig.defaults(**{**PLAIN, "blur_p": (0.0, 0.9, 0.5)}, global_crops_size=16,
                                 local_crops_size=8, local_crops_number=1)
    aug, g = MultiCropAugmentation(cfg), torch.Generator().manual_seed(0)
    n = 400
    for _ in range(n):
        aug(_tile(size=32), generator=g)
    global_blurred, local_blurred = blurred.count(16), blurred.count(8)
    # global crop 1 never, crop 2 with p 0.9, the local crop with 0.5 (4 binomial sigmas at n = 400)
    assert abs(global_blurred - 0.9 * n) < 4 * math.sqrt(n * 0.9 * 0.1)
    assert abs(local_blurred - 0.5 * n) < 4 * math.sqrt(n * 0.25)


def test_input_must_be_uint8():
    with pytest.raises(ValueError, match="uint8 RGB CHW"):
        MultiCropAugmentation()(torch.rand(3, 32, 32))


def _tissue_like(seed):
    """Smooth colour fields plus sensor noise (224 px uint8): closer to H&E than white noise, whose
    bicubic overshoot is clamped differently by uint8 and float kernels."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 14, 14, generator=g) * 200 + 30
    tile = F.interpolate(low, size=(224, 224), mode="bilinear", align_corners=False)[0]
    return (tile + 6 * torch.randn(3, 224, 224, generator=g)).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("blur_kernel_size", [None, 9])
def test_same_draws_and_pixels_as_the_per_crop_float_path(blur_kernel_size):
    """The batched uint8 path against the per-crop float32 path it replaced (tests/augment_reference):
    one seed, the same draws from the generator (its state after each sample is equal); each crop
    within one grey level on average; per-channel mean and std over all crops within 0.1 level."""
    cfg = AugmentConfig.defaults(blur_kernel_size=blur_kernel_size)
    aug = MultiCropAugmentation(cfg)
    std, mean = torch.tensor(cfg.std).view(3, 1, 1), torch.tensor(cfg.mean).view(3, 1, 1)
    ours, theirs = [], []
    for seed in range(12):
        tile = _tissue_like(seed)
        g_new, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        new, ref = aug(tile, g_new), reference_augment(tile, cfg, g_ref)
        assert torch.equal(g_new.get_state(), g_ref.get_state())
        for a, b in zip(new["global_crops"] + new["local_crops"], ref["global_crops"] + ref["local_crops"]):
            a, b = (a * std + mean) * 255, (b * std + mean) * 255  # grey levels
            assert a.shape == b.shape and (a - b).abs().mean() < 1.0
            ours.append(a.flatten(1))
            theirs.append(b.flatten(1))
    ours, theirs = torch.cat(ours, 1), torch.cat(theirs, 1)
    assert torch.allclose(ours.mean(1), theirs.mean(1), atol=0.1)
    assert torch.allclose(ours.std(1), theirs.std(1), atol=0.1)


def test_draw_statistics_follow_the_config():
    """Each random choice at its configured rate or range over 4,000 crops (binomial: 5 sigma)."""
    cfg = AugmentConfig.defaults()
    aug, g = MultiCropAugmentation(cfg), torch.Generator().manual_seed(0)
    n = 4000
    scales = (cfg.global_crops_scale, cfg.global_crops_scale, cfg.local_crops_scale)
    draws = {kind: [aug.draw(224, 224, scales[kind], kind, g) for _ in range(n)] for kind in (0, 1, 2)}

    def rate(values, p):
        return abs(sum(values) / len(values) - p) <= 5 * math.sqrt(p * (1 - p) / len(values)) + 1e-9

    every = draws[0] + draws[1] + draws[2]
    assert rate([d.hflip for d in every], cfg.hflip_p) and rate([d.vflip for d in every], cfg.vflip_p)
    assert all(rate([d.quarter_turns == k for d in every], 0.25) for k in range(4))
    assert rate([d.hed is not None for d in every], cfg.hed_jitter_p)
    assert rate([bool(d.jitter) for d in every], cfg.color_jitter_p)
    assert rate([d.grayscale for d in every], cfg.grayscale_p)
    for kind in (0, 1, 2):
        assert rate([d.blur_sigma is not None for d in draws[kind]], cfg.blur_p[kind])
        assert rate([d.solarize for d in draws[kind]], cfg.solarize_p[kind])
    jittered = [d.jitter for d in every if d.jitter]
    assert all(sorted(op for op, _ in j) == [0, 1, 2, 3] for j in jittered)
    assert all(rate([j[0][0] == op for j in jittered], 0.25) for op in range(4))  # random order
    hues = torch.tensor([f for j in jittered for op, f in j if op == 3])
    assert hues.abs().max() <= cfg.hue and abs(hues.mean()) < 5 * cfg.hue / math.sqrt(3 * len(hues))
    sigmas = torch.tensor([d.blur_sigma for d in every if d.blur_sigma is not None])
    assert sigmas.min() >= cfg.blur_sigma[0] and sigmas.max() <= cfg.blur_sigma[1]
    areas = torch.tensor([d.box[2] * d.box[3] / 224**2 for d in draws[2]])
    assert areas.min() >= cfg.local_crops_scale[0] * 0.9 and areas.max() <= cfg.local_crops_scale[1] * 1.1
