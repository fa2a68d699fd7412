"""Prompt files: plain text (one prompt per line), JSON (a list of strings or of objects with
a ``prompt`` field, HPDv2-style) or JSONL (one string or object per line).

Errors name the file and the line (or list index) to fix.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PromptFileError", "read_prompt_file"]


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message says where and how to fix it."""


def _prompt_of(item: object, where: str) -> str:
    if isinstance(item, dict):
        if "prompt" not in item:
            raise PromptFileError(f"{where}: object has no 'prompt' field (keys: {', '.join(map(str, item)) or 'none'})")
        item = item["prompt"]
    if not isinstance(item, str) or not item.strip():
        raise PromptFileError(f"{where}: expected a non-empty prompt string, got {item!r}")
    return item.strip()


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of ``path`` in file order (blank lines in text/JSONL files are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise PromptFileError(f"{path}: expected a JSON list of prompts or of objects with a 'prompt' field")
        prompts = [_prompt_of(item, f"{path} item {i}") for i, item in enumerate(data)]
    else:
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PromptFileError(f"{path}:{number}: invalid JSON line ({err.msg})") from None
                prompts.append(_prompt_of(item, f"{path}:{number}"))
            else:
                prompts.append(line.strip())
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompts; put one prompt per line")
    return prompts
