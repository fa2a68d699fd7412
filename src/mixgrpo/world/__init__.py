"""The embedded procedural text-to-image world: grammar, renderer, split."""

from .grammar import (
    BACKGROUND,
    COLOURS,
    COUNT_WORDS,
    HELD_OUT_PAIRS,
    RELATIONS,
    SHAPES,
    CountSpec,
    PromptError,
    RelationSpec,
    Spec,
    all_prompts,
    format_prompt,
    heldout_eval_prompts,
    parse_prompt,
    perturb_one_attribute,
    split_prompts,
)
from .render import MIN_SIZE, render, sample_pairs, shape_template

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "COUNT_WORDS",
    "HELD_OUT_PAIRS",
    "MIN_SIZE",
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
    "render",
    "sample_pairs",
    "shape_template",
    "split_prompts",
]
