"""What a bench compares: method presets, or MixGRPO ablations (the paper's Table 3 and the
Flash* step count), each as an :class:`~mixgrpo.bench.runner.Arm` built from presets plus
``--set`` overrides shared by every arm."""

from __future__ import annotations

from ..core.sampler import flash_plan
from ..train.config import TrainConfig, apply_overrides
from ..train.presets import make_preset
from .runner import Arm

__all__ = ["ABLATIONS", "ARM_SETS", "DEFAULT_PRESETS", "QUICK", "ablation_arms", "compression_for_steps", "ovf_arms", "preset_arms", "scale_group",
           "split_presets"]

DEFAULT_PRESETS = ["dance-grpo", "mixgrpo", "mixgrpo-flash", "mixgrpo-flash-star"]
# `--presets frontier`: the MixGRPO-era baselines beside the methods that followed it
ARM_SETS = {"frontier": ["dance-grpo", "flow-grpo", "mixgrpo", "mixgrpo-flash-star", "flow-grpo-guard", "nft", "awm",
                         "branch-grpo"]}
ABLATIONS = ("window", "flash-steps", "ovf")


# --quick: the same presets and step counts, smaller groups and evaluation (about 2 minutes here);
# "group" is the trained group size every preset is scaled to (see scale_group)
QUICK = {"presets": ["dance-grpo", "mixgrpo", "mixgrpo-flash"], "seeds": 1, "iterations": 8, "evals": 2,
         "overrides": ["prompts_per_iter=2", "eval_prompts=64"], "group": 4}


def scale_group(cfg: TrainConfig, trained: int) -> list[str]:
    """Overrides that shrink ``cfg``'s groups to ``trained`` members in the loss while keeping
    the preset's shape: an Expand-and-Prune preset (16 expanded, 8 kept) keeps its expansion
    ratio (``trained`` = 4 -> 8 expanded, 4 kept); any other preset gets ``group_size = trained``."""
    keep = cfg.sampler.prune_keep
    if keep is None:
        return [f"group_size={trained}"]
    expanded = max(trained + 1, round(trained * cfg.group_size / keep))
    return [f"group_size={expanded}", f"sampler.prune_keep={trained}"]


def _config(preset: str, overrides: list[str], group: int | None = None) -> TrainConfig:
    """Preset, then (``group``) its groups scaled to ``group`` trained members, then the overrides."""
    cfg = make_preset(preset)
    if group is not None:
        cfg = apply_overrides(cfg, scale_group(cfg, group))
    return apply_overrides(cfg, overrides)


def split_presets(text: str) -> list[str]:
    """``--presets`` text -> arm specs: commas separate arms, except inside ``[...]``."""
    specs, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"--presets {text!r}: unbalanced or nested brackets; write preset[key=value;key=value]")
        if ch == "," and depth == 0:
            specs.append(current.strip())
            current = ""
        else:
            current += ch
    if depth:
        raise ValueError(f"--presets {text!r}: a '[' is never closed; write preset[key=value;key=value]")
    return [s for s in [*specs, current.strip()] if s]


def preset_arms(specs: list[str], overrides: list[str], group: int | None = None) -> list[Arm]:
    """One arm per spec: a preset name, a set of :data:`ARM_SETS` (``frontier``), or
    ``preset[key=value;...]`` for a variant with its own
    overrides on top of the shared ``--set`` ones (labelled by the whole spec). ``group``
    scales every preset's groups first (:func:`scale_group`; ``--quick``)."""
    arms = []
    specs = [name for spec in specs for name in ARM_SETS.get(spec, [spec])]
    for spec in specs:
        name, _, extra = spec.partition("[")
        if extra and not extra.endswith("]"):
            raise ValueError(f"arm {spec!r}: write preset[key=value;key=value] with nothing after the ']'")
        own = [o.strip() for o in extra[:-1].split(";") if o.strip()] if extra else []
        arms.append(Arm(spec, _config(name.strip(), [*overrides, *own], group)))
    labels = [a.label for a in arms]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--presets names an arm twice: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))}")
    return arms


def compression_for_steps(total: int, num_steps: int, window: tuple[int, ...], shift: float) -> float:
    """The smallest Flash compression ``r`` (in steps of 0.01) whose plan has ``total`` steps."""
    for k in range(1, 101):
        if flash_plan(num_steps, window, k / 100, shift).num_steps == total:
            return k / 100
    raise ValueError(f"no Flash compression gives {total} steps with window {window} on a {num_steps}-step grid")


def ablation_arms(kind: str, overrides: list[str], group: int | None = None) -> list[Arm]:
    """``window``: MixGRPO with w in {1, 2, 4, 8} (s = 1, sliding), stride 2, and the random
    and fixed-at-the-noisiest-steps schedules (w = 4). ``flash-steps``: Flash* with 8, 10,
    12 and 16 sampling steps in total."""
    if kind == "window":
        arms = []
        for size, stride, schedule in [(1, 1, "progressive"), (2, 1, "progressive"), (4, 1, "progressive"),
                                       (8, 1, "progressive"), (4, 2, "progressive"), (4, 1, "random"), (4, 1, "fixed")]:
            cfg = _config("mixgrpo", [*overrides, f"schedule.size={size}", f"schedule.stride={stride}",
                                      f"schedule.name={schedule}"], group)
            label = {"progressive": "sliding", "random": "random", "fixed": "fixed at 0"}[schedule]
            arms.append(Arm(f"w={size} s={stride} {label}", cfg))
        return arms
    if kind == "flash-steps":
        arms = []
        for total in (8, 10, 12, 16):
            cfg = _config("mixgrpo-flash-star", overrides, group)
            window = tuple(range(cfg.schedule.start, cfg.schedule.start + cfg.schedule.size))
            r = compression_for_steps(total, cfg.sampler.num_steps, window, cfg.sampler.shift)
            arms.append(Arm(f"flash* {total} steps", apply_overrides(cfg, [f"sampler.flash_compression={r}"])))
        return arms
    if kind == "ovf":
        return ovf_arms(overrides, group)
    raise ValueError(f"unknown ablation {kind!r}; choose one of {', '.join(ABLATIONS)}")


def ovf_arms(overrides: list[str], group: int | None = None) -> list[Arm]:
    """Pro-GRPO's claim: training on the k of G rollouts with maximal reward variance beats
    training on all G. Arms (MixGRPO, the bench's group size G): all G; OVF keeping 3G/4 and
    G/2 (same rollouts, so the same sampling passes); and a full group of 3G/4 (fewer
    passes), which tells a better subset apart from a merely smaller group."""
    base = _config("mixgrpo", overrides, group)
    g = base.group_size
    if g < 5:
        raise ValueError(f"--ablate ovf needs group_size >= 5 (subsets of 3G/4 and G/2), got {g}")
    three_quarters, half = round(3 * g / 4), g // 2
    return [
        Arm(f"all {g} of {g}", base),
        Arm(f"OVF {three_quarters} of {g}", apply_overrides(base, [f"loss.ovf_keep={three_quarters}"])),
        Arm(f"OVF {half} of {g}", apply_overrides(base, [f"loss.ovf_keep={half}"])),
        Arm(f"all {three_quarters} of {three_quarters}", apply_overrides(base, [f"group_size={three_quarters}"])),
    ]
