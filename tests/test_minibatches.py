"""Several optimizer steps per rollout (``optim.minibatches``) and MixGRPO's sample orders."""

from __future__ import annotations

import random

import pytest
import torch

from mixgrpo.core import minibatches as mb
from mixgrpo.core.grpo import Advantages
from mixgrpo.train.config import apply_overrides
from mixgrpo.train.presets import make_preset
from mixgrpo.train.trainer import GRPOTrainer
from tiny_runs import make_tiny_checkpoint, tiny_config


def _reference_balance_pos_neg(samples: list[dict], use_random: bool = False) -> list[dict]:
    """Transcribed from Tencent-Hunyuan/MixGRPO @ e5cdd6a,
    ``fastvideo/models/reward_model/utils.py::balance_pos_neg``."""
    if use_random:
        return random.sample(samples, len(samples))
    positive_samples = [s for s in samples if s["advantages"].item() > 0]
    negative_samples = [s for s in samples if s["advantages"].item() < 0]
    positive_samples = random.sample(positive_samples, len(positive_samples))
    negative_samples = random.sample(negative_samples, len(negative_samples))
    if len(positive_samples) < len(negative_samples):
        smaller_group, larger_group = positive_samples, negative_samples
    else:
        smaller_group, larger_group = negative_samples, positive_samples
    balanced = []
    for i in range(len(smaller_group)):
        balanced.append(smaller_group[i])
        balanced.append(larger_group[i])
    balanced.extend(larger_group[len(smaller_group):])
    return balanced


@pytest.mark.parametrize("adv", [
    [0.5, -1.0, 2.0, -0.3, -0.2, 1.0, -2.0, -0.1],  # 3 positive, 5 negative
    [0.5, 1.0, 2.0, -0.3, 0.2, 1.0, 0.7, 0.1],  # 7 positive, 1 negative
    [1.0, -1.0, 1.0, -1.0],  # a tie: negatives go first
    [0.4, 0.0, -0.4, 0.0],  # exact zeros: the reference drops them, ours puts them last
])
def test_balance_interleaves_signs_as_the_reference(monkeypatch, adv):
    """With the shuffles taken out (identity on both sides) ours is the reference's order,
    plus the exact-zero members at the end."""
    adv_t = torch.tensor(adv)
    monkeypatch.setattr(random, "sample", lambda seq, k: list(seq)[:k])
    expected = [int(s["row"]) for s in _reference_balance_pos_neg(
        [{"row": i, "advantages": a} for i, a in enumerate(adv_t)])]
    expected += [i for i, a in enumerate(adv) if a == 0]
    monkeypatch.setattr(torch, "randperm", lambda n, generator=None: torch.arange(n))
    assert mb.order_members(adv_t, "balance").tolist() == expected


def test_orders_permute_the_group_and_are_seeded():
    adv = torch.randn(12, generator=torch.Generator().manual_seed(1))
    for order in mb.MINIBATCH_ORDERS:
        a = mb.order_members(adv, order, torch.Generator().manual_seed(3))
        b = mb.order_members(adv, order, torch.Generator().manual_seed(3))
        assert sorted(a.tolist()) == list(range(12)) and torch.equal(a, b)
    assert mb.order_members(adv, "none").tolist() == list(range(12))
    balanced = adv[mb.order_members(adv, "balance", torch.Generator().manual_seed(0))]
    signs = (balanced > 0).tolist()
    n_small = min(sum(signs), 12 - sum(signs))
    assert all(signs[2 * i] != signs[2 * i + 1] for i in range(n_small))  # pairs of opposite sign
    with pytest.raises(ValueError, match="use one of none, random, balance"):
        mb.order_members(adv, "sorted")


def test_parts_slice_every_group_and_cover_the_valid_rows():
    """Part k holds the k-th contiguous slice of every group (in sampling order for
    ``none``); invalid rows are in no part; a short group leaves later parts thinner."""
    adv = torch.arange(12.0)
    valid = torch.ones(12, dtype=torch.bool)
    valid[8:] = False  # group 2 teaches nothing
    valid[5] = False
    parts = mb.minibatch_parts(adv, valid, group_size=4, parts=2)
    assert [p.tolist() for p in parts] == [[0, 1, 4, 6], [2, 3, 7]]
    assert [p.tolist() for p in mb.minibatch_parts(adv, valid, 4, 4)] == [[0, 4], [1, 6], [2, 7], [3]]
    assert [p.tolist() for p in mb.minibatch_parts(adv, valid, 4, 1)] == [[0, 1, 2, 3, 4, 6, 7]]
    with pytest.raises(ValueError, match="multiple of group_size"):
        mb.minibatch_parts(adv, valid, group_size=5, parts=2)


def test_parts_do_not_depend_on_how_groups_are_split_between_ranks():
    """Each group is ordered by its own generator, so two ranks holding half the groups each
    get exactly the whole batch's parts, restricted to their rows."""
    adv = torch.randn(16, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(16, dtype=torch.bool)
    gens = lambda groups: [torch.Generator().manual_seed(100 + g) for g in groups]  # noqa: E731
    whole = mb.minibatch_parts(adv, valid, 4, 2, "balance", gens(range(4)))
    rank0 = mb.minibatch_parts(adv[:8], valid[:8], 4, 2, "balance", gens([0, 1]))
    rank1 = mb.minibatch_parts(adv[8:], valid[8:], 4, 2, "balance", gens([2, 3]))
    for k in range(2):
        assert whole[k].tolist() == rank0[k].tolist() + (rank1[k] + 8).tolist()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _step_gradients(trainer, batch, adv) -> list[list[torch.Tensor]]:
    """The accumulated gradient at each optimizer step of one update, without stepping (all
    at the same weights)."""
    grads = []

    def record(loss_finite: bool) -> bool:
        grads.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.params])
        trainer.optimizer.zero_grad(set_to_none=True)
        return True

    trainer.optimizer_step = record
    trainer.update(batch, adv)
    return grads


@pytest.mark.parametrize(("preset", "order"), [("mixgrpo", "balance"), ("dance-grpo", "none"), ("awm", "random")])
def test_each_optimizer_step_trains_the_mean_loss_of_its_part(tiny_checkpoint, preset, order):
    """Step k's gradient is exactly that of a one-step update whose only valid samples are
    part k's: the loss of a step is the mean over its own samples (as the references divide
    by their accumulation count), not over the whole rollout (at one set of weights, two
    halves' means sum to twice the whole's)."""
    cfg = tiny_config(tiny_checkpoint, preset, "optim.minibatches=2", f"optim.minibatch_order={order}",
                      "loss.clip_range=0.5")
    trainer = GRPOTrainer(cfg)
    batch = trainer.rollout(0)
    adv = trainer.advantages(trainer.score(batch), batch.group_size)
    assert adv.valid.all()
    if cfg.loss.objective == "grpo":  # old log-probs off the current policy: ratios != 1 and clipped
        tr = batch.rollout.transitions
        tr.log_prob += 0.3 * torch.randn(tr.log_prob.shape, generator=torch.Generator().manual_seed(0))
    from mixgrpo.train.optimizer_steps import epoch_parts

    parts = epoch_parts(trainer, batch, adv, 0)
    assert len(parts) == 2 and sorted(torch.cat(parts).tolist()) == list(range(8))
    per_step = _step_gradients(trainer, batch, adv)
    assert len(per_step) == 2
    one = GRPOTrainer(apply_overrides(cfg, ["optim.minibatches=1", "optim.minibatch_order=none"]))
    one.model.load_state_dict(trainer.model.state_dict())
    # and so the steps' gradients add up to twice the one-step gradient over all 8 samples
    (whole,) = _step_gradients(one, batch, adv)
    for a, b, w in zip(per_step[0], per_step[1], whole, strict=True):
        assert torch.allclose(a + b, 2 * w, rtol=1e-5, atol=1e-6 * w.abs().max().item())
    for k, part in enumerate(parts):
        only = torch.zeros(8, dtype=torch.bool)
        only[part] = True
        (expected,) = _step_gradients(one, batch, Advantages(adv.advantages, only, 0))
        largest = max(g.abs().max().item() for g in expected)
        assert largest > 0
        worst = max((a - b).abs().max().item() for a, b in zip(per_step[k], expected, strict=True))
        assert worst <= 1e-6 * largest, f"part {k}: {worst:.3g} vs {largest:.3g}"


@pytest.mark.parametrize(("preset", "steps"), [
    ("mixgrpo", 4), ("mixgrpo-flash-star", 4), ("dance-grpo", 3), ("flow-grpo", 2), ("awm", 1), ("nft", 1),
])
def test_presets_step_as_often_per_rollout_as_their_references(preset, steps):
    assert make_preset(preset).optim.minibatches == steps


def test_bad_minibatch_settings_are_refused_with_the_fix():
    from mixgrpo.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"optim\.minibatches must be >= 1"):
        apply_overrides(TrainConfig(), ["optim.minibatches=0"])
    with pytest.raises(ValueError, match="minibatch_order must be one of none, random, balance"):
        apply_overrides(TrainConfig(), ["optim.minibatch_order=sorted"])
