"""What the Qwen-Image, FLUX.2 and Wan adapter tests share: a tiny run's config, two GRPO
iterations that must move only the adapter, and the exports diffusers must load back."""

from __future__ import annotations

from pathlib import Path

import torch

from mixgrpo.inference.diffusers_models import make_velocity_model
from mixgrpo.inference.generate import noise_shape
from mixgrpo.inference.policy import export_run, load_policy
from mixgrpo.train.config import apply_overrides
from mixgrpo.train.presets import make_preset
from mixgrpo.train.run import train
from mixgrpo.train.trainer import GRPOTrainer

PROMPTS = ["two red circles", "a photo of a cat left of a blue square", "one yellow triangle"]
SIDE, STEPS = 16, 6  # pixels per side; Euler steps


def run_config(kind: str, pipe: Path, emb: Path, preset: str, *extra: str):
    """Two iterations of ``preset`` on the tiny pipeline, 3 images per prompt, 6 steps."""
    return apply_overrides(make_preset(preset), [
        f"model.kind={kind}", f"model.path={pipe}", f"model.embeddings={emb}", f"model.image_size={SIDE}",
        "iterations=2", "prompts_per_iter=2", "group_size=3", f"sampler.num_steps={STEPS}", "schedule.size=2",
        "schedule.interval=1", "eval_prompts=2", "eval_every=2", "checkpoint_every=2", "optim.micro_batch=6",
        "rewards={flatness: 1.0}", "optim.lr=3e-2", *extra,
    ])


def train_lora(kind: str, pipe: Path, emb: Path, preset: str, out: Path, *extra: str) -> GRPOTrainer:
    """Train a LoRA run; its base weights must stay bitwise, its adapter must move."""
    cfg = run_config(kind, pipe, emb, preset, "model.lora_rank=4", "model.lora_alpha=8", *extra)
    trainer = GRPOTrainer(cfg)
    transformer = trainer.backend.lora_module
    base = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n}
    assert base and lora
    summary = train(cfg, out, trainer=trainer)
    assert summary["iterations"] == 2 and (out / "checkpoints" / "latest.json").is_file()
    after = dict(transformer.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())  # the base: bitwise unchanged
    assert any(not torch.equal(after[n], v) for n, v in lora.items())  # the adapter learned
    assert all(not p.requires_grad for n, p in transformer.named_parameters() if "lora_" not in n)
    trainer.model.eval()
    return trainer


def probe(model, cond, seed: int = 0) -> torch.Tensor:
    """One velocity on fixed random latents of the model's shape, at times from 0.7 down to 0.3."""
    x = torch.randn(len(cond), *noise_shape(model.config), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.velocity(x, torch.linspace(0.7, 0.3, len(cond)), cond)


def adapter_like(kind: str, transformer, trained) -> torch.nn.Module:
    """``transformer`` behind the adapter settings of the trained model ``trained``."""
    return make_velocity_model(kind, transformer, trained.config.image_size, getattr(trained, "guidance_scale", 3.5),
                               frames=getattr(trained.config, "frames", None),
                               expand_timesteps=getattr(trained, "expand_timesteps", False))


def check_exports(kind: str, pipeline_class, pipe: Path, run: Path, trainer: GRPOTrainer, tmp: Path) -> None:
    """``mixgrpo export`` both ways: the adapter through the pipeline's own ``load_lora_weights``
    and the merged transformer through ``from_pretrained`` give the trained model's velocity; both
    exports and the run load for ``sample`` / ``eval``. Measured: adapter and run 0.0, merged
    2.4e-7 (the folded weight rounds); asserted <= 1e-6 and <= 3e-6."""
    cond = trainer.backend.condition(PROMPTS[:2])
    ours = probe(trainer.model, cond)

    adapter = export_run(run, tmp / "adapter", lora="adapter", ema=False)
    pipeline = pipeline_class.from_pretrained(pipe, local_files_only=True)
    plain = probe(adapter_like(kind, pipeline.transformer, trainer.model), cond)
    pipeline.load_lora_weights(adapter)
    theirs = probe(adapter_like(kind, pipeline.transformer, trainer.model), cond)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-6, f"adapter export: max |ours - {pipeline_class.__name__} + load_lora_weights| = {diff:.3g}"
    assert (ours - plain).abs().max() > 1e-4  # the adapter matters on this probe

    merged = export_run(run, tmp / "merged", lora="merged", ema=False)
    transformer = type(pipeline.transformer).from_pretrained(merged / "transformer", local_files_only=True)
    folded = probe(adapter_like(kind, transformer, trainer.model), cond)
    diff = (ours - folded).abs().max().item()
    assert diff <= 3e-6, f"merged export: max |ours - from_pretrained(transformer)| = {diff:.3g}"

    for source in (run, adapter, merged):
        policy = load_policy(source, ema=False)
        assert policy.kind == kind
        assert (probe(policy.model, cond) - ours).abs().max() <= 3e-6


def check_bf16_checkpointed_step(kind: str, pipe: Path, emb: Path, *extra: str) -> None:
    """A bf16 LoRA run with gradient checkpointing: bf16 base (but for the modules the diffusers
    class keeps in fp32, e.g. Wan's norms and time embedding), fp32 adapter, a finite step."""
    trainer = GRPOTrainer(run_config(kind, pipe, emb, "mixgrpo", "model.lora_rank=4", "model.dtype=bfloat16",
                                     "model.gradient_checkpointing=true", *extra))
    module = trainer.backend.lora_module
    fp32 = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    dtypes = {("lora" if "lora_" in n else "fp32" if fp32 & set(n.split(".")) else "base", p.dtype)
              for n, p in module.named_parameters()}
    assert dtypes - {("fp32", torch.float32)} == {("lora", torch.float32), ("base", torch.bfloat16)}
    row = trainer.step(0)
    assert row["nonfinite_samples"] == 0 and torch.isfinite(torch.tensor(row["loss"]))


def check_full_fine_tune(kind: str, pipe: Path, emb: Path, tmp: Path, *extra: str) -> None:
    """A full fine-tune moves the transformer; its export is a transformer folder diffusers loads
    with the trained velocity, and the run samples as that velocity too."""
    cfg = run_config(kind, pipe, emb, "mixgrpo", "optim.lr=1e-2", *extra)
    trainer = GRPOTrainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    train(cfg, tmp / "run", trainer=trainer)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))
    out = export_run(tmp / "run", tmp / "export", ema=False)
    trainer.model.eval()
    cond = trainer.backend.condition(PROMPTS[:2])
    loaded = type(trainer.backend.lora_module).from_pretrained(out / "transformer", local_files_only=True)
    ours = probe(trainer.model, cond)
    assert torch.equal(probe(adapter_like(kind, loaded, trainer.model), cond), ours)
    assert torch.equal(probe(load_policy(tmp / "run", ema=False).model, cond), ours)


def check_lora_off_is_base(parts, cond, x: torch.Tensor, guidances=(1.0,)) -> set[str]:
    """Add a LoRA to ``parts.transformer`` (its B drawn non-zero, so the adapter matters): with it
    switched off every guidance's velocity is the base's bitwise, with it on it differs.
    Returns the names of the adapted modules."""
    from mixgrpo.models.lora import adapters_disabled, add_lora

    t = torch.full((len(x),), 0.6)
    with torch.no_grad():
        base = {g: parts.model.velocity(x, t, cond, g) for g in guidances}
        add_lora(parts.transformer, 4, 8, parts.lora_targets)
        for name, p in parts.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at 0
        for g in guidances:
            with adapters_disabled(parts.transformer):
                assert torch.equal(parts.model.velocity(x, t, cond, g), base[g])
            assert (parts.model.velocity(x, t, cond, g) - base[g]).abs().max() > 1e-4
    return {n.split(".lora_")[0] for n, _ in parts.transformer.named_parameters() if "lora_" in n}
