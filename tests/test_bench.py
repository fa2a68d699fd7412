"""`mixgrpo bench`: interleaved runs, the report's figures, and the CLI on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mixgrpo.bench.arms import ablation_arms, compression_for_steps, preset_arms, split_presets
from mixgrpo.bench.report import markdown, mean_ci, summarise
from mixgrpo.bench.runner import ArmResult, eval_points
from mixgrpo.cli import app
from mixgrpo.core.sampler import flash_plan
from tiny_runs import make_tiny_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_overrides(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("bench") / "tiny")
    return [f"model.checkpoint={ckpt}", "sampler.num_steps=10", "eval_prompts=8", "optim.micro_batch=8",
            "rewards={test-train-brightness: 1.0}"]


def _result(label, seed, times, evals):
    r = ArmResult(label, seed, iter_times=list(times), model_passes=[10] * len(times), train_rewards=[0.0] * len(times))
    elapsed = 0.0
    for it, reward in evals:
        elapsed = sum(times[:it])
        r.evals.append((it, elapsed, {"reward_mean": reward, "reward_x": reward}))
    return r


def test_mean_ci_is_a_t_interval_over_seeds():
    from scipy.stats import t

    stat = mean_ci([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["ci95"] == pytest.approx(t.ppf(0.975, 2) * 1.0 / 3**0.5)
    assert mean_ci([0.5]) == {"mean": 0.5, "ci95": None}


def test_eval_points_include_start_and_end():
    assert eval_points(60, 4) == [0, 15, 30, 45, 60]
    assert eval_points(3, 4) == [0, 1, 2, 3]


def test_summary_ratios_gains_and_time_to_target():
    results = [
        _result("dance-grpo", 0, [4.0] * 4, [(0, 0.4), (2, 0.5), (4, 0.6)]),
        _result("mixgrpo", 0, [2.0] * 4, [(0, 0.4), (2, 0.65), (4, 0.7)]),
        _result("slow", 0, [1.0] * 4, [(0, 0.4), (2, 0.45), (4, 0.5)]),
    ]
    rows = {r["preset"]: r for r in summarise(results)}
    assert rows["mixgrpo"]["time_ratio_vs_dance_grpo"] == 0.5
    assert rows["mixgrpo"]["reward_gain"]["mean"] == pytest.approx(0.3)
    assert rows["mixgrpo"]["time_to_target_s"] == 4.0  # reached 0.6 after 2 iterations of 2 s
    assert rows["dance-grpo"]["time_to_target_s"] == 16.0
    assert rows["slow"]["time_to_target_s"] is None and rows["slow"]["paper_time_ratio"] is None
    flat = {r["preset"]: r for r in summarise([_result("dance-grpo", 0, [1.0], [(0, 0.5), (1, 0.45)]),
                                                _result("mixgrpo", 0, [1.0], [(0, 0.5), (1, 0.6)])])}
    assert flat["mixgrpo"]["target_reward"] is None and flat["mixgrpo"]["time_to_target_s"] is None
    no_reference = summarise([_result("mixgrpo", 0, [1.0], [(0, 0.1), (1, 0.2)])])
    assert no_reference[0]["time_ratio_vs_dance_grpo"] is None and no_reference[0]["time_to_target_s"] is None


def test_paper_ratio_sits_beside_the_measured_ratio_and_depends_on_the_preset_alone():
    """The measured ratio is a ratio of median iteration times over every iteration of every
    seed; the paper's figure is looked up by preset (a variant with its own overrides is not
    the paper's configuration) and never moves with what was measured."""

    def results(scale):
        times = {"dance-grpo": [[4, 4, 40], [4, 3, 5]], "mixgrpo": [[1, 2, 30], [2, 2, 3]],
                 "mixgrpo-flash": [[1, 1, 1], [1, 1, 1]], "mixgrpo[schedule.size=2]": [[2, 2, 2], [2, 2, 2]]}
        return [_result(label, seed, [scale * t for t in ts], [(0, 0.4), (3, 0.5)])
                for label, per_seed in times.items() for seed, ts in enumerate(per_seed)]

    rows = {r["preset"]: r for r in summarise(results(1.0))}
    assert rows["dance-grpo"]["iter_time_s"] == 4 and rows["mixgrpo"]["iter_time_s"] == 2  # medians, not means
    assert rows["mixgrpo"]["time_ratio_vs_dance_grpo"] == 0.5
    assert rows["mixgrpo-flash"]["time_ratio_vs_dance_grpo"] == 0.25
    paper = {k: r["paper_time_ratio"] for k, r in rows.items()}
    assert paper["dance-grpo"] == 1.0 and 0 < paper["mixgrpo-flash"] < paper["mixgrpo"] < 1
    assert paper["mixgrpo[schedule.size=2]"] is None
    slower = {r["preset"]: r for r in summarise(results(7.0))}
    assert {k: r["paper_time_ratio"] for k, r in slower.items()} == paper
    assert slower["mixgrpo"]["time_ratio_vs_dance_grpo"] == pytest.approx(0.5)
    # the table puts each figure in its own column
    header, _, *lines = markdown(list(rows.values()), "t").splitlines()[2:]
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in lines if line.startswith("| ")}
    measured, cited = columns.index("time ratio vs DanceGRPO"), columns.index("paper ratio (FLUX)")
    assert cells["mixgrpo"][measured] == "0.500" and cells["mixgrpo-flash"][measured] == "0.250"
    assert cells["mixgrpo"][cited] == f"{paper['mixgrpo']:.3f}" and cells["mixgrpo[schedule.size=2]"][cited] == "—"


def test_quick_scales_every_preset_it_runs_including_the_pruning_ones(tmp_path):
    """--quick trains groups of 4: plain presets sample 4, Expand-and-Prune presets keep their
    2x expansion (8 sampled, pruned to 4); a --set still wins over the scaling."""
    from mixgrpo.bench import plan_bench

    names = ["dance-grpo", "mixgrpo", "pro-grpo", "mixgrpo-pro", "mixgrpo-prefix"]
    plan = plan_bench(tmp_path / "b", presets=names, quick=True)
    shapes = {a.label: (a.config.group_size, a.config.sampler.prune_keep, a.config.sampler.prune_offsets)
              for a in plan.arms}
    assert shapes == {"dance-grpo": (4, None, []), "mixgrpo": (4, None, []), "mixgrpo-prefix": (4, None, []),
                      "pro-grpo": (8, 4, [2, 5]), "mixgrpo-pro": (8, 4, [0, 1])}
    assert plan.arms[2].config.prompts_per_iter == 2 and plan.arms[2].config.eval_prompts == 64
    mine = plan_bench(tmp_path / "c", presets=["pro-grpo"], quick=True, overrides=["group_size=12"])
    assert (mine.arms[0].config.group_size, mine.arms[0].config.sampler.prune_keep) == (12, 4)
    full = plan_bench(tmp_path / "d", presets=["pro-grpo"])  # without --quick: the preset as it is
    assert (full.arms[0].config.group_size, full.arms[0].config.sampler.prune_keep) == (16, 8)


@pytest.mark.parametrize("total", [8, 10, 12, 16])
def test_flash_step_ablation_hits_the_asked_step_count(total):
    r = compression_for_steps(total, 25, (0, 1, 2, 3), 3.0)
    assert flash_plan(25, (0, 1, 2, 3), r, 3.0).num_steps == total
    with pytest.raises(ValueError, match="no Flash compression"):
        compression_for_steps(40, 25, (0, 1, 2, 3), 3.0)


def test_window_ablation_varies_one_factor_at_a_time():
    arms = ablation_arms("window", [])
    assert [a.label for a in arms][:4] == ["w=1 s=1 sliding", "w=2 s=1 sliding", "w=4 s=1 sliding", "w=8 s=1 sliding"]
    assert {(a.config.schedule.size, a.config.schedule.stride, a.config.schedule.name) for a in arms[4:]} == {
        (4, 2, "progressive"), (4, 1, "random"), (4, 1, "fixed")}
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_arms("lr", [])


def test_ovf_ablation_compares_subsets_with_the_full_group():
    arms = ablation_arms("ovf", [])
    assert [a.label for a in arms] == ["all 8 of 8", "OVF 6 of 8", "OVF 4 of 8", "all 6 of 6"]
    assert [(a.config.group_size, a.config.loss.ovf_keep) for a in arms] == [(8, None), (8, 6), (8, 4), (6, None)]
    # the OVF arms sample exactly what the full group samples: only the trained subset differs
    assert all(a.config.sampler == arms[0].config.sampler and a.config.schedule == arms[0].config.schedule for a in arms)
    with pytest.raises(ValueError, match="needs group_size >= 5"):
        ablation_arms("ovf", ["group_size=4"])


def test_preset_variants_carry_their_own_overrides():
    specs = split_presets("dance-grpo, mixgrpo-flash-star[loss.ovf_keep=4;schedule.size=2],mixgrpo")
    assert specs == ["dance-grpo", "mixgrpo-flash-star[loss.ovf_keep=4;schedule.size=2]", "mixgrpo"]
    arms = preset_arms(specs, ["group_size=6"])
    assert [a.label for a in arms] == specs
    variant = arms[1].config
    assert (variant.loss.ovf_keep, variant.schedule.size, variant.group_size) == (4, 2, 6)
    assert arms[0].config.group_size == 6 and arms[2].config.loss.ovf_keep is None
    for text, match in [("mixgrpo[loss.ovf_keep=4", "never closed"), ("mixgrpo]", "unbalanced"),
                        ("mixgrpo[[a=1]]", "nested")]:
        with pytest.raises(ValueError, match=match):
            split_presets(text)
    with pytest.raises(ValueError, match="nothing after"):
        preset_arms(["mixgrpo[loss.ovf_keep=4]x"], [])
    with pytest.raises(ValueError, match="twice"):
        preset_arms(["mixgrpo", "mixgrpo"], [])


def test_bench_quick_writes_every_file_and_key(tiny_overrides, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--quick", "--out", str(out), "--iterations", "2"]
    for o in tiny_overrides:
        args += ["--set", o]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    rows = {r["preset"]: r for r in data["rows"]}
    assert set(rows) == {"dance-grpo", "mixgrpo", "mixgrpo-flash"}
    keys = {"preset", "seeds", "model_passes_per_image", "iter_time_s", "time_ratio_vs_dance_grpo",
            "final_eval_reward", "reward_gain", "time_to_target_s"}
    for row in rows.values():
        assert keys <= set(row) and set(row["final_eval_reward"]) == {"mean", "ci95"}
        assert row["iterations"] == 2 and row["seeds"] == [0]
    assert rows["dance-grpo"]["time_ratio_vs_dance_grpo"] == 1.0
    # fewer model passes is the whole point of the window and of Flash
    assert rows["mixgrpo-flash"]["model_passes_per_image"] < rows["mixgrpo"]["model_passes_per_image"] \
        < rows["dance-grpo"]["model_passes_per_image"]
    assert "paper ratio" in (out / "bench.md").read_text()
    for png in ("reward_vs_time.png", "reward_vs_iteration.png"):
        assert (out / png).stat().st_size > 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "not empty" in again.output


def test_bench_window_ablation_runs_every_variant(tiny_overrides, tmp_path):
    args = ["bench", "--ablate", "window", "--out", str(tmp_path / "abl"), "--seeds", "2", "--iterations", "1",
            "--set", "prompts_per_iter=1", "--set", "group_size=2"]
    for o in tiny_overrides:
        args += ["--set", o]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "abl" / "bench.json").read_text())["rows"]
    assert len(rows) == 7 and all(r["seeds"] == [0, 1] for r in rows)
    assert all(r["final_eval_reward"]["ci95"] is not None for r in rows)


def test_flux_shaped_gpu_mode_runs_the_real_model_path(tmp_path):
    """The GPU mode on the CPU, at a tiny width: it builds the FLUX-shaped pipeline and its
    embeddings, trains every arm through model.kind=flux and reports costs (peak memory is
    null off CUDA)."""
    pytest.importorskip("diffusers")
    from mixgrpo.bench import FluxShape, plan_bench, run_bench

    shape = FluxShape(double_blocks=1, single_blocks=1, heads=1, text_tokens=8, prompts=4)
    plan = plan_bench(tmp_path / "gpu", presets=["dance-grpo", "mixgrpo"], iterations=1, flux_shape=shape,
                      overrides=["model.image_size=64", "prompts_per_iter=1", "group_size=2", "sampler.num_steps=6",
                                 "schedule.size=2", "eval_prompts=2"])
    assert plan.seeds == 1 and "FLUX-shaped: hidden 128" in plan.title
    assert all(a.config.model.kind == "flux" and a.config.model.dtype == "bfloat16" for a in plan.arms)
    rows = run_bench(plan)
    assert [r["preset"] for r in rows] == ["dance-grpo", "mixgrpo"]
    assert rows[1]["model_passes_per_image"] < rows[0]["model_passes_per_image"]
    cuda = torch.cuda.is_available()  # the FLUX-shaped arms train on the GPU when there is one
    assert all((r["peak_memory_gb"] is None) != cuda and r["iter_time_s"] > 0 for r in rows)
    config = json.loads((tmp_path / "gpu" / "model" / "pipe" / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_single_layers"], config["joint_attention_dim"]) == (1, 1, 4096)


def test_flux_shaped_cli_rejects_bad_shapes(tmp_path):
    result = runner.invoke(app, ["bench", "--out", str(tmp_path / "x"), "--flux-shaped", "--flux-blocks", "2"])
    assert result.exit_code == 2 and "double,single" in result.output
    result = runner.invoke(app, ["bench", "--out", str(tmp_path / "x"), "--flux-shaped", "--flux-heads", "0"])
    assert result.exit_code == 2 and "--flux-heads" in result.output


def test_time_to_dance_reward_is_paired_by_seed_and_interpolated():
    """Seed 0: DanceGRPO ends at 0.6 and first reaches it at 16 s; the arm crosses 0.6 half way
    between 0.5 (2 s) and 0.7 (4 s): 3 s, ratio 3/16. Seed 1: target 0.5, reached at 8 s by
    DanceGRPO, at 1 s by the arm: 1/8. Seed 2: DanceGRPO ended below its start, no target."""
    from mixgrpo.bench.report import crossing_time, time_to_reference

    dance = [_result("dance-grpo", 0, [4.0] * 4, [(0, 0.4), (2, 0.5), (4, 0.6)]),
             _result("dance-grpo", 1, [4.0] * 4, [(0, 0.4), (2, 0.5), (4, 0.5)]),
             _result("dance-grpo", 2, [4.0] * 4, [(0, 0.4), (2, 0.5), (4, 0.3)])]
    arm = [_result("x", 0, [1.0] * 4, [(0, 0.4), (2, 0.5), (4, 0.7)]),
           _result("x", 1, [1.0] * 4, [(0, 0.4), (1, 0.5), (4, 0.45)]),
           _result("x", 2, [1.0] * 4, [(0, 0.4), (4, 0.9)])]
    assert crossing_time(dance[0], 0.6) == 16.0 and crossing_time(arm[0], 0.6) == pytest.approx(3.0)
    stat = time_to_reference(arm, dance)
    assert stat["undefined"] == 1 and stat["never"] == 0
    assert stat["ratio"]["mean"] == pytest.approx((3 / 16 + 1 / 8) / 2)
    slow = [_result("x", 0, [1.0] * 4, [(0, 0.4), (4, 0.55)])]
    assert time_to_reference(slow, dance) == {"ratio": None, "never": 1, "undefined": 0}


def test_frontier_names_the_newer_methods_beside_the_baselines():
    from mixgrpo.bench.arms import ARM_SETS

    arms = preset_arms(["frontier", "mixgrpo-cps"], [])
    assert [a.label for a in arms] == [*ARM_SETS["frontier"], "mixgrpo-cps"]
    assert {a.config.loss.objective for a in arms} == {"grpo", "nft", "awm"}
    with pytest.raises(ValueError, match="names an arm twice"):
        preset_arms(["frontier", "nft"], [])
