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
    lr 1e-5 on FLUX, 300 iterations): 4 prompts x 8 images, 60 iterations. (`make demo`
    adds ``model.dtype=bfloat16``: about 2x faster on a CPU.)"""
    cfg.iterations = 60
    cfg.prompts_per_iter = 4
    cfg.group_size = 8
    # The tiny U-Net base (world v2) degrades under larger steps: paired against a no-update
    # control on the same prompts and noise, lr 1e-4 lost 0.1-0.3 train reward within 20
    # iterations, 3e-5 and 1e-5 about 0.03; LoRA (r 8, lr 2e-4 or 1e-3) stayed level.
    cfg.optim.lr = 1e-5
    cfg.eval_every = 30
    cfg.eval_prompts = 256  # held-out mean to about +-0.04 (95%)


def mixgrpo(cfg: TrainConfig) -> None:
    """MixGRPO: ODE everywhere but a sliding window of w = 4 SDE steps (Flow-GRPO form),
    loss on the window only, the window starting at the noisiest step and moving by 1;
    shared initial noise per group; per-reward group normalisation with the reference's
    ``(r - mean) / (std + 1e-8)``, torch's unbiased std (Tencent-Hunyuan/MixGRPO @ e5cdd6a,
    ``train_grpo_flux.py``); clip 1e-4, A_max 5, no KL; 4 optimizer steps per rollout, each on
    a quarter of every group (``finetune_flux_grpo_MixGRPO.sh``: 12 samples per GPU,
    ``gradient_accumulation_steps=3``). The reference caps the window start
    with ``range(cur, min(cur + 4, T - 2))`` and so never trains step T - 2; ours slides the
    full window up to it (``schedule.max_start`` caps it lower)."""
    _cpu_scale(cfg)
    cfg.sampler.sde_kind, cfg.sampler.noise_level, cfg.sampler.sde_on = "flow_grpo", 0.7, "trained"
    cfg.sampler.shared_noise = True
    cfg.schedule.name, cfg.schedule.size, cfg.schedule.stride = "progressive", 4, 1
    cfg.schedule.interval = 5  # GPU: 25 of 300 iterations (12 positions); here 60 / 5 = 12 positions too
    cfg.loss.clip_range, cfg.loss.adv_clip, cfg.loss.kl_beta = 1e-4, 5.0, 0.0
    cfg.loss.multi_reward_mode = "normalize_then_sum"
    cfg.loss.std_unbiased, cfg.loss.adv_eps = True, 1e-8
    cfg.optim.minibatches = 4  # its scripts: 12 samples per GPU, an optimizer step every 3


def mixgrpo_cps(cfg: TrainConfig) -> None:
    """MixGRPO v7's CPS configuration (its Table 1 trains with coefficients-preserving
    sampling in the window): MixGRPO with ``sde_kind=cps`` and Flow-GRPO's CPS log-prob
    ``-mean((x' - mean)^2)`` (yifan123/flow_grpo @ 54809b5, ``sd3_sde_with_logprob.py``; the
    MixGRPO code at e5cdd6a has no CPS). Noise level 0.8 and clip 1e-5 as Flow-GRPO's CPS
    configs (``config/grpo.py``, ``*_fast_nocfg``): that log-prob's ratios move on the scale
    ``2 std^2`` times the mean-reduced Gaussian's. The ratio is exactly 1 at the first of the
    rollout's 4 optimizer steps and moves from the second on."""
    mixgrpo(cfg)
    cfg.sampler.sde_kind, cfg.sampler.noise_level = "cps", 0.8
    cfg.loss.logprob_form, cfg.loss.clip_range = "flow_grpo_cps", 1e-5


def mixgrpo_flash(cfg: TrainConfig) -> None:
    """MixGRPO-Flash: MixGRPO with DPM-Solver++ (order 2) on a grid compressed by 0.4 after
    the window; Euler before it."""
    mixgrpo(cfg)
    cfg.sampler.flash_compression, cfg.sampler.dpm_order = 0.4, 2
    cfg.schedule.interval = 4  # GPU: 20 of 300 iterations (15 positions); here 60 / 4 = 15


def mixgrpo_flash_star(cfg: TrainConfig) -> None:
    """MixGRPO-Flash*: the window frozen at steps 0-3, compression 0.2 (7 sampling passes)."""
    mixgrpo_flash(cfg)
    cfg.schedule.name, cfg.schedule.start = "fixed", 0
    cfg.sampler.flash_compression = 0.2


def flow_grpo(cfg: TrainConfig) -> None:
    """Flow-GRPO: SDE (a = 0.7) on every step but the last, loss on all of them, rewards
    summed then normalised with one std over the whole batch (``global_std``, its SD3
    configs), KL to the reference in its form ``mean((mean - mean_ref)^2) / (2 g^2)`` with
    beta 0.04, clip 1e-4 (yifan123/flow_grpo @ 54809b5 ``config/grpo.py``, and
    ``scripts/train_sd3.py`` @ ac4c86e); two optimizer steps per rollout (its configs'
    ``gradient_accumulation_steps = num_batches_per_epoch // 2``)."""
    _cpu_scale(cfg)
    cfg.sampler.sde_kind, cfg.sampler.noise_level, cfg.sampler.sde_on = "flow_grpo", 0.7, "all"
    cfg.sampler.shared_noise = False
    cfg.schedule.name = "all"
    cfg.loss.clip_range, cfg.loss.adv_clip, cfg.loss.kl_beta = 1e-4, 5.0, 0.04
    cfg.loss.kl_form, cfg.loss.std_mode = "flow_grpo", "global"
    cfg.loss.multi_reward_mode = "sum_then_normalize"
    cfg.optim.minibatches = 2  # gradient_accumulation_steps = num_batches_per_epoch // 2: 2 steps per epoch


def flow_grpo_guard(cfg: TrainConfig) -> None:
    """GRPO-Guard on Flow-GRPO (arXiv 2510.22319; the authors' code is not public, so as
    verl-project/verl-omni @ a1139ba ``GRPOGuardLoss`` and ``docs/algo/grpo_guard.md``): the
    ratio re-centred by ``b`` and scaled by the step std, each step's loss over ``|dt|``,
    clip 2e-6 (its docs); everything else Flow-GRPO's."""
    flow_grpo(cfg)
    cfg.loss.ratio_norm, cfg.loss.step_weight, cfg.loss.clip_range = True, "inverse_dt", 2e-6


def dance_grpo(cfg: TrainConfig) -> None:
    """DanceGRPO: eta-form SDE (eta = 0.3) on every step; each sample trains its own random
    ``int(0.6 * 24) = 14`` steps (a fresh permutation per sample, XueZeyue/DanceGRPO @ 15cc71d
    ``train_grpo_flux.py``); shared initial noise per group; ``(r - mean) / (std + 1e-8)``
    with torch's unbiased std; no KL, clip 1e-4; 3 optimizer steps per rollout
    (``finetune_flux_grpo.sh``: 12 samples per GPU, ``gradient_accumulation_steps 4``)."""
    _cpu_scale(cfg)
    cfg.sampler.sde_kind, cfg.sampler.noise_level, cfg.sampler.sde_on = "dance", 0.3, "all"
    cfg.sampler.shared_noise = True
    cfg.schedule.name, cfg.schedule.fraction, cfg.schedule.per_sample = "random_subset", 0.6, True
    cfg.loss.clip_range, cfg.loss.adv_clip, cfg.loss.kl_beta = 1e-4, 5.0, 0.0
    cfg.loss.multi_reward_mode = "normalize_then_sum"
    cfg.loss.std_unbiased, cfg.loss.adv_eps = True, 1e-8
    cfg.optim.minibatches = 3


def branch_grpo(cfg: TrainConfig) -> None:
    """BranchGRPO (arXiv 2509.06040; Fredreic1849/BranchGRPO @ 19fbb9f,
    ``fastvideo/train_branchgrpo_flux.py`` and ``scripts/finetune/finetune_flux_branchgrpo_8gpus.sh``):
    DanceGRPO's SDE (eta 0.3) on a 20-step grid, one binary tree per prompt splitting at steps
    0, 3, 6 and 9 (16 leaves sharing their prefixes), children drawn with 4x the step noise
    (scored at the unscaled std); a node's reward is the mean of its leaves', each edge gets
    its child's advantage among the nodes of its depth (unbiased std + 1e-8, clip 5); the
    PPO loss (clip 1e-3) on every edge once, no KL. Deviations: the reference takes an
    optimizer step every 12 edges (about 37 per iteration on 8 GPUs), ours one per iteration; its last step (to t = 0) is stochastic and trained, ours is the plain
    final step (no SDE density there); 2 prompts x 16 leaves per iteration (its 16 x 16)."""
    _cpu_scale(cfg)
    cfg.prompts_per_iter, cfg.group_size = 2, 16
    cfg.sampler.num_steps = 20
    cfg.sampler.sde_kind, cfg.sampler.noise_level, cfg.sampler.sde_on = "dance", 0.3, "all"
    cfg.sampler.shared_noise = True
    cfg.sampler.tree_splits, cfg.sampler.split_noise_scale = [0, 3, 6, 9], 4.0
    cfg.schedule.name = "all"
    cfg.eval_steps = 25  # held-out samples on the same 25-step grid as every other preset
    cfg.loss.clip_range, cfg.loss.adv_clip, cfg.loss.kl_beta = 1e-3, 5.0, 0.0
    cfg.loss.std_unbiased, cfg.loss.adv_eps = True, 1e-8


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


def _forward_process(cfg: TrainConfig) -> None:
    """Shared by the likelihood-free presets: deterministic rollouts from independent noise
    (a shared noise would make a group G copies of one image), no CFG, advantages with one
    global std (both references' ``global_std``), ``A_max`` 5, evaluation on the same 25-step
    grid as every other preset."""
    _cpu_scale(cfg)
    cfg.sampler.sde_on, cfg.sampler.shared_noise, cfg.sampler.guidance = "none", False, 1.0
    cfg.loss.std_mode, cfg.loss.std_unbiased, cfg.loss.adv_eps, cfg.loss.adv_clip = "global", False, 1e-4, 5.0
    cfg.loss.multi_reward_mode = "sum_then_normalize"
    cfg.schedule.final_step = True
    cfg.eval_steps = 25
    # both references train a LoRA (r 32, alpha 64, lr 3e-4) on the attention projections; on the
    # embedded U-Net that is its attention blocks (8 and 4 px) and time MLP. Full fine-tuning of
    # the tiny U-Net at lr 1e-4 drifted colours and lost flatness within 20 iterations
    # (composition 0.331 -> 0.167, flatness 0.98 -> 0.47 for AWM); the LoRA kept flatness.
    cfg.model.lora_rank, cfg.model.lora_alpha, cfg.optim.lr = 32, 64.0, 3e-4


def nft(cfg: TrainConfig) -> None:
    """DiffusionNFT (NVlabs/DiffusionNFT @ 24af555, ``scripts/train_nft_sd3.py``,
    ``config/nft.py``): rollouts by the old policy with 10-step second-order DPM-Solver++; per
    sample a fresh permutation of the 10 grid times, of which ``int(0.99 * 10) = 9`` train;
    ``r = 1/2 + 1/2 clip(A / 5, -1, 1)``; the NFT loss with beta 1 and the code's adaptive
    weighting; ``1e-4 mean (v - v_ref)^2`` to the base; old policy
    ``d = min(0.001 * step, 0.5)``; LoRA r 32 at lr 3e-4."""
    _forward_process(cfg)
    cfg.sampler.num_steps, cfg.sampler.ode_solver, cfg.sampler.rollout_policy = 10, "dpm2", "old"
    cfg.schedule.name, cfg.schedule.fraction, cfg.schedule.per_sample = "random_subset", 0.99, True
    cfg.loss.objective, cfg.loss.nft_beta, cfg.loss.kl_beta = "nft", 1.0, 1e-4
    cfg.loss.old_flat, cfg.loss.old_rate, cfg.loss.old_max = 0, 0.001, 0.5


def awm(cfg: TrainConfig) -> None:
    """AWM, advantage weighted matching (scxue/advantage_weighted_matching @ be51372,
    ``scripts/train_sd3_awm.py``, ``config/dgx_awm.py``): on-policy rollouts of 14 steps; per
    sample 6 times, one in each stratum of grid indices [1, int(0.9 x 14) = 12) (``discrete_wo_init``); the
    generalised-Huber matching log-likelihood (p = 0.25) in a PPO ratio with clip 1 and
    advantages scaled to [-1, 1]; ``1e-3 mean (v - v_ref)^2`` to the base and
    ``1 x mean (v - v_ema)^2`` to an EMA copy with ``d = min(0.001 * step, 0.3)``. Deviation:
    the reference samples with SA-Solver (noise 0.4 inside sigma in [0.3, 0.9] for GenEval,
    none for PickScore); ours with deterministic DPM-Solver++(2), as its PickScore config."""
    _forward_process(cfg)
    cfg.sampler.num_steps, cfg.sampler.ode_solver = 14, "dpm2"
    cfg.schedule.name, cfg.schedule.size, cfg.schedule.low, cfg.schedule.fraction = "stratified", 6, 1, 0.9
    cfg.loss.objective, cfg.loss.awm_weighting, cfg.loss.awm_power = "awm", "ghuber", 0.25
    cfg.loss.clip_range, cfg.loss.kl_beta, cfg.loss.old_kl_beta = 1.0, 1e-3, 1.0
    cfg.loss.old_flat, cfg.loss.old_rate, cfg.loss.old_max = 0, 0.001, 0.3


PRESETS: dict[str, Callable[[TrainConfig], None]] = {
    "mixgrpo": mixgrpo,
    "mixgrpo-cps": mixgrpo_cps,
    "mixgrpo-flash": mixgrpo_flash,
    "mixgrpo-flash-star": mixgrpo_flash_star,
    "flow-grpo": flow_grpo,
    "flow-grpo-guard": flow_grpo_guard,
    "dance-grpo": dance_grpo,
    "branch-grpo": branch_grpo,
    "pro-grpo": pro_grpo,
    "mixgrpo-prefix": mixgrpo_prefix,
    "mixgrpo-pro": mixgrpo_pro,
    "nft": nft,
    "awm": awm,
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
