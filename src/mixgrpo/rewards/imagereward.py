"""ImageReward (THUDM, ``ImageReward.pt``) on transformers' BLIP classes.

The official model (``ImageReward/ImageReward.py``) is BLIP's ViT-L/16 image encoder, a BERT
text encoder with cross-attention to every image token (BLIP's ``med``), and an MLP head on the
text [CLS] state::

    r = (MLP(h_cls) - 0.16717362830052426) / 1.0333394966054072

Key map: ``blip.visual_encoder`` (timm-style ViT: ``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``,
``norm``) -> ``BlipVisionModel`` (``embeddings.*``, ``encoder.layers.i.{layer_norm1,
self_attn.qkv, self_attn.projection, layer_norm2, mlp.*}``, ``post_layernorm``);
``blip.text_encoder`` -> ``BlipTextModel`` (same BERT names, cross-attention built with
``is_decoder=True`` and run bidirectionally); ``mlp.layers`` as it is. Preprocessing (the
official ``_transform(224)`` on a PIL image): resize the shorter side to 224 (PIL bicubic),
centre crop, to tensor, OpenAI CLIP normalisation. Prompts: bert-base-uncased, 35 tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import check_images, register_reward
from .checkpoints import load_state_dict, require_keys
from .preference import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_uint8_grid

__all__ = ["IMAGEREWARD_MEAN", "IMAGEREWARD_STD", "ImageRewardReward", "imagereward_preprocess"]

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
REQUIRED_KEYS = ("blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.cls_token",
                 "blip.visual_encoder.pos_embed", "blip.visual_encoder.norm.weight",
                 "blip.text_encoder.embeddings.word_embeddings.weight",
                 "blip.text_encoder.embeddings.position_embeddings.weight", "mlp.layers.0.weight", "mlp.layers.7.weight")
_VIT_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
              "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def imagereward_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The official ``_transform(size)`` applied to the PIL images of ``images``."""
    from PIL import Image

    grid = (to_uint8_grid(images) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for array in grid:
        img = Image.fromarray(array)
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)  # torchvision Resize(int): shorter side -> size
        img = img.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
        w, h = img.size
        top, left = round((h - size) / 2.0), round((w - size) / 2.0)
        img = img.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255)
    x = torch.stack(out)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def build_imagereward(state: dict[str, torch.Tensor], path: str) -> tuple[nn.Module, nn.Module, nn.Sequential]:
    """(vision, text, mlp) modules of transformers' BLIP carrying an ``ImageReward.pt`` state dict."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    require_keys(state, REQUIRED_KEYS, "ImageReward (BLIP)", path)
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    width, _, patch, _ = state[v + "patch_embed.proj.weight"].shape
    grid = round((state[v + "pos_embed"].shape[1] - 1) ** 0.5)
    v_layers, t_layers = _count(state, v + "blocks."), _count(state, t + "encoder.layer.")
    vocab, hidden = state[t + "embeddings.word_embeddings.weight"].shape
    try:
        vision_cfg = BlipVisionConfig(hidden_size=width, intermediate_size=state[v + "blocks.0.mlp.fc1.weight"].shape[0],
                                      num_hidden_layers=v_layers, num_attention_heads=max(width // 64, 1),
                                      image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
        text_cfg = BlipTextConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=t_layers,
                                  num_attention_heads=max(hidden // 64, 1),
                                  intermediate_size=state[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                                  encoder_hidden_size=state[t + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
                                  max_position_embeddings=state[t + "embeddings.position_embeddings.weight"].shape[0],
                                  layer_norm_eps=1e-12, is_decoder=True, pad_token_id=0)
        vision_state = {"embeddings.class_embedding": state[v + "cls_token"],
                        "embeddings.position_embedding": state[v + "pos_embed"],
                        "embeddings.patch_embedding.weight": state[v + "patch_embed.proj.weight"],
                        "embeddings.patch_embedding.bias": state[v + "patch_embed.proj.bias"],
                        "post_layernorm.weight": state[v + "norm.weight"], "post_layernorm.bias": state[v + "norm.bias"]}
        for i in range(v_layers):
            for old, new in _VIT_BLOCK.items():
                for kind in ("weight", "bias"):
                    vision_state[f"encoder.layers.{i}.{new}.{kind}"] = state[f"{v}blocks.{i}.{old}.{kind}"]
    except KeyError as err:
        raise ValueError(f"{path} lacks key {err.args[0]} that an ImageReward checkpoint has; the file is truncated "
                         "or of another model") from None
    text_state = {k[len(t):]: val for k, val in state.items() if k.startswith(t) and "position_ids" not in k}
    vision, text, mlp = BlipVisionModel(vision_cfg), BlipTextModel(text_cfg, add_pooling_layer=False), _mlp(hidden)
    for module, sub, what in ((vision, vision_state, "image encoder"), (text, text_state, "text encoder"),
                              (mlp, {k[len("mlp.layers."):]: val for k, val in state.items()
                                     if k.startswith("mlp.layers.")}, "MLP head")):
        result = module.load_state_dict({k: val.float() for k, val in sub.items()}, strict=False)
        missing = [k for k in result.missing_keys if "position_ids" not in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"{path}: the {what} does not match ImageReward's layout (missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
    return vision.eval(), text.eval(), mlp.eval()


@register_reward("imagereward")
class ImageRewardReward:
    """ImageReward-v1.0. ``path``: ``ImageReward.pt``; ``tokenizer``: a bert-base-uncased
    folder (``vocab.txt``), the tokenizer BLIP uses."""

    def __init__(self, path: str, tokenizer: str, device: str = "cpu", batch_size: int = 32, dtype: str = "float32"):
        from transformers import BertTokenizer

        from .preference import _DTYPES

        if dtype not in _DTYPES or batch_size < 1:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} and batch_size >= 1, got {dtype!r}, {batch_size}")
        vision, text, mlp = build_imagereward(load_state_dict(path, "ImageReward"), str(path))
        self.device, self.dtype, self.batch_size = torch.device(device), _DTYPES[dtype], batch_size
        self.vision = vision.to(self.device, self.dtype).requires_grad_(False)
        self.text = text.to(self.device, self.dtype).requires_grad_(False)
        self.mlp = mlp.to(self.device).requires_grad_(False)  # the head runs in fp32, as officially
        folder = Path(tokenizer)
        if not (folder / "vocab.txt").is_file():
            raise FileNotFoundError(f"imagereward tokenizer: {folder} has no vocab.txt; pass a bert-base-uncased folder")
        self.tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        self.image_size = vision.config.image_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            pixels = imagereward_preprocess(images[start : start + self.batch_size], self.image_size)
            tokens = self.tokenizer(prompts[start : start + self.batch_size], padding="max_length", truncation=True,
                                    max_length=35, return_tensors="pt").to(self.device)
            image_embeds = self.vision(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            hidden = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                               encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                               is_decoder=False).last_hidden_state
            r = self.mlp(hidden[:, 0].float()).squeeze(-1)
            scores.append(((r - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).cpu())
        return torch.cat(scores).float()
