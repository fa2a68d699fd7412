"""Dynamic multi-reward weighting: the rules' known answers, an analytic toy with two
conflicting rewards where `gradient` and `constraint` keep a floor that `static` loses, and
the trainer's use of them (logging, checkpoint round trip, bad options)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from mixgrpo.core.weighting import (
    constraint_weights,
    dual_ascent,
    min_norm_coefficients,
    progress_weights,
)
from mixgrpo.train.config import WeightingConfig, apply_overrides
from mixgrpo.train.run import train
from mixgrpo.train.trainer import GRPOTrainer
from mixgrpo.train.weighting import make_weighting
from tiny_runs import make_tiny_checkpoint, tiny_config, train_interrupted_then_resumed

TWO = "rewards={test-train-brightness: 1.0, flatness: 1.0}"


# ----------------------------------------------------------------------------- the rules
def test_min_norm_coefficients_known_answers():
    def gram(*g):
        m = torch.tensor(g, dtype=torch.float64)
        return m @ m.T

    assert torch.allclose(min_norm_coefficients(gram([1.0, 0.0], [0.0, 1.0])), torch.tensor([0.5, 0.5], dtype=torch.float64))
    # one gradient inside the other's direction but shorter: all weight on the short one
    assert torch.allclose(min_norm_coefficients(gram([1.0, 0.0], [2.0, 0.0])), torch.tensor([1.0, 0.0], dtype=torch.float64))
    # opposite gradients of norms 1 and 3: the convex combination through 0 is (3/4, 1/4)
    assert torch.allclose(min_norm_coefficients(gram([1.0, 0.0], [-3.0, 0.0])), torch.tensor([0.75, 0.25], dtype=torch.float64))


def test_min_norm_coefficients_match_a_brute_force_search_for_three_rewards():
    g = torch.tensor([[1.0, 0.2, -0.3], [-0.5, 1.0, 0.1], [0.2, -0.8, 0.6]], dtype=torch.float64)
    alpha = min_norm_coefficients(g @ g.T)
    assert alpha.min() >= 0 and abs(alpha.sum().item() - 1) < 1e-12
    best = min((torch.tensor([a, b, 1 - a - b], dtype=torch.float64) @ g).norm().item()
               for a, b in itertools.product(torch.linspace(0, 1, 201).tolist(), repeat=2) if a + b <= 1)
    assert (alpha @ g).norm().item() <= best + 1e-6


def test_progress_gives_a_stalled_reward_more_weight_and_tends_to_static_at_high_temperature():
    base = torch.tensor([1.0, 1.0], dtype=torch.float64)
    fast, slow, sd = torch.tensor([0.6, 0.3]), torch.tensor([0.5, 0.3]), torch.tensor([0.05, 0.05])
    w = progress_weights(base, fast.double(), slow.double(), sd.double(), temperature=1.0)
    assert w[1] > 1 > w[0] and abs(w.sum().item() - 2) < 1e-12  # the stalled second reward gains
    w_hot = progress_weights(base, fast.double(), slow.double(), sd.double(), temperature=1e6)
    assert torch.allclose(w_hot, base, atol=1e-5)


def test_dual_ascent_grows_below_the_floor_and_returns_to_zero_above():
    lam = torch.zeros(2, dtype=torch.float64)
    floors = torch.tensor([0.0, 0.5], dtype=torch.float64)
    lam = dual_ascent(lam, floors, torch.tensor([1.0, 0.4], dtype=torch.float64), floors.abs(), lr=1.0)
    assert lam[1] == pytest.approx(0.2) and lam[0] == 0
    lam = dual_ascent(lam, floors, torch.tensor([1.0, 0.9], dtype=torch.float64), floors.abs(), lr=1.0)
    assert lam[1] == 0
    assert torch.allclose(constraint_weights(0, torch.tensor([5.0, 1.0])), torch.tensor([0.5, 0.5], dtype=torch.float64))


# ----------------------------------------------------------------------------- analytic toy
# Two conflicting rewards of a parameter theta in R^2 with exact gradients:
#   R1 = -|theta - a|^2 (the primary), R2 = -|theta - b|^2 (must stay above its floor).
A, B = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)
THETA0 = torch.tensor([0.0, 0.5], dtype=torch.float64)


def _rewards(theta):
    return torch.stack([-(theta - A).pow(2).sum(), -(theta - B).pow(2).sum()])


def _grads(theta):
    return torch.stack([-2 * (theta - A), -2 * (theta - B)])  # (2, P): ascent directions


def _toy(name: str, steps: int = 400, lr: float = 0.01, **options):
    cfg = WeightingConfig(name=name, **options)
    weighting = make_weighting(["r1", "r2"], {"r1": 1.0, "r2": 0.05}, cfg)
    theta, history = THETA0.clone(), []
    for _ in range(steps):
        g = _grads(theta)
        if weighting.needs_gradients:
            alpha = weighting.combine(g @ g.T, [0, 1])
            direction = alpha @ g
        else:
            w = torch.tensor(list(weighting.weights().values()), dtype=torch.float64)
            direction = w @ g
        theta = theta + lr * direction
        r = _rewards(theta)
        weighting.observe({"r1": r[0].item(), "r2": r[1].item()})
        history.append(r)
    return torch.stack(history), weighting


def test_static_weights_let_the_secondary_reward_fall_below_its_floor():
    floor = 0.9 * _rewards(THETA0)[1].item()  # 10% worse than the start (rewards are negative: -1.25 -> -1.375)
    history, _ = _toy("static")
    assert history[-1, 0] > _rewards(THETA0)[0]  # the primary improves
    assert history[-1, 1] < floor - 1.0  # and the secondary falls far below its floor


def test_gradient_never_lowers_either_reward():
    """MGDA's min-norm direction is a common ascent direction: with exact gradients and a small
    step neither reward ever falls (each drop would contradict <g_j, d> >= |d|^2 >= 0), and
    with ema=1 the iterate reaches the Pareto set (the segment between a and b)."""
    history, _ = _toy("gradient", ema=1.0)
    start = _rewards(THETA0)
    assert (history[:, 1] >= start[1] - 1e-12).all() and (history[:, 0] >= start[0] - 1e-12).all()
    assert (history[1:] >= history[:-1] - 1e-12).all()


def test_constraint_keeps_the_floor_while_raising_the_primary():
    start = _rewards(THETA0)
    history, weighting = _toy("constraint", steps=1500, primary="r1", floors={"r2": 1.1}, relative=True, dual_lr=0.5)
    floor = weighting.floors()["r2"]
    assert floor == pytest.approx(1.1 * history[0, 1].item())  # 10% below the first batch's (negative) reward
    # the constrained optimum: theta on the floor's circle around b, towards a
    optimum = -((A - B).norm().item() - (-floor) ** 0.5) ** 2
    assert history[-1, 0].item() == pytest.approx(optimum, abs=1e-3) and optimum > start[0]
    assert history[-200:, 1].min() >= floor - 1e-3  # held at the floor
    static, _ = _toy("static", steps=1500)
    assert static[-1, 1] < floor - 1.0  # where static weights do not hold it


# ----------------------------------------------------------------------------- in the trainer
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.mark.parametrize(("name", "extra"), [
    ("progress", ["weighting.warmup=1"]),
    ("gradient", ["optim.minibatches=1"]),  # one gradient per reward per iteration
    ("constraint", ["weighting.primary=test-train-brightness", "weighting.floors={flatness: 1.01}"]),
])
def test_each_weighting_logs_its_weights_and_resumes_bitwise(tiny_checkpoint, tmp_path, name, extra):
    cfg = tiny_config(tiny_checkpoint, "mixgrpo", TWO, f"weighting.name={name}", *extra)
    full = GRPOTrainer(cfg)
    train(cfg, tmp_path / "full", trainer=full)
    rows = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    weights = [(r["weight_flatness"], r["weight_test-train-brightness"]) for r in rows]
    assert len(set(weights)) > 1, f"{name}: the weights never moved: {weights}"
    assert (tmp_path / "full/weights_curve.png").is_file()
    train_interrupted_then_resumed(cfg, tmp_path / "cut")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full/checkpoints/iter_000003/weights.safetensors"))
    b = load_file(str(tmp_path / "cut/checkpoints/iter_000003/weights.safetensors"))
    assert any(k.startswith("state.weighting.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cut = [json.loads(x) for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert [(r["weight_flatness"], r["weight_test-train-brightness"]) for r in cut] == weights


def _flat(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params])


def test_gradient_weighting_steps_on_the_min_norm_combination(tiny_checkpoint):
    """The step's gradient is sum_j alpha_j g_j of the per-reward gradients, alpha from their Gram."""
    cfg = tiny_config(tiny_checkpoint, "mixgrpo", TWO, "weighting.name=gradient", "optim.minibatches=1", "weighting.ema=1.0",
                      "optim.grad_clip=1e9")
    trainer = GRPOTrainer(cfg)
    seen = {}
    step = trainer.optimizer.step

    def capture(*a, **k):
        seen["grad"] = _flat(trainer.params)
        return step(*a, **k)

    trainer.optimizer.step = capture
    before = [p.detach().clone() for p in trainer.params]
    trainer.step(0)
    alpha = trainer.weighting.current()
    # the per-reward gradients, recomputed one reward at a time from the same starting weights
    single = []
    for name in trainer.weighting.names:
        other = GRPOTrainer(apply_overrides(cfg, [f"rewards={{{name}: 1.0}}", "weighting.name=static"]))
        with torch.no_grad():
            for p, b in zip(other.params, before, strict=True):
                p.copy_(b)
        got = {}
        other.optimizer.step = lambda *a, got=got, o=other, **k: got.setdefault(
            "g", _flat(o.params))
        other.step(0)
        single.append(got["g"])
    g = torch.stack(single)
    assert torch.allclose(alpha, min_norm_coefficients(g @ g.T), atol=1e-6)
    expected = alpha @ g
    assert (seen["grad"] - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize(("extra", "match"), [
    (["weighting.name=bogus"], "weighting.name 'bogus' is not one of"),
    (["weighting.name=progress", "rewards={flatness: 1.0}"], "weighs several rewards; this config has one"),
    (["weighting.name=constraint", TWO], "weighting.primary must name the reward to maximise"),
    (["weighting.name=constraint", TWO, "weighting.primary=flatness", "weighting.floors={nope: 0.9}"],
     "weighting.floors must map the other rewards"),
    (["weighting.name=gradient", TWO, "optim.inner_epochs=2"], "needs optim.inner_epochs=1"),
    (["weighting.name=gradient", TWO], "optim.minibatches=1"),  # the mixgrpo preset takes 4 steps per rollout
    (["weighting.name=progress", TWO, "weighting.temperature=0"], "weighting.temperature must be > 0"),
])
def test_bad_weighting_options_are_one_line_errors(tiny_checkpoint, extra, match):
    with pytest.raises(ValueError, match=match) as err:
        tiny_config(tiny_checkpoint, "mixgrpo", *extra).validate()
    assert "\n" not in str(err.value)


def test_a_checkpoint_without_weighting_state_is_refused_by_a_dynamic_run(tiny_checkpoint):
    static = GRPOTrainer(tiny_config(tiny_checkpoint, "mixgrpo", TWO))
    state = {k: v for k, v in static.trainable_state().items() if not k.startswith("state.weighting.")}
    dynamic = GRPOTrainer(tiny_config(tiny_checkpoint, "mixgrpo", TWO, "weighting.name=progress"))
    with pytest.raises(ValueError, match=r"holds no state\.weighting\.seen"):
        dynamic.load_trainable_state(state)


@pytest.mark.parametrize("preset", ["branch-grpo", "nft"])
def test_dynamic_weights_reach_tree_and_forward_process_presets(tiny_checkpoint, tmp_path, preset):
    """Dynamic weights run with BranchGRPO's tree advantages and NFT's forward-process loss."""
    cfg = tiny_config(tiny_checkpoint, preset, TWO, "weighting.name=progress", "weighting.warmup=1",
                      "weighting.temperature=0.01", "iterations=3")
    trainer = GRPOTrainer(cfg)
    train(cfg, tmp_path / "run", trainer=trainer)
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["weight_flatness"] != rows[0]["weight_flatness"]
