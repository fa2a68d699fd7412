"""The embedded world's prompt grammar: coloured shapes, counts and spatial relations.

Two prompt forms::

    <count> <colour> <shape>[s]                       "three blue squares", "one red circle"
                                                      ("a"/"an" stand for one: "a red circle")
    a <colour> <shape> <relation> a <colour> <shape>  "a red circle left of a blue square"

Held-out split: three (colour, shape) pairs never occur in training prompts, so held-out
prompts test attribute combinations GRPO never trained on.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "COUNT_WORDS",
    "HELD_OUT_PAIRS",
    "RELATIONS",
    "SHAPES",
    "CountSpec",
    "PromptError",
    "RelationSpec",
    "Spec",
    "all_prompts",
    "format_prompt",
    "heldout_eval_prompts",
    "parse_prompt",
    "perturb_one_attribute",
    "split_prompts",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 70, 210),
    "cyan": (40, 200, 210),
}
BACKGROUND: tuple[int, int, int] = (20, 20, 20)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})


class PromptError(ValueError):
    """A prompt outside the embedded grammar."""


@dataclass(frozen=True)
class CountSpec:
    """``count`` objects of one colour and shape, and nothing else ("three blue squares")."""

    count: int
    colour: str
    shape: str

    def __post_init__(self) -> None:
        _check_object(self.colour, self.shape)
        if not 1 <= self.count <= len(COUNT_WORDS):
            raise PromptError(f"count must be in [1, {len(COUNT_WORDS)}], got {self.count}; use one to four")

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The (colour, shape) pairs the prompt mentions."""
        return ((self.colour, self.shape),)


@dataclass(frozen=True)
class RelationSpec:
    """Object A in a spatial relation to a different object B ("a red circle left of a blue square")."""

    colour_a: str
    shape_a: str
    relation: str
    colour_b: str
    shape_b: str

    def __post_init__(self) -> None:
        _check_object(self.colour_a, self.shape_a)
        _check_object(self.colour_b, self.shape_b)
        if self.relation not in RELATIONS:
            raise PromptError(f"unknown relation {self.relation!r}; known: {', '.join(RELATIONS)}")
        if (self.colour_a, self.shape_a) == (self.colour_b, self.shape_b):
            raise PromptError(
                f"the two objects of a relation prompt must differ in colour or shape, got "
                f"'{self.colour_a} {self.shape_a}' twice; change one of them"
            )

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The (colour, shape) pairs the prompt mentions, A first."""
        return ((self.colour_a, self.shape_a), (self.colour_b, self.shape_b))


Spec = CountSpec | RelationSpec


def _check_object(colour: str, shape: str) -> None:
    if colour not in COLOURS:
        raise PromptError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise PromptError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def format_prompt(spec: Spec) -> str:
    """The canonical prompt text of ``spec`` (lower case, single spaces)."""
    if isinstance(spec, CountSpec):
        noun = spec.shape if spec.count == 1 else spec.shape + "s"
        return f"{COUNT_WORDS[spec.count - 1]} {spec.colour} {noun}"
    return f"a {spec.colour_a} {spec.shape_a} {spec.relation} a {spec.colour_b} {spec.shape_b}"


_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_ONE = ("a", "an")  # "a red circle" is "one red circle"
_COUNT_RE = re.compile(rf"^({'|'.join([*COUNT_WORDS, *_ONE])}) ({_COLOUR}) ({_SHAPE})(s?)$")
_RELATION_RE = re.compile(rf"^an? ({_COLOUR}) ({_SHAPE}) ({'|'.join(RELATIONS)}) an? ({_COLOUR}) ({_SHAPE})$")
_VOCABULARY = frozenset(
    [*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *COUNT_WORDS, "a", "an", *" ".join(RELATIONS).split()]
)


def parse_prompt(text: str) -> Spec:
    """Parse a prompt of the grammar (case and extra whitespace are ignored).

    Args:
        text: a prompt such as "two red circles", "a red circle" (= "one red circle") or
            "a red circle left of a blue square".

    Returns:
        The :class:`CountSpec` or :class:`RelationSpec` it describes.

    Raises:
        PromptError: the text is outside the grammar; the message names the unknown words,
            or the expected forms when every word is known.
    """
    norm = " ".join(str(text).lower().split())
    match = _COUNT_RE.match(norm)
    if match:
        count = 1 if match.group(1) in _ONE else COUNT_WORDS.index(match.group(1)) + 1
        if (count == 1) == bool(match.group(4)):
            raise PromptError(f"prompt {text!r}: use the singular noun for 'one' (or 'a') and the plural otherwise")
        return CountSpec(count, match.group(2), match.group(3))
    match = _RELATION_RE.match(norm)
    if match:
        return RelationSpec(*match.groups())
    unknown = [w for w in norm.split() if w not in _VOCABULARY]
    if unknown:
        raise PromptError(
            f"prompt {text!r} is outside the embedded grammar: unknown word(s) {', '.join(map(repr, unknown))}; "
            f"known colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}"
        )
    raise PromptError(
        f"prompt {text!r} is outside the embedded grammar: expected '<count> <colour> <shape>s' "
        f"or 'a <colour> <shape> <relation> a <colour> <shape>'"
    )


def _all_specs() -> list[Spec]:
    objects = list(itertools.product(COLOURS, SHAPES))
    specs: list[Spec] = [CountSpec(n, c, s) for n in range(1, len(COUNT_WORDS) + 1) for c, s in objects]
    specs += [
        RelationSpec(ca, sa, rel, cb, sb)
        for (ca, sa), rel, (cb, sb) in itertools.product(objects, RELATIONS, objects)
        if (ca, sa) != (cb, sb)
    ]
    return specs


def all_prompts() -> list[str]:
    """Every prompt of the grammar, in a fixed order (72 count + 1,224 relation prompts)."""
    return [format_prompt(s) for s in _all_specs()]


def split_prompts() -> tuple[list[str], list[str]]:
    """Fixed ``(train, heldout)`` split: held-out prompts contain a :data:`HELD_OUT_PAIRS` pair."""
    train, heldout = [], []
    for spec in _all_specs():
        (heldout if any(p in HELD_OUT_PAIRS for p in spec.pairs) else train).append(format_prompt(spec))
    return train, heldout


def heldout_eval_prompts(n: int = 256, seed: int = 0) -> list[str]:
    """A fixed sample of ``n`` held-out prompts (seeded permutation of the held-out split, in split order)."""
    heldout = split_prompts()[1]
    if not 1 <= n <= len(heldout):
        raise ValueError(f"n must be in [1, {len(heldout)}] held-out prompts, got {n}")
    order = np.random.default_rng(seed).permutation(len(heldout))[:n]
    return [heldout[i] for i in sorted(order)]


def _other(options: list, current: object, rng: np.random.Generator) -> object:
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def perturb_one_attribute(spec: Spec, rng: np.random.Generator) -> Spec:
    """The same spec with exactly one attribute changed to another valid value.

    Args:
        spec: the spec to perturb.
        rng: picks the attribute and its new value.

    Returns:
        A valid spec differing from ``spec`` in exactly one field (count, colour or shape of
        a count prompt; relation or one object's colour or shape of a relation prompt).
    """
    if not isinstance(spec, CountSpec | RelationSpec):
        raise TypeError(f"cannot perturb {spec!r}; pass a CountSpec or RelationSpec (see parse_prompt)")
    for _ in range(100):
        if isinstance(spec, CountSpec):
            field = ("count", "colour", "shape")[int(rng.integers(3))]
            options = {"count": range(1, len(COUNT_WORDS) + 1), "colour": COLOURS, "shape": SHAPES}[field]
        else:
            field = ("colour_a", "shape_a", "relation", "colour_b", "shape_b")[int(rng.integers(5))]
            options = COLOURS if field.startswith("colour") else SHAPES if field.startswith("shape") else RELATIONS
        try:
            return replace(spec, **{field: _other(list(options), getattr(spec, field), rng)})
        except PromptError:  # e.g. made the two objects identical: draw again
            continue
    raise RuntimeError("could not perturb spec")  # pragma: no cover
