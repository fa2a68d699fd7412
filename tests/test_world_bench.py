"""`python -m mixgrpo.bench.world`: reward throughput and an embedded model's quality figures."""

from __future__ import annotations

import torch

from mixgrpo.bench import world as world_bench
from mixgrpo.inference.policy import load_policy
from mixgrpo.models.checkpoint import build_embedded, save_embedded


def test_rewards_only_reports_both_embedded_rewards():
    results = world_bench.main(["--rewards-only"])
    assert set(results["reward_images_per_s"]) == {"composition", "flatness"}
    assert all(rate > 0 for rate in results["reward_images_per_s"].values())


def test_evaluate_checkpoint_scores_each_prompt_and_splits_by_form(tmp_path):
    torch.manual_seed(0)
    save_embedded(build_embedded("tiny-unet", {"widths": [8, 16], "heads": 2}), tmp_path / "m")
    prompts = ["one red circle", "two blue circles", "a red circle left of a blue square"]
    ev = world_bench.evaluate_checkpoint(load_policy(tmp_path / "m"), prompts, steps=4)
    assert ev["n"] == 3 and ev["images"].shape == (3, 3, 32, 32) and ev["scores"].shape == (3,)
    assert ev["composition_mean"] == 0.0  # v = 0 leaves the starting noise as it is: no objects
    assert ev["count_exact"] == 0.0 and ev["relation_exact"] == 0.0
