"""Video rewards: ``per-frame`` turns any image reward into a video reward, and
``temporal-consistency`` scores how steadily a clip holds together from frame to frame.

Both take ``(B, F, 3, H, W)`` clips in [0, 1] (``video = True``, see :mod:`.base`).

``temporal-consistency``. For consecutive frames ``f, g`` and ``b x b`` blocks ``B`` of
``f``, the block-matching difference

    D(f -> g) = mean over blocks B of  min over |d|_inf <= r of  mean_{p in B, c} |g(p + d) - f(p)|

forgives any motion of up to ``r`` pixels per frame (each block may find itself nearby in
the next frame), but not flicker, noise, colour drift, or things that appear, vanish or
jump. Matching blocks rather than single pixels keeps noise from matching itself: a
pixel's best of ``(2r + 1)^2`` shifts would find a near copy in pure noise. It is taken both ways (``f -> g`` misses what appears in ``g``, ``g -> f`` what
vanishes from ``f``) and averaged over the clip's frame pairs::

    r_tc = 1 - clip(mean_pairs (D(f -> g) + D(g -> f)) / 2 / scale, 0, 1)

A still clip scores 1: it rewards steadiness, not motion, so pair it with a reward that
asks for what the prompt wants (e.g. ``per-frame`` of a prompt verifier).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import check_videos, get_reward, register_reward, score

__all__ = ["AGGREGATES", "PerFrameReward", "TemporalConsistencyReward"]

AGGREGATES: tuple[str, ...] = ("mean", "min", "median")


@register_reward("per-frame")
class PerFrameReward:
    """An image reward applied to every frame, aggregated over the frames.

    Args:
        reward: the registered image reward's name.
        aggregate: ``mean`` (default), ``min`` (every frame must pass) or ``median``.
        **options: the image reward's own options.
    """

    name = "per-frame"
    video = True

    def __init__(self, reward: str, aggregate: str = "mean", **options):
        if aggregate not in AGGREGATES:
            raise ValueError(f"per-frame aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        self.inner = get_reward(reward, **options)
        if getattr(self.inner, "video", False):
            raise ValueError(f"reward {reward!r} already scores videos; use it directly, not through per-frame")
        self.aggregate = aggregate

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_videos(videos, prompts)
        b, f = videos.shape[:2]
        per_frame = score(self.inner, videos.flatten(0, 1), [p for p in prompts for _ in range(f)]).view(b, f)
        if self.aggregate == "mean":
            return per_frame.mean(1)
        if self.aggregate == "min":
            return per_frame.min(1).values
        return per_frame.median(1).values


def _block_matching_difference(f: torch.Tensor, g: torch.Tensor, radius: int, block: int) -> torch.Tensor:
    """``(N,)`` mean over ``block``-pixel blocks of ``f`` of their smallest mean ``|g(p + d) - f(p)|``
    over shifts ``|d| <= radius``; ``f``, ``g``: ``(N, 3, H, W)``."""
    h, w = f.shape[-2:]
    padded = F.pad(g, (radius,) * 4, mode="replicate")
    best = None
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            diff = (padded[..., dy : dy + h, dx : dx + w] - f).abs().mean(1, keepdim=True)  # (N, 1, H, W)
            per_block = F.avg_pool2d(diff, block, ceil_mode=True)  # (N, 1, H/b, W/b)
            best = per_block if best is None else torch.minimum(best, per_block)
    return best.flatten(1).mean(1)


@register_reward("temporal-consistency")
class TemporalConsistencyReward:
    """Frame-to-frame steadiness of a clip in [0, 1] (see the module doc).

    Args:
        radius: motion in pixels per frame that costs nothing (2).
        scale: the mean difference (0-1 colour units) that scores 0 (0.05).
        block: side of the matched blocks in pixels (4).
    """

    name = "temporal-consistency"
    video = True

    def __init__(self, radius: int = 2, scale: float = 0.05, block: int = 4):
        if radius < 0 or not scale > 0 or block < 1:
            raise ValueError(f"temporal-consistency needs radius >= 0, scale > 0 and block >= 1, got {radius}, "
                             f"{scale} and {block}")
        self.radius, self.scale, self.block = radius, scale, block

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_videos(videos, prompts)
        clips = videos.detach().to("cpu", torch.float32)
        b, f = clips.shape[:2]
        if f < 2:
            return torch.ones(b)
        a, c = clips[:, :-1].flatten(0, 1), clips[:, 1:].flatten(0, 1)  # consecutive pairs, (B (F-1), 3, H, W)
        both = 0.5 * (_block_matching_difference(a, c, self.radius, self.block)
                      + _block_matching_difference(c, a, self.radius, self.block))
        d = both.view(b, f - 1).mean(1)
        return (1 - d / self.scale).clamp(0, 1)
