"""What every benchmark adapter returns, and the checks that make a bad root a clear error."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinov2_patho.errors import UserError
from dinov2_patho.registry import Registry

BENCHMARKS = Registry("benchmark")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class BenchmarkError(UserError):
    pass


class ImageSplit(Dataset):
    """One split: `labels` [N] int64 and `read(i)` -> RGB uint8 [H, W, 3].

    Indexing yields `(transform(image), label)`; set `transform` with `with_transform`.
    `groups` [N], where an adapter knows them: the slide or patient of each image, which
    cross-validation keeps within one fold.
    """

    labels: np.ndarray
    groups: np.ndarray | None = None
    transform: Callable[[np.ndarray], torch.Tensor] | None = None

    def read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.read(i)
        return (self.transform(image) if self.transform else image), int(self.labels[i])

    def with_transform(self, transform: Callable[[np.ndarray], torch.Tensor]) -> ImageSplit:
        split = object.__new__(type(self))
        split.__dict__.update(self.__dict__, transform=transform)
        return split


class FileSplit(ImageSplit):
    def __init__(self, paths: Sequence[Path], labels: Sequence[int]):
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, np.int64)

    def read(self, i: int) -> np.ndarray:
        try:
            with Image.open(self.paths[i]) as image:
                return np.asarray(image.convert("RGB"))
        except OSError as e:
            raise BenchmarkError(f"{self.paths[i]}: cannot read image: {e}") from e


@dataclass(frozen=True)
class Benchmark:
    name: str
    classes: tuple[str, ...]
    mpp: float | None  # native µm/px of the images, None when unknown
    splits: dict[str, ImageSplit]  # "train", "val", and "test" where the benchmark has one

    @property
    def eval_split(self) -> str:
        """Where results are reported: test when there is one, else val (eva's practice)."""
        return "test" if "test" in self.splits else "val"

    def __post_init__(self):
        for split in ("train", "val"):
            if split not in self.splits or len(self.splits[split]) == 0:
                raise BenchmarkError(f"benchmark {self.name}: the {split} split is empty")


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise BenchmarkError(f"expected {what} at {path} (directory not found)")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise BenchmarkError(f"expected {what} at {path} (file not found)")
    return path


def list_images(directory: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS,
                recursive: bool = False) -> list[Path]:
    """Image files under `directory`, sorted by path (torchvision's `make_dataset` order)."""
    extensions = tuple(e.lower() for e in extensions)
    files = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in extensions)


def class_folders(split_dir: Path, classes: Sequence[str], extensions: Iterable[str]) -> FileSplit:
    """`split_dir/<class>/<image>` for each of `classes` (label = its position)."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = require_dir(split_dir / name, f"the class folder {name!r}")
        images = list_images(folder, extensions, recursive=True)
        if not images:
            raise BenchmarkError(f"{split_dir / name}: no {'/'.join(extensions)} images in this class folder")
        paths += images
        labels += [label] * len(images)
    return FileSplit(paths, labels)
