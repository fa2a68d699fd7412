"""Tiny models and training configs shared by the trainer, inference and bench tests."""

from __future__ import annotations

from pathlib import Path

import torch

from mixgrpo.models.checkpoint import build_embedded, save_embedded
from mixgrpo.models.tiny_dit import TextCondition, TinyDiT, TinyDiTConfig
from mixgrpo.rewards import register_reward
from mixgrpo.train.config import TrainConfig, apply_overrides
from mixgrpo.train.presets import make_preset

TINY = TinyDiTConfig(width=32, depth=2, heads=2)


@register_reward("test-train-brightness")
class Brightness:
    """Toy reward with a known optimum: brighter is better."""

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def make_tiny_checkpoint(folder: Path) -> str:
    """A randomly initialised tiny DiT (perturbed so every weight matters), saved to ``folder``."""
    torch.manual_seed(0)
    model = TinyDiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return str(save_embedded(model, folder))


def random_condition(batch: int, seed: int = 0, visible: int = 6) -> TextCondition:
    """Random text conditioning of the embedded models' shape: 16 tokens of 384, ``visible`` unmasked."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 16, dtype=torch.bool)
    mask[:, :visible] = True
    return TextCondition(torch.randn(batch, 16, 384, generator=gen), mask, torch.randn(batch, 384, generator=gen))


def perturbed_embedded(model_type: str, fields: dict, seed: int = 0) -> torch.nn.Module:
    """An embedded model with ``0.05 N(0, 1)`` added to every weight (zero-inits included), so
    every unit acts and outputs depend on every input; in eval mode."""
    torch.manual_seed(seed)
    model = build_embedded(model_type, fields)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_config(checkpoint: str, preset: str = "mixgrpo", *extra: str) -> TrainConfig:
    """A preset shrunk to seconds: 4 iterations, 2 prompts x 4, 8 steps, brightness reward."""
    base = make_preset(preset)
    pruned = base.sampler.prune_keep is not None
    return apply_overrides(base, [
        *(["sampler.prune_keep=2"] if pruned else []),
        *(["schedule.size=3"] if base.schedule.name == "stratified" else []),  # AWM: 3 strata of steps [1, 7)
        *(["sampler.tree_splits=[0, 3]"] if base.sampler.tree_splits else []),  # BranchGRPO: 4 leaves
        f"model.checkpoint={checkpoint}", "iterations=4", "prompts_per_iter=2", "group_size=4",
        "sampler.num_steps=8", "eval_prompts=8", "eval_every=2", "checkpoint_every=2", "schedule.interval=1",
        "schedule.size=2", "optim.micro_batch=4", "rewards={test-train-brightness: 1.0}", *extra,
    ])


def train_interrupted_then_resumed(cfg: TrainConfig, folder: Path, crash_at: int = 2) -> None:
    """Train ``cfg`` into ``folder``, crash at iteration ``crash_at`` (after the checkpoint of
    ``crash_at - 1``; ``crash_at`` itself is lost), then ``--resume`` to the end."""
    from mixgrpo.train.run import train

    class Crash(RuntimeError):
        pass

    def crash(row):
        if row["iteration"] == crash_at:
            raise Crash

    try:
        train(cfg, folder, on_iteration=crash)
    except Crash:
        pass
    else:
        raise AssertionError(f"the run never reached iteration {crash_at}")
    train(cfg, folder, resume=True)
