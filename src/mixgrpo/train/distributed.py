"""Data-parallel training under torchrun: which groups a rank samples, and the collectives.

Launch with torchrun (``torchrun --nproc_per_node 8 -m mixgrpo train ...``; multi-node with
its rendezvous flags). Each rank samples ``prompts_per_iter / world_size`` whole groups, so a
group never straddles ranks; rewards (and the non-finite mask) are all-gathered, so every rank
computes the same advantages over the whole batch (group statistics and the ``global`` std
mode see everything) and keeps its own rows. Gradients are summed over ranks with one
all-reduce per optimizer step (DDP, on the step's last backward; FSDP2 reduce-scatters), the
loss being normalised by the *global* number of trained samples: the update equals the
single-process one. With ``sampler.noise_per_group`` every
group's noise comes from (seed, iteration, group) whatever rank draws it, so a 2-process run
reproduces the 1-process run.

Restarts (``torchrun --max-restarts``): torchrun keeps one TCP store for the whole job (the
agent's rendezvous store, shared with the workers since torch 2.4) and hands the restarted
workers the same ``MASTER_PORT``, but the keys of the failed attempt are still in it. The
process group's bootstrap keys (gloo's per-rank listening addresses, the store-based
barrier's counter) have fixed names, so a restarted rank could read the *dead* peer's
address before the new peer overwrote it and fail with "Gloo connectFullMesh failed ...
Connection refused" (or pass the barrier on a stale count). :func:`dist_from_environment`
therefore starts the process group on a store prefixed by the restart attempt
(``mixgrpo/attempt_<TORCHELASTIC_RESTART_COUNT>/``): every attempt bootstraps from keys of
its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "Dist",
    "all_gather_rows",
    "barrier",
    "check_distributed_config",
    "dist_from_environment",
    "rank_device",
    "sum_over_ranks",
]


@dataclass(frozen=True)
class Dist:
    """This process's place: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # this rank's device: where its collectives run (NCCL: its own GPU)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_groups(self, num_groups: int) -> range:
        """The groups (prompt indices of the iteration) this rank samples."""
        per_rank = num_groups // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


def elastic_restart_count() -> int:
    """How often torchrun has restarted this worker group (``--max-restarts``); 0 outside it."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def rank_device(device: str, local_rank: int, world_size: int) -> torch.device:
    """The device a process trains on: ``cuda`` without an index means this rank's own GPU
    (``cuda:LOCAL_RANK``) under several processes; anything else is taken as given."""
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is None and world_size > 1:
        return torch.device("cuda", local_rank)
    return chosen


def dist_from_environment(device: str = "cpu") -> Dist:
    """The torchrun environment as a :class:`Dist` (a single process without it); starts the
    process group (NCCL on CUDA, gloo on the CPU) when there are several processes.

    On CUDA the rank's GPU (``cuda:LOCAL_RANK`` for ``device="cuda"``) becomes the current
    device before the process group starts, so NCCL's communicators and every ``cuda``
    tensor without an index land on it, not all on ``cuda:0``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=str(rank_device(device, 0, 1)))
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun "
                         "(e.g. torchrun --nproc_per_node 2 -m mixgrpo train ...), which sets the rendezvous")
    local_rank = int(os.environ["LOCAL_RANK"])
    chosen = rank_device(device, local_rank, world)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    d = Dist(int(os.environ["RANK"]), world, local_rank, str(chosen))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", store=_attempt_store(d.rank, world),
                                rank=d.rank, world_size=world)
    return d


def _attempt_store(rank: int, world: int) -> dist.Store:
    """The ``env://`` store (torchrun's agent store, or one rank 0 hosts) with this restart
    attempt's prefix, so no key of an earlier attempt is ever read (see the module doc)."""
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
    return dist.PrefixStore(f"mixgrpo/attempt_{elastic_restart_count()}", store)


def check_distributed_config(cfg, d: Dist) -> None:
    """Refuse, on every rank and before any work, what data parallelism cannot split exactly."""
    if not d.enabled:
        return
    if cfg.prompts_per_iter % d.world_size:
        raise ValueError(f"prompts_per_iter {cfg.prompts_per_iter} is not divisible by the {d.world_size} processes: "
                         "each rank samples whole groups; use a multiple of the world size")
    if not cfg.sampler.noise_per_group:
        raise ValueError("multi-process training needs sampler.noise_per_group: true (each group's noise then "
                         "does not depend on the rank that samples it); add --set sampler.noise_per_group=true")


def _wire(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Where the backend can send ``x`` from: NCCL only moves tensors on the rank's own GPU
    (``d.device``); gloo sends CPU tensors."""
    if dist.get_backend() == "nccl":
        target = torch.device(d.device)
        if target.type != "cuda":
            raise ValueError(f"rank {d.rank} runs NCCL collectives but its device is {d.device}; use model.device=cuda")
        return x.to(target)
    return x.cpu()


def all_gather_rows(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all ranks) concatenated in rank order along dim 0."""
    if not d.enabled:
        return x
    sent = _wire(x.contiguous(), d)
    parts = [torch.empty_like(sent) for _ in range(d.world_size)]
    dist.all_gather(parts, sent)
    return torch.cat(parts).to(x.device)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def sum_over_ranks(value: float, d: Dist) -> float:
    if not d.enabled:
        return value
    t = _wire(torch.tensor([value], dtype=torch.float64), d)
    dist.all_reduce(t)
    return t.item()
