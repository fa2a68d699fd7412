"""Renderer of the embedded world: hard-edged coloured shapes on a plain background.

Each shape is a fixed pixel template per image size, stamped at integer positions. Snapping
to the pixel grid matters: a free sub-pixel circle of radius 4.5 can rasterise to an 8x8
box missing only its corners (fill ratio 0.94, i.e. a "square"), while a template keeps the
bounding-box fill ratios the verifier relies on fixed (square 1.0, circle ~0.75-0.83,
triangle ~0.5) at every size.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from .grammar import BACKGROUND, COLOURS, CountSpec, RelationSpec, Spec, all_prompts, parse_prompt

__all__ = ["MIN_SIZE", "render", "sample_pairs", "shape_template"]

MIN_SIZE = 24
# Nominal extents at 32 px, scaled with the image: circle radius 4-5, square side 9,
# upward triangle base 10 (rounded to odd for symmetry) and height 9.
_RADIUS_RANGE, _SQUARE_SIDE, _TRI_BASE, _TRI_HEIGHT = (4.0, 5.0), 8.5, 10.0, 9.0
_GAP = 2.0  # background pixels kept between object bounding boxes
_SEPARATION = 10.0  # centre distance along a relation's axis
_MAX_TRIES, _OBJECT_TRIES = 1000, 200


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _disk(radius: float) -> np.ndarray:
    k = math.floor(radius)
    offsets = np.arange(-k, k + 1)
    return _crop(offsets[None, :] ** 2 + offsets[:, None] ** 2 <= radius**2)


@lru_cache(maxsize=64)
def shape_template(shape: str, size: int) -> np.ndarray:
    """The boolean pixel mask of ``shape`` in a ``size`` x ``size`` image.

    Args:
        shape: one of :data:`~mixgrpo.world.grammar.SHAPES`.
        size: image side in pixels.

    Returns:
        A read-only ``(h, w)`` bool array cropped to the shape's bounding box.
    """
    unit = size / 32
    if shape == "circle":
        # Small discrete disks are far from pi/4 for some radii (lone tip pixels or
        # nearly square), so pick the radius in range whose disk is the roundest.
        lo, hi = (r * unit for r in _RADIUS_RANGE)
        radii = np.linspace(lo, hi, 41)
        mask = min((_disk(r) for r in radii), key=lambda m: abs(m.mean() - math.pi / 4))
    elif shape == "square":
        side = max(_round_half_up(_SQUARE_SIDE * unit), 2)
        mask = np.ones((side, side), dtype=bool)
    elif shape == "triangle":
        width = 2 * _round_half_up((_TRI_BASE * unit - 1) / 2) + 1
        height = max(_round_half_up(_TRI_HEIGHT * unit), 2)
        y = np.arange(height)[:, None] + 0.5
        x = np.arange(width)[None, :] + 0.5 - width / 2
        mask = _crop(np.abs(x) <= (width / 2) * y / height)  # apex up, base at the bottom
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of circle, square, triangle")
    mask.setflags(write=False)
    return mask


@lru_cache(maxsize=64)
def _centroid(shape: str, size: int) -> tuple[float, float]:
    """``(y, x)`` pixel centroid of a template, relative to its top-left corner."""
    ys, xs = np.nonzero(shape_template(shape, size))
    return float(ys.mean()) + 0.5, float(xs.mean()) + 0.5


def _relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], unit: float) -> bool:
    """Whether ``(x, y)`` centroids ``a`` and ``b`` show ``relation`` unambiguously (y grows down)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= _SEPARATION * unit and abs(across) <= along / 2


def _place(
    shapes: list[str], size: int, rng: np.random.Generator, relation: str | None = None
) -> list[tuple[int, int]]:
    """Rejection-sample top-left corners: inside the canvas, ``_GAP`` pixels apart."""
    unit = size / 32
    gap = max(_GAP, _round_half_up(_GAP * unit))
    dims = [shape_template(s, size).shape for s in shapes]
    centroids = [_centroid(s, size) for s in shapes]
    for _ in range(_MAX_TRIES):
        corners: list[tuple[int, int]] = []
        for h, w in dims:
            for _ in range(_OBJECT_TRIES):
                y0, x0 = int(rng.integers(1, size - h)), int(rng.integers(1, size - w))
                if all(
                    y0 >= oy + oh + gap or oy >= y0 + h + gap or x0 >= ox + ow + gap or ox >= x0 + w + gap
                    for (oy, ox), (oh, ow) in zip(corners, dims, strict=False)
                ):
                    corners.append((y0, x0))
                    break
            else:
                break
        if len(corners) < len(shapes):
            continue
        if relation is not None:
            # Judged on pixel centroids, as the verifier sees them (a triangle's sits below its box centre).
            (ya, xa), (yb, xb) = corners
            (cya, cxa), (cyb, cxb) = centroids
            if not _relation_holds(relation, (xa + cxa, ya + cya), (xb + cxb, yb + cyb), unit):
                continue
        return corners
    raise RuntimeError(f"could not place {shapes} on a {size}px canvas")  # pragma: no cover


def render(spec: Spec, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Render a prompt spec.

    Args:
        spec: a :class:`CountSpec` or :class:`RelationSpec`.
        rng: source of the object positions.
        size: image side in pixels, at least :data:`MIN_SIZE`.

    Returns:
        A ``(size, size, 3)`` uint8 image of hard-edged shapes on :data:`BACKGROUND`.
    """
    if size < MIN_SIZE:
        raise ValueError(f"image size must be >= {MIN_SIZE} pixels, got {size}; render at {MIN_SIZE} or more")
    if isinstance(spec, CountSpec):
        objects = [(spec.colour, spec.shape)] * spec.count
        relation = None
    elif isinstance(spec, RelationSpec):
        objects = [(spec.colour_a, spec.shape_a), (spec.colour_b, spec.shape_b)]
        relation = spec.relation
    else:
        raise TypeError(f"cannot render {spec!r}; pass a CountSpec or RelationSpec (see parse_prompt)")
    corners = _place([shape for _, shape in objects], size, rng, relation)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for (colour, shape), (y0, x0) in zip(objects, corners, strict=True):
        mask = shape_template(shape, size)
        h, w = mask.shape
        image[y0 : y0 + h, x0 : x0 + w][mask] = COLOURS[colour]
    return image


def sample_pairs(
    n: int, seed: int, prompts: list[str] | None = None, size: int = 32
) -> tuple[list[str], torch.Tensor]:
    """Draw prompts uniformly and render them; deterministic in ``seed``.

    Args:
        n: number of pairs, at least 1.
        seed: seed of the prompt draws and the object positions.
        prompts: prompts to draw from (default: :func:`all_prompts`).
        size: image side in pixels.

    Returns:
        The ``n`` prompts and their renders, ``(n, 3, size, size)`` float32 in ``[0, 1]``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pool = list(prompts) if prompts is not None else all_prompts()
    if not pool:
        raise ValueError("the prompt list is empty; pass at least one prompt or None for all prompts")
    specs = [parse_prompt(p) for p in pool]
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(pool), size=n)
    images = np.stack([render(specs[i], rng, size) for i in picks])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return [pool[i] for i in picks], tensor
