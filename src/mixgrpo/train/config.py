"""Training configuration: nested dataclasses, each field with a one-line reason.

A method is a preset (:mod:`mixgrpo.train.presets`) that edits these values; the trainer
never looks at the preset's name. ``--set a.b=value`` overrides are parsed against the
field's type; unknown keys suggest the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..core.windows import WindowSchedule
from .config_sections import (
    LossConfig,
    ModelConfig,
    OptimConfig,
    SamplerConfig,
    ScheduleConfig,
    WeightingConfig,
)

__all__ = [
    "EVAL_SPLITS",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "SamplerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "WeightingConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_yaml",
]


# eval_split -> how figures name what it scored
EVAL_SPLITS: dict[str, str] = {"heldout": "held-out", "train": "training-prompt"}


@dataclass
class TrainConfig:
    preset: str = "mixgrpo"  # which preset built this config (recorded, never branched on)
    iterations: int = 60  # rollout + update cycles
    prompts_per_iter: int = 4  # distinct prompts per iteration
    group_size: int = 8  # images per prompt, G (MixGRPO: 12)
    seed: int = 0  # every random draw derives from (seed, iteration)
    # name -> weight, or name -> {weight: w, <constructor options>} (e.g. {hps: {weight: 1, path: ...}})
    rewards: dict[str, float | dict[str, Any]] = field(default_factory=lambda: {"composition": 1.0})
    rewards_in_background: bool = False  # score a chunk's images in a thread while the next chunk samples
    parallel: str = "ddp"  # under torchrun: ddp (replicated weights) | fsdp (FSDP2-sharded, DCP checkpoints)
    eval_every: int = 20  # evaluation interval (iterations), also at start and end
    # images per evaluation: one per prompt of the split, at most its size, except that
    # eval_split=train and the motion world repeat their prompts (each repeat with its own noise)
    eval_prompts: int = 64
    # what the evaluation scores: "heldout" (prompts RL never trains on; the embedded world's hold
    # out colour-shape pairs too) or "train" (the prompts RL trains on, on fixed evaluation noise:
    # how fast a method optimises, apart from how far it generalises)
    eval_split: str = "heldout"
    prompt_pool: int = 0  # train on a fixed seeded sample of this many training prompts (0: all of them)
    eval_steps: int | None = None  # Euler steps of the evaluation samples (None: sampler.num_steps)
    checkpoint_every: int = 10  # iterations between checkpoints
    keep_checkpoints: int = 2  # retention
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)  # several rewards: static or dynamic weights

    @property
    def reward_weights(self) -> dict[str, float]:
        """``name -> weight`` (1 when a reward's mapping gives none)."""
        return {n: float(s.get("weight", 1.0)) if isinstance(s, dict) else float(s) for n, s in self.rewards.items()}

    @property
    def reward_options(self) -> dict[str, dict[str, Any]]:
        """``name -> constructor keyword arguments`` (a mapping's keys other than ``weight``)."""
        return {n: {k: v for k, v in s.items() if k != "weight"} if isinstance(s, dict) else {}
                for n, s in self.rewards.items()}

    def validate(self) -> TrainConfig:
        for section in (self.sampler, self.schedule, self.loss, self.optim, self.model, self.weighting):
            section.validate()
        self._validate_weighting()
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.rewards_in_background and self.sampler.groups_per_call is None:
            raise ValueError("rewards_in_background overlaps scoring with sampling of the next chunk: set "
                             "sampler.groups_per_call (and sampler.noise_per_group: true)")
        if self.sampler.shift == "scheduler" and self.model.kind == "embedded":
            raise ValueError("sampler.shift=scheduler reads a diffusers pipeline's scheduler config; the embedded "
                             "model has none, give a number (e.g. 3)")
        if self.iterations < 1 or self.prompts_per_iter < 1:
            raise ValueError("iterations and prompts_per_iter must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples within a group), got {self.group_size}")
        for name, spec in self.rewards.items():
            if isinstance(spec, dict) and not isinstance(spec.get("weight", 1.0), (int, float)):
                raise ValueError(f"rewards.{name}.weight must be a number, got {spec['weight']!r}")
        weights = self.reward_weights
        if not weights or any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise ValueError(f"rewards must map reward names to weights >= 0 with a positive sum, got {self.rewards}")
        from ..rewards import check_reward_input, registered_reward

        videos = self.model.makes_videos()
        for name in self.rewards:  # an image reward on a video model (or the reverse), before any model loads
            reward = registered_reward(name)
            if reward is not None and videos is not None:
                check_reward_input(reward, name, videos=videos)
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1 or null, got {self.eval_steps}")
        if self.eval_every < 1 or self.eval_prompts < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("eval_every, eval_prompts, checkpoint_every and keep_checkpoints must be >= 1")
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split must be heldout or train, got {self.eval_split!r}")
        if self.prompt_pool < 0 or 0 < self.prompt_pool < self.prompts_per_iter:
            raise ValueError(f"prompt_pool must be 0 (every prompt) or >= prompts_per_iter "
                             f"({self.prompts_per_iter}), got {self.prompt_pool}")
        survivors = self.sampler.prune_keep if self.sampler.prune_keep is not None else self.group_size
        if not 2 <= survivors <= self.group_size - (self.sampler.prune_keep is not None):
            raise ValueError(f"sampler.prune_keep must be in [2, group_size - 1 = {self.group_size - 1}] "
                             f"(group_size is the expanded group), got {survivors}")
        if self.sampler.prune_sizes and self.sampler.prune_sizes[0] >= self.group_size:
            raise ValueError(f"sampler.prune_sizes must start below group_size {self.group_size} (the expanded group), got "
                             f"{self.sampler.prune_sizes}")
        if self.loss.ovf_keep is not None and not 2 <= self.loss.ovf_keep < survivors:
            raise ValueError(f"loss.ovf_keep must be in [2, {survivors - 1}]: k below the (surviving) group of "
                             f"{survivors}, got {self.loss.ovf_keep}")
        forward = self.loss.objective != "grpo"
        per_sample = self.schedule.per_sample or self.schedule.name == "stratified"
        if per_sample and not forward and self.sampler.sde_on != "all":
            raise ValueError("schedule.per_sample trains different steps per sample, so every step must be an SDE "
                             "step: set sampler.sde_on=all")
        if self.schedule.final_step and not forward:
            raise ValueError("schedule.final_step trains the step that ends at t = 0, where an SDE step has no "
                             "density: it needs loss.objective=nft or awm")
        if self.sampler.sde_on == "none" and not forward:
            raise ValueError("sampler.sde_on=none leaves no stochastic step for the GRPO loss: use "
                             "loss.objective=nft or awm, or sde_on=trained")
        if self.sampler.tree_splits:
            leaves = 2 ** len(self.sampler.tree_splits)
            if self.group_size != leaves or forward or self.loss.ovf_keep is not None or self.schedule.per_sample:
                raise ValueError(f"sampler.tree_splits={self.sampler.tree_splits} grows {leaves} leaves per prompt: set "
                                 f"group_size={leaves}, with loss.objective=grpo, no loss.ovf_keep, no "
                                 "schedule.per_sample")
        if forward and self.sampler.prune_keep is not None:
            raise ValueError("Expand-and-Prune (sampler.prune_keep) needs loss.objective=grpo")
        if self.sampler.rollout_policy == "old" and not self.loss.uses_old_policy:
            raise ValueError("sampler.rollout_policy=old needs an old policy: loss.objective=nft or loss.old_kl_beta > 0")
        if self.loss.logprob_form == "flow_grpo_cps" and self.sampler.sde_kind != "cps":
            raise ValueError(f"loss.logprob_form=flow_grpo_cps is Flow-GRPO's log-prob for CPS steps; it needs "
                             f"sampler.sde_kind=cps, got {self.sampler.sde_kind!r}")
        trainable = self.sampler.num_steps - (0 if self.schedule.final_step else 1)
        if self.schedule.name not in ("all", "random_subset") and self.schedule.size > trainable:
            raise ValueError(
                f"schedule.size {self.schedule.size} is larger than the {trainable} trainable steps of a "
                f"{self.sampler.num_steps}-step grid; lower schedule.size or raise sampler.num_steps"
            )
        try:  # the schedule against this grid (sizes, strata, bounds)
            WindowSchedule(num_steps=self.sampler.num_steps, **dataclasses.asdict(self.schedule))
        except ValueError as err:
            raise ValueError(f"schedule.* does not fit sampler.num_steps={self.sampler.num_steps}: {err}") from None
        return self

    def _validate_weighting(self) -> None:
        w, names = self.weighting, sorted(self.rewards)
        if w.name == "static":
            return
        if len(names) < 2:
            raise ValueError(f"weighting.name={w.name} weighs several rewards; this config has one ({names[0]}): "
                             "add a reward, or use weighting.name=static")
        if w.name == "gradient":
            if (self.optim.inner_epochs != 1 or self.optim.minibatches != 1 or self.loss.ovf_keep is not None
                    or self.sampler.tree_splits):
                raise ValueError("weighting.name=gradient combines one gradient per reward per iteration: it needs "
                                 "optim.inner_epochs=1, optim.minibatches=1, no loss.ovf_keep and no "
                                 "sampler.tree_splits")
            if self.parallel == "fsdp":
                raise ValueError("weighting.name=gradient keeps one full gradient per reward, which FSDP shards: "
                                 "use parallel=ddp")
        if w.name == "constraint":
            if w.primary not in self.rewards:
                raise ValueError(f"weighting.primary must name the reward to maximise, one of {names}; got {w.primary!r}")
            bad = [n for n in w.floors if n not in self.rewards or n == w.primary]
            if bad or not w.floors:
                raise ValueError(f"weighting.floors must map the other rewards ({[n for n in names if n != w.primary]}) "
                                 f"to floors, e.g. {{flatness: 0.95}}; got {w.floors}")


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_from_dict(data: dict, cls=TrainConfig, prefix: str = ""):
    """Build a (nested) config from a plain dict; unknown keys raise with a suggestion."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix or '<root>'} must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ValueError(_unknown_key(prefix + key, cls))
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = config_from_dict(value, hints[key], f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _unknown_key(path: str, cls) -> str:
    name = path.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, list(_hints(cls)), n=1)
    hint = f"; did you mean {path[: -len(name)]}{close[0]!r}?" if close else f"; valid keys: {', '.join(_hints(cls))}"
    return f"unknown config key {path!r}{hint}"


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Convert a YAML / ``--set`` value to the field's type, or raise naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none"))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{path}: cannot be null")
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping like {{composition: 1.0}}, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path} must be a list like [0, 2], got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{path} must be true or false, got {value!r}")
    if hint in (int, float):
        try:
            number = hint(value) if not isinstance(value, str) else hint(float(value)) if hint is float else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path} must be {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    return value


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``a.b=value`` strings (type-checked against the dataclass fields)."""
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node, cls = data, TrainConfig
        for i, key in enumerate(keys):
            hints = _hints(cls)
            if key not in hints:
                raise ValueError(_unknown_key(".".join(keys[: i + 1]), cls))
            if i == len(keys) - 1:
                if dataclasses.is_dataclass(hints[key]):
                    raise ValueError(f"{path} is a section; set one of its keys, e.g. {path}.{next(iter(_hints(hints[key])))}")
                node[key] = _coerce(yaml.safe_load(raw) if raw.strip() else raw, hints[key], path)
            else:
                if not dataclasses.is_dataclass(hints[key]):
                    raise ValueError(f"{'.'.join(keys[: i + 1])} is not a section")
                node, cls = node[key], hints[key]
    return config_from_dict(data).validate()


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data
