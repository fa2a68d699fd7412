"""GRPO training: config, presets, trainer, run directory."""
