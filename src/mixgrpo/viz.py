"""Captioned image grids and metric curves (PIL and matplotlib; files only, no display).

Videos ``(B, F, 3, H, W)`` are drawn as strips: up to :data:`STRIP_FRAMES` evenly spaced
frames side by side, one clip per row of a grid.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["STRIP_FRAMES", "frame_strips", "image_grid", "save_curve", "save_image_grid", "save_images"]

STRIP_FRAMES = 8  # frames of a video shown in its strip (first and last included)


def frame_strips(videos: torch.Tensor, frames: int = STRIP_FRAMES) -> torch.Tensor:
    """``(B, F, 3, H, W)`` -> ``(B, 3, H, k W)``: ``k = min(F, frames)`` evenly spaced frames side by side."""
    f = videos.shape[1]
    pick = torch.linspace(0, f - 1, min(f, frames)).round().long()
    chosen = videos[:, pick]  # (B, k, 3, H, W)
    return chosen.permute(0, 2, 3, 1, 4).flatten(3)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` floats in [0, 1] -> ``(B, H, W, 3)`` uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(
    images: torch.Tensor, captions: Sequence[str] | None = None, columns: int = 8, scale: int = 4
) -> Image.Image:
    """Tile images (nearest-neighbour upscaled by ``scale``) with wrapped captions below; videos
    as frame strips, one per row, upscaled only while their frames are under 256 px."""
    if images.ndim == 5:
        columns, scale = 1, max(1, min(scale, 256 // images.shape[-2]))
        images = frame_strips(images)
    arrays = _to_uint8(images)
    n, h, w, _ = arrays.shape
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    cell_w, img_h = w * scale, h * scale
    caption_h = 34 if captions else 0
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (columns * cell_w, rows * (img_h + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, arr in enumerate(arrays):
        r, c = divmod(i, columns)
        x, y = c * cell_w, r * (img_h + caption_h)
        canvas.paste(Image.fromarray(arr).resize((cell_w, img_h), Image.NEAREST), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], width=max(8, cell_w // 6))[:3]
            draw.multiline_text((x + 2, y + img_h + 1), "\n".join(lines), fill="black", font=font, spacing=0)
    return canvas


def save_image_grid(path: str | Path, images: torch.Tensor, captions: Sequence[str] | None = None, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, captions, **kw).save(path)
    return path


def save_curve(
    path: str | Path, xs: Sequence[float] | None, series: dict[str, Sequence[float]] | dict[str, tuple], xlabel: str,
    title: str = "",
) -> Path:
    """Line plot of one or more series against ``xs`` (``xs=None``: each series is ``(xs, ys)``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for name, ys in series.items():
        x, y = (xs, ys) if xs is not None else ys
        ax.plot(x, y, label=name, marker="o" if len(y) <= 12 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_images(folder: str | Path, images: torch.Tensor) -> list[Path]:
    """Each image (video: its frame strip) as ``folder/00000.png`` (full resolution, no caption)."""
    images = frame_strips(images) if images.ndim == 5 else images
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(_to_uint8(images)):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths
