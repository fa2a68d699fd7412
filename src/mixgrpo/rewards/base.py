"""The reward plug-in contract and registry.

A reward maps a batch of images and their prompts to one score per image::

    class MyReward:
        name = "my-reward"
        def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            # images: (B, 3, H, W) floats in [0, 1]; returns (B,) float32 (CPU)
            ...

Register it with ``@register_reward("my-reward")`` (or the ``mixgrpo.rewards`` entry-point
group, loaded on first lookup) and refer to it by name in configs. Heavy imports belong
inside the class, so listing rewards stays cheap.

A *video* reward sets the class attribute ``video = True`` and scores ``(B, F, 3, H, W)``
clips. :func:`score` refuses an image reward on videos (wrap it: ``per-frame``, in
:mod:`.video`) and a video reward on images, each in one line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Reward", "RewardOptionsError", "check_images", "check_videos", "get_reward", "is_video_reward", "list_rewards",
           "register_reward", "score", "validate_reward_output"]


@runtime_checkable
class Reward(Protocol):
    """Scores ``(B, 3, H, W)`` images in [0, 1] against their prompts: ``(B,)`` float32 on the CPU."""

    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}
_ENTRY_POINTS_LOADED = False


def register_reward(name: str) -> Callable[[type], type]:
    """Class decorator adding a reward class (or factory) to the registry.

    Args:
        name: the name configs use; also set as the class's ``name`` attribute.

    Returns:
        The decorator, which returns the class unchanged apart from ``name``.
    """

    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a reward named {name!r} is already registered ({_REGISTRY[name]!r}); pick another name")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="mixgrpo.rewards"):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()


def list_rewards() -> list[str]:
    """Names of the registered rewards, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


class RewardOptionsError(ValueError):
    """A reward's constructor options do not fit its signature (missing or unknown ones).
    ``problem`` is the message without the hint on where options go, for callers with their own."""

    def __init__(self, problem: str, hint: str):
        super().__init__(f"{problem} ({hint})")
        self.problem = problem


def get_reward(name: str, **kwargs) -> Reward:
    """Instantiate the reward registered as ``name``.

    Args:
        name: a registered name (see :func:`list_rewards`).
        **kwargs: passed to the reward's constructor.

    Raises:
        ValueError: ``name`` is not registered; the message lists the registered names.
    """
    _load_entry_points()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {', '.join(sorted(_REGISTRY)) or 'none'}")
    factory = _REGISTRY[name]
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins and some C extensions have none
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError:
            takes = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
            raise RewardOptionsError(f"reward {name!r} takes options {', '.join(takes) or '(none)'}; got "
                                     f"{', '.join(kwargs) or '(none)'}",
                                     f"set them as rewards: {{{name}: {{weight: 1, <option>: ...}}}}") from None
    return factory(**kwargs)


def check_images(images: torch.Tensor, prompts: list[str]) -> None:
    """Raise ``ValueError`` for a batch no reward should silently score.

    Args:
        images: ``(B, 3, H, W)`` floating-point images in [0, 1].
        prompts: one prompt per image.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (B, 3, H, W), got {shape}; pass RGB batches channels-first")
    if not images.is_floating_point():
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf; the sampler or model produced non-finite values")
    low, high = images.min().item(), images.max().item()
    if low < -1e-3 or high > 1 + 1e-3:
        hint = "map [-1, 1] images with (x + 1) / 2" if low >= -1 - 1e-3 and high <= 1 + 1e-3 else "divide by 255"
        raise ValueError(f"images must be in [0, 1], got values in [{low:.3g}, {high:.3g}]; {hint}")


def check_videos(videos: torch.Tensor, prompts: list[str]) -> None:
    """:func:`check_images` for ``(B, F, 3, H, W)`` clips in [0, 1], one prompt per clip."""
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[2] != 3:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"expected videos of shape (B, F, 3, H, W), got {shape}; pass RGB clips frames-first")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"got {videos.shape[0]} videos but {len(prompts)} prompts; pass one prompt per video")
    check_images(videos.flatten(0, 1), [p for p in prompts for _ in range(videos.shape[1])])


def is_video_reward(reward: object) -> bool:
    """Whether ``reward`` scores ``(B, F, 3, H, W)`` clips (its ``video`` attribute)."""
    return bool(getattr(reward, "video", False))


def check_reward_input(reward: object, name: str, videos: bool, shape: tuple[int, ...] | None = None) -> None:
    """One line when ``reward`` (an instance, or its registered class) cannot score what a model
    makes: an image reward on videos (the fix: wrap it in ``per-frame``) or a video reward on
    images. ``shape``: the batch's, for the message."""
    made = "videos" if videos else "images"
    got = f"got {made} {tuple(shape)}" if shape is not None else f"this model makes {made}"
    if videos and not is_video_reward(reward):
        raise ValueError(f"reward {name!r} scores images (B, 3, H, W) but {got}; score them "
                         f"frame by frame with rewards: {{per-frame: {{weight: 1, reward: {name}}}}}")
    if not videos and is_video_reward(reward):
        raise ValueError(f"reward {name!r} scores videos (B, F, 3, H, W) but {got}; "
                         "use it on a video model, or pick an image reward")


def registered_reward(name: str) -> Callable[..., Reward] | None:
    """The class (or factory) registered as ``name``, or None; for checks before any reward is built."""
    _load_entry_points()
    return _REGISTRY.get(name)


def validate_reward_output(values: torch.Tensor, batch: int, name: str, *, allow_nonfinite: bool = False) -> torch.Tensor:
    """A reward's output as ``(B,)`` float32.

    Args:
        values: what the reward returned.
        batch: the number of images scored.
        name: the reward's name, for the error message.
        allow_nonfinite: return NaN/Inf scores as they are (the trainer drops their groups).

    Raises:
        ValueError: wrong shape, or NaN/Inf scores (unless allowed).
    """
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.shape != (batch,):
        raise ValueError(f"reward {name!r} returned shape {tuple(values.shape)}; expected ({batch},), one score per image")
    if not allow_nonfinite and not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"reward {name!r} returned {bad} non-finite score(s) (NaN/Inf); fix the reward")
    return values


def score(reward: Reward, images: torch.Tensor, prompts: list[str], *, allow_nonfinite: bool = False) -> torch.Tensor:
    """Check the inputs, call ``reward`` and check its output; returns ``(B,)`` float32.

    With ``allow_nonfinite`` the caller has replaced non-finite images itself and wants
    NaN/Inf scores back rather than an error. ``images`` may be ``(B, F, 3, H, W)`` videos
    for a video reward."""
    name = getattr(reward, "name", repr(reward))
    if isinstance(images, torch.Tensor) and images.ndim in (4, 5):
        check_reward_input(reward, name, images.ndim == 5, images.shape)
    if is_video_reward(reward):
        check_videos(images, prompts)
    else:
        check_images(images, prompts)
    values = reward(images, prompts)
    return validate_reward_output(values, images.shape[0], name, allow_nonfinite=allow_nonfinite)
