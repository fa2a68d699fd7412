"""An open_clip ViT CLIP checkpoint (HPS-v2.1's layout) as a transformers ``CLIPModel``.

open_clip and transformers build the same network; only names and a few layouts differ:

* attention: open_clip's ``nn.MultiheadAttention`` keeps q, k, v stacked in ``in_proj_weight``
  ``(3w, w)``; transformers has ``q_proj``, ``k_proj``, ``v_proj``;
* projections: open_clip computes ``x @ proj`` (``proj`` is ``(width, embed)``), transformers a
  ``Linear`` without bias, whose weight is ``proj.T``;
* names: ``ln_pre`` -> ``pre_layrnorm`` (sic), ``ln_1/ln_2`` -> ``layer_norm1/2``, ``c_fc/c_proj``
  -> ``fc1/fc2``, ``ln_final`` -> ``final_layer_norm``.

Head counts are not stored in the weights: open_clip's ViT-H-14 (HPS) uses 16 vision heads of
80 dims and 16 text heads of 64; other widths default to 64-dim heads.
"""

from __future__ import annotations

import re

import torch

from .checkpoints import require_keys

__all__ = ["REQUIRED_KEYS", "clip_from_open_clip"]

REQUIRED_KEYS = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
                 "visual.ln_post.weight", "visual.proj", "token_embedding.weight", "positional_embedding",
                 "ln_final.weight", "text_projection", "logit_scale")

_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}


def _layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not found or found != set(range(max(found) + 1)):
        raise ValueError(f"checkpoint has an incomplete set of {prefix}N blocks ({sorted(found)[:5]}...)")
    return max(found) + 1


def _blocks(state: dict[str, torch.Tensor], src: str, dst: str, n: int, out: dict[str, torch.Tensor]) -> None:
    for i in range(n):
        a, b = f"{src}{i}.", f"{dst}{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{a}attn.in_proj_{kind}"].chunk(3)
            out[f"{b}self_attn.q_proj.{kind}"], out[f"{b}self_attn.k_proj.{kind}"], out[f"{b}self_attn.v_proj.{kind}"] = q, k, v
            for old, new in _LAYER.items():
                out[f"{b}{new}.{kind}"] = state[f"{a}{old}.{kind}"]


def _heads(width: int, vision: bool) -> int:
    return 16 if vision and width == 1280 else max(width // 64, 1)


def clip_from_open_clip(state: dict[str, torch.Tensor], path: str, *, vision_heads: int | None = None,
                        text_heads: int | None = None):
    """A ``transformers.CLIPModel`` carrying ``state`` (open_clip ViT layout); sizes come from
    the tensors, head counts from the arguments or the defaults in the module doc."""
    from transformers import CLIPConfig, CLIPModel

    require_keys(state, REQUIRED_KEYS, "HPS-v2.1 (open_clip CLIP)", path)
    v_width, patch = state["visual.conv1.weight"].shape[0], state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = state["token_embedding.weight"].shape[1]
    v_layers = _layers(state, "visual.transformer.resblocks.")
    t_layers = _layers(state, "transformer.resblocks.")
    config = CLIPConfig(
        projection_dim=state["visual.proj"].shape[1],
        vision_config={"hidden_size": v_width, "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                       "num_hidden_layers": v_layers, "num_attention_heads": vision_heads or _heads(v_width, True),
                       "image_size": grid * patch, "patch_size": patch, "hidden_act": "gelu", "layer_norm_eps": 1e-5},
        text_config={"hidden_size": t_width, "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                     "num_hidden_layers": t_layers, "num_attention_heads": text_heads or _heads(t_width, False),
                     "vocab_size": state["token_embedding.weight"].shape[0],
                     "max_position_embeddings": state["positional_embedding"].shape[0], "hidden_act": "gelu",
                     # eos_token_id 2 selects transformers' argmax-of-ids pooling: open_clip's own rule
                     "layer_norm_eps": 1e-5, "eos_token_id": 2},
    )
    out = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    try:
        _blocks(state, "visual.transformer.resblocks.", "vision_model.encoder.layers.", v_layers, out)
        _blocks(state, "transformer.resblocks.", "text_model.encoder.layers.", t_layers, out)
    except KeyError as err:
        raise ValueError(f"{path} lacks key {err.args[0]} that an open_clip CLIP checkpoint has; the file is "
                         "truncated or of another model") from None
    model = CLIPModel(config)
    result = model.load_state_dict({k: v.float() for k, v in out.items()}, strict=False)
    unexpected_missing = [k for k in result.missing_keys if "position_ids" not in k]
    if unexpected_missing or result.unexpected_keys:
        raise ValueError(f"{path}: cannot map the open_clip weights onto CLIP (missing {unexpected_missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
    return model.eval().requires_grad_(False)
