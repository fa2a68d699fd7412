"""Toy-size reward checkpoints in the official layouts, built offline (random weights).

* :func:`make_hps_files`: ``HPS_v2.1_compressed.pt`` (an open_clip state dict under
  ``"state_dict"``) and a CLIP BPE tokenizer folder;
* :func:`make_clip_folder`: a transformers ``CLIPModel`` + ``CLIPProcessor`` folder (the layout
  of PickScore_v1 and of openai/clip-vit-*, used for ``pickscore`` and ``clipscore``);
* :func:`make_imagereward_files`: ``ImageReward.pt`` (BLIP ViT + BERT with cross-attention + MLP
  head, the official key names) and a bert-base-uncased style ``vocab.txt`` folder;
* :func:`make_tiny_vlm` / :func:`build_tiny_llava`: a Llava and its processor (``vlm-judge``);
* :func:`make_reward_checkpoints` + :func:`reward_options`: all of them in one folder and the
  ``--reward-options`` mapping (reward name -> constructor options) that points at them.

Shared by tests/test_preference_rewards.py, tests/test_vlm_judge.py,
tests/test_eval_real_rewards.py and scripts/eval_tiny_real_models.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["CHAT_TEMPLATE", "VLM_TEMPLATE", "VLM_WORDS", "WORDS", "OpenClipReference", "build_tiny_llava",
           "make_clip_folder", "make_clip_tokenizer", "make_hps_files", "make_imagereward_files",
           "make_reward_checkpoints", "make_tiny_vlm", "official_imagereward_state", "reward_options"]

WORDS = ["a", "red", "blue", "cat", "dog", "photo", "of", "two", "circles"]


# ------------------------------------------------------------------------------------------ CLIP tokenizer
def make_clip_tokenizer(folder, context=8):
    """A CLIP BPE tokenizer folder whose end-of-text token has the largest id (as in CLIP)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab = {w + "</w>": i for i, w in enumerate(WORDS)}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(WORDS), len(WORDS) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<|endoftext|>",
                        pad_token="<|endoftext|>", model_max_length=context)
    tok.save_pretrained(folder)
    return tok, len(vocab)


# ------------------------------------------------------------------------------------------ HPS-v2.1 (open_clip)
class _Block(nn.Module):  # open_clip's ResidualAttentionBlock
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Stack(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))


class _Visual(nn.Module):
    def __init__(self, width=32, layers=2, heads=2, patch=4, image=16, embed=16):
        super().__init__()
        g = image // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn(g * g + 1, width) * 0.1)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = _Stack(width, layers, heads)
        self.proj = nn.Parameter(torch.randn(width, embed) * 0.2)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipReference(nn.Module):
    """A tiny open_clip CLIP: same forward, same state-dict names (2 heads in both towers)."""

    def __init__(self, vocab, context=8, width=32, layers=2, heads=2, embed=16):
        super().__init__()
        torch.manual_seed(0)
        self.visual = _Visual(embed=embed)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.1)
        self.transformer = _Stack(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * 0.2)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        for p in self.parameters():  # LayerNorms away from identity, so a swapped name shows
            if p.ndim == 1:
                p.data += torch.randn_like(p) * 0.1

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        return self.ln_final(x)[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection

    def hps(self, pixels, ids):
        f_img = nn.functional.normalize(self.visual(pixels), dim=-1)
        f_txt = nn.functional.normalize(self.encode_text(ids), dim=-1)
        return (f_img * f_txt).sum(-1)


def make_hps_files(folder):
    """``folder/HPS_v2.1_compressed.pt`` and ``folder/tokenizer``; returns (folder, reference model, tokenizer)."""
    folder = Path(folder)
    tok, vocab = make_clip_tokenizer(folder / "tokenizer")
    ref = OpenClipReference(vocab).eval()
    torch.save({"state_dict": ref.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    return folder, ref, tok


# ------------------------------------------------------------------------------------------ PickScore / CLIP score
def make_clip_folder(folder, seed=0):
    """A transformers CLIPModel (random, ``torch.manual_seed(seed)``) + CLIPProcessor saved to
    ``folder/model`` (tokenizer source in ``folder/tok``); returns ``folder/model``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    tok, vocab = make_clip_tokenizer(folder / "tok")
    torch.manual_seed(seed)
    config = CLIPConfig(projection_dim=16,
                        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": vocab, "max_position_embeddings": 8,
                                     "eos_token_id": vocab - 1},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 16, "patch_size": 4})
    CLIPModel(config).save_pretrained(folder / "model")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder / "model")
    return folder / "model"


# ------------------------------------------------------------------------------------------ ImageReward (BLIP)
def official_imagereward_state(vision, text, mlp):
    """Our BLIP modules' weights renamed back into ImageReward.pt's keys (the inverse map)."""
    inverse = {"layer_norm1": "norm1", "self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj",
               "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out = {}
    for k, v in vision.state_dict().items():
        if k.startswith("encoder.layers."):
            i, rest = k[len("encoder.layers."):].split(".", 1)
            name, kind = rest.rsplit(".", 1)
            out[f"blip.visual_encoder.blocks.{i}.{inverse[name]}.{kind}"] = v
    sd = vision.state_dict()
    out.update({"blip.visual_encoder.cls_token": sd["embeddings.class_embedding"],
                "blip.visual_encoder.pos_embed": sd["embeddings.position_embedding"],
                "blip.visual_encoder.patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
                "blip.visual_encoder.patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"],
                "blip.visual_encoder.norm.weight": sd["post_layernorm.weight"],
                "blip.visual_encoder.norm.bias": sd["post_layernorm.bias"]})
    out.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    out.update({f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()})
    out["blip.vision_proj.weight"] = torch.zeros(4, 32)  # present in the official file, unused by the score
    return out


def make_imagereward_files(folder):
    """``folder/ImageReward.pt`` and ``folder/bert/vocab.txt``; returns (folder, (vision, text, mlp))
    with the modules in eval mode (the reference forward)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from mixgrpo.rewards.imagereward import _mlp

    folder = Path(folder)
    (folder / "bert").mkdir(parents=True, exist_ok=True)
    (folder / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=1, image_size=32, patch_size=8, layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(vocab_size=len(WORDS) + 7, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=1, intermediate_size=128, encoder_hidden_size=64,
                                        max_position_embeddings=40, is_decoder=True), add_pooling_layer=False)
    mlp = _mlp(64)
    for module in (vision, text, mlp):
        for p in module.parameters():
            p.data += torch.randn_like(p) * 0.05
    torch.save(official_imagereward_state(vision, text, mlp), folder / "ImageReward.pt")
    return folder, (vision.eval(), text.eval(), mlp.eval())


# ------------------------------------------------------------------------------------------ vlm-judge (Llava)
VLM_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER", "ASSISTANT", ":", ".", ",", "\n", "(", ")",
             "1", "2", "3", "4", "5", "a", "an", "red", "blue", "green", "cat", "dog", "circle", "circles", "two",
             "photo", "of", "rate", "the", "image", "caption", "from", "to", "how", "well", "it", "matches", "score",
             "Score", "Final", "is"]
VLM_IMAGE_SIZE, VLM_PATCH = 16, 8
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>{{ '\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
VLM_TEMPLATE = "rate how well the image matches the caption : {prompt}"


def build_tiny_llava(folder, chat_template=CHAT_TEMPLATE):
    """Save a random Llava (1-layer CLIP vision tower, 1-layer Llama, 16-dim) and its processor
    (word-level tokenizer, CLIP image processor, chat template) to ``folder``; returns the folder."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(VLM_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<image>|\w+|[^\w\s]|\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
    ])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": VLM_IMAGE_SIZE},
                                         crop_size={"height": VLM_IMAGE_SIZE, "width": VLM_IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=VLM_PATCH,
                               vision_feature_select_strategy="default", chat_template=chat_template,
                               num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=VLM_IMAGE_SIZE, patch_size=VLM_PATCH, projection_dim=16)
    text = LlamaConfig(vocab_size=len(VLM_WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # a peakier random head, so the level probabilities differ visibly
        model.lm_head.weight.mul_(20)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_vlm(folder):
    """The tiny Llava with its chat template in ``folder``; returns the folder."""
    return build_tiny_llava(Path(folder))


# ------------------------------------------------------------------------------------------ all five, and their options
def make_reward_checkpoints(folder) -> Path:
    """Every toy reward checkpoint under ``folder`` (hps/, pickscore/, imagereward/, clipscore/, vlm/); returns ``folder``.
    Use :func:`reward_options` for the options that point at them."""
    folder = Path(folder)
    make_hps_files(folder / "hps")
    make_clip_folder(folder / "pickscore")
    make_clip_folder(folder / "clipscore", seed=1)  # seed 0's cosines are all < 0 here: CLIP score 0 throughout
    make_imagereward_files(folder / "imagereward")
    make_tiny_vlm(folder / "vlm")
    return folder


def reward_options(folder) -> dict:
    """``--reward-options`` mapping (plain str/int values, YAML-able) for the checkpoints that
    :func:`make_reward_checkpoints` wrote under ``folder``: hps, pickscore, imagereward,
    clipscore and vlm-judge (pickscore and clipscore both read a transformers CLIP folder, here two
    random ones)."""
    folder = Path(folder)
    return {
        "hps": {"path": str(folder / "hps" / "HPS_v2.1_compressed.pt"), "tokenizer": str(folder / "hps" / "tokenizer"),
                "vision_heads": 2, "text_heads": 2},
        "pickscore": {"path": str(folder / "pickscore" / "model")},
        "imagereward": {"path": str(folder / "imagereward" / "ImageReward.pt"),
                        "tokenizer": str(folder / "imagereward" / "bert")},
        "clipscore": {"path": str(folder / "clipscore" / "model")},
        "vlm-judge": {"path": str(folder / "vlm"), "template": VLM_TEMPLATE, "batch_size": 8},
    }
