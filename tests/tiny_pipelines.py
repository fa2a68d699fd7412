"""Tiny random diffusers pipelines built offline (tokenizers included) for the real-model paths."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["a", "an", "two", "one", "three", "red", "blue", "green", "yellow", "circle", "circles", "square",
         "squares", "triangle", "left", "right", "of", "above", "below", "cat", "photo"]


def _clip_tokenizer(folder: Path, max_length: int = 8):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w + "</w>": i + 2 for i, w in enumerate(WORDS)}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<|endoftext|>",
                         pad_token="<|endoftext|>", model_max_length=max_length), len(vocab)


def _t5_tokenizer(max_length: int = 16):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = ["<pad>", "</s>", "<unk>", *WORDS]
    tok = Tokenizer(models.Unigram([(t, 0.0) for t in vocab], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=max_length), len(vocab)


def make_tiny_flux_pipeline(folder: Path) -> Path:
    """A FluxPipeline (CLIP 16-d, T5 32-d, 4-channel VAE, 1+1-block transformer) saved to ``folder``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip_tok, clip_vocab = _clip_tokenizer(folder.parent / (folder.name + "-vocab"))
    t5_tok, t5_vocab = _t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8, projection_dim=16))
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.1159, scaling_factor=0.3611)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def make_tiny_sd3_pipeline(folder: Path) -> Path:
    """A StableDiffusion3Pipeline (two CLIPs with projections, 16-d each; T5 32-d; 4-channel VAE;
    one-block transformer) saved to ``folder``. The joint CLIP states (16 + 16) match T5's 32."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)

    def clip(name: str):
        tok, vocab = _clip_tokenizer(folder.parent / (folder.name + f"-{name}"))
        model = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=8, projection_dim=16))
        return tok, model

    tok1, clip1 = clip("clip1")
    tok2, clip2 = clip("clip2")
    t5_tok, t5_vocab = _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.0609,
                        scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip1,
                                    tokenizer=tok1, text_encoder_2=clip2, tokenizer_2=tok2, text_encoder_3=t5,
                                    tokenizer_3=t5_tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder
