"""What inference reads of a ``mixgrpo train`` run folder: its ``config.yaml`` model section and
its newest intact checkpoint's trained tensors.

Inference sits below training (core <- models/rewards/world <- inference <- train), so it
reads the resolved config as YAML instead of importing the training config classes. A run
folder's ``config.yaml`` is written resolved (every field present); the defaults here only
cover hand-written or older files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from .verify import newest_intact

__all__ = ["RunModel", "latest_run_weights", "load_named", "load_safetensors", "pick_weights", "read_run_model"]

logger = logging.getLogger(__name__)

_KINDS = ("embedded", "flux", "sd3", "qwen-image", "flux2", "wan", "sd")


@dataclass(frozen=True)
class RunModel:
    """The ``model`` section of a run's config, as far as loading and exporting need it."""

    kind: str = "embedded"
    checkpoint: str | None = None  # embedded: model folder (None = the shipped base)
    path: str | None = None  # diffusers kinds: the pipeline folder
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=list)
    image_size: int = 512  # flux/sd3: pixels per side
    flux_guidance: float = 3.5  # FLUX.1's distilled guidance
    frames: int = 81  # wan: video frames
    embeddings: str | None = None  # flux/sd3: the training prompts' `mixgrpo preprocess` folder
    eval_embeddings: str | None = None  # flux/sd3: the held-out prompts' (None: `embeddings`)
    shift: float | str = 3.0  # the run's sampler.shift (a number, or "scheduler")
    dtype: str = "float32"  # the run's model.dtype (flux/sd3: bfloat16 samples with bf16 weights)


def read_run_model(folder: str | Path) -> RunModel:
    """The model section of ``folder/config.yaml``; a file that is not a run config raises
    ``ValueError`` in one line naming it."""
    path = Path(folder) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a run folder (no config.yaml)") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"{path} has no 'model' section: not a `mixgrpo train` run config")
    kind = {"tiny-dit": "embedded"}.get(model.get("kind", "embedded"), model.get("kind", "embedded"))
    if kind not in _KINDS:
        raise ValueError(f"{path}: model.kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    sampler = data.get("sampler") if isinstance(data.get("sampler"), dict) else {}
    shift = sampler.get("shift", 3.0)
    try:
        return RunModel(kind=kind, checkpoint=model.get("checkpoint"), path=model.get("path"),
                        lora_rank=int(model.get("lora_rank", 0)), lora_alpha=float(model.get("lora_alpha", 16.0)),
                        lora_targets=list(model.get("lora_targets") or []), image_size=int(model.get("image_size", 512)),
                        flux_guidance=float(model.get("flux_guidance", 3.5)), embeddings=model.get("embeddings"),
                        frames=int(model.get("frames", 81)),
                        eval_embeddings=model.get("eval_embeddings"), dtype=str(model.get("dtype", "float32")),
                        shift=shift if shift == "scheduler" else float(shift))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad model section ({err})") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"weights file {path} is corrupt or not safetensors ({err})") from err


def load_named(model: torch.nn.Module, names: list[str], state: dict[str, torch.Tensor], source: Path) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} trained tensor(s) (e.g. {missing[0]}); it belongs to another run or model")
    with torch.no_grad():
        for name in names:
            if params[name].shape != state[name].shape:
                raise ValueError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, the model expects {tuple(params[name].shape)}")
            if not torch.isfinite(state[name]).all():
                raise ValueError(f"{source}: tensor {name} holds NaN or Inf; use an earlier checkpoint")
            params[name].copy_(state[name])


def latest_run_weights(folder: Path, on_note: Callable[[str], None] | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """The newest intact checkpoint folder of a run and its trained tensors; ``on_note`` gets
    one line when newer checkpoints were damaged and skipped (logged as a warning by default)."""
    root = folder / "checkpoints"
    found = newest_intact(root)  # raises CheckpointDamaged (ValueError) when every one is damaged
    if found is None:
        raise FileNotFoundError(f"run folder {folder} has no checkpoint yet (nothing in {root}); wait for its first checkpoint or pass another --checkpoint")
    note = found.note()
    if note:
        note = note.replace("; resuming from", "; using")
        if on_note is not None:
            on_note(note)
        else:
            logger.warning(note)
    return found.folder, load_safetensors(found.folder / "weights.safetensors")


def pick_weights(state: dict[str, torch.Tensor], ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The EMA tensors (``ema.`` prefix stripped) when asked for and present, else the live ones."""
    if ema and any(k.startswith("ema.") for k in state):
        return {k[4:]: v for k, v in state.items() if k.startswith("ema.")}, "ema."
    # the rest is trainer state: the old policy of DiffusionNFT / AWM (``old.``), step counts (``state.``)
    return {k: v for k, v in state.items() if not k.startswith(("ema.", "old.", "state."))}, "live "
