"""A synthetic cohort of H&E-like whole-slide images for tests and the demo.

`make_cohort(out_dir)` writes, deterministically for a seed and in a few seconds:

- `slides/<slide_id>.tiff`: pyramidal tiled JPEG TIFFs laid out like Aperio SVS (level 0, a
  stripped thumbnail, then 4x-downsampled levels) with an Aperio ImageDescription carrying
  `MPP = 0.5` and `AppMag = 20`, so OpenSlide (aperio vendor) and tiffslide both read the mpp;
- `masks/<slide_id>.png`: the tissue mask on the 224-px tile grid (one pixel per tile);
- `clusters.csv`: `slide_id,tile_x,tile_y,level_1..level_4` for every tissue tile, the paper's format.
  The tree nests: level_4 = tissue type, level_3 = type x texture variant, level_2 = level_3 x
  staining site, level_1 = level_2 x slide quadrant;
- `metadata.csv`: `slide_id,tissue,primary_diagnosis,tissue_diagnosis`;
- `labels.csv`: `slide_id,tile_x,tile_y,tissue_type`, the ground truth per tissue tile;
- opt-in (`tissue_mix`, `positive_fraction`): a long tail of tissue types with a fifth, rare one
  (necrosis), and `slide_labels.csv` (`slide_id,label,split,patient_id`): a slide is positive when it
  holds a small planted necrosis lesion, as a Camelyon16 slide is when it holds a metastasis.

Four tissue types with distinct colour and texture statistics, so a small model can separate
them: tumour (dense large nuclei), stroma (oriented eosin fibres, sparse spindle nuclei),
adipose (white vacuoles with thin membranes) and mucus (pale blue wisps, few cells). Tissue
regions follow the tile grid, so every tile has exactly one type. Each slide has its own
staining and scan (H and E concentrations, brightness), as slides from different sites and
batches do, so colour alone separates the types within a slide but does not carry over to
other slides; texture does.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image, ImageDraw, ImageFilter

from dinov2_patho.data.augment import hed_jitter
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_dir
from dinov2_patho.logging import get_logger
from dinov2_patho.slide_files import slide_path

log = get_logger(__name__)

TISSUE_TYPES = ("tumor", "stroma", "adipose", "mucus")  # the default cohort's types
RARE_TISSUE = "necrosis"  # opt-in fifth type: a long tail's rarest type, or planted lesions
ALL_TISSUE_TYPES = (*TISSUE_TYPES, RARE_TISSUE)  # level_4 of clusters.csv indexes this
SLIDE_CLASSES = ("negative", "positive")  # slide_labels.csv: positive = holds a planted lesion
MPP = 0.5
TILE = 224  # level-0 px of a 112 um tile at MPP
_ATLAS = 768  # texture atlas side; tiles are random crops of it
_ORGANS = ("colon", "breast")
_STAINS = (np.array([1.0, 1.0, 1.0]), np.array([0.94, 0.97, 1.04]))  # two staining sites
# Per-slide stain and scanner variation (staining batch, section thickness, exposure), drawn per slide:
# haematoxylin / eosin concentrations times a log-uniform factor in [1/s, s], plus a brightness gain.
STAIN_SCALE = 2.0
BRIGHTNESS = (0.8, 1.1)
_MIX_REGIONS = 12  # Voronoi regions per slide under a tissue_mix: enough for a long tail to show


@dataclass(frozen=True)
class Cohort:
    root: Path
    slides_dir: Path
    masks_dir: Path
    clusters_csv: Path
    metadata_csv: Path
    labels_csv: Path
    slide_ids: tuple[str, ...]

    @classmethod
    def at(cls, root: str | Path, slide_ids: tuple[str, ...] = ()) -> Cohort:
        root = Path(root)
        return cls(root, root / "slides", root / "masks", root / "clusters.csv", root / "metadata.csv",
                   root / "labels.csv", slide_ids)

    def slide_path(self, slide_id: str) -> Path:
        return slide_path(self.slides_dir, slide_id, ".tiff")

    @property
    def slide_labels_csv(self) -> Path:
        """`slide_id,label,split,patient_id`; written only when lesions are planted."""
        return self.root / "slide_labels.csv"


# --- textures ---------------------------------------------------------------------------------

def _canvas(rgb: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (_ATLAS, _ATLAS), rgb)
    return img, ImageDraw.Draw(img)


def _nuclei(draw: ImageDraw.ImageDraw, rng: np.random.Generator, count: int, r_range: tuple[float, float],
            elong: float = 1.0) -> None:
    xs, ys = rng.uniform(0, _ATLAS, (2, count))
    rs = rng.uniform(*r_range, count)
    shades = rng.uniform(0.75, 1.15, count)
    for x, y, r, s in zip(xs, ys, rs, shades):
        rx, ry = r * elong, r / elong
        colour = tuple(int(min(255, c * s)) for c in (70, 35, 115))
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=colour)


def _tumor(rng: np.random.Generator, variant: int) -> Image.Image:
    img, draw = _canvas((205, 140, 190))
    count, radius = ((3200, (6.0, 9.0)), (6000, (3.5, 5.5)))[variant]
    _nuclei(draw, rng, count, radius)
    return img


def _stroma(rng: np.random.Generator, variant: int) -> Image.Image:
    img, draw = _canvas((242, 190, 210))
    angle = np.deg2rad((25.0, 115.0)[variant])
    n = 2500
    xs, ys = rng.uniform(-40, _ATLAS + 40, (2, n))
    th = angle + rng.normal(0, 0.15, n)
    ln = rng.uniform(30, 90, n)
    for x, y, t, length in zip(xs, ys, th, ln):
        dx, dy = np.cos(t) * length / 2, np.sin(t) * length / 2
        draw.line((x - dx, y - dy, x + dx, y + dy), fill=(215, 105, 155), width=2)
    _nuclei(draw, rng, 250, (3.0, 4.0), elong=2.5)
    return img


def _adipose(rng: np.random.Generator, variant: int) -> Image.Image:
    img, draw = _canvas((225, 150, 185))
    count, radius = ((700, (18.0, 34.0)), (1600, (10.0, 20.0)))[variant]
    xs, ys = rng.uniform(0, _ATLAS, (2, count))
    for x, y, r in zip(xs, ys, rng.uniform(*radius, count)):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(250, 246, 250), outline=(215, 135, 175), width=2)
    _nuclei(draw, rng, 60, (2.5, 3.5), elong=2.0)
    return img


def _mucus(rng: np.random.Generator, variant: int) -> Image.Image:
    # Wisps: low-frequency noise stretched along one axis, thresholded into bands.
    low = rng.normal(size=(12, 48) if variant == 0 else (48, 12)).astype(np.float32)
    field = np.asarray(Image.fromarray(low).resize((_ATLAS, _ATLAS), Image.BICUBIC))
    band = np.clip(1.0 - np.abs(np.sin(field * 3.0)) * 1.3, 0, 1)[..., None]
    base, wisp = np.array([212, 210, 232], np.float32), np.array([160, 150, 205], np.float32)
    img = Image.fromarray((base + (wisp - base) * band).astype(np.uint8))
    _nuclei(ImageDraw.Draw(img), rng, 80, (2.5, 4.0))
    return img


def _necrosis(rng: np.random.Generator, variant: int) -> Image.Image:
    # Mottled eosinophilic debris: pale-pink blotches, ghost cell outlines, karyorrhectic dust.
    low = rng.normal(size=(24, 24)).astype(np.float32)
    field = np.asarray(Image.fromarray(low).resize((_ATLAS, _ATLAS), Image.BICUBIC))[..., None]
    base, blotch = np.array([236, 168, 200], np.float32), np.array([250, 214, 228], np.float32)
    img = Image.fromarray((base + (blotch - base) * np.clip(field * 0.6 + 0.5, 0, 1)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for x, y, r in zip(*rng.uniform(0, _ATLAS, (2, 900)), rng.uniform(5.0, 9.0, 900)):
        draw.ellipse((x - r, y - r, x + r, y + r), outline=(214, 140, 180), width=1)
    count, radius = ((5000, (0.8, 1.6)), (2000, (1.5, 2.5)))[variant]
    _nuclei(draw, rng, count, radius)
    return img


_RENDER = (_tumor, _stroma, _adipose, _mucus, _necrosis)


def _finish(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Soften edges and add grain, as a scanner's optics and sensor would."""
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.int16)
    arr = arr + rng.integers(-6, 7, arr.shape[:2], dtype=np.int16)[..., None]
    return np.clip(arr, 0, 255).astype(np.uint8)


def _atlases(rng: np.random.Generator, rare_rng: np.random.Generator | None = None) -> np.ndarray:
    """[type, variant, H, W, 3] texture atlases of TISSUE_TYPES, then RARE_TISSUE's when `rare_rng`
    is given (its own stream, so the others stay those of `rng`), then the glass background (last)."""
    types = len(TISSUE_TYPES) + (rare_rng is not None)
    out = np.empty((types + 1, 2, _ATLAS, _ATLAS, 3), np.uint8)
    for t, render in enumerate(_RENDER[:len(TISSUE_TYPES)]):
        for v in range(2):
            out[t, v] = _finish(render(rng, v), rng)
    glass = np.full((_ATLAS, _ATLAS, 3), (241, 240, 244), np.uint8)
    out[-1] = _finish(Image.fromarray(glass), rng)
    if rare_rng is not None:
        for v in range(2):
            out[len(TISSUE_TYPES), v] = _finish(_necrosis(rare_rng, v), rare_rng)
    return out


def _restain(atlases: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The tissue atlases as one slide's staining and scan shows them: H and E concentrations
    rescaled (Ruifrok-Johnston colour deconvolution, as the training augmentation), then a
    brightness gain. The glass (last atlas) is left as it is."""
    log_s = np.log(STAIN_SCALE)
    scale = [*np.exp(rng.uniform(-log_s, log_s, 2)), 1.0]
    gain = rng.uniform(*BRIGHTNESS)
    tissue = torch.from_numpy(atlases[:-1]).movedim(-1, 0)  # [3, type, variant, H, W]
    shape = tissue.shape
    tissue = hed_jitter(tissue.reshape(3, -1, _ATLAS).float() / 255, scale, (0.0, 0.0, 0.0)) * gain
    out = atlases.copy()
    out[:-1] = (tissue.clamp_(0, 1) * 255).round_().to(torch.uint8).reshape(shape).movedim(0, -1).numpy()
    return out


# --- slide layout ------------------------------------------------------------------------------

def _layout(rng: np.random.Generator, grid_h: int, grid_w: int, types: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per grid cell: tissue mask, tissue type (Voronoi regions), texture variant (per region)."""
    yy, xx = np.mgrid[0:grid_h, 0:grid_w].astype(np.float32)
    cy, cx = (grid_h - 1) / 2, (grid_w - 1) / 2
    ry, rx = grid_h * rng.uniform(0.36, 0.46), grid_w * rng.uniform(0.36, 0.46)
    wobble = rng.normal(0, 0.12, (grid_h, grid_w))
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 + wobble < 1.0
    seeds = np.stack([rng.uniform(0, grid_h, len(types)), rng.uniform(0, grid_w, len(types))], 1)
    dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    region = dist.argmin(-1)
    variant = rng.integers(0, 2, len(types))
    return mask, types[region], variant[region]


def _mixed_types(region: np.ndarray, mask: np.ndarray, shares: np.ndarray, assigned: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Per region, the tissue type whose cohort-wide tile count lags its share most (regions in random
    order), so the cohort's tile shares track `shares` however unevenly the regions are sized. `assigned`
    (tiles per type so far) is updated in place."""
    sizes = np.bincount(region[mask], minlength=region.max() + 1)
    types = np.zeros(sizes.size, np.int64)
    for r in rng.permutation(sizes.size):
        if sizes[r]:
            types[r] = int(np.argmax(shares * (assigned.sum() + sizes[r]) - assigned))
            assigned[types[r]] += sizes[r]
    return types[region]


def _lesion(mask: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A compact blob of `size` tissue cells: the tissue cells nearest a random tissue cell."""
    cells = np.argwhere(mask)
    if len(cells) < size:
        raise UserError(f"a slide has {len(cells)} tissue tiles, fewer than lesion_tiles={size}")
    centre = cells[rng.integers(len(cells))]
    dist = ((cells - centre) ** 2).sum(1) + rng.uniform(0, 0.5, len(cells))  # jitter breaks ties
    blob = np.zeros_like(mask)
    blob[tuple(cells[np.argsort(dist)[:size]].T)] = True
    return blob


def _slide_split(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """train / val / test = 1/2, 1/4, 1/4 of each class's slides."""
    split = np.empty(len(labels), object)
    for c in np.unique(labels):
        slides = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.round(np.array([0.5, 0.75]) * len(slides)).astype(int)
        for name, part in zip(("train", "val", "test"), np.split(slides, bounds)):
            split[part] = name
    return list(split)


def _aperio_description(width: int, height: int, tile: int) -> str:
    return (f"Aperio Image Library v12.0.15 synthetic\r\n{width}x{height} [0,0 {width}x{height}] "
            f"({tile}x{tile}) JPEG/RGB Q=90|AppMag = 20|MPP = {MPP}|Title = dinov2_patho synthetic")


def _write_pyramid(path: Path, level0: np.ndarray, levels: int, tile: int) -> None:
    height, width = level0.shape[:2]
    opts = dict(photometric="rgb", compression="jpeg", compressionargs={"level": 90}, metadata=None)
    pyramid = [Image.fromarray(level0)]
    for _ in range(levels - 1):
        pyramid.append(pyramid[-1].reduce(4))  # box filter; ceil(dim / 4) like Aperio's levels
    thumb = pyramid[-1].copy()
    thumb.thumbnail((256, 256))
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(level0, tile=(tile, tile), description=_aperio_description(width, height, tile),
                  subfiletype=0, **opts)
        tif.write(np.asarray(thumb), rowsperstrip=16,
                  description=f"Aperio thumbnail {thumb.width}x{thumb.height}", **opts)
        for img in pyramid[1:]:
            tif.write(np.asarray(img), tile=(tile, tile), subfiletype=0,
                      description=f"Aperio level {width}x{height} -> {img.width}x{img.height}", **opts)


def _check_options(num_slides: int, grid: tuple[int, int], tissue_mix: Sequence[float] | None,
                   positive_fraction: float, lesion_tiles: int) -> np.ndarray | None:
    """The normalised tissue shares (None: the default palette); a UserError for a bad option."""
    if num_slides < 1:
        raise UserError(f"num_slides must be >= 1, got {num_slides}")
    if min(grid) < 1:
        raise UserError(f"grid must be at least 1 x 1 tiles, got {grid[0]} x {grid[1]}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise UserError(f"positive_fraction must lie in [0, 1], got {positive_fraction}")
    if positive_fraction > 0 and lesion_tiles < 1:
        raise UserError(f"lesion_tiles must be >= 1, got {lesion_tiles}")
    if tissue_mix is None:
        return None
    shares = np.asarray(tissue_mix, np.float64)
    if len(shares) not in (len(TISSUE_TYPES), len(ALL_TISSUE_TYPES)) or (shares < 0).any() \
            or shares.sum() <= 0:
        raise UserError(f"tissue_mix must be {len(TISSUE_TYPES)} or {len(ALL_TISSUE_TYPES)} non-negative "
                        f"shares of {', '.join(ALL_TISSUE_TYPES)}, got {list(tissue_mix)}")
    if positive_fraction > 0 and len(shares) == len(ALL_TISSUE_TYPES) and shares[-1] > 0:
        raise UserError(f"tissue_mix gives {RARE_TISSUE} a share, but with planted lesions it appears only "
                        "in them (so that it marks the positive slides); give it 0")
    return shares / shares.sum()


def make_cohort(out_dir: str | Path, *, num_slides: int = 8, seed: int = 0, grid: tuple[int, int] = (10, 10),
                margin: int = 60, levels: int = 3, tiff_tile: int = 256, overwrite: bool = False,
                tissue_mix: Sequence[float] | None = None, positive_fraction: float = 0.0,
                lesion_tiles: int = 4) -> Cohort:
    """Write a cohort of `num_slides` slides of `grid` (rows, cols) 224-px tiles plus `margin` px.

    The defaults write the 4-type cohort of rotating palettes. Opt-in:
    - `tissue_mix`: tile shares of ALL_TISSUE_TYPES (4 or 5 values, e.g. a long tail 60/25/10/4/1);
      each slide is cut into `_MIX_REGIONS` regions typed so the cohort's shares follow it;
    - `positive_fraction`: that share of the slides (rounded) gets a lesion, a compact region of
      `lesion_tiles` tiles of RARE_TISSUE, found nowhere else; `slide_labels.csv` says which
      (`slide_id,label,split,patient_id`, label negative/positive, split train/val/test by class).

    The directory is built beside `out_dir` and renamed onto it, so it is either complete or absent.
    """
    out = Path(out_dir)
    shares = _check_options(num_slides, grid, tissue_mix, positive_fraction, lesion_tiles)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    rng = np.random.default_rng(seed)
    stain_rng = np.random.default_rng([seed, 1])  # its own stream: the layouts stay those of `seed`
    lesion_rng = np.random.default_rng([seed, 2])  # opt-in features draw from streams of their own
    positive = np.zeros(num_slides, bool)
    positive[lesion_rng.permutation(num_slides)[:round(positive_fraction * num_slides)]] = True
    rare = positive.any() or (shares is not None and len(shares) == len(ALL_TISSUE_TYPES) and shares[-1] > 0)
    plain = _atlases(rng, np.random.default_rng([seed, 3]) if rare else None)
    if shares is not None:
        shares = np.pad(shares, (0, len(plain) - 1 - len(shares)))  # types rendered, glass excluded
        assigned = np.zeros(len(shares), np.int64)
    stained = [np.clip(plain * stain, 0, 255).astype(np.uint8) for stain in _STAINS]
    for atlases in stained:
        atlases[-1] = plain[-1]  # the stain varies by site, the glass does not
    grid_h, grid_w = grid
    height, width = grid_h * TILE + margin, grid_w * TILE + margin
    slide_ids = tuple(f"SYN-{seed:03d}-{i:04d}" for i in range(num_slides))
    with atomic_dir(out) as tmp:
        cohort = Cohort.at(tmp, slide_ids)
        cohort.slides_dir.mkdir()
        cohort.masks_dir.mkdir()
        clusters, labels, metadata = [], [], []
        for i, slide_id in enumerate(slide_ids):
            # Every type appears across the cohort: each slide holds 3 regions from a rotating palette.
            if shares is None:
                types = np.array([(i + k) % len(TISSUE_TYPES) for k in range(3)] + [int(rng.integers(0, 4))])
                mask, ttype, variant = _layout(rng, grid_h, grid_w, types)
            else:
                mask, region, variant = _layout(rng, grid_h, grid_w, np.arange(_MIX_REGIONS))
                ttype = _mixed_types(region, mask, shares, assigned, rng)
            if positive[i]:
                blob = _lesion(mask, lesion_tiles, lesion_rng)
                ttype = np.where(blob, len(TISSUE_TYPES), ttype)
                variant = np.where(blob, lesion_rng.integers(0, 2), variant)
            site = i % len(_STAINS)
            atlases = _restain(stained[site], stain_rng)
            level0 = np.empty((height, width, 3), np.uint8)
            level0[:] = atlases[-1, 0, :1, :1]  # glass
            for gy in range(grid_h):
                for gx in range(grid_w):
                    t, v = (ttype[gy, gx], variant[gy, gx]) if mask[gy, gx] else (len(atlases) - 1, 0)
                    oy, ox = rng.integers(0, _ATLAS - TILE, 2)
                    # Half turns only: a quarter turn would swap the orientation-coded texture variants.
                    patch = np.rot90(atlases[t, v, oy:oy + TILE, ox:ox + TILE], 2 * int(rng.integers(0, 2)))
                    level0[gy * TILE:(gy + 1) * TILE, gx * TILE:(gx + 1) * TILE] = patch
            _write_pyramid(cohort.slide_path(slide_id), level0, levels, tiff_tile)
            Image.fromarray(mask.astype(np.uint8) * 255).save(slide_path(cohort.masks_dir, slide_id, ".png"))
            for gy, gx in zip(*np.nonzero(mask)):
                t, v = int(ttype[gy, gx]), int(variant[gy, gx])
                quadrant = int(gy >= grid_h / 2) * 2 + int(gx >= grid_w / 2)
                l3 = t * 2 + v
                l2 = l3 * len(_STAINS) + site
                l1 = l2 * 4 + quadrant
                x, y = int(gx) * TILE, int(gy) * TILE
                clusters.append((slide_id, x, y, l1, l2, l3, t))
                labels.append((slide_id, x, y, ALL_TISSUE_TYPES[t]))
            organ = _ORGANS[i % len(_ORGANS)]
            diagnosis = "adenocarcinoma" if (mask & (ttype == 0)).any() else "normal"
            metadata.append((slide_id, organ, diagnosis, f"{organ}_{diagnosis}"))
        _write_csv(cohort.clusters_csv,
                   ("slide_id", "tile_x", "tile_y", "level_1", "level_2", "level_3", "level_4"), clusters)
        _write_csv(cohort.labels_csv, ("slide_id", "tile_x", "tile_y", "tissue_type"), labels)
        _write_csv(cohort.metadata_csv,
                   ("slide_id", "tissue", "primary_diagnosis", "tissue_diagnosis"), metadata)
        if positive_fraction > 0:
            split = _slide_split(positive.astype(int), lesion_rng)
            _write_csv(cohort.slide_labels_csv, ("slide_id", "label", "split", "patient_id"),
                       [(sid, SLIDE_CLASSES[int(p)], sp, f"PAT-{sid[4:]}")
                        for sid, p, sp in zip(slide_ids, positive, split)])
    log.info("synthetic cohort: %d slides, %d tissue tiles in %s", num_slides, len(clusters), out)
    return Cohort.at(out, slide_ids)


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue())

