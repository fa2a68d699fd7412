"""Run under torchrun by tests/test_distributed.py: one GRPO iteration of the config in
argv[1] (plus ``key=value`` overrides in argv[3:]), once with DDP and once with FSDP in the
same process group; rank 0 writes every trainable parameter's gradient at the first
optimizer step (or the one ``MIXGRPO_PROBE_STEP`` counts from 0; after the all-reduce, full tensors) to argv[2] as ``ddp/<name>`` and
``fsdp/<name>``. In one process (no torchrun) it writes the single-process gradients as
``one/<name>``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from mixgrpo.train.config import apply_overrides, config_from_dict
from mixgrpo.train.distributed import dist_from_environment
from mixgrpo.train.trainer import GRPOTrainer


def first_step_gradients(cfg, d, index: int | None = None) -> dict[str, torch.Tensor]:
    """The gradients at optimizer step ``index`` of iteration 0 (default: the first; the
    environment's ``MIXGRPO_PROBE_STEP`` under torchrun)."""
    index = int(os.environ.get("MIXGRPO_PROBE_STEP", "0")) if index is None else index
    trainer = GRPOTrainer(cfg, dist=d)
    captured: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step
    seen = [0]

    def capture(*args, **kwargs):
        seen[0] += 1
        if seen[0] == index + 1:
            for name, p in zip(trainer.param_names, trainer.params, strict=True):
                g = p.grad
                if g is None:  # a parameter this iteration's loss does not reach
                    continue
                g = g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP: a collective
                captured[name] = g.detach().float().cpu().clone()
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    trainer.step(0)
    assert captured, f"optimizer step {index} never ran"
    return captured


def main(config: str, out: str, *overrides: str) -> None:
    base = apply_overrides(config_from_dict(yaml.safe_load(Path(config).read_text())), list(overrides))
    d = dist_from_environment(base.model.device)
    grads = {}
    modes = os.environ.get("MIXGRPO_PROBE_MODES", "ddp,fsdp").split(",") if d.enabled else ["one"]
    for mode in modes:
        cfg = apply_overrides(base, [f"parallel={mode if mode != 'one' else 'ddp'}"])
        grads.update({f"{mode}/{k}": v for k, v in first_step_gradients(cfg, d).items()})
    if d.is_main:
        save_file(grads, out)
    if d.enabled:  # leave the group before exit: a live gloo group can abort a rank at teardown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
