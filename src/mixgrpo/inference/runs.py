"""What inference reads of a ``mixgrpo train`` run folder's ``config.yaml``: its model section.

Inference sits below training (core <- models/rewards/world <- inference <- train), so it
reads the resolved config as YAML instead of importing the training config classes. A run
folder's ``config.yaml`` is written resolved (every field present); the defaults here only
cover hand-written or older files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["RunModel", "read_run_model"]

_KINDS = ("embedded", "flux", "sd3")


@dataclass(frozen=True)
class RunModel:
    """The ``model`` section of a run's config, as far as loading and exporting need it."""

    kind: str = "embedded"
    checkpoint: str | None = None  # embedded: model folder (None = the shipped base)
    path: str | None = None  # flux/sd3: the diffusers pipeline folder
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=list)


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
    try:
        return RunModel(kind=kind, checkpoint=model.get("checkpoint"), path=model.get("path"),
                        lora_rank=int(model.get("lora_rank", 0)), lora_alpha=float(model.get("lora_alpha", 16.0)),
                        lora_targets=list(model.get("lora_targets") or []))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad model section ({err})") from None
