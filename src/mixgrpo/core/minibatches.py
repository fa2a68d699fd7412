"""Several optimizer steps per rollout: which samples each step trains on.

The references accumulate gradients over a fixed number of samples per GPU and step the
optimizer every ``gradient_accumulation_steps`` of them, so one rollout gives several
updates: MixGRPO 12 samples per GPU / 3 = 4 steps, DanceGRPO 12 / 4 = 3, Flow-GRPO 2 per
epoch (``num_batches_per_epoch // 2``), DiffusionNFT and AWM 1. Each GPU holds one prompt's
group there, so every optimizer step sees every prompt through a slice of its group. We
keep that structure, which also makes the split independent of how groups sit on ranks:

    part k of an epoch = the k-th of ``K`` contiguous slices of every group's members,
                         taken in the order :func:`order_members` gives.

``order`` is MixGRPO's ``advantage_rerange_strategy`` (Tencent-Hunyuan/MixGRPO @ e5cdd6a,
``fastvideo/train_grpo_flux.py`` and ``balance_pos_neg`` in
``fastvideo/models/reward_model/utils.py``): ``none`` keeps sampling order, ``random``
shuffles, ``balance`` shuffles the positive and the negative advantages apart and then
interleaves them (the smaller side first, ties: negatives first), the rest of the larger
side after, so each step sees both signs. Deviation: the reference drops members whose
advantage is exactly 0 from ``balance``; ours puts them last (they carry no policy gradient
but still count in a step's mean and its KL).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MINIBATCH_ORDERS", "minibatch_parts", "order_members"]

MINIBATCH_ORDERS: tuple[str, ...] = ("none", "random", "balance")


def order_members(advantages: torch.Tensor, order: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n,)`` positions of one group's members in the order the optimizer steps take them.

    Args:
        advantages: ``(n,)`` the members' advantages.
        order: one of :data:`MINIBATCH_ORDERS`.
        generator: the shuffles' randomness (``random`` and ``balance``).
    """
    n = advantages.numel()
    if order == "none":
        return torch.arange(n)
    if order == "random":
        return torch.randperm(n, generator=generator)
    if order != "balance":
        raise ValueError(f"unknown minibatch order {order!r}; use one of {', '.join(MINIBATCH_ORDERS)}")
    pos = (advantages > 0).nonzero().squeeze(1)
    neg = (advantages < 0).nonzero().squeeze(1)
    pos = pos[torch.randperm(pos.numel(), generator=generator)]
    neg = neg[torch.randperm(neg.numel(), generator=generator)]
    small, large = (pos, neg) if pos.numel() < neg.numel() else (neg, pos)
    pairs = torch.stack([small, large[: small.numel()]], 1).reshape(-1)  # small[0], large[0], small[1], ...
    zero = (advantages == 0).nonzero().squeeze(1)
    return torch.cat([pairs, large[small.numel():], zero])


def minibatch_parts(advantages: torch.Tensor, valid: torch.Tensor, group_size: int, parts: int, order: str = "none",
                    generators: Sequence[torch.Generator | None] | None = None) -> list[torch.Tensor]:
    """The samples of each of ``parts`` optimizer steps (see the module doc).

    Args:
        advantages: ``(N,)`` advantages of group-contiguous samples, ``N = groups * group_size``.
        valid: ``(N,)`` bool, the samples that train (others are in no part).
        group_size: members per group.
        parts: optimizer steps per epoch, ``K >= 1``.
        order: how each group's members are ordered before slicing.
        generators: one per group for ``random``/``balance`` (None: torch's global generator).

    Returns:
        ``K`` long tensors of row indices (a part may be empty when a group has fewer valid
        members than ``K``).
    """
    n = advantages.numel()
    if parts < 1 or group_size < 1 or n % group_size:
        raise ValueError(f"need parts >= 1 and N = {n} a multiple of group_size = {group_size}")
    slices: list[list[torch.Tensor]] = [[] for _ in range(parts)]
    for g, start in enumerate(range(0, n, group_size)):
        rows = torch.arange(start, start + group_size)[valid[start : start + group_size].cpu()]
        gen = generators[g] if generators is not None else None
        ranked = rows[order_members(advantages[rows].cpu(), order, gen)]
        for k, chunk in enumerate(torch.tensor_split(ranked, parts)):
            slices[k].append(chunk)
    return [torch.cat(s) if s else torch.zeros(0, dtype=torch.long) for s in slices]
