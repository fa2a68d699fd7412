"""The sections of a training config: sampler, schedule, loss, optimizer, model. Each field
carries a one-line reason; ``validate`` checks what one section can check alone (the
cross-section rules live in :class:`~mixgrpo.train.config.TrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import torch

from ..core.forward_losses import AWM_WEIGHTINGS, OBJECTIVES
from ..core.grpo import MULTI_REWARD_MODES, STD_MODES
from ..core.minibatches import MINIBATCH_ORDERS
from ..core.objective import KL_FORMS, STEP_WEIGHTS
from ..core.sampler import ODE_SOLVERS
from ..core.steps import LOG_PROB_FORMS, LOG_PROB_REDUCTIONS, SDE_KINDS
from ..core.weighting import WEIGHTINGS
from ..core.windows import WINDOW_SCHEDULES

__all__ = ["LossConfig", "ModelConfig", "OptimConfig", "SamplerConfig", "ScheduleConfig", "WeightingConfig"]


@dataclass
class SamplerConfig:
    num_steps: int = 25  # T, the training grid (MixGRPO: 25)
    shift: float | str = 3.0  # time shift of the grid (MixGRPO FLUX scripts: 3); "scheduler" = the model's scheduler config; unused by sd (its DDIM grid)
    sde_kind: str = "flow_grpo"  # flow_grpo | dance | cps | dpm (SDE-DPM-Solver++, first order) | ddim (DDIM eta): the exploration step
    noise_level: float = 0.7  # a (flow_grpo, cps) or eta (dance, ddim)
    sde_on: str = "trained"  # "trained": SDE only on trained steps (MixGRPO); "all": every trainable step; "none": ODE only
    rollout_policy: str = "current"  # current | old: sample with the lagging old policy (DiffusionNFT)
    ode_solver: str = "euler"  # ODE steps outside the SDE steps
    flash_compression: float | None = None  # MixGRPO-Flash: DPM-Solver++ on a compressed grid after the window
    dpm_order: int = 2  # DPM-Solver++ order for Flash's tail
    guidance: float = 1.0  # classifier-free guidance scale; 1 = a single pass
    shared_noise: bool = True  # all members of a group start from the same noise (MixGRPO)
    shared_prefix: bool = False  # run the ODE steps before the first SDE step once per group, then branch
    prune_offsets: list[int] = field(default_factory=list)  # Expand-and-Prune: prune after first SDE step + offset
    prune_keep: int | None = None  # members per group left after the last prune (group_size is the expanded size)
    # group sizes after each prune, in step order, the last = prune_keep (Pro-GRPO's SD setting:
    # 48 -> [32, 8]); empty: shrink linearly from group_size to prune_keep
    prune_sizes: list[int] = field(default_factory=list)
    noise_per_group: bool = False  # each group's noise from its own generator: samples independent of batching/sharding
    groups_per_call: int | None = None  # groups per sampler call (None: all); needs noise_per_group
    tree_splits: list[int] = field(default_factory=list)  # BranchGRPO: binary splits at these SDE steps (G = 2^n leaves)
    split_noise_scale: float = 1.0  # BranchGRPO's kappa: children draw kappa-scaled noise at a split

    def validate(self) -> None:
        if self.num_steps < 2:
            raise ValueError(f"sampler.num_steps must be >= 2, got {self.num_steps}")
        if self.sde_kind not in SDE_KINDS:
            raise ValueError(f"sampler.sde_kind {self.sde_kind!r} is not one of {SDE_KINDS}")
        if self.sde_on not in ("trained", "all", "none"):
            raise ValueError(f"sampler.sde_on must be 'trained', 'all' or 'none', got {self.sde_on!r}")
        if self.sde_on == "none" and self.shared_noise:
            raise ValueError("sampler.sde_on=none samples deterministically, so a group sharing its initial noise "
                             "would be G copies of one image: set sampler.shared_noise=false")
        if self.rollout_policy not in ("current", "old"):
            raise ValueError(f"sampler.rollout_policy must be 'current' or 'old', got {self.rollout_policy!r}")
        if self.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"sampler.ode_solver {self.ode_solver!r} is not one of {ODE_SOLVERS}")
        if self.flash_compression is not None and not 0 < self.flash_compression <= 1:
            raise ValueError(f"sampler.flash_compression must be in (0, 1] or null, got {self.flash_compression}")
        if self.flash_compression is not None and self.sde_on != "trained":
            raise ValueError("sampler.flash_compression needs sampler.sde_on='trained' (a window, then the DPM tail)")
        if self.shared_prefix and not self.shared_noise:
            raise ValueError("sampler.shared_prefix needs sampler.shared_noise: true (the prefix is shared because the noise is)")
        if self.groups_per_call is not None and (self.groups_per_call < 1 or not self.noise_per_group):
            raise ValueError("sampler.groups_per_call must be >= 1 and needs sampler.noise_per_group: true (then "
                             "chunking the batch leaves every sample unchanged)")
        if bool(self.prune_offsets) != (self.prune_keep is not None):
            raise ValueError("Expand-and-Prune needs both sampler.prune_offsets (e.g. [0, 2]) and sampler.prune_keep")
        if any(o < 0 for o in self.prune_offsets) or len(set(self.prune_offsets)) != len(self.prune_offsets):
            raise ValueError(f"sampler.prune_offsets must be distinct offsets >= 0 from the first SDE step, got {self.prune_offsets}")
        if self.prune_sizes and (len(self.prune_sizes) != len(self.prune_offsets) or self.prune_sizes[-1] != self.prune_keep
                                 or any(a <= b for a, b in pairwise(self.prune_sizes))):
            raise ValueError(f"sampler.prune_sizes must give one decreasing size per prune ({len(self.prune_offsets)}), the "
                             f"last equal to sampler.prune_keep ({self.prune_keep}), got {self.prune_sizes}")
        if self.shift != "scheduler" and (isinstance(self.shift, str) or not self.shift > 0):
            raise ValueError(f"sampler.shift must be a number > 0 or 'scheduler' (flux/sd3: read the pipeline's "
                             f"scheduler config), got {self.shift!r}")
        if self.tree_splits and (self.shared_prefix or self.prune_offsets or self.groups_per_call is not None
                                 or not self.shared_noise):
            raise ValueError("sampler.tree_splits (BranchGRPO trees) grow each group from its one shared noise: "
                             "set sampler.shared_noise=true and leave out shared_prefix, prune_offsets and "
                             "groups_per_call")
        if not self.split_noise_scale > 0:
            raise ValueError(f"sampler.split_noise_scale must be > 0, got {self.split_noise_scale}")
        if not self.noise_level > 0 or not self.guidance >= 1:
            raise ValueError("sampler.noise_level must be > 0 and sampler.guidance >= 1")


@dataclass
class ScheduleConfig:
    name: str = "progressive"  # which steps train each iteration (mixgrpo.core.windows)
    size: int = 4  # window size w (MixGRPO: 4)
    stride: int = 1  # window stride s (MixGRPO: 1)
    interval: int = 25  # iterations per window position (MixGRPO: 25 on GPU; presets scale it)
    min_interval: int | None = None  # decay schedule's last interval
    exp_decay_k: float = 0.1
    exp_decay_threshold: int = 13
    start: int = 0  # first window start: the noisiest step
    max_start: int | None = None  # cap on the start (default T - 1 - w)
    rollback: bool = False  # restart from `start` past the cap
    low: int = 0  # random_range bounds (Flow-GRPO-Fast)
    high: int | None = None
    fraction: float = 0.6  # random_subset share of trainable steps (DanceGRPO: 0.6)
    per_sample: bool = False  # random_subset: a fresh subset per sample (DanceGRPO's per-sample randperm)
    final_step: bool = False  # the last grid step may train too (forward-process objectives: no SDE density needed)

    def validate(self) -> None:
        if self.name not in WINDOW_SCHEDULES:
            raise ValueError(f"schedule.name {self.name!r} is not one of {WINDOW_SCHEDULES}")
        if self.per_sample and self.name not in ("random_subset", "stratified"):
            raise ValueError(f"schedule.per_sample needs schedule.name=random_subset, got {self.name!r}")


@dataclass
class LossConfig:
    clip_range: float = 1e-4  # PPO clip eps (MixGRPO: 1e-4 with mean-reduced log-probs)
    adv_clip: float | None = 5.0  # A_max (MixGRPO: 5)
    reduction: str = "mean"  # log-prob reduction over latent dims: mean (reference code) | sum
    kl_beta: float = 0.0  # weight of KL to the reference policy (MixGRPO: 0)
    std_mode: str = "group"  # advantage std: per group | global (Flow-GRPO's global_std)
    std_unbiased: bool = False  # ddof-1 advantage std (MixGRPO/DanceGRPO torch .std()); False: ddof 0 (Flow-GRPO np.std)
    adv_eps: float = 1e-4  # added to the advantage std (Flow-GRPO 1e-4; MixGRPO/DanceGRPO 1e-8)
    trimmed_ratio: float = 0.0  # MixGRPO: share of a group's lowest rewards left out of its mean and std
    kl_form: str = "exact"  # exact: ||dmu||^2/(2 g^2 |dt|) | flow_grpo: ||dmu||^2/(2 g^2), its train_sd3.py
    logprob_form: str = "gaussian"  # gaussian (exact density) | flow_grpo_cps: -(x'-mu)^2 (Flow-GRPO's cps)
    multi_reward_mode: str = "normalize_then_sum"  # MixGRPO/DanceGRPO; Flow-GRPO: sum_then_normalize
    ovf_keep: int | None = None  # Pro-GRPO OVF: train on the k of each group with maximal reward variance
    ratio_norm: bool = False  # GRPO-Guard: the importance ratio re-centred with the rollout's step means
    step_weight: str = "none"  # none | inverse_dt: GRPO-Guard's per-step 1/|dt| loss weight
    # grpo: clipped ratio of SDE transition densities; nft / awm: forward-process losses on re-noised clean samples
    objective: str = "grpo"
    nft_beta: float = 1.0  # DiffusionNFT's mixing coefficient beta (reference: 1; 0.1 for OCR / multi-reward)
    awm_weighting: str = "ghuber"  # AWM's per-time weighting of the matching error (reference configs: ghuber)
    awm_power: float = 0.25  # AWM's generalised-Huber power p
    old_kl_beta: float = 0.0  # weight of mean (v - v_old)^2 (AWM's KL to its EMA adapter: 1)
    # old policy theta_old <- d theta_old + (1 - d) theta after each optimizer step,
    # d = min(old_rate * (step - old_flat), old_max), 0 before old_flat (DiffusionNFT: 0, 0.001, 0.5)
    old_flat: int = 0
    old_rate: float = 0.001
    old_max: float = 0.5

    def validate(self) -> None:
        if not self.clip_range > 0:
            raise ValueError(f"loss.clip_range must be > 0, got {self.clip_range}")
        if self.adv_clip is not None and not self.adv_clip > 0:
            raise ValueError(f"loss.adv_clip must be > 0 or null, got {self.adv_clip}")
        if self.reduction not in LOG_PROB_REDUCTIONS:
            raise ValueError(f"loss.reduction {self.reduction!r} is not one of {LOG_PROB_REDUCTIONS}")
        if self.kl_beta < 0:
            raise ValueError(f"loss.kl_beta must be >= 0, got {self.kl_beta}")
        if self.std_mode not in STD_MODES:
            raise ValueError(f"loss.std_mode {self.std_mode!r} is not one of {STD_MODES}")
        if self.multi_reward_mode not in MULTI_REWARD_MODES:
            raise ValueError(f"loss.multi_reward_mode {self.multi_reward_mode!r} is not one of {MULTI_REWARD_MODES}")
        if not self.adv_eps > 0 or not 0 <= self.trimmed_ratio < 1:
            raise ValueError(f"loss.adv_eps must be > 0 and loss.trimmed_ratio in [0, 1), got {self.adv_eps}, "
                             f"{self.trimmed_ratio}")
        if self.kl_form not in KL_FORMS:
            raise ValueError(f"loss.kl_form {self.kl_form!r} is not one of {KL_FORMS}")
        if self.logprob_form not in LOG_PROB_FORMS:
            raise ValueError(f"loss.logprob_form {self.logprob_form!r} is not one of {LOG_PROB_FORMS}")
        if self.step_weight not in STEP_WEIGHTS:
            raise ValueError(f"loss.step_weight {self.step_weight!r} is not one of {STEP_WEIGHTS}")
        if self.objective != "grpo" and (self.ratio_norm or self.step_weight != "none"):
            raise ValueError("loss.ratio_norm and loss.step_weight (GRPO-Guard) reweight SDE transition ratios: "
                             "they need loss.objective=grpo")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"loss.objective {self.objective!r} is not one of {OBJECTIVES}")
        if self.awm_weighting not in AWM_WEIGHTINGS:
            raise ValueError(f"loss.awm_weighting {self.awm_weighting!r} is not one of {AWM_WEIGHTINGS}")
        if not self.nft_beta > 0 or not self.awm_power > 0 or self.old_kl_beta < 0:
            raise ValueError(f"loss.nft_beta and loss.awm_power must be > 0 and loss.old_kl_beta >= 0, got "
                             f"{self.nft_beta}, {self.awm_power}, {self.old_kl_beta}")
        if self.old_flat < 0 or self.old_rate < 0 or not 0 <= self.old_max < 1:
            raise ValueError(f"loss.old_flat and loss.old_rate must be >= 0 and loss.old_max in [0, 1), got "
                             f"{self.old_flat}, {self.old_rate}, {self.old_max}")
        if self.objective == "nft" and self.adv_clip is None:
            raise ValueError("loss.objective=nft maps advantages to [0, 1] through A_max: set loss.adv_clip (e.g. 5)")
        if self.objective != "grpo" and self.ovf_keep is not None:
            raise ValueError("loss.ovf_keep (Pro-GRPO's OVF) works with loss.objective=grpo only")

    @property
    def uses_old_policy(self) -> bool:
        """Whether the loss reads a lagging copy of the weights (NFT's old policy, AWM's EMA)."""
        return self.objective == "nft" or self.old_kl_beta > 0


@dataclass
class OptimConfig:
    lr: float = 1e-5  # AdamW learning rate (MixGRPO FLUX: 1e-5; presets scale it for the tiny model)
    weight_decay: float = 1e-4  # MixGRPO: 1e-4
    grad_clip: float = 1.0  # max grad norm (MixGRPO: 1.0)
    micro_batch: int = 16  # samples per backward pass; gradients accumulate over the batch
    inner_epochs: int = 1  # optimisation passes over each rollout batch
    # optimizer steps per inner epoch, each on its slice of every group (core/minibatches.py):
    # the references' samples per GPU / gradient_accumulation_steps (MixGRPO 12/3 = 4, DanceGRPO
    # 12/4 = 3, Flow-GRPO 2, DiffusionNFT and AWM 1). With 1 step per rollout the ratio stays 1.
    minibatches: int = 1
    minibatch_order: str = "none"  # none | random | balance: MixGRPO's advantage_rerange_strategy
    ema: float | None = None  # EMA decay of the trained weights, None to disable
    max_nonfinite: int = 3  # stop after this many consecutive iterations with NaN/Inf (skipped updates)

    def validate(self) -> None:
        if self.max_nonfinite < 1:
            raise ValueError(f"optim.max_nonfinite must be >= 1, got {self.max_nonfinite}")
        if not self.lr > 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ValueError("optim.lr and optim.grad_clip must be > 0 and optim.weight_decay >= 0")
        if self.micro_batch < 1 or self.inner_epochs < 1 or self.minibatches < 1:
            raise ValueError("optim.micro_batch, optim.inner_epochs and optim.minibatches must be >= 1")
        if self.minibatch_order not in MINIBATCH_ORDERS:
            raise ValueError(f"optim.minibatch_order must be one of {', '.join(MINIBATCH_ORDERS)}, "
                             f"got {self.minibatch_order!r}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"optim.ema must be in (0, 1) or null, got {self.ema}")


MODEL_KINDS = ("embedded", "flux", "sd3", "qwen-image", "flux2", "wan", "sd")
VIDEO_KINDS = ("wan",)  # models whose samples are videos (B, F, 3, H, W): video rewards only


@dataclass
class ModelConfig:
    kind: str = "embedded"  # embedded (the tiny model; "tiny-dit" is an old alias) | flux | sd3 | qwen-image | flux2 | wan | sd (diffusers, local folders; sd: SD1.x/2.x/XL)
    checkpoint: str | None = None  # embedded: model folder; None = the shipped embedded base
    path: str | None = None  # flux/sd3: local diffusers pipeline folder
    embeddings: str | None = None  # flux/sd3: `mixgrpo preprocess` output of the training prompts
    eval_embeddings: str | None = None  # flux/sd3: same for evaluation prompts (default: `embeddings`)
    image_size: int = 512  # flux/sd3: pixels per side (latents are image_size / VAE factor)
    flux_guidance: float = 3.5  # FLUX.1-dev / FLUX.2-dev distilled guidance (MixGRPO FLUX.1: 3.5; Flux2Pipeline default: 4)
    frames: int = 81  # wan: video frames, 4k + 1 (WanPipeline's default 81; latents have (frames - 1) / 4 + 1)
    lora_rank: int = 0  # 0 = full fine-tuning; > 0 trains a peft LoRA adapter
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=list)  # empty = the model's default attention projections
    dtype: str = "float32"  # float32 | bfloat16: autocast; flux/sd3 LoRA also keeps the frozen base in bf16
    device: str = "cpu"  # cpu | cuda | cuda:N (noise is always drawn on the CPU: same samples on any device)
    gradient_checkpointing: bool = False  # recompute block activations in backward (less memory, ~30% slower)

    def makes_videos(self) -> bool | None:
        """Whether the model samples videos: a video kind, or an embedded checkpoint whose
        config has ``frames`` (the moving-shapes model); None while that checkpoint cannot be
        read (loading it says why, in one line)."""
        if self.kind in VIDEO_KINDS:
            return True
        if self.kind not in ("embedded", "tiny-dit") or self.checkpoint is None:
            return False
        from ..models.checkpoint import read_config

        try:
            model = read_config(self.checkpoint).get("model")
        except (FileNotFoundError, ValueError, AttributeError):
            return None
        return isinstance(model, dict) and model.get("frames") is not None

    def validate(self) -> None:
        if self.kind == "tiny-dit":  # the first round's name, kept so old run folders load
            self.kind = "embedded"
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        if self.kind != "embedded" and (not self.path or not self.embeddings):
            raise ValueError(f"model.kind={self.kind} needs model.path (a local pipeline folder) and model.embeddings "
                             "(run `mixgrpo preprocess` first)")
        if self.image_size < 8:
            raise ValueError(f"model.image_size must be >= 8, got {self.image_size}")
        if self.kind in VIDEO_KINDS:
            from ..models.wan import latent_frames

            try:
                latent_frames(self.frames)
            except ValueError as err:
                raise ValueError(f"model.frames: {err}") from None
        if self.lora_rank < 0:
            raise ValueError(f"model.lora_rank must be >= 0, got {self.lora_rank}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype must be float32 or bfloat16, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"model.device {self.device!r} is not a torch device (cpu, cuda, cuda:0, ...): {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"model.device={self.device} but this torch build sees no CUDA GPU; "
                             "set model.device=cpu or install a CUDA build of torch")


@dataclass
class WeightingConfig:
    """How several rewards are weighted over training (:mod:`mixgrpo.core.weighting`)."""

    name: str = "static"  # static (the rewards' weights) | progress | gradient (MGDA) | constraint
    temperature: float = 1.0  # progress: tau of exp(-progress / tau); large = static
    fast: float = 0.5  # progress: decay of the fast EMA of each reward's batch mean
    slow: float = 0.9  # progress: decay of the slow EMA (and of the running variance)
    warmup: int = 5  # progress: iterations on the static weights while the statistics settle
    ema: float = 0.3  # gradient: weight of each iteration's min-norm coefficients in their EMA
    primary: str | None = None  # constraint: the reward to maximise
    floors: dict[str, float] = field(default_factory=dict)  # constraint: reward -> floor it must stay above
    relative: bool = True  # constraint: floors are fractions of each reward's first batch mean (the start policy's)
    dual_lr: float = 0.5  # constraint: eta of the multipliers' dual ascent (per unit of relative shortfall)

    def validate(self) -> None:
        if self.name not in WEIGHTINGS:
            raise ValueError(f"weighting.name {self.name!r} is not one of {WEIGHTINGS}")
        if not self.temperature > 0 or not 0 <= self.fast < 1 or not 0 <= self.slow < 1 or self.warmup < 1:
            raise ValueError("weighting.temperature must be > 0, weighting.fast and weighting.slow in [0, 1), "
                             "weighting.warmup >= 1")
        if not 0 < self.ema <= 1 or not self.dual_lr > 0:
            raise ValueError("weighting.ema must be in (0, 1] and weighting.dual_lr > 0")
