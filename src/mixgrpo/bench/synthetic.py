"""A FLUX-shaped stand-in for `mixgrpo bench --flux-shaped`: cost at real width, no weights.

FLUX.1-dev's transformer has 19 double-stream and 38 single-stream blocks at hidden size
3072 (24 heads x 128). Timing a method needs that width and the real token counts (T5 512
text tokens; a 512 px image is 64x64 latents, 1024 packed tokens), not the depth: the bench
builds the transformer with a few blocks, random init, and random text embeddings of the real
shapes, writes them as a normal pipeline folder + `preprocess` output, and trains through the
same `model.kind=flux` path users take. Rewards of a random model mean nothing; the figures
are iteration times, their ratios, model passes and peak GPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..text.preprocess import write_embeddings

__all__ = ["FluxShape", "flux_shaped_overrides", "make_flux_shaped"]


@dataclass(frozen=True)
class FluxShape:
    double_blocks: int = 2
    single_blocks: int = 2
    heads: int = 24  # x 128 = hidden size (FLUX.1: 24 -> 3072)
    text_tokens: int = 512  # T5 sequence length (FLUX.1-dev: 512)
    prompts: int = 16

    def validate(self) -> FluxShape:
        if self.double_blocks < 1 or self.single_blocks < 0 or self.heads < 1:
            raise ValueError(f"--flux-blocks needs >= 1 double and >= 0 single blocks, --flux-heads >= 1; got {self}")
        if self.text_tokens < 1 or self.prompts < 2:
            raise ValueError(f"text_tokens must be >= 1 and prompts >= 2, got {self.text_tokens}, {self.prompts}")
        return self

    @property
    def hidden_size(self) -> int:
        return 128 * self.heads


def make_flux_shaped(folder: Path, shape: FluxShape, seed: int = 0) -> tuple[Path, Path]:
    """Write ``folder/pipe`` (transformer, a narrow 16-channel VAE with FLUX's 8x factor, the
    scheduler) and ``folder/emb`` (random T5 / CLIP-pooled embeddings); returns both paths."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    shape.validate()
    pipe, emb = folder / "pipe", folder / "emb"
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=shape.double_blocks, num_single_layers=shape.single_blocks,
        attention_head_dim=128, num_attention_heads=shape.heads, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    transformer.to(torch.bfloat16).save_pretrained(pipe / "transformer")
    del transformer
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[16] * 4, layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, shift_factor=0.1159, scaling_factor=0.3611)
    vae.save_pretrained(pipe / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(pipe / "scheduler")
    prompts = [f"synthetic prompt {i}" for i in range(shape.prompts)]
    tensors = {"prompt_embeds": torch.randn(shape.prompts, shape.text_tokens, 4096, generator=gen),
               "pooled": torch.randn(shape.prompts, 768, generator=gen)}
    write_embeddings(emb, tensors, prompts, pipeline="FluxPipeline", model=str(pipe.resolve()),
                     max_sequence_length=shape.text_tokens)
    return pipe, emb


def flux_shaped_overrides(folder: Path, image_size: int = 512) -> list[str]:
    """Config overrides that train every arm on :func:`make_flux_shaped`'s folder: bf16, the
    GPU when there is one, a prompt-blind reward (only cost is measured)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [
        "model.kind=flux", f"model.path={folder / 'pipe'}", f"model.embeddings={folder / 'emb'}",
        f"model.image_size={image_size}", "model.dtype=bfloat16", f"model.device={device}",
        "rewards={flatness: 1.0}", "eval_prompts=4",
    ]
