"""Training checkpoints: weights, optimizer and progress, written atomically.

Layout::

    DIR/checkpoints/iter_000010/{weights,optimizer}.safetensors + state.json
    DIR/checkpoints/latest.json       -> {"iteration": 10, "path": "iter_000010"}

A checkpoint folder is written under a temporary name, fsynced and renamed; ``latest.json``
is replaced only after that, so it always points at a complete checkpoint. Only
safetensors and JSON are read back.

``state.json`` carries the sha256 of every file of the checkpoint (``"checksums"``; FSDP shard
files as ``dcp/<name>``). Resuming verifies them (:func:`load_resumable`): a damaged newest
checkpoint is named in one line and the newest intact one is loaded instead; nothing is ever
loaded unverified. ``keep`` counts intact checkpoints only. A failed write (full disk...)
removes its temporary folder and leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..inference.verify import (
    CheckpointDamaged,
    IntactCheckpoint,
    checkpoint_folders,
    damage,
    file_sha256,
    newest_intact,
)

__all__ = ["CheckpointDamaged", "IntactCheckpoint", "latest_iteration", "latest_state", "load_latest", "load_resumable",
           "newest_intact", "save_checkpoint"]


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
    """Write checkpoint ``iteration`` and prune to the newest ``keep`` intact ones (``opt=None``:
    the optimizer state lives elsewhere, e.g. in the FSDP shards ``extra["dcp"]`` names, whose
    files get checksums too). A write that fails removes its temporary folder and raises."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if not all(torch.isfinite(v).all() for v in weights.values()):
        raise ValueError(f"refusing to checkpoint non-finite weights at iteration {iteration}")
    try:
        tmp.mkdir()
        _write_files(tmp, iteration, weights, opt, extra, root)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    index_tmp = root / ".latest.json.tmp"
    index_tmp.write_text(json.dumps({"iteration": iteration, "path": name}))
    os.replace(index_tmp, root / "latest.json")
    _fsync_dir(root)
    _prune(root, keep, name)
    return final


def _write_files(tmp: Path, iteration: int, weights: dict[str, torch.Tensor], opt: torch.optim.Optimizer | None,
                 extra: dict[str, Any], root: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    meta: dict[str, Any] = {}
    if opt is not None:
        opt_tensors, meta["optimizer"] = _optimizer_tensors(opt)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    sums = {}
    for f in sorted(tmp.iterdir()):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
        sums[f.name] = file_sha256(f)
    if "dcp" in extra:  # the FSDP shards every rank wrote before this
        shards = root / extra["dcp"]
        for f in sorted(p for p in shards.rglob("*") if p.is_file()):
            sums[f"dcp/{f.relative_to(shards).as_posix()}"] = file_sha256(f)
    state = tmp / "state.json"
    with open(state, "w") as handle:
        handle.write(json.dumps({"iteration": iteration, **meta, **extra, "checksums": sums}, indent=1))
        handle.flush()
        os.fsync(handle.fileno())


def _prune(root: Path, keep: int, newest: str) -> None:
    """Keep the newest ``keep`` intact checkpoints (and any damaged one newer than the oldest
    of those, which the run will overwrite as it goes); delete everything older."""
    intact = []
    for folder in checkpoint_folders(root):
        if len(intact) == keep:
            shutil.rmtree(folder, ignore_errors=True)
        elif damage(folder) is None:
            intact.append(folder.name)
    kept = {p.name for p in checkpoint_folders(root)}
    for shards in root.glob("iter_*.dcp"):  # FSDP shards of checkpoints no longer kept
        if shards.stem not in kept and shards.stem < newest:
            shutil.rmtree(shards, ignore_errors=True)


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
    """Load the newest intact checkpoint; restores ``opt`` in place (see :func:`load_resumable`)."""
    found = load_resumable(root)
    iteration, weights, state = load_checkpoint(found, opt)
    return iteration, weights, state


def load_resumable(root: Path) -> IntactCheckpoint:
    """The newest intact checkpoint in ``root``; ``.note()`` names any newer damaged one.
    Raises ``FileNotFoundError`` when there is none, :class:`CheckpointDamaged` (a ValueError)
    when all are damaged."""
    found = newest_intact(root)
    if found is None:
        raise FileNotFoundError(f"no checkpoint to resume from in {root}; start without --resume")
    return found


def load_checkpoint(found: IntactCheckpoint, opt: torch.optim.Optimizer | None) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a verified checkpoint: ``(iteration, weights, state)``; restores ``opt`` in place."""
    folder, state = found.folder, dict(found.state)
    try:
        weights = load_file(str(folder / "weights.safetensors"))
        if opt is not None:
            _restore_optimizer(opt, load_file(str(folder / "optimizer.safetensors")), state.pop("optimizer"))
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"checkpoint {folder} is unreadable ({err}); delete it to resume from an earlier one") from err
    return int(state["iteration"]), weights, state
