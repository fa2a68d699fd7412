"""LoRA on the embedded model through peft: inject, switch off, merge, save in peft format.

The adapter is injected in place (``peft.inject_adapter_in_model``) so the model keeps its
``velocity`` interface; the same functions serve training, inference (``--blend`` runs the
base model by switching the adapter off) and export.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LORA_TARGETS",
    "adapters_disabled",
    "add_lora",
    "has_lora",
    "lora_config",
    "merged_state_dict",
    "save_peft_adapter",
]

LORA_TARGETS = ["qkv", "proj", "mlp.0", "mlp.2"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(rank: int, alpha: float, targets: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets or LORA_TARGETS))


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | None = None) -> nn.Module:
    """Freeze ``model`` and inject a trainable rank-``rank`` adapter (``W + (alpha/r) B A``)
    into the modules named by ``targets`` (default: the embedded model's :data:`LORA_TARGETS`)."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(rank, alpha, targets), model)
    return model


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def in_place_lora_names(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Saved LoRA keys (``<prefix><module>.lora_A.weight``: peft's ``base_model.model.``, diffusers'
    ``transformer.``) as the names :func:`add_lora`'s in-place adapter gives the parameters."""
    return {k.removeprefix(prefix).replace(".lora_A.weight", ".lora_A.default.weight")
            .replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in state.items()}


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block: the adapter is off, then on again."""
    layers = _tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in: ``W' = W + (alpha/r) B A``.

    Computed from copies, so ``model`` keeps its separate adapter."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    for name, module in model.named_modules():
        if name + ".base_layer.weight" not in state or not hasattr(module, "get_delta_weight"):
            continue
        for adapter in module.active_adapters:
            state[name + ".base_layer.weight"] += module.get_delta_weight(adapter).detach()
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def save_peft_adapter(model: nn.Module, out_dir: str | Path, *, rank: int, alpha: float, base: str) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as peft's ``save_pretrained``
    does (keys ``base_model.model.<module>.lora_A.weight``), loadable by ``PeftModel.from_pretrained``."""
    from peft import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = get_peft_model_state_dict(model)
    tensors = {f"base_model.model.{k}": v.detach().float().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    config = lora_config(rank, alpha).to_dict()
    config["base_model_name_or_path"] = base
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return out
