"""Saving and loading embedded-model checkpoints: ``model.safetensors`` + ``config.json``.

Only safetensors and JSON are ever read: nothing in a checkpoint can execute code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .tiny_dit import TinyDiT, TinyDiTConfig
from .tiny_unet import TinyUNet, TinyUNetConfig
from .tiny_video import TinyVideoUNet, TinyVideoUNetConfig
from .tiny_vp import TinyVPUNet, TinyVPUNetConfig

__all__ = ["ARCHITECTURES", "BASE_CHECKPOINT", "CONFIG", "WEIGHTS", "EmbeddedModel", "build_embedded", "load_embedded",
           "read_config", "save_embedded"]

EmbeddedModel = TinyDiT | TinyUNet | TinyVideoUNet | TinyVPUNet
# config.json's model_type -> (config class, model class); the shipped base is a tiny-unet,
# tiny-video-unet the moving-shapes world's video model, tiny-vp-unet the base as an
# epsilon/v-prediction diffusion model
ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    "tiny-dit": (TinyDiTConfig, TinyDiT),
    "tiny-unet": (TinyUNetConfig, TinyUNet),
    "tiny-video-unet": (TinyVideoUNetConfig, TinyVideoUNet),
    "tiny-vp-unet": (TinyVPUNetConfig, TinyVPUNet),
}

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
BASE_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "base"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _model_type(model: nn.Module) -> str:
    for name, (_, cls) in ARCHITECTURES.items():
        if type(model) is cls:  # exact: the video U-Net is a U-Net subclass
            return name
    raise TypeError(f"{type(model).__name__} is not an embedded model; use one of {', '.join(ARCHITECTURES)}")


def build_embedded(model_type: str, config: dict[str, Any]) -> EmbeddedModel:
    """A freshly initialised embedded model of ``model_type`` from its config dict."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown embedded model_type {model_type!r}; known: {', '.join(ARCHITECTURES)}")
    config_cls, model_cls = ARCHITECTURES[model_type]
    return model_cls(config_cls(**config))


def save_embedded(model: EmbeddedModel, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` (atomically each)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise ValueError("refusing to save non-finite weights")
    _atomic_write(out / WEIGHTS, lambda p: save_file(state, str(p)))
    config = {"model_type": _model_type(model), "model": model.config.to_dict(), **(extra or {})}
    _atomic_write(out / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    cfg_path = Path(path) / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in checkpoint folder {Path(path)}: pass a folder written by `mixgrpo pretrain` or `mixgrpo train`")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint config {cfg_path} is not valid JSON ({err}); the file is corrupt") from err


def load_embedded(path: str | Path | None = None, device: str | torch.device = "cpu") -> EmbeddedModel:
    """Load an embedded-model checkpoint folder; ``None`` loads the shipped base checkpoint."""
    folder = Path(path) if path is not None else BASE_CHECKPOINT
    config = read_config(folder)
    if config.get("model_type") not in ARCHITECTURES:
        raise ValueError(f"{folder / CONFIG} describes model_type {config.get('model_type')!r}, not an embedded "
                         f"model ({', '.join(ARCHITECTURES)}); pass a folder written by `mixgrpo pretrain`")
    try:
        model = build_embedded(config["model_type"], config["model"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{folder / CONFIG} has an invalid 'model' section: {err}") from err
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights {weights} are missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint weights {weights} are corrupt or not safetensors ({err})") from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise ValueError(
            f"checkpoint weights {weights} do not match its config: {len(diff)} tensor(s) differ, e.g. {diff[:3]}"
        )
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise ValueError(f"checkpoint weights {weights} contain NaN or Inf; use an earlier checkpoint")
    model.load_state_dict(state)
    return model.to(device).eval()
