"""The multi-crop augmentation as it was before the batched uint8 path (one crop at a time, float32
from the resize on, HSV through explicit rgb->hsv->rgb, blur as a grouped conv2d): the reference
that tests/test_augment.py compares the library against. Test-only; draws from the generator in the
same order as the library, so one seed gives both paths the same parameters."""

import math

import torch
import torch.nn.functional as F

from dinov2_patho.data.augment import AugmentConfig, random_resized_crop_box

_RGB_FROM_HED = F.normalize(torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]), dim=1)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_GRAY = torch.tensor([0.299, 0.587, 0.114])


def _uniform(lo, hi, g):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _coin(p, g):
    return p > 0 and (p >= 1 or torch.rand((), generator=g).item() < p)


def _gray(x):
    return torch.einsum("chw,c->hw", x, _GRAY).unsqueeze(0)


def _blend(x, other, f):
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def _hue(x, shift):
    r, g, b = x.unbind(0)
    maxc, minc = x.amax(dim=0), x.amin(dim=0)
    chroma = maxc - minc
    flat = chroma == 0
    safe = torch.where(flat, torch.ones_like(chroma), chroma)
    sat = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    hue = torch.where(maxc == r, (g - b) / safe,
                      torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = (torch.where(flat, torch.zeros_like(hue), hue / 6.0) + shift).remainder(1.0)
    k = (torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1) + 6.0 * hue.unsqueeze(0)).remainder(6.0)
    return maxc - maxc * sat * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def _hed(x, scale, bias):
    transform = _HED_FROM_RGB @ torch.diag(torch.tensor(scale)) @ _RGB_FROM_HED
    od = -torch.log(x.clamp(min=1.0 / 255.0))
    od = torch.einsum("chw,cd->dhw", od, transform) + (torch.tensor(bias) @ _RGB_FROM_HED).view(3, 1, 1)
    return torch.exp(-od).clamp_(0.0, 1.0)


def _blur(x, sigma, kernel_size):
    wanted = int(math.ceil(3.0 * sigma)) if kernel_size is None else (kernel_size - 1) // 2
    radius = min(wanted, x.shape[-1] - 1, x.shape[-2] - 1)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    y = F.pad(x.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(y, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3).squeeze(0)


def reference_crop(image: torch.Tensor, c: AugmentConfig, size: int, scale, kind: int, g) -> torch.Tensor:
    top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], scale, c.crop_ratio, g)
    x = image[:, top:top + h, left:left + w].float().div_(255.0).unsqueeze(0)
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = x.squeeze(0).clamp_(0.0, 1.0)
    if _coin(c.hflip_p, g):
        x = x.flip(-1)
    if _coin(c.vflip_p, g):
        x = x.flip(-2)
    if c.rot90:
        x = torch.rot90(x, int(torch.randint(0, 4, (), generator=g)), dims=(1, 2))
    if _coin(c.hed_jitter_p, g):
        scale_hed = [_uniform(1 - c.hed_scale, 1 + c.hed_scale, g) for _ in range(3)]
        x = _hed(x, scale_hed, [_uniform(-c.hed_bias, c.hed_bias, g) for _ in range(3)])
    if _coin(c.color_jitter_p, g):
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0 and c.brightness > 0:
                x = (x * _uniform(max(0.0, 1 - c.brightness), 1 + c.brightness, g)).clamp_(0.0, 1.0)
            elif op == 1 and c.contrast > 0:
                x = _blend(x, _gray(x).mean(), _uniform(max(0.0, 1 - c.contrast), 1 + c.contrast, g))
            elif op == 2 and c.saturation > 0:
                x = _blend(x, _gray(x), _uniform(max(0.0, 1 - c.saturation), 1 + c.saturation, g))
            elif op == 3 and c.hue > 0:
                x = _hue(x, _uniform(-c.hue, c.hue, g))
    if _coin(c.grayscale_p, g):
        x = _gray(x).expand(3, -1, -1)
    if _coin(c.blur_p[kind], g):
        x = _blur(x, _uniform(*c.blur_sigma, g), c.blur_kernel_size)
    if _coin(c.solarize_p[kind], g):
        x = torch.where(x >= c.solarize_threshold, 1.0 - x, x)
    return (x - torch.tensor(c.mean).view(3, 1, 1)) / torch.tensor(c.std).view(3, 1, 1)


def reference_augment(image: torch.Tensor, c: AugmentConfig, g) -> dict[str, list[torch.Tensor]]:
    return {"global_crops": [reference_crop(image, c, c.global_crops_size, c.global_crops_scale, k, g)
                             for k in (0, 1)],
            "local_crops": [reference_crop(image, c, c.local_crops_size, c.local_crops_scale, 2, g)
                            for _ in range(c.local_crops_number)]}
