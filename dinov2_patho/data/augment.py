"""Multi-crop augmentation for H&E tiles, as tensor ops (no torchvision, no PIL).

DINOv2's recipe (2 global + N local random-resized crops, colour jitter, grayscale, blur,
solarisation) adapted to pathology: tissue has no "up", so crops are also flipped vertically
and rotated by multiples of 90 degrees, and a stain jitter perturbs the haematoxylin / eosin /
DAB concentrations (Ruifrok-Johnston colour deconvolution; Tellez et al. 2018, "HED-light").

Every random draw comes from torch (the global generator, or the one passed to `__call__`),
so `torch.manual_seed` (DataLoader seeds each worker) makes the crops reproducible. All of a
sample's draws come first (`CropDraws`, in the order of the per-crop pipeline this replaced, so
a seed gives the same crops); then the crops are resized in uint8 and the crops of one size are
augmented together, each op on the batch of crops that take it (about 2.3x less CPU per sample).
Input: a uint8 CHW tensor [3, H, W] (TileDataset). Output: {"global_crops": [2 x float
[3, G, G]], "local_crops": [n x float [3, L, L]]}, normalised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from dinov2_patho.errors import UserError

Generator = torch.Generator | None

# Stain optical-density vectors (rows: haematoxylin, eosin, DAB), Ruifrok & Johnston 2001.
_RGB_FROM_HED = F.normalize(torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]), dim=1)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_GRAY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL and torchvision
_MIN_INTENSITY = 1.0 / 255.0  # optical density of a black pixel stays finite


def _rand(generator: Generator) -> float:
    return torch.rand((), generator=generator).item()


def _uniform(lo: float, hi: float, generator: Generator) -> float:
    return lo + (hi - lo) * _rand(generator)


def _coin(p: float, generator: Generator) -> bool:
    return p > 0 and (p >= 1 or _rand(generator) < p)


def _per_image(values: float | Sequence[float] | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`values` (one number, or one per image of a batch [N, 3, H, W]) shaped to broadcast over x."""
    v = torch.as_tensor(values, dtype=x.dtype, device=x.device)
    return v.view(-1, 1, 1, 1) if v.ndim == 1 else v


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
    """Bicubic, antialiased resize of a uint8 CHW image to size x size. torch's uint8 kernel (as PIL's,
    which DINOv2's torchvision pipeline runs) rounds between its two passes: about 4x faster than
    float32, pixels within about one level of the float result on tissue."""
    return F.interpolate(x.unsqueeze(0), size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False).squeeze(0)


# ---------------------------------------------------------------------------- colour
# Every colour op takes one image [3, H, W] or a batch [N, 3, H, W] with one parameter per image.

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma [..., 1, H, W] of RGB images [..., 3, H, W]."""
    r, g, b = x.unbind(-3)
    luma = r * _GRAY_WEIGHTS[0].item()
    luma.add_(g, alpha=_GRAY_WEIGHTS[1].item()).add_(b, alpha=_GRAY_WEIGHTS[2].item())
    return luma.unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: float | Sequence[float]) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]."""
    return torch.lerp(other.expand_as(x), x, _per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: float | Sequence[float]) -> torch.Tensor:
    return (x * _per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: float | Sequence[float]) -> torch.Tensor:
    # The mean luma is the luma of the channel means: one reduction, no luma image.
    mean_luma = x.mean(dim=(-2, -1)) @ _GRAY_WEIGHTS.to(x)
    return _blend(x, mean_luma.reshape(*x.shape[:-3], 1, 1, 1), factor)


def adjust_saturation(x: torch.Tensor, factor: float | Sequence[float]) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: float | Sequence[float]) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns (in [-0.5, 0.5]); value and saturation stay.

    HSV in closed form: with c = max - min and h the hue in sixths of a turn, channel n (5, 3, 1 for
    r, g, b) is max - c * clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6. On CPU, torch.where, ==,
    remainder and argmax cost 5-20x plain arithmetic per element: the hue sector is selected with
    0/1 factors from sign(), angles are reduced with frac()."""
    r, g, b = x.split(1, dim=-3)
    maxc = x.amax(dim=-3, keepdim=True)  # amax/amin: far faster than max(dim) on CPU
    chroma = maxc - x.amin(dim=-3, keepdim=True)
    # Sector by the channel holding the max (red wins ties, then green; on a tie both formulas
    # agree). h = red * (g - b) + green * (b - r + 2c) + blue * (r - g + 4c), blue = 1 - red - green;
    # a grey pixel (c = 0, r == g == b) gets h = 0.
    red = torch.sign(maxc - r).neg_().add_(1.0)
    green = torch.sign(maxc - g).neg_().add_(1.0).mul_(1.0 - red)
    hue = (b + g).sub_(r, alpha=2.0).sub_(chroma, alpha=2.0).mul_(green)
    hue.addcmul_(red, (g * 2.0).sub_(b).sub_(r).sub_(chroma, alpha=4.0))
    hue.add_(r).sub_(g).add_(chroma, alpha=4.0)  # in [-1, 5)
    # In turns, plus the shift, plus 1: >= 1/3, so that frac() below takes it mod 1.
    turns = hue.div_(chroma.clamp(min=torch.finfo(x.dtype).tiny).mul_(6.0))
    turns.add_(_per_image(shift, x) + 1.0)
    sector = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(3, 1, 1) / 6.0
    k = (turns + sector).frac_().mul_(6.0)
    # min(k, 4 - k) = 2 - |k - 2|; in place: fresh large tensors cost page faults on CPU.
    ramp = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return ramp.mul_(chroma).neg_().add_(maxc)


def hed_jitter(x: torch.Tensor, scale: Sequence[float] | torch.Tensor,
               bias: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Scale and shift the per-stain concentrations (H, E, D): od' = (od @ HED^-1 * scale + bias) @ HED,
    folded into one 3x3 map on optical densities; identity for scale 1, bias 0. `scale` and `bias`:
    3 values, or [N, 3] for a batch [N, 3, H, W]."""
    m, m_inv = _RGB_FROM_HED.to(x), _HED_FROM_RGB.to(x)
    a = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    b = torch.as_tensor(bias, dtype=x.dtype, device=x.device)
    transform = m_inv @ (a.unsqueeze(-1) * m)  # [..., 3, 3]: m_inv @ diag(a) @ m
    offset = (b @ m).unsqueeze(-1)  # [..., 3, 1]
    # log(x) = -od: exp(log(x) @ transform - offset) = exp(-od'), without negating twice.
    log_x = torch.log(x.clamp(min=_MIN_INTENSITY)).flatten(-2)  # [..., 3, H*W]
    out = torch.matmul(transform.transpose(-1, -2), log_x).sub_(offset)
    return out.exp_().clamp_(0.0, 1.0).view_as(x)


def gaussian_blur(x: torch.Tensor, sigma: float | Sequence[float], kernel_size: int | None = None
                  ) -> torch.Tensor:
    """Separable Gaussian blur, reflect padding; one sigma per image of a batch [N, 3, H, W]. Kernel
    radius ceil(3 sigma), which keeps 99.7 % of the Gaussian at every sigma, or (kernel_size - 1) / 2
    for a fixed size: DINOv2's torchvision GaussianBlur(9) truncates sigma 2 at 2 sigma. Either is
    capped by the image. Shifted multiply-adds: far faster than a grouped conv2d on CPU for these
    small kernels."""
    images = x if x.ndim == 4 else x.unsqueeze(0)
    sigmas = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)
    cap = min(x.shape[-1], x.shape[-2]) - 1
    if kernel_size is None:
        radii = torch.ceil(3.0 * sigmas).clamp_(max=cap)
    else:
        radii = torch.full_like(sigmas, min((kernel_size - 1) // 2, cap))
    radius = int(radii.max().item())
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernels = torch.exp(-0.5 * (t / sigmas.unsqueeze(1)) ** 2) * (t.abs() <= radii.unsqueeze(1))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).to(x.device)
    # Reflect padding by the largest radius serves every image: taps past its own radius weigh 0.
    out = images
    for dim in (-1, -2):
        pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
        padded = F.pad(out, pad, mode="reflect")
        length = out.shape[dim]
        out = padded.narrow(dim, 0, length) * kernels[:, 0].view(-1, 1, 1, 1)
        for tap in range(1, 2 * radius + 1):
            out.addcmul_(padded.narrow(dim, tap, length), kernels[:, tap].view(-1, 1, 1, 1))
    return out.view_as(x)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


# ---------------------------------------------------------------------------- config

@dataclass
class CropsConfig:
    """The `crops` section of the training config: DINOv2's multi-crop (checked with `augmentation` by
    AugmentConfig)."""

    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    global_crops_size: int = 224
    local_crops_number: int = 8
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    local_crops_size: int = 98        # a multiple of student.patch_size (7 x 14)


_CROPS_KEYS = frozenset(f.name for f in fields(CropsConfig))


@dataclass
class AugmentationConfig:
    """The `augmentation` section of the training config: per crop, in this order after the random
    resized crop (checked with `crops` by AugmentConfig)."""

    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot90: bool = True                # a random multiple of 90 degrees: tissue has no up
    hed_jitter_p: float = 0.5         # stain jitter in Ruifrok-Johnston HED space
    hed_scale: float = 0.05           # each stain concentration x U(1 - s, 1 + s)
    hed_bias: float = 0.05            # + U(-b, b) optical density
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # global crop 1, global crop 2, local crops: the odds a crop is blurred, as DINOv2's paper and config
    # mean them; its GaussianBlur(p) blurs with 1 - p (torchvision's RandomApply), so dinov2-trained
    # checkpoints saw [0.0, 0.9, 0.5]
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])
    blur_kernel_size: int | None = None  # null: 2 ceil(3 sigma) + 1 taps; 9: DINOv2's fixed kernel
    solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.0])
    solarize_threshold: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet normalisation
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass(frozen=True)
class AugmentConfig:
    """Everything the augmentation reads: `crops.*` and `augmentation.*` of the training config, checked.
    No defaults here: `defaults()` and `from_config()` take them from CropsConfig and AugmentationConfig,
    their one home."""

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
        """The defaults, with `values` (field=value) in place of some."""
        merged = asdict(CropsConfig()) | asdict(AugmentationConfig())
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"AugmentConfig has no field {unknown[0]!r}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in (merged | values).items()})


# ---------------------------------------------------------------------------- pipeline

_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


@dataclass(frozen=True)
class CropDraws:
    """The random choices for one crop, drawn (one generator, fixed order) before any pixel work so
    that crops of one size are then augmented together as a batch."""

    box: tuple[int, int, int, int]  # top, left, height, width in the tile
    hflip: bool
    vflip: bool
    quarter_turns: int
    hed: tuple[tuple[float, ...], tuple[float, ...]] | None  # (scale, bias) per stain
    jitter: tuple[tuple[int, float], ...]  # (index into _JITTER_OPS, factor), in the order applied
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def _batch(crops: list[torch.Tensor], members: list[int]) -> torch.Tensor:
    """crops[members] as one tensor [n, 3, H, W]: the batch they already are views of, in order
    (the last op took them all), else a stacked copy."""
    base = crops[members[0]]._base
    if (base is not None and base.shape == (len(members), *crops[members[0]].shape)
            and all(crops[i].data_ptr() == base[j].data_ptr() for j, i in enumerate(members))):
        return base
    return torch.stack([crops[i] for i in members])


def _apply(crops: list[torch.Tensor], members: list[int], op: Any, *args: Any) -> None:
    """crops[members] = op(crops[members] as one batch, *args)."""
    if members:
        for i, out in zip(members, op(_batch(crops, members), *args).unbind(0)):
            crops[i] = out


class MultiCropAugmentation:
    def __init__(self, config: AugmentConfig | None = None):
        self.config = config or AugmentConfig.defaults()
        c = self.config
        self._mean = torch.tensor(c.mean).view(3, 1, 1)
        self._std = torch.tensor(c.std).view(3, 1, 1)
        self._jitter_ranges = ((c.brightness, (max(0.0, 1 - c.brightness), 1 + c.brightness)),
                               (c.contrast, (max(0.0, 1 - c.contrast), 1 + c.contrast)),
                               (c.saturation, (max(0.0, 1 - c.saturation), 1 + c.saturation)),
                               (c.hue, (-c.hue, c.hue)))

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> MultiCropAugmentation:
        return cls(AugmentConfig.from_config(cfg))

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> dict[str, list[torch.Tensor]]:
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 RGB CHW tensor [3, H, W], got {image.dtype} of shape "
                             f"{tuple(image.shape)}")
        c = self.config
        height, width = image.shape[1:]
        global_draws = [self.draw(height, width, c.global_crops_scale, kind, generator) for kind in (0, 1)]
        local_draws = [self.draw(height, width, c.local_crops_scale, 2, generator)
                       for _ in range(c.local_crops_number)]
        return {"global_crops": self.render(image, global_draws, c.global_crops_size),
                "local_crops": self.render(image, local_draws, c.local_crops_size)}

    def draw(self, height: int, width: int, scale: Sequence[float], kind: int, g: Generator) -> CropDraws:
        """One crop's random choices; `kind` 0/1 = first/second global crop, 2 = local (selects the
        blur/solarise odds). Draws are skipped exactly where a probability is 0 or 1."""
        c = self.config
        box = random_resized_crop_box(height, width, scale, c.crop_ratio, g)
        hflip, vflip = _coin(c.hflip_p, g), _coin(c.vflip_p, g)
        quarter_turns = int(torch.randint(0, 4, (), generator=g)) if c.rot90 else 0
        hed = None
        if _coin(c.hed_jitter_p, g):
            hed = (tuple(_uniform(1 - c.hed_scale, 1 + c.hed_scale, g) for _ in range(3)),
                   tuple(_uniform(-c.hed_bias, c.hed_bias, g) for _ in range(3)))
        jitter: tuple[tuple[int, float], ...] = ()
        if _coin(c.color_jitter_p, g):  # torchvision's ColorJitter: the four ops in random order
            order = torch.randperm(4, generator=g).tolist()
            jitter = tuple((op, _uniform(*self._jitter_ranges[op][1], g)) for op in order
                           if self._jitter_ranges[op][0] > 0)
        gray = _coin(c.grayscale_p, g)
        blur_sigma = _uniform(*c.blur_sigma, g) if _coin(c.blur_p[kind], g) else None
        return CropDraws(box, hflip, vflip, quarter_turns, hed, jitter, gray, blur_sigma,
                         _coin(c.solarize_p[kind], g))

    def render(self, image: torch.Tensor, draws: Sequence[CropDraws], size: int) -> list[torch.Tensor]:
        """The crops `draws` describe, normalised float [3, size, size], augmented as one batch."""
        if not draws:
            return []
        crops = [self._geometry(image, d, size).float().div_(255.0) for d in draws]
        hed = [i for i, d in enumerate(draws) if d.hed]
        _apply(crops, hed, hed_jitter, [draws[i].hed[0] for i in hed], [draws[i].hed[1] for i in hed])
        for position in range(len(_JITTER_OPS)):  # each crop's k-th op, grouped by op
            for op, fn in enumerate(_JITTER_OPS):
                members = [i for i, d in enumerate(draws) if len(d.jitter) > position
                           and d.jitter[position][0] == op]
                _apply(crops, members, fn, [draws[i].jitter[position][1] for i in members])
        _apply(crops, [i for i, d in enumerate(draws) if d.grayscale], lambda y: grayscale(y).expand_as(y))
        blurred = [i for i, d in enumerate(draws) if d.blur_sigma is not None]
        _apply(crops, blurred, gaussian_blur, [draws[i].blur_sigma for i in blurred],
               self.config.blur_kernel_size)
        solarized = [i for i, d in enumerate(draws) if d.solarize]
        _apply(crops, solarized, solarize, self.config.solarize_threshold)
        batch = _batch(crops, list(range(len(crops))))  # made here: normalised in place
        return list(batch.sub_(self._mean).div_(self._std).unbind(0))

    @staticmethod
    def _geometry(image: torch.Tensor, d: CropDraws, size: int) -> torch.Tensor:
        """The crop resized (uint8), flipped and turned."""
        top, left, h, w = d.box
        x = resize(image[:, top:top + h, left:left + w], size)
        if d.hflip:
            x = x.flip(-1)
        if d.vflip:
            x = x.flip(-2)
        return torch.rot90(x, d.quarter_turns, dims=(1, 2)) if d.quarter_turns else x
