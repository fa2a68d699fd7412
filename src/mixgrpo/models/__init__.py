"""Model adapters: each exposes ``velocity(x, t, cond) -> v`` to the samplers."""
