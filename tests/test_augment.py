import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from dinov2_patho.data.augment import (
    AugmentConfig,
    MultiCropAugmentation,
    adjust_hue,
    gaussian_blur,
    hed_jitter,
    hsv_to_rgb,
    random_resized_crop_box,
    rgb_to_hsv,
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


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.integers(1, 16))
def test_hsv_round_trip(seed, size):
    x = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))
    hsv = rgb_to_hsv(x)
    assert hsv.min() >= 0 and hsv.max() <= 1
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-5)
    assert torch.allclose(adjust_hue(x, 0.0), x, atol=1e-5)
    assert torch.allclose(adjust_hue(adjust_hue(x, 0.3), -0.3), x, atol=1e-4)


def test_hue_of_primaries():
    red_green_blue = torch.eye(3).view(3, 3, 1)  # pixel j is primary j
    assert torch.allclose(rgb_to_hsv(red_green_blue)[0, :, 0], torch.tensor([0.0, 1 / 3, 2 / 3]))
    assert torch.allclose(adjust_hue(red_green_blue, 1 / 3), torch.eye(3)[[2, 0, 1]].view(3, 3, 1), atol=1e-6)


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
    monkeypatch.setattr(augment, "gaussian_blur", lambda x, *_: blurred.append(x.shape[-1]) or x)
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
