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
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Reward", "RewardOptionsError", "check_images", "get_reward", "list_rewards", "register_reward", "score", "validate_reward_output"]


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
    NaN/Inf scores back rather than an error."""
    check_images(images, prompts)
    values = reward(images, prompts)
    return validate_reward_output(values, images.shape[0], getattr(reward, "name", repr(reward)),
                                  allow_nonfinite=allow_nonfinite)
