"""What an optimiser does to a verifier: perturbation families for calibrating ``composition``.

Each family turns a spec into a ``(size, size, 3)`` uint8 image, deterministic in ``rng``.
They start from the clean render and damage it the way a reward-hacking policy does: blobs
of the right colour instead of shapes, speckle, smears, half-drawn or wrongly sized shapes,
extra objects, plain colour mass. ``scripts/calibrate_verifier.py`` scores every family with
the old and the new verifier; ``tests/test_verifier_calibration.py`` holds each to a bound.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from .grammar import (
    BACKGROUND,
    COLOURS,
    SHAPES,
    RelationSpec,
    Spec,
    perturb_one_attribute,
)
from .render import render, shape_template

__all__ = ["FAMILIES", "objects_of", "perturbed"]

_BG = np.array(BACKGROUND, dtype=np.uint8)
_EIGHT = np.ones((3, 3), dtype=bool)


def objects_of(image: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(mask, rgb)`` of each object of a clean render (a connected non-background component)."""
    foreground = (image != _BG).any(-1)
    components, n = ndimage.label(foreground, structure=_EIGHT)
    out = []
    for k in range(1, n + 1):
        mask = components == k
        out.append((mask, image[mask][0].copy()))
    return out


def _erase(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[mask] = _BG
    return out


def _random_walk_blob(area: int, start: tuple[int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """An irregular worm-like blob of exactly ``area`` pixels: a 2x2 brush on a random walk."""
    mask = np.zeros((size, size), dtype=bool)
    y, x = start
    while mask.sum() < area:
        for dy in (0, 1):
            for dx in (0, 1):
                if mask.sum() < area:
                    mask[min(max(y + dy, 0), size - 1), min(max(x + dx, 0), size - 1)] = True
        step = ((0, 1), (0, -1), (1, 0), (-1, 0))[int(rng.integers(4))]
        y, x = min(max(y + step[0], 0), size - 2), min(max(x + step[1], 0), size - 2)
    return mask


def _blobs(spec: Spec, rng: np.random.Generator, size: int) -> np.ndarray:
    """Each object replaced by a same-colour irregular blob of the same area."""
    image = render(spec, rng, size)
    out = np.empty_like(image)
    out[:] = _BG
    for mask, rgb in objects_of(image):
        ys, xs = np.nonzero(mask)
        out[_random_walk_blob(int(mask.sum()), (int(ys.mean()), int(xs.mean())), size, rng)] = rgb
    return out


def _speckle(spec: Spec, rng: np.random.Generator, size: int, count: int = 20) -> np.ndarray:
    """The clean render with ``count`` background pixels set to random palette colours."""
    image = render(spec, rng, size)
    background = np.argwhere((image == _BG).all(-1))
    palette = np.array(list(COLOURS.values()), dtype=np.uint8)
    for y, x in background[rng.choice(len(background), size=count, replace=False)]:
        image[y, x] = palette[int(rng.integers(len(palette)))]
    return image


def _smear(spec: Spec, rng: np.random.Generator, size: int, length: int = 3) -> np.ndarray:
    """Each object dragged ``length`` px in a random direction (motion smear)."""
    image = render(spec, rng, size)
    out = image.copy()
    for mask, rgb in objects_of(image):
        dy, dx = ((0, 1), (0, -1), (1, 0), (-1, 0))[int(rng.integers(4))]
        trail = mask.copy()
        for k in range(1, length + 1):
            trail |= np.roll(np.roll(mask, k * dy, axis=0), k * dx, axis=1)
        out[trail] = rgb
    return out


def _blur(spec: Spec, rng: np.random.Generator, size: int, sigma: float = 1.0) -> np.ndarray:
    """The clean render under a Gaussian blur (soft, smeared edges)."""
    image = render(spec, rng, size).astype(np.float32)
    return np.clip(ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0)), 0, 255).round().astype(np.uint8)


def _half_drawn(spec: Spec, rng: np.random.Generator, size: int) -> np.ndarray:
    """Each object with one half (top, bottom, left or right of its centre) erased."""
    image = render(spec, rng, size)
    out = image.copy()
    for mask, _ in objects_of(image):
        ys, xs = np.nonzero(mask)
        cut = int(rng.integers(4))
        gone = [ys < ys.mean(), ys >= ys.mean(), xs < xs.mean(), xs >= xs.mean()][cut]
        out[ys[gone], xs[gone]] = _BG
    return out


def _rescaled(spec: Spec, rng: np.random.Generator, size: int, factor: float) -> np.ndarray:
    image = render(spec, rng, size)
    out = np.empty_like(image)
    out[:] = _BG
    for mask, rgb in objects_of(image):
        ys, xs = np.nonzero(mask)
        crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        big = ndimage.zoom(crop.astype(np.float32), factor, order=0) > 0.5
        cy, cx = int(ys.mean()), int(xs.mean())
        y0, x0 = cy - big.shape[0] // 2, cx - big.shape[1] // 2
        for (y, x) in np.argwhere(big):
            if 0 <= y0 + y < size and 0 <= x0 + x < size:
                out[y0 + y, x0 + x] = rgb
    return out


def _other_object(spec: Spec, rng: np.random.Generator) -> tuple[str, str]:
    mentioned = set(spec.pairs)
    options = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in mentioned]
    return options[int(rng.integers(len(options)))]


def _extra_object(spec: Spec, rng: np.random.Generator, size: int) -> np.ndarray:
    """The clean scene with one more object, of a kind the prompt does not mention, in free space."""
    colour, shape = _other_object(spec, rng)
    template = shape_template(shape, size)
    h, w = template.shape
    for _ in range(1000):  # a crowded layout (four squares) may leave no room: lay the scene out again
        image = render(spec, rng, size)
        busy = ndimage.binary_dilation((image != _BG).any(-1), structure=_EIGHT)  # keep 1 px apart
        for _ in range(200):
            y0, x0 = int(rng.integers(1, size - h)), int(rng.integers(1, size - w))
            if not busy[y0 : y0 + h, x0 : x0 + w].any():
                image[y0 : y0 + h, x0 : x0 + w][template] = COLOURS[colour]
                return image
    raise RuntimeError(f"no room for an extra {shape} beside {spec}")  # pragma: no cover


def _colour_mass(spec: Spec, rng: np.random.Generator, size: int) -> np.ndarray:
    """The first verifier's hack: big rectangles of each prompt colour, in the prompt's layout."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = _BG
    colours = [c for c, _ in spec.pairs]
    half = size // 2
    boxes = [(slice(2, size - 2), slice(2, half - 1)), (slice(2, size - 2), slice(half + 1, size - 2))]
    if isinstance(spec, RelationSpec) and spec.relation in ("above", "below"):
        boxes = [(slice(2, half - 1), slice(2, size - 2)), (slice(half + 1, size - 2), slice(2, size - 2))]
    if isinstance(spec, RelationSpec) and spec.relation in ("right of", "below"):
        boxes = boxes[::-1]
    for colour, box in zip(colours, boxes, strict=False):
        image[box] = COLOURS[colour]
    return image


# family name -> image maker; kept in the order of the calibration table
FAMILIES: dict[str, Callable[[Spec, np.random.Generator, int], np.ndarray]] = {
    "clean render": lambda s, r, n: render(s, r, n),
    "one attribute changed": lambda s, r, n: render(perturb_one_attribute(s, r), r, n),
    "one extra object": _extra_object,
    "objects -> same-area blobs": _blobs,
    "speckle (20 px)": _speckle,
    "smear (3 px)": _smear,
    "blur (sigma 1 px)": _blur,
    "half-drawn": _half_drawn,
    "shapes x1.5": lambda s, r, n: _rescaled(s, r, n, 1.5),
    "shapes x0.6": lambda s, r, n: _rescaled(s, r, n, 0.6),
    "colour mass": _colour_mass,
}


def perturbed(family: str, specs: list[Spec], seed: int, size: int = 32) -> np.ndarray:
    """``(N, size, size, 3)`` uint8 images of ``family`` for ``specs``, deterministic in ``seed``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    rng = np.random.default_rng(seed)
    return np.stack([FAMILIES[family](spec, rng, size) for spec in specs])
