"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for models too big to replicate per GPU.

``parallel: fsdp`` shards every transformer block (TinyDiT ``blocks``; FLUX
``transformer_blocks`` + ``single_transformer_blocks``; SD3 ``transformer_blocks``) and then the
model root, over all ranks. Parameters become DTensors; gradients are reduce-scattered (a mean
over ranks, which the trainer compensates so the update equals the single-process one).
``model.dtype=bfloat16`` adds a mixed-precision policy (bf16 compute, fp32 reductions).

Checkpoints: every rank writes its shards of the weights, the optimizer state and the EMA with
``torch.distributed.checkpoint`` (``checkpoints/iter_N.dcp/``), which can be read back on a
different world size; rank 0 also writes the consolidated trained weights
(``iter_N/weights.safetensors``) for export and sampling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["BLOCK_LISTS", "load_sharded", "save_sharded", "shard_model"]

BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks")


def shard_model(root: nn.Module, world_size: int, device: torch.device, bf16: bool) -> None:
    """``fully_shard`` each transformer block of ``root``, then ``root`` itself (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    units = [block for name in BLOCK_LISTS for block in getattr(root, name, [])]
    if not units:
        raise ValueError(f"parallel=fsdp found no transformer blocks ({', '.join(BLOCK_LISTS)}) in "
                         f"{type(root).__name__}; use parallel=ddp")
    for block in units:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_sd, "optim": optim_sd, **({"ema": ema} if ema else {})}


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: dict[str, torch.Tensor] | None) -> None:
    """Every rank writes its shards to ``folder`` (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer, ema), checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: dict[str, torch.Tensor] | None) -> None:
    """Read ``folder`` into the (possibly differently sharded) model, optimizer and EMA."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not (folder / ".metadata").is_file():
        raise ValueError(f"{folder} is not a complete distributed checkpoint (.metadata missing); resume from an "
                         "earlier one or start a new run")
    from torch.distributed.checkpoint import DefaultLoadPlanner

    state = _state(model, optimizer, ema)
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    missing = [k for k in state["model"] if f"model.{k}" not in saved]
    missing += [k for k in (ema or {}) if f"ema.{k}" not in saved]
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} trained tensor(s) (e.g. {missing[0]}); it belongs to another "
                         "run or model")
    # the template holds optimizer state for every parameter; a parameter that never had a
    # gradient (e.g. the unused null condition) has none on disk, and keeps its fresh state
    dcp.load(state, checkpoint_id=str(folder), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True))
    if ema:
        with torch.no_grad():
            for name, tensor in ema.items():
                tensor.copy_(state["ema"][name])
