"""Pictures of samples: PNG image grids (one row per class) and 2-D scatter plots.

Grids are drawn with PIL and plots with matplotlib's Agg canvas, so nothing here needs
torchvision or a display. Both are imported when a picture is drawn: the package imports (and
its metrics run) on a machine that has neither.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def grid_filename(
    guidance: float, variance: str, steps: int, prefix: str = "grid", ext: str = "png"
) -> str:
    """Stable, readable name for the grid of one (guidance weight, variance, steps) setting.

    >>> grid_filename(3.0, "fixed_small", 50)
    'grid_w3_fixed_small_50steps.png'
    """
    weight = format(float(guidance), "g")  # 3.0 -> "3", 1.5 -> "1.5": same w, same name
    variance_slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(variance))
    return f"{prefix}_w{weight}_{variance_slug}_{int(steps)}steps.{ext}"


def images_to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 in [0, 255]."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid_array(
    samples: Tensor, nrow: int = 8, min_image_px: int = 32, padding: int = 2, pad_value: int = 255
) -> np.ndarray:
    """Tile images into one (H, W, C) uint8 array, `nrow` images per row.

    Each image is upscaled by an integer factor with nearest-neighbour (so 8x8 digits stay
    crisp) until its side is at least `min_image_px`. With samples ordered class-major and
    `nrow` = samples per class, each row holds one class.
    """
    if samples.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(samples.shape)}")
    images = images_to_uint8(samples)
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_image_px / min(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    rows, cols = math.ceil(n / nrow), min(n, nrow)
    grid = np.full(
        (rows * h + (rows + 1) * padding, cols * w + (cols + 1) * padding, c),
        pad_value,
        dtype=np.uint8,
    )
    for i, image in enumerate(images):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_sample_grid(
    samples: Tensor,
    path: str | Path,
    nrow: int = 8,
    min_image_px: int = 32,
    padding: int = 2,
) -> Path:
    """Write a PNG grid of images (see `make_grid_array`); grey for C=1, RGB for C=3."""
    from PIL import Image

    grid = make_grid_array(samples, nrow, min_image_px, padding)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # PIL infers the mode from the array: (H, W) uint8 -> "L", (H, W, 3) uint8 -> "RGB".
    Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).save(path)
    logger.debug("wrote sample grid %s (%dx%d)", path, grid.shape[1], grid.shape[0])
    return path


def save_points_plot(
    samples: Tensor,
    labels: Tensor | None,
    path: str | Path,
    truth=None,
    title: str | None = None,
    k: float = 3.0,
) -> Path:
    """Scatter plot of 2-D samples coloured by (requested) class, true modes marked.

    `truth` is optional and only needs `means` (M, 2) and `std`: each mode is drawn as a cross
    with a circle of radius k·std, the region that counts as covering it.
    """
    # Imported here so that importing the evaluation package stays cheap; Figure + Agg canvas
    # avoids pyplot's global state (safe in worker threads, no display needed).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = samples.detach().float().cpu().numpy()
    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.6)
    else:
        classes = labels.detach().cpu().numpy()
        # vmin/vmax centred on integers give each class its own qualitative colour.
        n_colours = 10 if classes.max() < 10 else 20
        ax.scatter(
            points[:, 0],
            points[:, 1],
            c=classes,
            cmap=f"tab{n_colours}",
            vmin=-0.5,
            vmax=n_colours - 0.5,
            s=4,
            alpha=0.6,
        )
    if truth is not None:
        _draw_modes(ax, truth, k)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _draw_modes(ax, truth, k: float) -> None:
    from matplotlib.patches import Circle

    means = truth.means.detach().float().cpu().numpy()
    ax.scatter(means[:, 0], means[:, 1], marker="x", c="black", s=40)
    for mx, my in means:
        ax.add_patch(Circle((mx, my), k * truth.std, fill=False, ec="black", lw=0.5, alpha=0.5))
