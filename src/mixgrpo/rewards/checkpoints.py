"""Reading reward checkpoints safely, and naming what is wrong with them.

Official reward weights ship as torch pickles (``HPS_v2.1_compressed.pt``, ``ImageReward.pt``).
They are read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers (no code runs); safetensors files are read as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["load_state_dict", "require_keys"]

# a prefix that identifies each official layout, to say which reward a checkpoint belongs to
KNOWN_LAYOUTS = {"visual.conv1.weight": "an open_clip CLIP (HPS-v2 / HPS-v2.1)",
                 "blip.visual_encoder.patch_embed.proj.weight": "ImageReward (BLIP)",
                 "vision_model.embeddings.patch_embedding.weight": "a Hugging Face CLIPModel (PickScore / CLIP)"}


def load_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of ``path`` (.pt/.pth/.bin via ``weights_only`` or .safetensors); a
    ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist; pass the path of the official file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zips, pickles with code, foreign formats
        raise ValueError(f"{path} is not a readable {what} checkpoint ({type(err).__name__}: {str(err)[:120]}); "
                         "re-download the official file") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors; is it the official {what} file?")
    return {k.removeprefix("module."): v for k, v in state.items()}


def require_keys(state: dict[str, torch.Tensor], keys: Iterable[str], what: str, path: str | Path) -> None:
    """Raise naming the missing keys, and the reward the file looks like when it is another's."""
    keys = list(keys)
    missing = [k for k in keys if k not in state]
    if not missing:
        return
    other = next((name for key, name in KNOWN_LAYOUTS.items() if key in state and key not in keys), None)
    if other is not None:
        raise ValueError(f"{path} is a checkpoint of {other}, not of {what}; pass the {what} file")
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    raise ValueError(f"{path} lacks {len(missing)} key(s) a {what} checkpoint has ({shown}); "
                     "the file is truncated or of another model")
