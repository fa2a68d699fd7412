"""Tiny random diffusers pipelines built offline (tokenizers included) for the real-model paths:
FLUX.1, SD3, Qwen-Image, FLUX.2, SD, SDXL and Wan (text-to-video)."""

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


# the system part of Qwen-Image's chat template: encode_prompt drops its 34 tokens (drop_idx)
QWEN_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
               "relationships of the objects and background")


def _qwen_tokenizer(max_length: int = 2048):
    """A byte-level BPE Qwen2Tokenizer whose merges make each word of the system prompt one token,
    so the template's system part is 34 tokens, as with the real tokenizer (asserted); prompt
    words fall apart into bytes."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|endoftext|>": 0}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    merges = []

    def whole(word: str) -> None:  # merges building `word` left to right
        done = word[0]
        for ch in word[1:]:
            if done + ch not in vocab:
                merges.append((done, ch))
                vocab[done + ch] = len(vocab)
            done += ch

    for word in QWEN_SYSTEM.replace(",", "").split()[1:]:  # "Ġ" is byte-level BPE's space; these merges come first so they win
        whole("Ġ" + word)
    for word in ("system", "user", "assistant", "Describe"):
        whole(word)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=max_length)
    system = f"<|im_start|>system\n{QWEN_SYSTEM}:<|im_end|>\n<|im_start|>user\n"
    assert len(tok(system).input_ids) == 34, "the tiny Qwen tokenizer must split the system prompt as Qwen's does"
    return tok, len(tok)


def make_tiny_qwen_image_pipeline(folder: Path) -> Path:
    """A QwenImagePipeline (Qwen2.5-VL 16-d, 2 layers; a 4-channel one-frame video VAE that
    downsamples by 2; one-block transformer) saved to ``folder``. Its scheduler shifts
    dynamically, as Qwen-Image's does (without its shift_terminal)."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tok, vocab = _qwen_tokenizer()
    text = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, bos_token_id=None, eos_token_id=None, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                        "rope_theta": 1e6})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=vocab + 1, video_token_id=vocab + 2,
        vision_start_token_id=vocab + 3, vision_end_token_id=vocab + 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 2.0, 1.1])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def make_tiny_flux2_pipeline(folder: Path) -> Path:
    """A Flux2Pipeline (a 30-layer 8-d Mistral-3, so its states 10, 20, 30 exist; a 4-channel VAE
    that downsamples by 2, with random BatchNorm statistics; 1+1-block transformer) saved to
    ``folder``. The tokenizer is a word-level fast tokenizer with a chat template, standing in
    for the real PixtralProcessor (which needs torchvision); encode_prompt only calls
    ``apply_chat_template``."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    special = ["<pad>", "<s>", "</s>", "<unk>", "[IMG]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"]
    words = dict.fromkeys(SYSTEM_MESSAGE.replace(",", " ").replace(".", " ").split() + WORDS)
    vocab = {w: i for i, w in enumerate([*special, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=special[4:], model_max_length=512)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
                         "{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}"
                         "[/INST]{% endif %}{% endfor %}")
    text = dict(model_type="mistral", vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=30,
                num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=512)
    vision = dict(model_type="pixtral", hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                  head_dim=4, patch_size=4, image_size=16)
    encoder = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                              image_token_index=4, spatial_merge_size=1))
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=16)
    with torch.no_grad():  # non-trivial statistics, so the latent normalisation is tested
        vae.bn.running_mean.copy_(0.3 * torch.randn(16))
        vae.bn.running_var.copy_(0.5 + torch.rand(16))
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                          timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2))
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                         text_encoder=encoder, tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def _clip_word_tokenizer(folder: Path, max_length: int = 16):
    """A CLIPTokenizer whose BPE merges build each of :data:`WORDS`, so prompts differ in tokens
    (the plain tiny tokenizer knows single letters only)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[str] = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        done = pieces[0]
        for piece in pieces[1:]:
            if f"{done} {piece}" not in merges:
                merges.append(f"{done} {piece}")
            done += piece
            vocab.setdefault(done, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<|endoftext|>",
                         pad_token="<|endoftext|>", model_max_length=max_length), len(vocab)


def _tiny_sd_vae(scaling_factor: float, **stats):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor, **stats)


def make_tiny_sd_pipeline(folder: Path, prediction_type: str = "epsilon", spacing: str = "leading",
                          alpha_to_one: bool = False) -> Path:
    """A StableDiffusionPipeline (CLIP 16-d, 2 layers; a 4-channel VAE that downsamples by 2; a
    two-level UNet with cross-attention) with a ``DDIMScheduler`` on SD's betas, saved to
    ``folder``. Defaults as SD1.5: epsilon, leading spacing with offset 1, final alpha
    ``alphas_cumprod[0]``; SD2.x-like with ``prediction_type="v_prediction"``."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok, vocab = _clip_word_tokenizer(folder.parent / (folder.name + "-vocab"))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=alpha_to_one, steps_offset=1, timestep_spacing=spacing,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=_tiny_sd_vae(0.18215), text_encoder=clip, tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def make_tiny_sdxl_pipeline(folder: Path) -> Path:
    """A StableDiffusionXLPipeline (two CLIPs, 16-d each, the second with a 16-d projection; a
    4-channel VAE that downsamples by 2; a two-level UNet with SDXL's text-time embedding) saved
    to ``folder``. Its VAE carries per-channel ``latents_mean`` / ``latents_std``. Its scheduler config is SDXL's: an ``EulerDiscreteScheduler`` whose json also
    carries the DDIM keys (``clip_sample`` and ``set_alpha_to_one`` false, leading, offset 1)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16)
    tok1, vocab = _clip_word_tokenizer(folder.parent / (folder.name + "-clip1"))
    tok2, _ = _clip_word_tokenizer(folder.parent / (folder.name + "-clip2"))
    clip1 = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, **text))
    clip2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=vocab, projection_dim=16, **text))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), norm_num_groups=4, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=16 + 6 * 4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    # per-channel latent statistics (as Playground v2.5's SDXL VAE), so that decoding path is tested too
    vae = _tiny_sd_vae(0.5, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 2.0, 1.1])
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip1, text_encoder_2=clip2,
                                     tokenizer=tok1, tokenizer_2=tok2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}))
    return folder


def make_tiny_wan_pipeline(folder: Path, ti2v: bool = False) -> Path:
    """A text-to-video WanPipeline (UMT5 16-d, one layer; a 4-channel video VAE compressing time
    by 4 and space by 4, with non-trivial latents_mean / latents_std; a one-block transformer)
    saved to ``folder``. Its scheduler is Wan's own kind, UniPC on flow sigmas with
    ``flow_shift`` 3. ``ti2v``: Wan2.2 TI2V-5B's layout instead, per-token timesteps
    (``expand_timesteps``) and a residual VAE on 2x2-patchified pixels (space compressed by 8)."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tok, vocab = _t5_tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2))
    residual = dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12) if ti2v else {}
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 2.0, 1.1],
                           scale_factor_temporal=4, scale_factor_spatial=8 if ti2v else 4, **residual)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                        num_layers=1, rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tok, text_encoder=encoder, vae=vae, scheduler=scheduler, transformer=transformer,
                       expand_timesteps=ti2v)
    pipe.save_pretrained(folder)
    return folder
