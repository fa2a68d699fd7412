"""Pretraining of the embedded model on the procedural world (``mixgrpo pretrain``).

Loss (rectified flow / conditional flow matching): with ``x0`` a render scaled to
``[-1, 1]``, ``eps ~ N(0, I)``, ``t ~ sigmoid(N(0, 1))`` (SD3's logit-normal),
``x_t = (1 - t) x0 + t eps``:

    L = E || v_theta(x_t, t, c) - (eps - x0) ||^2

The text condition is replaced by the learned null condition with probability
``cond_dropout`` so classifier-free guidance works. The saved weights are an EMA. Batches are
half count prompts, half relation prompts (relations outnumber counts 17:1). By default every
prompt of the grammar is seen (``prompts="all"``, as the first base): held-out prompts are the
ones RL never trains on. ``prompts="train"`` keeps the held-out colour-shape pairs from the
base too; such a base draws an unseen pair in a seen colour or shape (held-out composition
0.17 after 1,419 steps), which RL on training prompts cannot teach.

``world="motion"`` pretrains a video model (``tiny-video-unet``) on the moving-shapes world
instead: ``(prompt, clip)`` pairs from :func:`~mixgrpo.world.motion.sample_clips`, prompts
drawn uniformly (one prompt form), clips ``(B, C, F, H, W)`` and the same loss over every
frame. The image world's run is unchanged, bitwise. ``init`` starts from another model's
weights where names and shapes match: a ``tiny-video-unet`` of the image base's widths starts
as the shipped base on every frame, so only the motion (and the new prompt form) is learnt.

``architecture="tiny-vp-unet"`` (``--parameterization eps`` or ``v``) trains the same U-Net as a
VP diffusion model (:mod:`~mixgrpo.models.tiny_vp`) on the DDPM loss instead:
``k ~ U{0..999}``, ``x_k = a_k x0 + s_k eps``, ``L = E || eps_theta(x_k, k, c) - eps ||^2`` (v:
target ``a_k eps - s_k x0``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .inference.generate import condition, generate
from .models.checkpoint import (
    ARCHITECTURES,
    BASE_CHECKPOINT,
    build_embedded,
    load_embedded,
    save_embedded,
)
from .models.tiny_dit import TextCondition
from .models.tiny_vp import TinyVPUNet
from .text import cached_embeddings
from .viz import save_curve, save_image_grid
from .world import get_world, sample_clips, sample_pairs

__all__ = ["PretrainConfig", "check_init", "pretrain"]

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    steps: int = 2000  # optimizer steps (the run stops earlier if `minutes` runs out)
    minutes: float | None = None  # wall-clock budget; None = no limit
    batch_size: int = 64
    lr: float = 6e-4  # AdamW peak learning rate, after `warmup` steps; cosine to 10%
    warmup: int = 200
    weight_decay: float = 0.0
    ema: float = 0.999  # EMA decay of the saved weights
    cond_dropout: float = 0.1  # probability of the null condition, for CFG
    seed: int = 0
    log_every: int = 25
    save_every: int = 500  # write the EMA checkpoint this often, so a killed run keeps its progress
    architecture: str = "tiny-unet"  # tiny-unet (the shipped base) | tiny-dit (the first round's) | tiny-video-unet (motion) | tiny-vp-unet (eps / v)
    model: dict = field(default_factory=dict)  # the architecture's config fields; {} = its defaults
    prompts: str = "all"  # all: every grammar prompt (the shipped base) | train: held-out pairs never seen
    bf16: bool = True  # bf16 autocast: ~2x faster on CPU; the weights and the EMA stay fp32
    world: str = "image"  # image: the text-to-image grammar | motion: moving-shapes clips (a video architecture)
    init: str | None = None  # start from a model folder's weights ("base": the shipped image base), where names and shapes match

    def __post_init__(self) -> None:
        get_world(self.world)  # one line naming the worlds
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.prompts not in ("train", "all"):
            raise ValueError(f"prompts must be 'train' or 'all', got {self.prompts!r}")
        try:
            model = ARCHITECTURES[self.architecture][0](**self.model)  # the config class validates; no model is built
        except TypeError as err:
            raise ValueError(f"invalid {self.architecture} model fields: {err}") from err
        makes = getattr(model, "world", "image")
        if makes != self.world:
            fits = [a for a, (c, _) in ARCHITECTURES.items() if getattr(c(), "world", "image") == self.world]
            raise ValueError(f"architecture {self.architecture} generates the {makes} world, not {self.world}; "
                             f"use --architecture {' or '.join(fits)} with --world {self.world}")
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError(f"steps, batch_size and save_every must be >= 1, got {self.steps}, {self.batch_size}, {self.save_every}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {self.warmup}")


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    *,
    command: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train (from scratch, or from ``cfg.init``) and write ``model.safetensors``, ``config.json``, ``metrics.jsonl``,
    ``loss.png`` and ``samples.png`` to ``out_dir``."""
    out = Path(out_dir)
    torch.manual_seed(cfg.seed)
    world = get_world(cfg.world)
    prompts = world.prompts() if cfg.prompts == "all" else world.split()[0]
    embeddings = cached_embeddings(prompts)
    model = build_embedded(cfg.architecture, cfg.model)
    if cfg.init is not None:
        _initialise(model, cfg.init)
    data = _DATA[cfg.world](cfg, prompts, model.config)
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a refused --init leaves no folder
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.monotonic()
    losses: list[tuple[int, float]] = []
    metrics = (out / "metrics.jsonl").open("w")
    running, steps_done = None, 0

    def provenance(done: int) -> dict:
        return {
            "pretrain": {**asdict(cfg), "model": model.config.to_dict()},
            "steps_done": done,
            "wall_s": round(time.monotonic() - start, 1),
            "final_loss_ema": running,
            "command": command or " ".join(sys.argv),
            "torch": torch.__version__,
        }
    for step in range(cfg.steps):
        if cfg.minutes is not None and time.monotonic() - start > 60 * cfg.minutes:
            break
        batch_prompts, x0 = data.batch(cfg.seed * 1_000_003 + step)
        cond = condition(embeddings, batch_prompts)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_dropout
        if drop.any():
            null = model.null_condition(cfg.batch_size)
            cond = TextCondition(
                torch.where(drop[:, None, None], null.tokens, cond.tokens),
                torch.where(drop[:, None], null.mask, cond.mask),
                torch.where(drop[:, None], null.pooled, cond.pooled),
            )
        net, x_t, t, target = _noised(model, x0, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            pred = net(x_t, t, cond)  # (B, 3, H, W) or (B, 3, F, H, W)
        loss = (pred.float() - target).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))  # short warm-up of the EMA
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        value = loss.item()
        steps_done = step + 1
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % cfg.log_every == 0:
            losses.append((step, running))
            metrics.write(json.dumps({"step": step, "loss": value, "loss_ema": running, "lr": _lr_at(step, cfg),
                                      "elapsed_s": round(time.monotonic() - start, 2)}) + "\n")
            metrics.flush()
        if on_step is not None:
            on_step(step, running)
        if steps_done % cfg.save_every == 0:
            save_embedded(ema, out, provenance(steps_done))
    metrics.close()
    save_embedded(ema, out, provenance(steps_done))
    if losses:
        save_curve(out / "loss.png", [s for s, _ in losses], {"loss (EMA)": [v for _, v in losses]}, "step",
                   "rectified-flow loss")
    images = generate(ema, condition(embeddings, data.preview), seed=cfg.seed)
    save_image_grid(out / "samples.png", images, data.preview, columns=8)  # videos: one frame strip per row
    return out


def _noised(model: torch.nn.Module, x0: torch.Tensor, gen: torch.Generator
            ) -> tuple[Callable[..., torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training example per image: ``(network, x_t, time, target)`` with ``network(x_t, time, cond)``
    regressed on ``target``. Flow: ``t ~ sigmoid(N(0, 1))``, ``x_t = (1 - t) x0 + t eps``, target
    ``eps - x0``. VP (``tiny-vp-unet``, DDPM): ``k ~ U{0..N-1}``, ``x_k = a_k x0 + s_k eps``, target
    ``eps`` (or ``v = a_k eps - s_k x0``)."""
    b, expand = len(x0), (-1, *[1] * (x0.ndim - 1))  # broadcast over (C, H, W) or (C, F, H, W)
    if not isinstance(model, TinyVPUNet):
        t = torch.sigmoid(torch.randn(b, generator=gen))
        eps = torch.randn(x0.shape, generator=gen)
        t_b = t.view(expand)
        return model, (1 - t_b) * x0 + t_b * eps, t, eps - x0
    schedule = model.schedule
    k = torch.randint(0, len(schedule.alphas_cumprod), (b,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a_sq = schedule.alphas_cumprod[k].float().view(expand)
    a, s = a_sq.sqrt(), (1 - a_sq).sqrt()
    target = eps if schedule.prediction_type == "epsilon" else a * eps - s * x0
    return model.prediction, a * x0 + s * eps, k, target


def check_init(cfg: PretrainConfig) -> None:
    """Raise in one line, before any work, when ``cfg.init`` cannot initialise the configured model."""
    if cfg.init is not None:
        _initialise(build_embedded(cfg.architecture, cfg.model), cfg.init)


def _initialise(model: torch.nn.Module, source: str) -> None:
    """Copy the tensors of the model folder ``source`` ("base": the shipped image base) into
    ``model`` by name; every shared name must match in shape. A video U-Net of the base's widths
    then starts as the base on every frame (its temporal units and frame embedding start at zero)."""
    folder = BASE_CHECKPOINT if source == "base" else Path(source)
    state = load_embedded(folder).state_dict()
    own = model.state_dict()
    shared = {k: v for k, v in state.items() if k in own}
    differ = [k for k, v in shared.items() if own[k].shape != v.shape]
    if differ or not shared:
        why = (f"{len(differ)} of its tensors differ in shape (e.g. {differ[0]}: {tuple(shared[differ[0]].shape)} vs "
               f"{tuple(own[differ[0]].shape)})" if differ else "none of its tensors names one of this model's")
        raise ValueError(f"--init {source}: {why}; give the model its architecture's widths (the shipped base: "
                         "--widths 32,64,128)")
    model.load_state_dict(shared, strict=False)
    log.info("initialised %d of %d tensors from %s (%d of its tensors unused)", len(shared), len(own), folder,
             len(state) - len(shared))


@dataclass
class _Data:
    """A world's pretraining data: ``batch(seed)`` -> prompts and ``x0`` in [-1, 1] in the
    model's layout; ``preview``: the prompts of the final sample grid."""

    batch: Callable[[int], tuple[list[str], torch.Tensor]]
    preview: list[str]


def _image_data(cfg: PretrainConfig, prompts: list[str], model_config) -> _Data:
    # Balanced by prompt form: relation prompts outnumber count prompts 17:1.
    count_prompts = [p for p in prompts if not p.startswith("a ")]
    relation_prompts = [p for p in prompts if p.startswith("a ")]
    half, size = cfg.batch_size // 2, model_config.image_size

    def batch(seed: int) -> tuple[list[str], torch.Tensor]:
        p_count, x_count = sample_pairs(half, seed=2 * seed, prompts=count_prompts, size=size) if half else ([], None)
        p_rel, x_rel = sample_pairs(cfg.batch_size - half, seed=2 * seed + 1, prompts=relation_prompts, size=size)
        images = x_rel if x_count is None else torch.cat([x_count, x_rel])
        return p_count + p_rel, images * 2 - 1

    return _Data(batch, prompts[:: max(1, len(prompts) // 16)][:16])


def _motion_data(cfg: PretrainConfig, prompts: list[str], model_config) -> _Data:
    def batch(seed: int) -> tuple[list[str], torch.Tensor]:
        chosen, clips = sample_clips(cfg.batch_size, seed, prompts=prompts, frames=model_config.frames,
                                     size=model_config.image_size)  # (B, F, 3, H, W)
        return chosen, clips.transpose(1, 2) * 2 - 1  # the model's (B, C, F, H, W)

    # the held-out prompts the base saw (all four directions of each pair), then training ones
    train, heldout = get_world("motion").split()
    return _Data(batch, [p for p in heldout + train if p in prompts][:16])


_DATA: dict[str, Callable[[PretrainConfig, list[str], object], _Data]] = {"image": _image_data,
                                                                          "motion": _motion_data}
