"""Renderer of the embedded world: hard-edged coloured shapes on a plain background."""

from __future__ import annotations

import numpy as np
import torch

from .grammar import BACKGROUND, COLOURS, CountSpec, RelationSpec, Spec, all_prompts, parse_prompt

__all__ = ["MIN_SIZE", "render", "sample_pairs"]

MIN_SIZE = 24
# Object extents at 32 px (scaled with the image): big enough that the fill ratio of the
# bounding box separates squares (~1.0), circles (~0.78) and triangles (~0.55) reliably.
_RADIUS, _SQUARE_HALF, _TRI_BASE, _TRI_HEIGHT = 4.5, 4.0, 10.0, 9.0
_GAP = 2.0


def _half_extent(shape: str, unit: float) -> float:
    return unit * {"circle": _RADIUS, "square": _SQUARE_HALF, "triangle": _TRI_BASE / 2}[shape]


def _mask(shape: str, cx: float, cy: float, size: int, unit: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= (unit * _RADIUS) ** 2
    if shape == "square":
        h = unit * _SQUARE_HALF
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    height, half_base = unit * _TRI_HEIGHT, unit * _TRI_BASE / 2
    top = cy - height / 2
    depth = (y - top) / height  # 0 at the apex, 1 at the base
    return (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= half_base * depth)


def _separated(centres: list[tuple[float, float, float]], cx: float, cy: float, half: float, gap: float) -> bool:
    return all(max(abs(cx - ox), abs(cy - oy)) >= half + oh + gap for ox, oy, oh in centres)


def _place(shapes: list[str], size: int, unit: float, rng: np.random.Generator, accept=None):
    """Rejection-sample non-overlapping centres (boxes ``_GAP`` apart, inside the canvas)."""
    for _ in range(1000):
        centres: list[tuple[float, float, float]] = []
        for shape in shapes:
            half = _half_extent(shape, unit)
            for _ in range(200):
                cx, cy = rng.uniform(half + 1, size - half - 1, size=2)
                if _separated(centres, cx, cy, half, _GAP * unit):
                    centres.append((cx, cy, half))
                    break
            else:
                break
        if len(centres) == len(shapes) and (accept is None or accept(centres)):
            return centres
    raise RuntimeError(f"could not place {len(shapes)} objects on a {size}px canvas")  # pragma: no cover


def _relation_holds(relation: str, a: tuple[float, float, float], b: tuple[float, float, float], unit: float) -> bool:
    dx, dy = b[0] - a[0], b[1] - a[1]  # B relative to A; image y grows downwards
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= 10 * unit and abs(across) <= along / 2


def render(spec: Spec, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Render ``spec`` as a ``(size, size, 3)`` uint8 image."""
    if size < MIN_SIZE:
        raise ValueError(f"image size must be >= {MIN_SIZE} pixels, got {size}")
    unit = size / 32
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    if isinstance(spec, CountSpec):
        objects = [(spec.colour, spec.shape)] * spec.count
        centres = _place([spec.shape] * spec.count, size, unit, rng)
    elif isinstance(spec, RelationSpec):
        objects = [(spec.colour_a, spec.shape_a), (spec.colour_b, spec.shape_b)]
        centres = _place([spec.shape_a, spec.shape_b], size, unit, rng,
                         accept=lambda c: _relation_holds(spec.relation, c[0], c[1], unit))
    else:
        raise TypeError(f"cannot render {spec!r}")
    for (colour, shape), (cx, cy, _) in zip(objects, centres, strict=True):
        image[_mask(shape, cx, cy, size, unit)] = COLOURS[colour]
    return image


def sample_pairs(
    n: int, seed: int, prompts: list[str] | None = None, size: int = 32
) -> tuple[list[str], torch.Tensor]:
    """``n`` prompts drawn uniformly (from ``prompts`` or the whole grammar) and their
    renders, ``(n, 3, size, size)`` float32 in ``[0, 1]``. Deterministic in ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pool = prompts if prompts is not None else all_prompts()
    if not pool:
        raise ValueError("the prompt list is empty")
    specs = [parse_prompt(p) for p in pool]
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(pool), size=n)
    images = np.stack([render(specs[i], rng, size) for i in picks])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return [pool[i] for i in picks], tensor
