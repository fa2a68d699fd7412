"""``composition-v1``: the first round's verifier, kept only to compare against (it is gameable).

Do not train on it: it reads shape from the bounding-box fill ratio, never checks size,
lets the best pair among any number of objects satisfy a relation, and ignores leftover
colour mass, so blobs of colour score as exact (see :mod:`mixgrpo.rewards.composition`
and ``scripts/calibrate_verifier.py``).

1. Colour (vectorised over the batch): every pixel is assigned the nearest of the background
   and the six palette colours. Pixels nearest the background are not foreground; pixels
   farther than ``max_colour_distance`` (RGB, 0-255 units) from all seven are ignored.
2. Objects (per image): connected components (8-connectivity, ``scipy.ndimage.label``) of
   each palette colour, dropping specks under ``min_area`` pixels (at 32 px; scaled with
   the image area).
3. Shape, by the fill ratio ``area / bounding-box area`` of the component: ``>= 0.88``
   square (a filled box, 1.0), ``>= 0.66`` circle (pi/4 ~ 0.79), otherwise triangle
   (~0.5). The thresholds sit near the midpoints, so slightly rounded squares or ragged
   circles from a model still land in the right class.
4. Score, with partial credit in [0, 1]:

   - count prompt: ``0.2 [an object of the colour] + 0.2 [an object of the colour and
     shape] + 0.6 [exactly `count` such objects and no other object]``;
   - relation prompt: ``0.25 [A found] + 0.25 [B found] + 0.5 [both found and the relation
     holds between their centroids]`` (``left of``: ``x_A + margin < x_B``; ``above``:
     ``y_A + margin < y_B``; margin 2 px at 32 px). With several candidates, the best pair
     counts.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..world.grammar import BACKGROUND, COLOURS, CountSpec, Spec
from .base import check_images, register_reward
from .composition import PromptSpecs

__all__ = ["CompositionV1Reward"]

SQUARE_MIN_FILL, TRIANGLE_MAX_FILL = 0.88, 0.66
_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # (7, 3), row 0 = background
_COLOUR_NAMES = list(COLOURS)
_EIGHT = np.ones((3, 3), dtype=bool)

Detection = tuple[str, str, float, float]  # colour, shape, centroid x, centroid y (pixels)


def _classify_pixels(images: torch.Tensor, max_distance: float) -> np.ndarray:
    """``(B, H, W)`` int8 labels: 0 background or no colour, ``k`` = palette colour ``k - 1``."""
    pixels = images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1) * 255.0
    palette = torch.from_numpy(_PALETTE)
    dist = torch.cdist(pixels.reshape(-1, 3), palette).reshape(*pixels.shape[:3], len(_PALETTE))
    best, label = dist.min(dim=-1)
    label[best > max_distance] = 0
    return label.to(torch.int8).numpy()


def _shape_of(fill: float) -> str:
    return "square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= TRIANGLE_MAX_FILL else "triangle"


def detect_objects(label_map: np.ndarray, min_area: float) -> list[Detection]:
    """Find the objects in one label map.

    Args:
        label_map: ``(H, W)`` labels as made by the colour step (0 = none, ``k`` = colour ``k-1``).
        min_area: smallest component kept, in pixels.

    Returns:
        ``(colour, shape, cx, cy)`` per object, centroids in pixel units (pixel centres at +0.5).
    """
    objects = []
    for k in np.unique(label_map):
        if k == 0:
            continue
        components, n = ndimage.label(label_map == k, structure=_EIGHT)
        areas = np.bincount(components.ravel(), minlength=n + 1)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            area = areas[index]
            if box is None or area < min_area:
                continue
            h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
            ys, xs = np.nonzero(components[box] == index)
            cx, cy = box[1].start + xs.mean() + 0.5, box[0].start + ys.mean() + 0.5
            objects.append((_COLOUR_NAMES[k - 1], _shape_of(area / (h * w)), float(cx), float(cy)))
    return objects


def _relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    (ax, ay), (bx, by) = a, b  # image y grows downwards
    return {
        "left of": ax + margin < bx,
        "right of": ax > bx + margin,
        "above": ay + margin < by,
        "below": ay > by + margin,
    }[relation]


def score_spec(spec: Spec, objects: list[Detection], margin: float) -> float:
    """Partial-credit score of detected objects against a spec (see the module docstring).

    Args:
        spec: the parsed prompt.
        objects: detections from :func:`detect_objects`.
        margin: centroid margin of the relation test, in pixels.

    Returns:
        The score in [0, 1].
    """
    if isinstance(spec, CountSpec):
        same_colour = [o for o in objects if o[0] == spec.colour]
        matching = [o for o in same_colour if o[1] == spec.shape]
        exact = len(matching) == spec.count and len(objects) == spec.count
        return 0.2 * bool(same_colour) + 0.2 * bool(matching) + 0.6 * exact
    found_a = [(o[2], o[3]) for o in objects if (o[0], o[1]) == (spec.colour_a, spec.shape_a)]
    found_b = [(o[2], o[3]) for o in objects if (o[0], o[1]) == (spec.colour_b, spec.shape_b)]
    related = any(_relation_holds(spec.relation, a, b, margin) for a in found_a for b in found_b)
    return 0.25 * bool(found_a) + 0.25 * bool(found_b) + 0.5 * related


@register_reward("composition-v1")
class CompositionV1Reward(PromptSpecs):
    """Verifiable compositional reward for the embedded world, in [0, 1].

    Args:
        permissive: score prompts outside the grammar 0.0 instead of raising
            :class:`~mixgrpo.world.PromptError` (strict by default, so typos in a prompt
            set fail loudly rather than training towards zero).
        max_colour_distance: RGB distance (0-255 units) beyond which a pixel is no colour.
        min_area: smallest object, in pixels at 32 px (scaled with the image area).
    """

    name = "composition-v1"

    def __init__(self, permissive: bool = False, max_colour_distance: float = 90.0, min_area: float = 8.0):
        if not max_colour_distance > 0:
            raise ValueError(f"max_colour_distance must be > 0, got {max_colour_distance}")
        if not min_area >= 1:
            raise ValueError(f"min_area must be >= 1 pixel, got {min_area}")
        super().__init__(permissive)
        self.max_colour_distance = max_colour_distance
        self.min_area = min_area

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score ``(B, 3, H, W)`` images in [0, 1] against their prompts; returns ``(B,)`` float32."""
        check_images(images, prompts)
        specs = [self._spec(p) for p in prompts]  # parse first: bad prompts fail before any work
        unit = (images.shape[-2] * images.shape[-1]) ** 0.5 / 32
        labels = _classify_pixels(images, self.max_colour_distance)
        min_area, margin = self.min_area * unit**2, 2.0 * unit
        scores = [
            0.0 if spec is None else score_spec(spec, detect_objects(label_map, min_area), margin)
            for spec, label_map in zip(specs, labels, strict=True)
        ]
        return torch.tensor(scores, dtype=torch.float32)
