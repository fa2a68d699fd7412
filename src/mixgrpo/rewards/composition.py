"""``composition`` (v2): a verifier that scores what a person would call a correct picture.

An object counts only if it looks like one of the world's shapes *at the world's size*;
every foreground pixel that no such object explains costs score. The first verifier
(:mod:`.composition_v1`) read shape from the bounding-box fill ratio and ignored leftover
colour, so a policy learnt to paint blobs of colour that it scored as exact.

1. **Colour** (vectorised over the batch): each pixel takes the nearest of the background
   and the six palette colours; a pixel farther than ``max_colour_distance`` (RGB, 0-255)
   from all seven is *off-palette* foreground (smears, tints).
2. **Components**: connected components (8-connectivity) of each palette colour.
3. **Shape test** against the renderer's own templates (:func:`~mixgrpo.world.shape_template`,
   the same pixels the world draws, at the image's size), position free: for a component
   ``M`` and template ``T``

       IoU(M, T) = max over integer shifts s of |M & (T + s)| / |M | (T + s)|

   computed by cross-correlating the two masks. A component is an object of the shape with
   the highest IoU if that IoU is ``>= min_iou`` (0.7) and its area is within
   ``area_tolerance`` (30 %) of the template's. Anything else -- a blob, a half-drawn,
   smeared, merged or wrongly sized shape, a speck -- is *unexplained* foreground.
4. **Score** in [0, 1], the prompt's credit times a cleanliness factor:

   - count prompt "N <colour> <shape>s": ``0.2 [an object of the colour] + 0.2 [an object of
     the colour and shape] + 0.6 [exactly N such objects and no other object]``;
   - relation prompt "a A <rel> a B": ``0.2 [A found] + 0.2 [B found] + 0.6 [exactly the two
     objects A and B, and the relation holds]``. The relation holds when B's centroid lies
     at least ``2 px`` (at 32 px) from A's along the relation's axis and the offset across
     the axis is no larger than the offset along it (a 90-degree cone);
   - cleanliness ``c = clip(1 - (u - free) / budget, 0, 1)`` with ``u`` the unexplained
     foreground pixels, ``free`` = 6 px and ``budget`` = 40 px (at 32 px, scaled with the
     image area): a few stray pixels are free, half a shape's worth of junk halves the score,
     a shape's worth zeroes it.

   So colour mass alone earns nothing (it is not an object and it is all unexplained), and
   a picture with extra objects never gets the 0.6 term. Partial credit stays for GRPO:
   the right colour as a real shape, the right object, then the whole prompt.

Speed: about 1 ms per 32 px image on one core (``python -m mixgrpo.bench.world``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage, signal

from ..world.grammar import BACKGROUND, COLOURS, SHAPES, CountSpec, PromptError, Spec, parse_prompt
from ..world.render import shape_template
from .base import check_images, register_reward

__all__ = ["CompositionReward", "Detection", "PromptSpecs", "Verdict", "cleanliness", "detect_objects", "relation_holds",
           "score_spec"]

_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # (7, 3), row 0 = background
_COLOUR_NAMES = list(COLOURS)
_EIGHT = np.ones((3, 3), dtype=bool)
_OFF_PALETTE = -1  # label of foreground pixels far from every colour


@dataclass(frozen=True)
class Detection:
    """One recognised object: its colour, shape, centroid (pixels, centres at +0.5) and IoU."""

    colour: str
    shape: str
    cx: float
    cy: float
    iou: float


@dataclass(frozen=True)
class Verdict:
    """What the verifier saw in one image: recognised objects and unexplained foreground pixels."""

    objects: tuple[Detection, ...]
    unexplained: int


def _classify_pixels(images: torch.Tensor, max_distance: float) -> np.ndarray:
    """``(B, H, W)`` int8 labels: 0 background, ``k`` palette colour ``k - 1``, -1 off-palette."""
    pixels = images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1) * 255.0  # (B, H, W, 3)
    dist = torch.cdist(pixels.reshape(-1, 3), torch.from_numpy(_PALETTE)).reshape(*pixels.shape[:3], len(_PALETTE))
    best, label = dist.min(dim=-1)
    label[best > max_distance] = _OFF_PALETTE
    return label.to(torch.int8).numpy()


@lru_cache(maxsize=16)
def _templates(size: int) -> tuple[tuple[str, np.ndarray, int], ...]:
    """``(shape, float mask, area)`` of each renderer template at ``size`` (built once per size)."""
    return tuple((shape, shape_template(shape, size).astype(np.float32), int(shape_template(shape, size).sum()))
                 for shape in SHAPES)


def _best_shape(mask: np.ndarray, area: int, templates, min_iou: float, tolerance: float) -> tuple[str, float] | None:
    """The template shape with the highest shift-free IoU, if it passes the size and IoU tests."""
    best: tuple[str, float] | None = None
    m = mask.astype(np.float32)
    for shape, template, t_area in templates:
        if abs(area - t_area) > tolerance * t_area:
            continue
        inter = float(signal.correlate2d(m, template, mode="full").max())  # best overlap over all shifts
        iou = inter / (area + t_area - inter)
        if iou >= min_iou and (best is None or iou > best[1]):
            best = (shape, iou)
    return best


def detect_objects(label_map: np.ndarray, *, min_iou: float = 0.7, area_tolerance: float = 0.3) -> Verdict:
    """Recognise the objects in one label map and count the unexplained foreground.

    Args:
        label_map: ``(H, W)`` labels from the colour step (0 background, ``k`` colour
            ``k - 1``, -1 off-palette).
        min_iou: smallest template IoU of an object.
        area_tolerance: largest relative difference between a component's and the template's area.

    Returns:
        The recognised objects and the number of foreground pixels none of them explains.
    """
    templates = _templates(label_map.shape[0])
    smallest = min(t for _, _, t in templates) * (1 - area_tolerance)
    objects: list[Detection] = []
    unexplained = int((label_map == _OFF_PALETTE).sum())
    for k in np.unique(label_map):
        if k <= 0:
            continue
        components, n = ndimage.label(label_map == k, structure=_EIGHT)
        areas = np.bincount(components.ravel(), minlength=n + 1)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            area = int(areas[index])
            mask = components[box] == index
            found = _best_shape(mask, area, templates, min_iou, area_tolerance) if area >= smallest else None
            if found is None:
                unexplained += area
                continue
            ys, xs = np.nonzero(mask)
            objects.append(Detection(_COLOUR_NAMES[k - 1], found[0], float(box[1].start + xs.mean() + 0.5),
                                     float(box[0].start + ys.mean() + 0.5), found[1]))
    return Verdict(tuple(objects), unexplained)


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    """Whether ``(x, y)`` centroid ``a`` is ``relation`` of ``b`` (image y grows downwards)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= margin and abs(across) <= along


def score_spec(spec: Spec, verdict: Verdict, *, margin: float, free: float, budget: float) -> float:
    """Partial credit of a verdict against a spec, times cleanliness (see the module docstring)."""
    objects = verdict.objects
    if isinstance(spec, CountSpec):
        same_colour = [o for o in objects if o.colour == spec.colour]
        matching = [o for o in same_colour if o.shape == spec.shape]
        exact = len(matching) == spec.count == len(objects)
        credit = 0.2 * bool(same_colour) + 0.2 * bool(matching) + 0.6 * exact
    else:
        found_a = [o for o in objects if (o.colour, o.shape) == (spec.colour_a, spec.shape_a)]
        found_b = [o for o in objects if (o.colour, o.shape) == (spec.colour_b, spec.shape_b)]
        exact = len(objects) == 2 and len(found_a) == len(found_b) == 1 and relation_holds(
            spec.relation, (found_a[0].cx, found_a[0].cy), (found_b[0].cx, found_b[0].cy), margin)
        credit = 0.2 * bool(found_a) + 0.2 * bool(found_b) + 0.6 * exact
    return credit * cleanliness(verdict, free, budget)


def cleanliness(verdict: Verdict, free: float, budget: float) -> float:
    """``clip(1 - (u - free) / budget, 0, 1)`` for ``u`` unexplained foreground pixels."""
    return min(1.0, max(0.0, 1.0 - (verdict.unexplained - free) / budget))


class PromptSpecs:
    """Parses and caches the grammar specs of prompts; ``permissive`` turns prompts outside
    the grammar into ``None`` (scored 0) instead of a :class:`~mixgrpo.world.PromptError`."""

    def __init__(self, permissive: bool = False):
        self.permissive = permissive
        self._specs: dict[str, Spec | None] = {}

    def _spec(self, prompt: str) -> Spec | None:
        if prompt not in self._specs:
            try:
                spec = parse_prompt(prompt)
            except PromptError:
                if not self.permissive:
                    raise
                return None  # not cached: arbitrary text could grow the cache without bound
            self._specs[prompt] = spec
        return self._specs[prompt]


@register_reward("composition")
class CompositionReward(PromptSpecs):
    """Verifiable compositional reward for the embedded world, in [0, 1] (v2: template shapes).

    Args:
        permissive: score prompts outside the grammar 0.0 instead of raising
            :class:`~mixgrpo.world.PromptError` (strict by default, so typos in a prompt
            set fail loudly rather than training towards zero).
        max_colour_distance: RGB distance (0-255 units) beyond which a pixel is off-palette.
        min_iou: smallest shift-free IoU with a renderer template for a component to be an object.
        area_tolerance: largest relative area difference between an object and its template.
        free_pixels, junk_budget: cleanliness ``clip(1 - (u - free) / budget, 0, 1)`` for
            ``u`` unexplained foreground pixels (both at 32 px, scaled with the image area).
    """

    name = "composition"

    def __init__(self, permissive: bool = False, max_colour_distance: float = 90.0, min_iou: float = 0.7,
                 area_tolerance: float = 0.3, free_pixels: float = 6.0, junk_budget: float = 40.0):
        if not max_colour_distance > 0:
            raise ValueError(f"max_colour_distance must be > 0, got {max_colour_distance}")
        if not 0 < min_iou <= 1:
            raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
        if not 0 <= area_tolerance < 1:
            raise ValueError(f"area_tolerance must be in [0, 1), got {area_tolerance}")
        if free_pixels < 0 or not junk_budget > 0:
            raise ValueError(f"free_pixels must be >= 0 and junk_budget > 0, got {free_pixels}, {junk_budget}")
        super().__init__(permissive)
        self.max_colour_distance = max_colour_distance
        self.min_iou, self.area_tolerance = min_iou, area_tolerance
        self.free_pixels, self.junk_budget = free_pixels, junk_budget

    def verdicts(self, images: torch.Tensor) -> list[Verdict]:
        """The objects and unexplained pixels of each ``(B, 3, H, W)`` image in [0, 1]."""
        labels = _classify_pixels(images, self.max_colour_distance)
        return [detect_objects(m, min_iou=self.min_iou, area_tolerance=self.area_tolerance) for m in labels]

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score ``(B, 3, H, W)`` images in [0, 1] against their prompts; returns ``(B,)`` float32."""
        check_images(images, prompts)
        specs = [self._spec(p) for p in prompts]  # parse first: bad prompts fail before any work
        area_unit = images.shape[-2] * images.shape[-1] / 32**2
        margin = 2.0 * area_unit**0.5
        free, budget = self.free_pixels * area_unit, self.junk_budget * area_unit
        scores = [
            0.0 if spec is None else score_spec(spec, verdict, margin=margin, free=free, budget=budget)
            for spec, verdict in zip(specs, self.verdicts(images), strict=True)
        ]
        return torch.tensor(scores, dtype=torch.float32)
