"""mixgrpo: GRPO alignment of flow-matching text-to-image models.

``mixgrpo.core`` holds the pure math (grids, steps, solvers, windows, GRPO objective, OVF).
"""

__version__ = "0.1.0"
