"""Images to backbone input: 224 px, normalised float tensors (ImageNet's mean / std unless the
backbone has its own, `backbones.hub.normalisation`).

`target_mpp=None` is eva's `ResizeAndCrop`: shorter side to 224, centre crop, whatever
the scan resolution. With a `target_mpp` (say 0.5, our pretraining tiles' 112 µm field)
the image is first rescaled from its native µm/px to the target, then centre-cropped;
an image smaller than 224 px at the target is upscaled until its shorter side is 224.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    mpp: float | None = None  # native µm/px of the images
    target_mpp: float | None = None
    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        scale = self.size / min(h, w)
        if self.target_mpp is not None and self.mpp is not None:
            scale = max(self.mpp / self.target_mpp, scale)
        new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        pil = Image.fromarray(image)
        if (new_h, new_w) != (h, w):
            pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        pil = pil.crop((left, top, left + self.size, top + self.size))
        # in numpy, on one thread: torch's per-op threads on these small arrays wait on each other, 8-10x
        # slower with 2 threads on 2 shared cores (benchmarks/preprocess_threads.py)
        x = (np.asarray(pil, np.float32) / 255.0 - np.float32(self.mean)) / np.float32(self.std)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def normalise_on_device(mean: tuple[float, ...], std: tuple[float, ...]):
    """uint8 [B, 3, H, W] -> ImageNet-normalised float, on the batch's device."""
    import torch

    def apply(x: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1) * 255
        s = torch.tensor(std, device=x.device).view(1, 3, 1, 1) * 255
        return (x.float() - m) / s

    return apply
