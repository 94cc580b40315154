"""Matplotlib figures and images as inline data URIs, and series downsampling for long runs."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

# A 170k-iteration series is drawn from at most this many buckets (mean, and min-max band).
MAX_POINTS = 600


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_uri(fig, dpi: int = 80) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_uri(image: Image.Image | np.ndarray, quality: int = 80) -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def downsample(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max) over at most `max_points` consecutive buckets of finite values."""
    keep = np.isfinite(y)
    x, y = np.asarray(x, np.float64)[keep], np.asarray(y, np.float64)[keep]
    if len(y) <= max_points:
        return x, y, y, y
    edges = np.linspace(0, len(y), max_points + 1).astype(np.int64)
    starts = edges[:-1]
    counts = np.diff(edges)
    return (np.add.reduceat(x, starts) / counts, np.add.reduceat(y, starts) / counts,
            np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts))


def plot_series(ax, x: np.ndarray, y: np.ndarray, label: str | None = None, **kwargs) -> None:
    """The bucket means as a line, the buckets' range as a light band; x ticks as 50k, 1.2M."""
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    bx, mean, lo, hi = downsample(x, y)
    (line,) = ax.plot(bx, mean, label=label, linewidth=1.2, **kwargs)
    if len(bx) and (lo != hi).any():
        ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
