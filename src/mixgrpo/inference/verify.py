"""Checksums of training checkpoints, and picking the newest intact one.

Training (:mod:`mixgrpo.train.checkpointing`) writes, in each checkpoint's ``state.json``,
``"checksums": {file: sha256}`` for every file it wrote (FSDP shard files as
``dcp/<name>``). Everything that reads a run folder back (``train --resume``, ``sample``,
``eval``, ``export``) goes through :func:`newest_intact`: the newest checkpoint whose files
all match, with one line for each newer checkpoint it had to skip. A checkpoint written
before checksums existed is accepted if its safetensors headers parse.

This module sits in the inference layer so that inference and training both import it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointDamaged",
    "IntactCheckpoint",
    "checkpoint_folders",
    "damage",
    "file_sha256",
    "newest_intact",
]

_CHUNK = 1 << 20


class CheckpointDamaged(ValueError):
    """No intact checkpoint: the message lists what is damaged and what to do."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_folders(root: Path) -> list[Path]:
    """Every finished checkpoint folder (``iter_NNNNNN``) in ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("iter_*") if p.is_dir() and p.suffix != ".dcp" and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def _file_of(folder: Path, name: str) -> Path:
    if name.startswith("dcp/"):
        return folder.parent / f"{folder.name}.dcp" / name[4:]
    return folder / name


def _headers_parse(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
        return True
    except Exception:
        return False


# (folder, (name, size, mtime_ns) of each of its files) -> reason or None: a file changed in
# any way (rewritten, truncated, touched) is hashed again
_verdicts: dict[tuple, str | None] = {}


def _fingerprint(folder: Path) -> tuple:
    files = [*folder.iterdir()]
    shards = folder.parent / f"{folder.name}.dcp"
    if shards.is_dir():
        files += [p for p in shards.rglob("*") if p.is_file()]
    stats = []
    for f in sorted(files):
        st = f.stat()
        stats.append((str(f), st.st_size, st.st_mtime_ns))
    return (str(folder.resolve()), tuple(stats))


def damage(folder: Path) -> str | None:
    """``None`` if checkpoint ``folder`` is intact, else why not, e.g.
    ``"weights.safetensors: checksum mismatch"``."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        return "state.json: missing"
    try:
        key = _fingerprint(folder)
    except OSError:
        return _check(folder, state_path)
    if key in _verdicts:
        return _verdicts[key]
    verdict = _check(folder, state_path)
    _verdicts[key] = verdict
    return verdict


def _check(folder: Path, state_path: Path) -> str | None:
    try:
        state = json.loads(state_path.read_text())
        if not isinstance(state, dict) or "iteration" not in state:
            return "state.json: not a checkpoint state"
    except (OSError, ValueError):
        return "state.json: unreadable"
    sums = state.get("checksums")
    if sums is None:  # written before checksums: at least the safetensors must parse
        if not (folder / "weights.safetensors").is_file():
            return "weights.safetensors: missing"
        for f in sorted(folder.glob("*.safetensors")):
            if not _headers_parse(f):
                return f"{f.name}: unreadable"
        return None
    if "weights.safetensors" not in sums:
        return "weights.safetensors: not listed in state.json"
    for name, expected in sums.items():
        path = _file_of(folder, name)
        if not path.is_file():
            return f"{name}: missing"
        if file_sha256(path) != expected:
            return f"{name}: checksum mismatch"
    return None


@dataclass
class IntactCheckpoint:
    """The newest intact checkpoint of a run, and one line per newer damaged one."""

    folder: Path
    state: dict[str, Any]
    skipped: list[str] = field(default_factory=list)

    @property
    def iteration(self) -> int:
        return int(self.state["iteration"])

    def note(self) -> str | None:
        """One line for the user when newer checkpoints were damaged, else ``None``."""
        if not self.skipped:
            return None
        return f"{'; '.join(self.skipped)}; resuming from {self.folder.name}"


def newest_intact(root: Path) -> IntactCheckpoint | None:
    """The newest intact checkpoint in ``root`` (``None`` when there is none at all); raises
    :class:`CheckpointDamaged` when checkpoints exist but every one is damaged."""
    skipped = []
    for folder in checkpoint_folders(root):
        why = damage(folder)
        if why is None:
            return IntactCheckpoint(folder, json.loads((folder / "state.json").read_text()), skipped)
        skipped.append(f"checkpoint {folder.name} is damaged ({why})")
    if skipped:
        raise CheckpointDamaged(f"{'; '.join(skipped)}; no intact checkpoint is left in {root}: "
                                "start a new run (or restore the checkpoints from a backup)")
    return None
