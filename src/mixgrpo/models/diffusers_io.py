"""Loading diffusers networks (transformers, UNets) from local folders: safetensors only, never the network."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_transformer"]


def load_transformer(folder: str | Path, class_name: str, dtype: torch.dtype = torch.float32,
                     subfolder: str = "transformer") -> nn.Module:
    """``class_name`` (a diffusers model class) from ``folder``: a pipeline folder (its
    ``subfolder``: ``transformer/``, or ``unet/`` for Stable Diffusion) or the network's folder
    itself. Errors name what was found."""
    import diffusers

    folder = Path(folder)
    sub = folder / subfolder
    target = sub if (sub / "config.json").is_file() else folder
    config = target / "config.json"
    if not config.is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) if folder.is_dir() else "nothing"
        raise FileNotFoundError(f"no {class_name} in {folder} (no config.json there or in {subfolder}/; found: {found})")
    try:
        found_class = json.loads(config.read_text()).get("_class_name")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON ({err})") from None
    if found_class != class_name:
        raise ValueError(f"{config} describes {found_class!r}, not a {class_name}: pass a pipeline folder of that model "
                         "or set model.kind to match the folder")
    try:
        return getattr(diffusers, class_name).from_pretrained(
            target, torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    except OSError as err:
        raise FileNotFoundError(f"cannot load {class_name} weights from {target}: {err}") from None
