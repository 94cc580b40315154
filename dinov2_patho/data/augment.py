"""Multi-crop augmentation for H&E tiles, as tensor ops (no torchvision, no PIL).

DINOv2's recipe (2 global + N local random-resized crops, colour jitter, grayscale, blur,
solarisation) adapted to pathology: tissue has no "up", so crops are also flipped vertically
and rotated by multiples of 90 degrees, and a stain jitter perturbs the haematoxylin / eosin /
DAB concentrations (Ruifrok-Johnston colour deconvolution; Tellez et al. 2018, "HED-light").

Every random draw comes from torch (the global generator, or the one passed to `__call__`),
so `torch.manual_seed` (DataLoader seeds each worker) makes the crops reproducible.
Input: a uint8 CHW tensor [3, H, W] (TileDataset). Output: {"global_crops": [2 x float
[3, G, G]], "local_crops": [n x float [3, L, L]]}, normalised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from dinov2_patho.config_files import packaged_section
from dinov2_patho.errors import UserError

Generator = torch.Generator | None

# Stain optical-density vectors (rows: haematoxylin, eosin, DAB), Ruifrok & Johnston 2001.
_RGB_FROM_HED = F.normalize(torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]), dim=1)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_GRAY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL and torchvision
_MIN_INTENSITY = 1.0 / 255.0  # optical density of a black pixel stays finite
TRAIN_DEFAULTS = "train/default.yaml"
_CROPS_KEYS = frozenset({"global_crops_size", "global_crops_scale", "local_crops_number", "local_crops_size",
                         "local_crops_scale"})


def _rand(generator: Generator) -> float:
    return torch.rand((), generator=generator).item()


def _uniform(lo: float, hi: float, generator: Generator) -> float:
    return lo + (hi - lo) * _rand(generator)


def _coin(p: float, generator: Generator) -> bool:
    return p > 0 and (p >= 1 or _rand(generator) < p)


# ---------------------------------------------------------------------------- geometry

def random_resized_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                            generator: Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area fraction in `scale` and aspect ratio (w/h) log-uniform
    in `ratio`; after 10 misses, the largest centred crop within the ratio range (torchvision's rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(*log_ratio, generator))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic, antialiased resize of a float CHW image to size x size, clamped to [0, 1]."""
    out = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bicubic", antialias=True,
                        align_corners=False)
    return out.squeeze(0).clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------- colour

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma [1, H, W] of an RGB image [3, H, W]."""
    return torch.einsum("chw,c->hw", x, _GRAY_WEIGHTS.to(x)).unsqueeze(0)


def _blend(x: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (factor * x + (1.0 - factor) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (x * factor).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(), factor)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """HSV [3, H, W] (all channels in [0, 1]) of an RGB image in [0, 1]."""
    r, g, b = x.unbind(0)
    maxc, minc = x.amax(dim=0), x.amin(dim=0)  # amax/amin: far faster than max(dim) on CPU
    chroma = maxc - minc
    flat = chroma == 0
    safe_chroma = torch.where(flat, torch.ones_like(chroma), chroma)
    saturation = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    # Hue sector by the channel holding the max (red wins ties, then green).
    hue = torch.where(maxc == r, (g - b) / safe_chroma,
                      torch.where(maxc == g, 2.0 + (b - r) / safe_chroma, 4.0 + (r - g) / safe_chroma))
    hue = torch.where(flat, torch.zeros_like(hue), hue / 6.0).remainder(1.0)
    return torch.stack([hue, saturation, maxc])


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """RGB of an HSV image: channel n (5, 3, 1 for r, g, b) is v - v*s*clamp(min(k, 4-k), 0, 1) with
    k = (n + 6h) mod 6, the closed form of the sector table."""
    h, s, v = x.unbind(0)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(3, 1, 1)
    k = (n + 6.0 * h.unsqueeze(0)).remainder(6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(x)
    hsv[0] = (hsv[0] + shift).remainder(1.0)
    return hsv_to_rgb(hsv)


def hed_jitter(x: torch.Tensor, scale: Sequence[float], bias: Sequence[float]) -> torch.Tensor:
    """Scale and shift the per-stain concentrations (H, E, D): od' = (od @ HED^-1 * scale + bias) @ HED,
    folded into one 3x3 map on optical densities; identity for scale 1, bias 0."""
    m, m_inv = _RGB_FROM_HED.to(x), _HED_FROM_RGB.to(x)
    a = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    b = torch.as_tensor(bias, dtype=x.dtype, device=x.device)
    transform = m_inv @ torch.diag(a) @ m
    offset = b @ m
    od = -torch.log(x.clamp(min=_MIN_INTENSITY))
    od = torch.einsum("chw,cd->dhw", od, transform) + offset.view(3, 1, 1)
    return torch.exp(-od).clamp_(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur, reflect padding. Kernel radius ceil(3 sigma), which keeps 99.7 % of
    the Gaussian at every sigma, or (kernel_size - 1) / 2 for a fixed size: DINOv2's torchvision
    GaussianBlur(9) truncates sigma 2 at 2 sigma. Either is capped by the image."""
    wanted = int(math.ceil(3.0 * sigma)) if kernel_size is None else (kernel_size - 1) // 2
    radius = min(wanted, x.shape[-1] - 1, x.shape[-2] - 1)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    y = F.pad(x.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    y = F.conv2d(y, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return y.squeeze(0)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


# ---------------------------------------------------------------------------- config

@dataclass(frozen=True)
class AugmentConfig:
    """Everything the augmentation reads: `crops.*` and `augmentation.*` of the training config.
    No defaults here: `defaults()` and `from_config()` take them from the packaged
    configs/train/default.yaml, their one home."""

    global_crops_size: int
    global_crops_scale: tuple[float, float]
    local_crops_number: int
    local_crops_size: int
    local_crops_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip_p: float
    vflip_p: float
    rot90: bool
    color_jitter_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    hed_jitter_p: float
    hed_scale: float  # each stain's concentration times U(1 - s, 1 + s)
    hed_bias: float  # plus U(-b, b) optical density
    grayscale_p: float
    blur_sigma: tuple[float, float]
    blur_p: tuple[float, float, float]  # global crop 1, global crop 2, local crops
    blur_kernel_size: int | None  # None: 2 ceil(3 sigma) + 1 taps
    solarize_p: tuple[float, float, float]
    solarize_threshold: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> UserError:
            section = "crops" if key in _CROPS_KEYS else "augmentation"
            return UserError(f"config: {section}.{key}={getattr(self, key)!r}: {why}")

        for key in ("global_crops_size", "local_crops_size"):
            if getattr(self, key) < 1:
                raise bad(key, "must be a positive number of pixels")
        if self.local_crops_number < 0:
            raise bad("local_crops_number", "must be >= 0")
        for key in ("global_crops_scale", "local_crops_scale", "crop_ratio", "blur_sigma"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi:
                raise bad(key, "must be a range [min, max] with 0 < min <= max")
        for key in ("global_crops_scale", "local_crops_scale"):
            if getattr(self, key)[1] > 1:
                raise bad(key, "area fractions must be <= 1")
        probabilities = ("hflip_p", "vflip_p", "color_jitter_p", "hed_jitter_p", "grayscale_p")
        for key in probabilities:
            if not 0 <= getattr(self, key) <= 1:
                raise bad(key, "a probability must be in [0, 1]")
        for key in ("blur_p", "solarize_p"):
            values = getattr(self, key)
            if len(values) != 3 or not all(0 <= p <= 1 for p in values):
                raise bad(key, "needs 3 probabilities in [0, 1]: global crop 1, global crop 2, local")
        size = self.blur_kernel_size
        if size is not None and (type(size) is not int or size < 3 or size % 2 == 0):
            raise bad("blur_kernel_size", "must be an odd integer >= 3, or null (2 ceil(3 sigma) + 1)")
        for key in ("brightness", "contrast", "saturation", "hed_scale", "hed_bias"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if not 0 <= self.hue <= 0.5:
            raise bad("hue", "must be in [0, 0.5]")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise bad("std", "mean and std need 3 values, std > 0")

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> AugmentConfig:
        """From the training config's `crops` and `augmentation` sections (missing keys: defaults)."""
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
        crops = OmegaConf.to_container(cfg.get("crops") or OmegaConf.create({}), resolve=True)
        augmentation = OmegaConf.to_container(cfg.get("augmentation") or OmegaConf.create({}), resolve=True)
        names = {f.name for f in fields(cls)}
        for key in augmentation:
            if key not in names or key in _CROPS_KEYS:
                raise UserError(f"config: unknown key augmentation.{key}")
        return cls.defaults(**{k: v for k, v in crops.items() if k in _CROPS_KEYS}, **augmentation)

    @classmethod
    def defaults(cls, **values: Any) -> AugmentConfig:
        """The packaged defaults, with `values` (field=value) in place of some."""
        crops = {k: v for k, v in packaged_section(TRAIN_DEFAULTS, "crops").items() if k in _CROPS_KEYS}
        merged = crops | packaged_section(TRAIN_DEFAULTS, "augmentation")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"AugmentConfig has no field {unknown[0]!r}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in (merged | values).items()})


# ---------------------------------------------------------------------------- pipeline

class MultiCropAugmentation:
    def __init__(self, config: AugmentConfig | None = None):
        self.config = config or AugmentConfig.defaults()
        c = self.config
        self._mean = torch.tensor(c.mean).view(3, 1, 1)
        self._std = torch.tensor(c.std).view(3, 1, 1)

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> MultiCropAugmentation:
        return cls(AugmentConfig.from_config(cfg))

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> dict[str, list[torch.Tensor]]:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an RGB CHW tensor [3, H, W], got shape {tuple(image.shape)}")
        c = self.config
        global_crops = [self._view(image, c.global_crops_size, c.global_crops_scale, kind, generator)
                        for kind in (0, 1)]
        local_crops = [self._view(image, c.local_crops_size, c.local_crops_scale, 2, generator)
                       for _ in range(c.local_crops_number)]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def _view(self, image: torch.Tensor, size: int, scale: Sequence[float], kind: int,
              g: Generator) -> torch.Tensor:
        """One crop; `kind` 0/1 = first/second global crop, 2 = local (selects blur/solarise odds)."""
        c = self.config
        top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], scale, c.crop_ratio, g)
        x = image[:, top:top + h, left:left + w]
        x = resize(x.float().div_(255.0) if x.dtype == torch.uint8 else x.float(), size)
        if _coin(c.hflip_p, g):
            x = x.flip(-1)
        if _coin(c.vflip_p, g):
            x = x.flip(-2)
        if c.rot90:
            x = torch.rot90(x, int(torch.randint(0, 4, (), generator=g)), dims=(1, 2))
        if _coin(c.hed_jitter_p, g):
            scale_hed = [_uniform(1 - c.hed_scale, 1 + c.hed_scale, g) for _ in range(3)]
            bias_hed = [_uniform(-c.hed_bias, c.hed_bias, g) for _ in range(3)]
            x = hed_jitter(x, scale_hed, bias_hed)
        if _coin(c.color_jitter_p, g):
            x = self._color_jitter(x, g)
        if _coin(c.grayscale_p, g):
            x = grayscale(x).expand(3, -1, -1)
        if _coin(c.blur_p[kind], g):
            x = gaussian_blur(x, _uniform(*c.blur_sigma, g), c.blur_kernel_size)
        if _coin(c.solarize_p[kind], g):
            x = solarize(x, c.solarize_threshold)
        return ((x - self._mean) / self._std).contiguous()

    def _color_jitter(self, x: torch.Tensor, g: Generator) -> torch.Tensor:
        """Brightness, contrast, saturation, hue with random factors, in random order (torchvision's)."""
        c = self.config
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0 and c.brightness > 0:
                x = adjust_brightness(x, _uniform(max(0.0, 1 - c.brightness), 1 + c.brightness, g))
            elif op == 1 and c.contrast > 0:
                x = adjust_contrast(x, _uniform(max(0.0, 1 - c.contrast), 1 + c.contrast, g))
            elif op == 2 and c.saturation > 0:
                x = adjust_saturation(x, _uniform(max(0.0, 1 - c.saturation), 1 + c.saturation, g))
            elif op == 3 and c.hue > 0:
                x = adjust_hue(x, _uniform(-c.hue, c.hue, g))
        return x
