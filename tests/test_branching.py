"""Pro-GRPO (OVF, Expand-and-Prune) and shared-prefix rollouts: sampler, trainer, presets."""

from __future__ import annotations

import itertools

import pytest
import torch

from mixgrpo.core.grids import uniform_grid
from mixgrpo.core.ovf import max_spread_subset
from mixgrpo.core.sampler import Pruning, flash_plan, initial_noise, mixed_plan, sample
from mixgrpo.core.steps import SDENoise
from mixgrpo.train.branching import prune_sizes
from mixgrpo.train.config import apply_overrides
from mixgrpo.train.presets import make_preset
from mixgrpo.train.trainer import GRPOTrainer
from tiny_runs import make_tiny_checkpoint, tiny_config

P, G = 3, 4


class RowLinear:
    """v = a_i x + b_i t with per-row coefficients, so a row mix-up changes the result;
    records the batch size of every call."""

    def __init__(self, a, b, calls):
        self.a, self.b, self.calls = a, b, calls

    def __call__(self, x, t):
        self.calls.append(x.shape[0])
        return self.a.view(-1, 1) * x + self.b.view(-1, 1) * t.view(-1, 1)

    def rows(self, index):
        return RowLinear(self.a[index], self.b[index], self.calls)


def _velocity(calls):
    # members of a group share their "prompt" (coefficients), as in training
    a = torch.linspace(0.1, 0.5, P).repeat_interleave(G)
    b = torch.linspace(-0.3, 0.3, P).repeat_interleave(G)
    return RowLinear(a, b, calls)


def _noise(shared=True):
    return initial_noise(P, G, (5,), shared=shared, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- core
def test_max_spread_subset_single_removal_is_exact_and_greedy_is_sane():
    feats = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))

    def spread(idx):
        sub = feats[list(idx)]
        return (sub - sub.mean(0)).pow(2).sum().item()

    best = max(itertools.combinations(range(7), 6), key=spread)
    assert max_spread_subset(feats, 6).tolist() == list(best)
    greedy = max_spread_subset(feats, 3)
    assert spread(greedy.tolist()) >= sorted(spread(c) for c in itertools.combinations(range(7), 3))[17]  # top half
    assert max_spread_subset(feats, 7).tolist() == list(range(7))
    with pytest.raises(ValueError, match="k must be"):
        max_spread_subset(feats, 0)


def test_prune_sizes_shrink_linearly_to_keep():
    assert prune_sizes(16, 8, 2) == [12, 8]
    assert prune_sizes(16, 8, 1) == [8]
    assert prune_sizes(12, 6, 3) == [10, 8, 6]


@pytest.mark.parametrize("plan", [
    mixed_plan(uniform_grid(10), [3, 4, 5]),
    mixed_plan(uniform_grid(10), [4, 5], "dpm2"),
    flash_plan(12, (3, 4), 0.5, 3.0),
])
def test_shared_prefix_is_bitwise_unshared_sampling_with_fewer_passes(plan):
    full_calls, shared_calls = [], []
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    full = sample(_velocity(full_calls), _noise(), plan, SDENoise("flow_grpo", 0.7), generator=gen())
    shared = sample(_velocity(shared_calls), _noise(), plan, SDENoise("flow_grpo", 0.7), generator=gen(),
                    prefix_groups=G)
    assert torch.equal(full.x0, shared.x0)
    assert torch.equal(full.transitions.log_prob, shared.transitions.log_prob)
    first = plan.sde_steps[0]
    assert shared_calls == [P] * first + [P * G] * (plan.num_steps - first)
    assert shared.row_passes == P * first + P * G * (plan.num_steps - first) < full.row_passes == P * G * plan.num_steps


def test_prefix_sharing_refuses_unshared_noise():
    plan = mixed_plan(uniform_grid(6), [2])
    with pytest.raises(ValueError, match="share its initial noise"):
        sample(_velocity([]), _noise(shared=False), plan, SDENoise("flow_grpo", 0.7), prefix_groups=G)


def test_pruned_trajectories_make_no_further_model_calls():
    plan = mixed_plan(uniform_grid(8), [1, 2, 3, 4])
    calls, seen = [], []

    def select(step, x0_hat, alive):
        seen.append((step, alive.tolist()))
        return torch.arange(0, x0_hat.shape[0], 2)  # keep every other row

    out = sample(_velocity(calls), _noise(shared=False), plan, SDENoise("flow_grpo", 0.7),
                 generator=torch.Generator().manual_seed(0), prune=Pruning(frozenset({1, 3}), select))
    n = P * G
    assert calls == [n, n, n // 2, n // 2, n // 4, n // 4, n // 4, n // 4]
    assert out.row_passes == sum(calls)
    assert out.kept.tolist() == list(range(0, n, 4)) and out.x0.shape[0] == n // 4
    assert seen == [(1, list(range(n))), (3, list(range(0, n, 2)))]
    assert out.transitions.x.shape[:2] == (4, n // 4)  # earlier transitions follow the survivors
    # up to the first prune the survivors are what unpruned sampling gives those rows (after
    # it, the SDE noise is drawn for fewer rows)
    full = sample(_velocity([]), _noise(shared=False), plan, SDENoise("flow_grpo", 0.7),
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(full.transitions.x[0, ::4], out.transitions.x[0])


def test_prune_steps_outside_the_plan_or_in_the_prefix_fail():
    plan = mixed_plan(uniform_grid(6), [2, 3])
    keep_all = Pruning(frozenset({9}), lambda k, x, a: torch.arange(x.shape[0]))
    with pytest.raises(ValueError, match="outside the 6-step plan"):
        sample(_velocity([]), _noise(), plan, SDENoise("flow_grpo", 0.7), prune=keep_all)
    early = Pruning(frozenset({1}), lambda k, x, a: torch.arange(x.shape[0]))
    with pytest.raises(ValueError, match="fall in the shared prefix"):
        sample(_velocity([]), _noise(), plan, SDENoise("flow_grpo", 0.7), prune=early, prefix_groups=G)


# ---------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("branch") / "tiny")


def _weights_after_steps(cfg, steps=2):
    trainer = GRPOTrainer(cfg)
    rows = [trainer.step(i) for i in range(steps)]
    return [p.detach().clone() for p in trainer.params], rows


def test_prefix_sharing_trains_like_plain_mixgrpo(tiny_checkpoint):
    """Bitwise for a batch-invariant velocity (above); a network's matmul kernels depend on
    the batch size (P rows in the prefix, P*G after), so here the samples agree to ~1 ulp."""
    cfgs = [tiny_config(tiny_checkpoint, p, "schedule.start=2") for p in ("mixgrpo", "mixgrpo-prefix")]
    rollouts = [GRPOTrainer(c).rollout(0).rollout for c in cfgs]
    torch.testing.assert_close(rollouts[0].x0, rollouts[1].x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(rollouts[0].transitions.log_prob, rollouts[1].transitions.log_prob, atol=1e-6, rtol=0)
    (plain, rows_plain), (shared, rows_shared) = (_weights_after_steps(c) for c in cfgs)
    for a, b in zip(plain, shared, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # window at step 2 of 8: the prefix costs 2 passes per group instead of 2 per image
    assert rows_shared[0]["model_passes_per_image"] == rows_plain[0]["model_passes_per_image"] - 2 * (1 - 1 / 4)


@pytest.mark.parametrize(("preset", "base"), [("mixgrpo-prefix", "mixgrpo"), ("mixgrpo-pro", "mixgrpo"),
                                               ("pro-grpo", "flow-grpo")])
def test_with_pruning_and_prefix_off_the_presets_are_their_base_presets(tiny_checkpoint, preset, base):
    off = ["sampler.shared_prefix=false", "sampler.prune_offsets=[]", "sampler.prune_keep=null", "group_size=4"]
    a, _ = _weights_after_steps(apply_overrides(tiny_config(tiny_checkpoint, preset), off))
    b, _ = _weights_after_steps(tiny_config(tiny_checkpoint, base))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_expand_and_prune_trains_on_the_survivors(tiny_checkpoint):
    cfg = tiny_config(tiny_checkpoint, "pro-grpo", "group_size=6", "sampler.prune_keep=3", "sampler.prune_offsets=[1,3]")
    trainer = GRPOTrainer(cfg)
    batch = trainer.rollout(0)
    assert batch.group_size == 3 and batch.images.shape[0] == cfg.prompts_per_iter * 3
    assert (batch.rollout.kept // 6).tolist() == [0, 0, 0, 1, 1, 1]  # every group keeps 3 of its own
    row = trainer.step(0)
    # rows: 6 per group for steps 0-1, 4 (= prune_sizes(6, 3, 2)[0]) for 2-3, 3 after
    # plus 7 loss and 7 reference-policy passes (flow-grpo's KL) per survivor
    expected = (2 * (6 * 2 + 4 * 2 + 3 * 4) + 2 * 3 * 7 * 2) / (2 * 3)
    assert row["model_passes_per_image"] == pytest.approx(expected)


def test_prune_sizes_set_each_prunes_group_size(tiny_checkpoint):
    """Pro-GRPO's SD setting prunes 48 -> 32 -> 8, off the linear 48 -> 28 -> 8: sizes as listed."""
    cfg = tiny_config(tiny_checkpoint, "pro-grpo", "group_size=6", "sampler.prune_keep=2", "sampler.prune_offsets=[1,3]",
                      "sampler.prune_sizes=[5,2]")
    row = GRPOTrainer(cfg).step(0)
    # rows: 6 per group for steps 0-1, 5 for 2-3, 2 after; 7 loss and 7 reference passes per survivor
    expected = (2 * (6 * 2 + 5 * 2 + 2 * 4) + 2 * 2 * 7 * 2) / (2 * 2)
    assert row["model_passes_per_image"] == pytest.approx(expected)


def test_ovf_trains_only_the_max_variance_subset(tiny_checkpoint):
    trainer = GRPOTrainer(tiny_config(tiny_checkpoint, "mixgrpo", "loss.ovf_keep=2"))
    rewards = {"test-train-brightness": torch.tensor([0.1, 0.5, 0.52, 0.9, 0.3, 0.31, 0.32, 0.7])}
    adv = trainer.advantages(rewards, 4)
    assert adv.valid.tolist() == [True, False, False, True, True, False, False, True]
    assert adv.advantages[~adv.valid].abs().sum() == 0
    # mixgrpo: MixGRPO's unbiased std, so a pair's advantages are +-1/sqrt(2)
    assert torch.allclose(adv.advantages[adv.valid], torch.tensor([-1.0, 1.0, -1.0, 1.0]) / 2**0.5, atol=1e-3)


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss.ovf_keep=4"], "loss.ovf_keep must be in"),
    (["group_size=16", "sampler.prune_keep=8", "sampler.prune_offsets=[0]", "loss.ovf_keep=8"], "loss.ovf_keep must be in"),
    (["sampler.prune_keep=8", "sampler.prune_offsets=[0]"], "sampler.prune_keep must be in"),
    (["group_size=6", "sampler.prune_keep=2", "sampler.prune_offsets=[0,1]", "sampler.prune_sizes=[5,3]"],
     "sampler.prune_sizes must give one decreasing size per prune"),
    (["group_size=6", "sampler.prune_keep=2", "sampler.prune_offsets=[0,1]", "sampler.prune_sizes=[6,2]"],
     "sampler.prune_sizes must start below group_size 6"),
    (["sampler.prune_offsets=[0]"], "needs both sampler.prune_offsets"),
    (["sampler.shared_prefix=true", "sampler.shared_noise=false"], "needs sampler.shared_noise"),
    (["sampler.prune_offsets=[-1]", "sampler.prune_keep=2"], "distinct offsets >= 0"),
])
def test_bad_branching_configs_fail_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(make_preset("mixgrpo"), ["group_size=4", *overrides])


def test_a_prune_step_after_the_window_fails_at_rollout(tiny_checkpoint):
    cfg = tiny_config(tiny_checkpoint, "mixgrpo-pro", "sampler.prune_offsets=[0,5]")
    with pytest.raises(ValueError, match="falls after the window's last SDE step"):
        GRPOTrainer(cfg).rollout(0)


# ------------------------------------------------------------------ per-group noise, chunks
def test_per_group_noise_makes_a_groups_samples_independent_of_its_batch():
    """With one generator per group, sampling the groups together, one by one, or with
    pruning and a shared prefix gives each group bitwise the same samples."""
    from mixgrpo.core.sampler import concat_rollouts
    from mixgrpo.core.steps import standard_noise

    plan = mixed_plan(uniform_grid(10), [3, 4, 5])
    noise = SDENoise("flow_grpo", 0.7)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(P)]  # noqa: E731
    x1 = _noise()
    together = sample(_velocity([]), x1, plan, noise, generator=gens(), prefix_groups=G)
    parts = []
    for i, gen in enumerate(gens()):
        rows = torch.arange(i * G, (i + 1) * G)
        part = sample(_velocity([]).rows(rows), x1[rows], plan, noise, generator=[gen], prefix_groups=G)
        part.kept = part.kept + i * G
        parts.append(part)
    one_by_one = concat_rollouts(parts)
    assert torch.equal(together.x0, one_by_one.x0) and torch.equal(together.kept, one_by_one.kept)
    assert torch.equal(together.transitions.log_prob, one_by_one.transitions.log_prob)
    assert together.row_passes == one_by_one.row_passes
    assert torch.equal(standard_noise((4, 2), torch.Generator().manual_seed(3), "cpu"),
                       torch.randn(4, 2, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="cannot be split evenly"):
        standard_noise((5, 2), gens(), "cpu")


@pytest.mark.parametrize("preset", ["mixgrpo", "mixgrpo-pro"])
def test_chunked_rollout_and_background_rewards_match_the_single_call(tiny_checkpoint, preset):
    """groups_per_call only changes how the batch is cut, and rewards_in_background only
    when the scoring runs: the iteration's numbers stay the same."""
    rows = []
    for extra in (["sampler.noise_per_group=true"],
                  ["sampler.noise_per_group=true", "sampler.groups_per_call=1"],
                  ["sampler.noise_per_group=true", "sampler.groups_per_call=1", "rewards_in_background=true"]):
        trainer = GRPOTrainer(tiny_config(tiny_checkpoint, preset, *extra))
        batch = trainer.rollout(0)
        rows.append((batch, trainer.score(batch), trainer.step(1)))
    (b0, r0, s0), *rest = rows
    for batch, rewards, step in rest:
        assert torch.allclose(batch.rollout.x0, b0.rollout.x0, atol=1e-5)
        assert torch.equal(batch.rollout.kept, b0.rollout.kept) and batch.prompts == b0.prompts
        assert all(torch.allclose(rewards[n], r0[n], atol=1e-5) for n in r0)
        assert step["reward_mean"] == pytest.approx(s0["reward_mean"], abs=1e-5)
        assert step["model_passes_per_image"] == s0["model_passes_per_image"]
    assert rows[2][0].rewards is not None and rows[0][0].rewards is None


def test_chunking_options_need_per_group_noise():
    with pytest.raises(ValueError, match=r"needs sampler\.noise_per_group"):
        apply_overrides(make_preset("mixgrpo"), ["sampler.groups_per_call=1"])
    with pytest.raises(ValueError, match=r"set sampler\.groups_per_call"):
        apply_overrides(make_preset("mixgrpo"), ["rewards_in_background=true"])
