"""The bench's paired difference to DanceGRPO: known answers on hand-made evaluations."""

from __future__ import annotations

import pytest

from mixgrpo.bench.report import paired_difference
from mixgrpo.bench.runner import ArmResult


def _arm(label: str, seed: int, per_prompt: list[float]) -> ArmResult:
    result = ArmResult(label, seed)
    result.evals = [(0, 0.0, {"reward_mean": 0.0}), (10, 5.0, {"reward_mean": sum(per_prompt) / len(per_prompt),
                                                               "per_prompt": per_prompt})]
    return result


def test_paired_difference_pairs_by_seed_and_prompt():
    dance = [_arm("dance-grpo", 0, [0.0, 0.5, 1.0]), _arm("dance-grpo", 1, [0.2, 0.2, 0.2])]
    # seed 0: d = [0.2, 0.1, 0.0] (mean 0.1); seed 1: d = [0.3, 0.5, 0.1] (mean 0.3)
    other = [_arm("mixgrpo", 1, [0.5, 0.7, 0.3]), _arm("mixgrpo", 0, [0.2, 0.6, 1.0])]
    got = paired_difference(other, dance)
    assert got["seeds"]["mean"] == pytest.approx(0.2)
    assert got["seeds"]["ci95"] == pytest.approx(12.7062047 * 0.1414213562 / 2**0.5, rel=1e-6)  # t(0.975, 1) sd / sqrt 2
    per_prompt = [0.25, 0.3, 0.05]  # mean over seeds of d[s, p]
    mean = sum(per_prompt) / 3
    sd = (sum((x - mean) ** 2 for x in per_prompt) / 2) ** 0.5
    assert got["prompts_ci95"] == pytest.approx(1.96 * sd / 3**0.5)
    assert got["prompts"] == 3


def test_no_pairing_without_per_prompt_scores_or_a_missing_seed():
    dance = [_arm("dance-grpo", 0, [0.0, 1.0])]
    assert paired_difference([_arm("mixgrpo", 1, [0.5, 0.5])], dance) is None
    bare = ArmResult("mixgrpo", 0)
    bare.evals = [(10, 1.0, {"reward_mean": 0.5})]
    assert paired_difference([bare], dance) is None
