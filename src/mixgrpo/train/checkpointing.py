"""Training checkpoints: weights, optimizer and progress, written atomically.

Layout::

    DIR/checkpoints/iter_000010/{weights,optimizer}.safetensors + state.json
    DIR/checkpoints/latest.json       -> {"iteration": 10, "path": "iter_000010"}

A checkpoint folder is written under a temporary name, fsynced and renamed; ``latest.json``
is replaced only after that, so it always points at a complete checkpoint. Only
safetensors and JSON are read back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["latest_iteration", "latest_state", "load_latest", "save_checkpoint"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    root: Path, iteration: int, weights: dict[str, torch.Tensor], opt: torch.optim.Optimizer | None,
    extra: dict[str, Any], keep: int,
) -> Path:
    """Write checkpoint ``iteration`` and prune to the newest ``keep`` (``opt=None``: the
    optimizer state lives elsewhere, e.g. in the FSDP shards ``extra["dcp"]`` names)."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if not all(torch.isfinite(v).all() for v in weights.values()):
        shutil.rmtree(tmp)
        raise ValueError(f"refusing to checkpoint non-finite weights at iteration {iteration}")
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    meta = {}
    if opt is not None:
        opt_tensors, meta["optimizer"] = _optimizer_tensors(opt)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, **meta, **extra}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    index_tmp = root / ".latest.json.tmp"
    index_tmp.write_text(json.dumps({"iteration": iteration, "path": name}))
    os.replace(index_tmp, root / "latest.json")
    _fsync_dir(root)
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and p.suffix != ".dcp")
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    kept = {p.name for p in done[-keep:]}
    for shards in root.glob("iter_*.dcp"):  # FSDP shards of checkpoints no longer kept
        if shards.stem not in kept and shards.stem < name:
            shutil.rmtree(shards, ignore_errors=True)
    return final


def latest_iteration(root: Path) -> int | None:
    index = root / "latest.json"
    if not index.is_file():
        return None
    return int(json.loads(index.read_text())["iteration"])


def latest_state(root: Path) -> dict[str, Any]:
    """``state.json`` of the checkpoint ``latest.json`` points at (``{}`` when there is none)."""
    index = root / "latest.json"
    if not index.is_file():
        return {}
    try:
        return json.loads((root / json.loads(index.read_text())["path"] / "state.json").read_text())
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"checkpoint in {root} is unreadable ({err}); delete it or start a new run directory") from err


def load_latest(root: Path, opt: torch.optim.Optimizer) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Load the checkpoint ``latest.json`` points at; restores ``opt`` in place."""
    index = root / "latest.json"
    if not index.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from in {root} (latest.json is missing); start without --resume")
    try:
        entry = json.loads(index.read_text())
        folder = root / entry["path"]
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "weights.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"checkpoint in {root} is unreadable ({err}); delete it or start a new run directory") from err
    _restore_optimizer(opt, opt_tensors, state.pop("optimizer"))
    return int(state["iteration"]), weights, state
