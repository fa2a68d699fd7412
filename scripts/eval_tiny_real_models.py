"""`mixgrpo eval` with the paper's rewards on a tiny FLUX run and a tiny SD3 run, end to end.

    OMP_NUM_THREADS=1 python scripts/eval_tiny_real_models.py [--folder DIR] [--doc docs/eval_tiny_real_models.md]

Builds, in ``--folder`` (default: a new temporary folder), everything offline:

* a tiny random FLUX and SD3 diffusers pipeline (tests/tiny_pipelines.py) and a 2-iteration
  LoRA MixGRPO run on each (flatness reward);
* toy-size random reward checkpoints in the official layouts (tests/tiny_rewards.py):
  ``HPS_v2.1_compressed.pt`` + CLIP tokenizer, PickScore and CLIP-score transformers CLIP
  folders, ``ImageReward.pt`` + BERT vocab, a Llava folder for ``vlm-judge``; and
  ``reward_options.yaml`` pointing at them;
* 64 distinct prompts (``prompts.txt``);

then runs the installed ``mixgrpo eval`` (a subprocess of ``.venv/bin/mixgrpo``, the user's path)
on each run and its pipeline folder at ``--blend 0,0.2`` with hps, pickscore, imagereward,
clipscore and vlm-judge, times each call, and writes the Markdown report ``--doc``: the exact
commands, the tables as the CLI printed them and the wall times.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

REWARDS = "hps,pickscore,imagereward,clipscore,vlm-judge"
TRAIN_PROMPTS = ["two red circles", "a photo of a cat", "one blue square", "three green triangle"]
SIDE, STEPS = 16, 6
COUNTS, COLOURS, SHAPES = ["one", "two", "three"], ["red", "blue", "green", "yellow"], ["circles", "squares", "triangle"]
# (kind, extra eval options): SD3 is sampled with classifier-free guidance (2 passes per step)
KINDS = [("flux", []), ("sd3", ["--cfg", "4.5"])]


def eval_prompts(n: int = 64) -> list[str]:
    """``n`` distinct prompts in the tiny pipelines' words."""
    plain = [f"{c} {col} {s}" for c in COUNTS for col in COLOURS for s in SHAPES]
    prompts = plain + [f"a photo of {p}" for p in plain]
    assert len(set(prompts)) >= n
    return prompts[:n]


def build(folder: Path) -> None:
    """Pipelines, runs, reward checkpoints, options and prompts in ``folder`` (names relative to it)."""
    import yaml

    from mixgrpo.text.preprocess import preprocess_prompts
    from mixgrpo.train.config import apply_overrides
    from mixgrpo.train.presets import make_preset
    from mixgrpo.train.run import train
    from tiny_pipelines import make_tiny_flux_pipeline, make_tiny_sd3_pipeline
    from tiny_rewards import make_reward_checkpoints, reward_options

    for kind, make in (("flux", make_tiny_flux_pipeline), ("sd3", make_tiny_sd3_pipeline)):
        if (folder / f"{kind}-run" / "config.yaml").is_file():
            continue
        pipe = make(folder / kind)
        emb = preprocess_prompts(pipe, TRAIN_PROMPTS, folder / f"{kind}-emb", max_sequence_length=16)
        cfg = apply_overrides(make_preset("mixgrpo"), [
            f"model.kind={kind}", f"model.path={pipe}", f"model.embeddings={emb}", f"model.image_size={SIDE}",
            *(["model.flux_guidance=3.5"] if kind == "flux" else []), "sampler.shift=scheduler", "iterations=2",
            "prompts_per_iter=2", "group_size=3", f"sampler.num_steps={STEPS}", "schedule.size=2",
            "schedule.interval=1", "eval_prompts=2", "eval_every=2", "checkpoint_every=2", "optim.micro_batch=6",
            "rewards={flatness: 1.0}", "model.lora_rank=4", "model.lora_alpha=8", "optim.lr=3e-2"])
        train(cfg, folder / f"{kind}-run")
    make_reward_checkpoints(folder / "rewards")
    options = reward_options(Path("rewards"))  # relative: the commands run in `folder`
    (folder / "reward_options.yaml").write_text(yaml.safe_dump(options, sort_keys=False))
    (folder / "prompts.txt").write_text("\n".join(eval_prompts()) + "\n")


def run_eval(folder: Path, kind: str, extra: list[str], limit: int | None = None) -> dict:
    exe = Path(sys.prefix) / "bin" / "mixgrpo"
    if not exe.is_file():
        exe = ROOT / ".venv" / "bin" / "mixgrpo"
    args = ["eval", "--checkpoint", f"{kind}-run", "--checkpoint", kind, "--image-size", str(SIDE),
            "--blend", "0,0.2", "--rewards", REWARDS, "--reward-options", "reward_options.yaml",
            "--prompts", "prompts.txt", "--steps", str(STEPS), *extra, "--out", f"eval/{kind}.json"]
    if limit is not None:  # the fixed cost: start-up, loading, one prompt per (checkpoint, blend)
        args[-2:] = ["--limit", str(limit), "--out", f"eval/{kind}-limit{limit}.json"]
    # COLUMNS: the CLI prints the table through rich, which wraps rows at the terminal width
    # (80 when piped); a wide virtual terminal keeps each row on one line
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIXGRPO_CACHE": str(folder / "cache"), "COLUMNS": "400"}
    start = time.perf_counter()
    proc = subprocess.run([str(exe), *args], cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"mixgrpo eval ({kind}) failed with exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    printed = "".join(line + "\n" for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("|"))
    written = (folder / args[-1]).with_suffix(".md").read_text()
    if printed != written:
        sys.exit(f"the table {kind} printed differs from {args[-1]}:\n{printed}\n---\n{written}")
    return {"kind": kind, "command": "mixgrpo " + shlex.join(args), "seconds": seconds, "table": printed}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(results: list[dict], fixed: dict[str, float], folder: Path, n_prompts: int, load: float) -> str:
    import yaml

    cpu = f"{os.cpu_count()}-core CPU ({cpu_model()})"
    options = yaml.safe_dump(yaml.safe_load((folder / "reward_options.yaml").read_text()), sort_keys=False)
    lines = [
        "# `mixgrpo eval` with the paper's rewards on tiny FLUX and SD3 runs",
        "",
        "Written by `scripts/eval_tiny_real_models.py` (run it again to regenerate this page).",
        "",
        "MixGRPO's Table 1 reports HPS-v2.1, PickScore, ImageReward and CLIP score; we add `vlm-judge`. "
        "This page shows `mixgrpo eval` producing that table end to end, offline, for a tiny FLUX run and a "
        "tiny SD3 run: each reward is loaded from a checkpoint in its **official layout** "
        "(`HPS_v2.1_compressed.pt`, PickScore's and CLIP's transformers folders, `ImageReward.pt`, a Llava "
        "folder), given to the CLI with `--reward-options`.",
        "",
        "> **The scores are not meaningful.** Every model here (the pipelines and all five reward "
        "checkpoints) is a random toy-size network built by `tests/tiny_pipelines.py` and "
        "`tests/tiny_rewards.py`. Only the plumbing is shown: the official file layouts load, every "
        "reward has a column, each cell is `mean ± 95% CI` over the prompts, both blends are evaluated "
        "and NFE counts the model passes per image. Do not compare the values with the paper's.",
        "",
        "## Setup",
        "",
        "* Checkpoints evaluated: `<kind>-run`, a 2-iteration LoRA MixGRPO run (rank 4, flatness reward), "
        "and `<kind>`, its diffusers pipeline folder (the base model; a pipeline folder is its own base, so "
        "its blend 0 and 0.2 rows are the same).",
        f"* {n_prompts} distinct prompts (`prompts.txt`), one seed each, {SIDE}x{SIDE} px, {STEPS} Euler steps; "
        "`--blend 0,0.2` (0.2 = MixGRPO's last 20% of the steps with the base model: here 1 of 6 steps). "
        "FLUX runs with its distilled guidance (NFE = steps); SD3 with `--cfg 4.5` (NFE = 2 x steps).",
        "* `reward_options.yaml` (paths relative to the folder the commands run in):",
        "",
        "```yaml",
        options.rstrip(),
        "```",
        "",
        "## Commands and wall time",
        "",
        "`WORK` is the folder the script built everything in (`--folder`); the commands run there, with "
        "the `mixgrpo` of the project's virtual environment.",
        "",
        f"Measured on this machine: {cpu}, `OMP_NUM_THREADS=1`, float32; the 1-minute load average was "
        f"{load:.1f} when the script started (other jobs shared the cores). The time is "
        "`time.perf_counter()` around the whole `mixgrpo eval` subprocess, so it includes Python start-up, "
        "loading the two checkpoints and the five reward models, encoding the prompts with the pipelines' "
        f"text encoders (once; cached in `MIXGRPO_CACHE`), sampling 4 x {n_prompts} images and scoring them. "
        "The last column is the same command with `--limit 1` run afterwards (prompt embeddings cached): "
        "roughly the fixed cost of start-up and loading.",
        "",
        f"| model | images scored | wall time, {n_prompts} prompts (s) | same with `--limit 1` (s) |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['kind'].upper()} | {4 * n_prompts} (2 checkpoints x 2 blends x {n_prompts}) | "
                     f"{r['seconds']:.1f} | {fixed[r['kind']]:.1f} |")
    lines += [""]
    for r in results:
        lines += ["```bash", f"cd WORK && OMP_NUM_THREADS=1 MIXGRPO_CACHE=WORK/cache COLUMNS=400 {r['command']}", "```", ""]
    for r in results:
        lines += [f"## {r['kind'].upper()}", "", "As `mixgrpo eval` printed it (also written to "
                  f"`eval/{r['kind']}.md`; per-prompt scores in `eval/{r['kind']}.json`):", "", r["table"].rstrip(), ""]
    lines += [
        "## Notes",
        "",
        "* The CLI prints the table through rich; these runs set `COLUMNS=400` because at the default "
        "width of a pipe (80 columns) rich wraps each row mid-line (the `.md` file beside the JSON is "
        "always intact).",
        "* CLIP score is `100 * max(cos, 0)`; the toy CLIP folders are random, so their cosines "
        "(and any ranking between rows) are noise.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "eval_tiny_real_models.md")
    args = parser.parse_args()
    folder = (args.folder or Path(tempfile.mkdtemp(prefix="mixgrpo-tiny-eval-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"building tiny pipelines, runs and reward checkpoints in {folder}", flush=True)
    build(folder)
    results, fixed = [], {}
    for kind, extra in KINDS:
        results.append(run_eval(folder, kind, extra))
        print(f"{kind}: {results[-1]['seconds']:.1f} s\n{results[-1]['table']}", flush=True)
        fixed[kind] = run_eval(folder, kind, extra, limit=1)["seconds"]
        print(f"{kind} --limit 1: {fixed[kind]:.1f} s", flush=True)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(report(results, fixed, folder, len(eval_prompts()), load))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
