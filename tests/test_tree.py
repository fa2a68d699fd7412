"""BranchGRPO's tree rollouts and per-depth advantages.

The advantage test transcribes Fredreic1849/BranchGRPO @ 19fbb9f,
``fastvideo/train_branchgrpo_flux.py``: an explicit tree of nodes, internal rewards the mean
of their leaf descendants (``compute_node_rewards`` without ``--tree_prob_weighted``), then
``compute_hierarchical_advantages_by_depth``: per depth, ``(R - mean) / (std + 1e-8)`` with
torch's unbiased std, 0 when ``std < 1e-6`` or one node; edges clipped to +-5.
"""

from __future__ import annotations

import pytest
import torch

from mixgrpo.core.grids import uniform_grid
from mixgrpo.core.sampler import mixed_plan
from mixgrpo.core.steps import SDENoise, gaussian_log_prob, sde_moments
from mixgrpo.core.tree import nodes_per_tree, sample_tree, tree_advantages


class _Node:
    def __init__(self, depth, parent=None):
        self.depth, self.parent, self.children, self.reward = depth, parent, [], None

    def leaves(self):
        return [self] if not self.children else [leaf for c in self.children for leaf in c.leaves()]


def _reference_tree(rewards, splits, num_steps):
    """Grow the reference's tree (one child per step, two at a split), leaves left to right."""
    root = _Node(0)
    level = [root]
    for step in range(num_steps):
        nxt = []
        for node in level:
            for _ in range(2 if step in splits else 1):
                child = _Node(node.depth + 1, node)
                node.children.append(child)
                nxt.append(child)
        level = nxt
    for leaf, r in zip(root.leaves(), rewards, strict=True):
        leaf.reward = torch.as_tensor(r, dtype=torch.float64)
    by_depth = {}
    stack = [root]
    while stack:
        node = stack.pop()
        by_depth.setdefault(node.depth, []).append(node)
        stack.extend(node.children)
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            if node.children:
                node.reward = torch.stack([leaf.reward for leaf in node.leaves()]).mean()
    for nodes in by_depth.values():
        if len(nodes) <= 1:
            for node in nodes:
                node.advantage = torch.tensor(0.0, dtype=torch.float64)
            continue
        r = torch.stack([n.reward for n in nodes])
        std = r.std()
        a = torch.zeros_like(r) if std < 1e-6 else (r - r.mean()) / (std + 1e-8)
        for node, ai in zip(nodes, a, strict=True):
            node.advantage = ai
    return root


@pytest.mark.parametrize(("splits", "num_steps", "seed"), [([0, 3, 6, 9], 19, 0), ([2, 5], 8, 1), ([0, 1, 2], 5, 2)])
def test_tree_advantages_match_the_reference(splits, num_steps, seed):
    leaves = 2 ** len(splits)
    rewards = torch.rand(3, leaves, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10
    rewards[1] = rewards[1].round()  # ties: some nodes equal
    ours, mask = tree_advantages(rewards, splits, list(range(num_steps)))
    for p in range(3):
        root = _reference_tree(rewards[p], splits, num_steps)
        for j, leaf in enumerate(root.leaves()):
            path = []
            node = leaf
            while node.parent is not None:
                path.append(node)
                node = node.parent
            path.reverse()  # path[k]: the child made by step k
            for k in range(num_steps):
                expected = path[k].advantage.clamp(-5, 5)
                torch.testing.assert_close(ours[p * leaves + j, k], expected, rtol=1e-12, atol=1e-12)
                first = path[k].leaves()[0] is leaf  # each edge trained once, by its first leaf
                assert bool(mask[p * leaves + j, k]) == first
    # edges per tree: sum over steps of the nodes each step makes
    assert int(mask.view(3, leaves, -1)[0].sum()) == sum(nodes_per_tree(splits, k) for k in range(num_steps))


def test_tree_rollout_shares_prefixes_and_scores_splits_at_the_unscaled_std():
    torch.manual_seed(0)
    grid = uniform_grid(6, shift=3.0)
    plan = mixed_plan(grid, range(5))
    splits, leaves = [1, 3], 4
    calls = []

    class Velocity:
        def __init__(self, rows=None):
            self.index = rows

        def __call__(self, x, t):
            calls.append(x.shape[0])
            return 0.3 * x + t.view(-1, 1, 1, 1)

        def rows(self, index):
            return Velocity(index)

    x1 = torch.randn(2, 1, 3, 4, 4).expand(2, leaves, 3, 4, 4).reshape(8, 3, 4, 4)
    noise = SDENoise("dance", 0.3)
    out = sample_tree(Velocity(), x1, plan, noise, splits, 4.0, group_size=leaves,
                      generator=torch.Generator().manual_seed(1))
    assert calls == [2, 2, 4, 4, 8, 8] and out.row_passes == 28  # one pass per node (the last step Euler)
    tr = out.transitions
    for k in range(5):
        nodes = nodes_per_tree(splits, k) * 2
        same = tr.x_next[k].view(nodes, 8 // nodes, -1)
        assert torch.equal(same, same[:, :1].expand_as(same))  # leaves of one node agree
        assert not torch.equal(tr.x_next[k][0], tr.x_next[k][8 // nodes]) if nodes < 8 else True
    for k in range(5):
        v = 0.3 * tr.x[k] + float(grid[k])
        mean, std = sde_moments(tr.x[k], v, float(grid[k]), float(grid[k + 1]), noise)
        torch.testing.assert_close(tr.log_prob[k], gaussian_log_prob(tr.x_next[k], mean, std, "mean"))
        spread = ((tr.x_next[k] - mean) / std).std().item()
        assert (spread > 2.5) == (k in splits)  # split children carry kappa = 4 times the noise
