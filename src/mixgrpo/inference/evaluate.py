"""Reward tables over prompt files: per checkpoint (and blend), mean, std and 95% CI of each
reward, plus per-prompt scores.

Statistics treat the prompt as the unit: each prompt's score is its mean over ``seeds``
samples, and ``ci95 = 1.96 * std(per-prompt scores, ddof=1) / sqrt(n)`` over the ``n`` prompts.
``best_of`` is the mean over prompts of each prompt's best sample (best of ``seeds``; pass@k
for a 0/1 verifier): how far picking among the model's own samples gets, the headroom that RL
sharpens toward.

Resuming: the work is done in parts, one per (seed pass, chunk of :data:`EVAL_CHUNK` prompts),
each drawn with the seed the whole pass would give it (see
:func:`~mixgrpo.inference.generate.generate_prompts`). ``on_part`` receives each finished
part's scores; passing them back as ``done`` skips those parts, and the result is the same
(bitwise) as one uninterrupted evaluation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..rewards import Reward, check_reward_input, get_reward, score
from ..rewards.base import RewardOptionsError
from .generate import EVAL_CHUNK, generate_prompts
from .policy_base import DISTILLED_KINDS, Policy

__all__ = ["EvalProgress", "build_rewards", "evaluate_policy", "markdown_table", "summarise_scores"]


class EvalProgress:
    """The finished parts of an evaluation, appended to ``path`` (JSON lines: a header naming
    the job, then one line per part, fsynced) so an interrupted ``mixgrpo eval`` continues
    where it stopped. A file of another job, or a torn last line, is ignored; the file is
    created with the first part and removed when the evaluation is complete."""

    def __init__(self, path: Path, job: dict[str, Any]):
        self.path, self.job = Path(path), json.loads(json.dumps(job))
        self._parts: dict[str, dict[str, dict[str, Any]]] = {}
        self._handle = None
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            try:
                same = bool(lines) and json.loads(lines[0]).get("job") == self.job
            except ValueError:
                same = False
            if same:
                for line in lines[1:]:
                    try:
                        row = json.loads(line)
                    except ValueError:  # torn by a hard kill: that part is redone
                        break
                    self._parts.setdefault(row["where"], {})[row["key"]] = row["part"]
            else:
                self.path.unlink()
        self.resumed = sum(len(v) for v in self._parts.values())

    def parts(self, where: str) -> dict[str, dict[str, Any]]:
        return self._parts.get(where, {})

    def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every finished part, by where and key (a copy, to hand to the other ranks)."""
        return json.loads(json.dumps(self._parts))

    def add(self, where: str, key: str, part: dict[str, Any]) -> None:
        if self._handle is None:
            fresh = not self.path.is_file()
            self.path.parent.mkdir(parents=True, exist_ok=True)  # --out may name a folder not made yet
            self._handle = self.path.open("a")
            if fresh:
                self._handle.write(json.dumps({"job": self.job}) + "\n")
            else:  # rewrite without a torn tail
                self._handle.close()
                self._rewrite()
                self._handle = self.path.open("a")
        self._handle.write(json.dumps({"where": where, "key": key, "part": part}) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._parts.setdefault(where, {})[key] = part

    def _rewrite(self) -> None:
        rows = [json.dumps({"job": self.job})]
        rows += [json.dumps({"where": w, "key": k, "part": p}) for w, parts in self._parts.items() for k, p in parts.items()]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("\n".join(rows) + "\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self.path.unlink(missing_ok=True)


def build_rewards(names: Sequence[str], options: Mapping[str, Any] | None = None) -> dict[str, Reward]:
    """``name -> reward``, each built with its constructor options from ``options`` (a mapping
    like a training config's ``rewards:`` section; a ``weight`` key there is ignored). A reward
    that cannot be built is one line naming it and what it needs."""
    options = dict(options or {})
    if isinstance(options.get("rewards"), Mapping):  # a whole training config: its rewards section
        options = dict(options["rewards"])
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"reward options for {unknown[0]!r}, which --rewards does not name ({', '.join(names)})")
    built = {}
    for name in names:
        kwargs = options.get(name) or {}
        if isinstance(kwargs, (int, float)):  # a bare training weight: no options
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"reward options for {name!r} must be a mapping of constructor options (e.g. path: ...), "
                             f"got {kwargs!r}")
        kwargs = {k: v for k, v in kwargs.items() if k != "weight"}
        try:
            built[name] = get_reward(name, **kwargs)
        except RewardOptionsError as err:  # a missing or unknown constructor option
            raise ValueError(f"{err.problem}: give them in --reward-options FILE (YAML: {{{name}: {{path: ...}}}})") from None
    return built


def summarise_scores(per_prompt: torch.Tensor) -> dict[str, float]:
    """``mean``, ``std`` and ``ci95`` of per-prompt scores ``(n,)``."""
    n = per_prompt.numel()
    std = per_prompt.std(correction=1).item() if n > 1 else 0.0
    return {"mean": per_prompt.mean().item(), "std": std, "ci95": 1.96 * std / math.sqrt(n)}


def evaluate_policy(
    policy: Policy,
    prompts: Sequence[str],
    rewards: Sequence[str] | Mapping[str, Reward],
    *,
    blend: float = 0.0,
    seeds: int = 1,
    steps: int = 25,
    shift: float | None = None,
    solver: str = "euler",
    guidance: float = 1.0,
    on_images: Callable[[int], None] | None = None,
    done: dict[str, dict[str, Any]] | None = None,
    on_part: Callable[[str, dict[str, Any]], None] | None = None,
    shard: tuple[int, int] = (0, 1),
    gather: Callable[[Any], list[Any]] | None = None,
) -> dict[str, Any]:
    """Sample every prompt ``seeds`` times (seed ``k`` for pass ``k``) and score each reward
    (``rewards``: registered names, or ``name -> reward`` built once by the caller, e.g. with
    checkpoint paths from :func:`build_rewards`).

    Under torchrun pass ``shard=(rank, world_size)`` and ``gather`` (``all_gather_object``):
    each rank samples its share of the parts, every rank returns the whole result.

    A reward with a ``check_prompts(prompts)`` method (raising ``ValueError`` for prompts it
    cannot score) is asked first, so a bad prompt fails before any image is drawn."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    scorers = dict(rewards) if isinstance(rewards, Mapping) else {name: get_reward(name) for name in rewards}
    for reward in scorers.values():  # a reward that can refuse prompts does so before any sampling
        check = getattr(reward, "check_prompts", None)
        if callable(check):
            check(list(prompts))
    for name, reward in scorers.items():  # an image reward on a video model (or the reverse): before sampling
        check_reward_input(reward, name, policy.video)
    policy.check_guidance(guidance)
    conditions = policy.conditions(prompts)  # every prompt's embedding found (or made) before any sampling
    shift = policy.grid_shift(steps) if shift is None else shift
    totals = {name: torch.zeros(len(prompts)) for name in rewards}
    best = {name: torch.full((len(prompts),), -math.inf) for name in rewards}  # best sample per prompt
    done = done or {}
    # the parts in a fixed order; with `gather` (torchrun) rank r draws parts r, r + W, ... of each
    # round of W and every rank receives all of them: the noise of a part depends on its key only,
    # so the result is the single process's, bitwise
    parts = [(k, start) for k in range(seeds) for start in range(0, len(prompts), EVAL_CHUNK)]
    rank, world = shard
    for first in range(0, len(parts), world):
        todo = parts[first : first + world]
        mine = None
        if rank < len(todo):
            k, start = todo[rank]
            key = f"{k}:{start}"
            if key not in done:
                chunk = list(prompts[start : start + EVAL_CHUNK])
                images = generate_prompts(policy, conditions, chunk, seed=k * 1_000_003 + start, steps=steps,
                                          shift=shift, solver=solver, guidance=guidance, blend=blend, base=policy.base,
                                          decode=policy.decode, device=policy.device)
                scores = {name: score(reward, images, chunk) for name, reward in scorers.items()}
                mine = (key, {"scores": {n: v.tolist() for n, v in scores.items()},
                              "dtypes": {n: str(v.dtype).removeprefix("torch.") for n, v in scores.items()}})
        for got in (gather(mine) if world > 1 else [mine]):
            if got is not None:  # newly scored on some rank
                done[got[0]] = got[1]
                if on_part is not None:
                    on_part(*got)
        for k, start in todo:
            key, n = f"{k}:{start}", len(prompts[start : start + EVAL_CHUNK])
            for name in rewards:
                part = torch.tensor(done[key]["scores"][name], dtype=getattr(torch, done[key]["dtypes"][name]))
                totals[name][start : start + n] += part
                best[name][start : start + n] = torch.maximum(best[name][start : start + n], part.to(best[name].dtype))
            if on_images is not None:
                on_images(n)
    per_prompt = {name: t / seeds for name, t in totals.items()}
    return {
        "checkpoint": policy.name,
        "weights": policy.source,
        "blend": blend,
        "nfe": steps * (2 if guidance != 1.0 and policy.kind not in DISTILLED_KINDS else 1),  # passes per image (CFG: 2)
        "n": len(prompts),
        "seeds": seeds,
        "rewards": {name: {**summarise_scores(s), "best_of": best[name].mean().item()} for name, s in per_prompt.items()},
        "per_prompt": [
            {"prompt": p, **{name: round(per_prompt[name][i].item(), 6) for name in rewards}} for i, p in enumerate(prompts)
        ],
    }


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per evaluated (checkpoint, blend), laid out like MixGRPO's Table 1: the model
    passes per image (NFE), then ``mean ± ci95`` of each reward."""
    names = list(results[0]["rewards"])
    lines = ["| checkpoint | blend | NFE | n | " + " | ".join(names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    for r in results:
        cells = [f"{r['rewards'][n]['mean']:.3f} ± {r['rewards'][n]['ci95']:.3f}"
                 + (f" (best of {r['seeds']}: {r['rewards'][n]['best_of']:.3f})" if r["seeds"] > 1 else "") for n in names]
        lines.append(f"| {r['checkpoint']} | {r['blend']:g} | {r.get('nfe', '')} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
