"""Methods as presets: functions that edit a base :class:`TrainConfig`.

Structure follows each paper exactly (which steps are stochastic, which are trained, the
sampler, the loss settings); sizes are scaled for a 2-core CPU budget. The README's preset
table lists what differs from the GPU defaults and why.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from .config import TrainConfig

__all__ = ["PRESETS", "make_preset"]


def _cpu_scale(cfg: TrainConfig) -> None:
    """Budget shared by every preset on the embedded model (GPU papers: 12 images/prompt,
    lr 1e-5 on FLUX, 300 iterations). The tiny model needs a larger lr to move in
    minutes, and 4 prompts x 8 images keep an iteration at a few seconds."""
    cfg.iterations = 80
    cfg.prompts_per_iter = 4
    cfg.group_size = 8
    cfg.optim.lr = 4e-5  # 1e-4 peaked at +0.17 by 40 iterations, then collapsed (flatness 0.97 -> 0.46)
    cfg.eval_every = 40
    cfg.eval_prompts = 256  # held-out mean to about +-0.04 (95%), as the base checkpoint's figure


def mixgrpo(cfg: TrainConfig) -> None:
    """MixGRPO: ODE everywhere but a sliding window of w = 4 SDE steps (Flow-GRPO form),
    loss on the window only, the window starting at the noisiest step and moving by 1;
    shared initial noise per group; per-reward group normalisation; clip 1e-4, A_max 5."""
    _cpu_scale(cfg)
    cfg.sampler.sde_kind, cfg.sampler.noise_level, cfg.sampler.sde_on = "flow_grpo", 0.7, "trained"
    cfg.sampler.shared_noise = True
    cfg.schedule.name, cfg.schedule.size, cfg.schedule.stride = "progressive", 4, 1
    cfg.schedule.interval = 6  # GPU: 25 of 300 iterations; here about the same share of a CPU run
    cfg.loss.clip_range, cfg.loss.adv_clip, cfg.loss.kl_beta = 1e-4, 5.0, 0.0
    cfg.loss.multi_reward_mode = "normalize_then_sum"


def mixgrpo_flash(cfg: TrainConfig) -> None:
    """MixGRPO-Flash: MixGRPO with DPM-Solver++ (order 2) on a grid compressed by 0.4 after
    the window; Euler before it."""
    mixgrpo(cfg)
    cfg.sampler.flash_compression, cfg.sampler.dpm_order = 0.4, 2
    cfg.schedule.interval = 5  # GPU: 20 iterations per position


def mixgrpo_flash_star(cfg: TrainConfig) -> None:
    """MixGRPO-Flash*: the window frozen at steps 0-3, compression 0.2 (7 sampling passes)."""
    mixgrpo_flash(cfg)
    cfg.schedule.name, cfg.schedule.start = "fixed", 0
    cfg.sampler.flash_compression = 0.2


def flow_grpo(cfg: TrainConfig) -> None:
    """Flow-GRPO: SDE (a = 0.7) on every step but the last, loss on all of them, rewards
    summed then normalised, KL to the reference (beta 0.04), clip 1e-4."""
    _cpu_scale(cfg)
    cfg.sampler.sde_kind, cfg.sampler.noise_level, cfg.sampler.sde_on = "flow_grpo", 0.7, "all"
    cfg.sampler.shared_noise = False
    cfg.schedule.name = "all"
    cfg.loss.clip_range, cfg.loss.adv_clip, cfg.loss.kl_beta = 1e-4, 5.0, 0.04
    cfg.loss.multi_reward_mode = "sum_then_normalize"


def dance_grpo(cfg: TrainConfig) -> None:
    """DanceGRPO: eta-form SDE (eta = 0.3) on every step, loss on a random 60% of them,
    shared initial noise per group, no KL, clip 1e-4."""
    _cpu_scale(cfg)
    cfg.sampler.sde_kind, cfg.sampler.noise_level, cfg.sampler.sde_on = "dance", 0.3, "all"
    cfg.sampler.shared_noise = True
    cfg.schedule.name, cfg.schedule.fraction = "random_subset", 0.6
    cfg.loss.clip_range, cfg.loss.adv_clip, cfg.loss.kl_beta = 1e-4, 5.0, 0.0
    cfg.loss.multi_reward_mode = "normalize_then_sum"


def pro_grpo(cfg: TrainConfig) -> None:
    """Pro-GRPO (Expand-and-Prune) on Flow-GRPO sampling, as its paper builds it: groups start
    2x expanded (16), and after SDE steps 2 and 5 the members whose predicted clean samples
    cluster are stopped (16 -> 12 -> 8), so the loss sees 8 diverse trajectories per prompt."""
    flow_grpo(cfg)
    cfg.group_size = 16
    cfg.sampler.prune_offsets, cfg.sampler.prune_keep = [2, 5], 8


def mixgrpo_prefix(cfg: TrainConfig) -> None:
    """MixGRPO with shared-prefix rollouts: a group shares its noise, so the ODE steps before
    the window run once per group and the members branch at the window. Same samples, fewer
    passes as the window slides toward the clean end."""
    mixgrpo(cfg)
    cfg.sampler.shared_prefix = True


def mixgrpo_pro(cfg: TrainConfig) -> None:
    """Our combination: MixGRPO with a shared prefix, groups expanded to 16 at the window and
    pruned inside it (after its first two SDE steps: 16 -> 12 -> 8)."""
    mixgrpo_prefix(cfg)
    cfg.group_size = 16
    cfg.sampler.prune_offsets, cfg.sampler.prune_keep = [0, 1], 8


PRESETS: dict[str, Callable[[TrainConfig], None]] = {
    "mixgrpo": mixgrpo,
    "mixgrpo-flash": mixgrpo_flash,
    "mixgrpo-flash-star": mixgrpo_flash_star,
    "flow-grpo": flow_grpo,
    "dance-grpo": dance_grpo,
    "pro-grpo": pro_grpo,
    "mixgrpo-prefix": mixgrpo_prefix,
    "mixgrpo-pro": mixgrpo_pro,
}


def make_preset(name: str) -> TrainConfig:
    """A validated config for preset ``name``; unknown names suggest the closest."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} (presets: {', '.join(PRESETS)})")
    cfg = TrainConfig(preset=name)
    PRESETS[name](cfg)
    return cfg.validate()
