"""What `make parity` (official packages) and the default suite (ours) share: tiny model
shapes, deterministic weights from parameter names, images and prompts.

Weights are a pure function of each key and shape, so the committed reference needs only the
key list and the official scores, never a checkpoint."""

from __future__ import annotations

import zlib

import torch

PROMPTS = ["a red cat", "two blue circles", "a photo of a dog", "a cat"]
WORDS = ["a", "red", "blue", "cat", "dog", "photo", "of", "two", "circles"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]

# open_clip model config (hpsv2's copy): ViT-H-14's structure at toy size
HPS_TINY = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
# ImageReward: BLIP ViT (patch 16 at 224, as the official transform fixes) and a 768-wide BERT
# (the official MLP head is built for 768)
IR_VISION = {"embed_dim": 64, "depth": 2, "num_heads": 1}
IR_MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
          "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 256,
          "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 12,
          "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(BERT_VOCAB) + 2,
          "encoder_width": 64, "add_cross_attention": True}


def seeded(key: str, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """A parameter as a function of its name: N(0, 0.05^2), plus 1 for norm scales."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    x = torch.randn(tuple(shape), generator=g) * 0.05
    last = key.rsplit(".", 2)
    if key.endswith(".weight") and any(n in last[-2].lower() for n in ("ln", "norm")):
        x += 1.0
    if key.endswith("logit_scale"):
        x = torch.full(tuple(shape), 4.6052)
    return x


def seeded_state(keys: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    return {k: seeded(k, shape) for k, shape in keys}


def parity_images(n: int = 4, size: int = 48) -> torch.Tensor:
    """Images already on the 8-bit grid (what a PIL image holds)."""
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(123))
    return (x * 255).round() / 255
