"""Inference: sampling with the base-model blend, checkpoint loading/export, reward tables."""

from .generate import (
    EVAL_CHUNK,
    blended_velocity,
    condition,
    generate,
    generate_prompts,
    switch_step,
)

__all__ = ["EVAL_CHUNK", "blended_velocity", "condition", "generate", "generate_prompts", "switch_step"]
