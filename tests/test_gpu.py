"""Checks that need a CUDA GPU (skipped without one; `scripts/gpu_check.sh` runs them).

Bounds here are first guesses for the GPU, not measured claims: the CPU suite holds the
tight figures (tests/test_pipeline_parity.py, tests/test_distributed.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_flux_pipeline_parity_on_the_gpu(tmp_path):
    """Our Euler sampling through FluxVelocityModel against FluxPipeline's loop, both on cuda."""
    pytest.importorskip("diffusers")
    from diffusers import FluxPipeline

    from mixgrpo.core.sampler import mixed_plan, sample
    from mixgrpo.models.flux import FluxCondition, FluxVelocityModel, pack_latents, unpack_latents
    from tiny_pipelines import make_tiny_flux_pipeline

    pipe = FluxPipeline.from_pretrained(make_tiny_flux_pipeline(tmp_path / "flux"), local_files_only=True).to("cuda")
    prompts = ["two red circles", "a photo of a cat"]
    x1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, max_sequence_length=16)
        theirs = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=pack_latents(x1), height=16, width=16,
                      num_inference_steps=6, guidance_scale=3.5, output_type="latent", return_dict=False)[0]
        model = FluxVelocityModel(pipe.transformer, 8, guidance_scale=3.5)
        cond = FluxCondition(embeds, pooled)
        ours = sample(lambda x, t: model.velocity(x, t, cond), x1,
                      mixed_plan(pipe.scheduler.sigmas.double().cpu(), [], "euler")).x0
    diff = (ours.float() - unpack_latents(theirs, 8, 8)).abs().max().item()
    print(f"FLUX parity on cuda: max |diff| = {diff:.3g}")
    assert diff <= 1e-5


def test_tiny_training_runs_on_the_gpu(tmp_path):
    """Two GRPO iterations of the tiny model with model.device=cuda: weights live on the GPU,
    metrics are finite, and the weights move."""
    from mixgrpo.train.run import train
    from mixgrpo.train.trainer import GRPOTrainer
    from tiny_runs import make_tiny_checkpoint, tiny_config

    cfg = tiny_config(make_tiny_checkpoint(tmp_path / "tiny"), "mixgrpo", "iterations=2", "model.device=cuda")
    trainer = GRPOTrainer(cfg)
    assert all(p.device.type == "cuda" for p in trainer.params)
    before = [p.detach().clone() for p in trainer.params]
    summary = train(cfg, tmp_path / "run", trainer=trainer)
    assert summary["iterations"] == 2 and torch.isfinite(torch.tensor(summary["final_eval_reward"]))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.params, strict=True))


def test_nccl_collectives_run_on_the_ranks_gpu(tmp_path):
    """One process under torchrun with NCCL: the rank's device is set before the process group
    starts and the collectives' tensors go to that GPU."""
    script = tmp_path / "nccl.py"
    script.write_text(
        "import os, torch, torch.distributed as dist\n"
        "from mixgrpo.train import distributed as D\n"
        "device = D.rank_device('cuda', int(os.environ['LOCAL_RANK']), 2)\n"  # as if one of 2 ranks
        "torch.cuda.set_device(device)\n"
        "dist.init_process_group('nccl')\n"
        "d = D.Dist(0, 1, int(os.environ['LOCAL_RANK']), str(device))\n"
        "t = D._wire(torch.tensor([1.5, 2.5]), d)\n"
        "assert t.device == device, (t.device, device)\n"
        "dist.all_reduce(t)\n"
        "assert t.cpu().tolist() == [1.5, 2.5]\n"
        "dist.destroy_process_group()\n"
        "print('nccl ok on', device)\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             str(script)], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nccl ok on cuda:0" in result.stdout
