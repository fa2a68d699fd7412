"""``mixgrpo preprocess``: text embeddings of a prompt file, computed once with a diffusers
pipeline's own text encoders and stored as safetensors shards, so RL never loads the
encoders (MixGRPO precomputes them the same way before training).

Layout of the output folder::

    index.json                 pipeline class, model folder, prompts, shard ranges, shapes
    embeddings-00000.safetensors  prompt_embeds (n, L, D), pooled (n, P)
                                  [+ negative_embeds, negative_pooled for SD3's CFG]

FLUX: ``prompt_embeds`` are T5 states, ``pooled`` the CLIP pooled output. SD3: the joint
CLIP-L/G + T5 states and the concatenated CLIP pooled outputs, plus the empty negative
prompt's (SD3 uses real classifier-free guidance).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["SUPPORTED_PIPELINES", "load_embeddings", "pipeline_class", "preprocess_prompts", "write_embeddings"]

SUPPORTED_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")
INDEX = "index.json"


def pipeline_class(model_dir: str | Path) -> str:
    """The supported pipeline class named by ``model_dir/model_index.json``, or a clear error."""
    model_dir = Path(model_dir)
    index = model_dir / "model_index.json"
    if not index.is_file():
        found = ", ".join(sorted(p.name for p in model_dir.iterdir())[:8]) if model_dir.is_dir() else ""
        found = found or "nothing"
        raise FileNotFoundError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json; found: {found})")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(f"{index} describes {name!r}; supported pipelines: {', '.join(SUPPORTED_PIPELINES)}")
    return name


@torch.no_grad()
def preprocess_prompts(
    model_dir: str | Path,
    prompts: Sequence[str],
    out: str | Path,
    *,
    max_sequence_length: int | None = None,
    batch_size: int = 16,
    shard_size: int = 1024,
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """Encode ``prompts`` with the pipeline in ``model_dir`` into shards under ``out``."""
    import diffusers

    model_dir, out = Path(model_dir), Path(out)
    name = pipeline_class(model_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new --out (preprocess never overwrites embeddings)")
    if not prompts:
        raise ValueError("no prompts to encode")
    pipe = getattr(diffusers, name).from_pretrained(model_dir, transformer=None, vae=None, local_files_only=True,
                                                    use_safetensors=True)
    length = max_sequence_length or (512 if name == "FluxPipeline" else 256)
    columns: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        if name == "FluxPipeline":
            embeds, pooled, _ = pipe.encode_prompt(batch, None, max_sequence_length=length)
            parts = {"prompt_embeds": embeds, "pooled": pooled}
        else:
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(batch, None, None, do_classifier_free_guidance=True,
                                                                 negative_prompt="", max_sequence_length=length)
            parts = {"prompt_embeds": embeds, "pooled": pooled, "negative_embeds": neg, "negative_pooled": neg_pooled}
        for key, value in parts.items():
            columns.setdefault(key, []).append(value.float().cpu())
        if on_batch is not None:
            on_batch(len(batch))
    tensors = {k: torch.cat(v) for k, v in columns.items()}
    return write_embeddings(out, tensors, prompts, pipeline=name, model=str(model_dir.resolve()),
                            max_sequence_length=length, shard_size=shard_size)


def write_embeddings(out: Path, tensors: dict[str, torch.Tensor], prompts: Sequence[str], *, pipeline: str,
                     model: str, max_sequence_length: int, shard_size: int = 1024) -> Path:
    """Write ``tensors`` (rows = ``prompts``) as shards + ``index.json``; the folder appears
    complete or not at all."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, len(prompts), shard_size)):
        file = f"embeddings-{i:05d}.safetensors"
        save_file({k: v[start : start + shard_size].contiguous() for k, v in tensors.items()}, str(tmp / file))
        shards.append({"file": file, "start": start, "stop": min(start + shard_size, len(prompts))})
    index = {"pipeline": pipeline, "model": model, "max_sequence_length": max_sequence_length,
             "prompts": list(prompts), "shards": shards, "shapes": {k: list(v.shape[1:]) for k, v in tensors.items()}}
    (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def load_embeddings(folder: str | Path, *, expect_dim: int | None = None,
                    expect_pooled: int | None = None) -> tuple[list[str], dict[str, torch.Tensor], dict]:
    """Prompts, stacked tensors and the index of a :func:`preprocess_prompts` folder.

    ``expect_dim`` / ``expect_pooled`` (the transformer's ``joint_attention_dim`` and
    ``pooled_projection_dim``) catch embeddings made for another model before any work."""
    folder = Path(folder)
    if not (folder / INDEX).is_file():
        raise FileNotFoundError(f"{folder} holds no preprocessed embeddings ({INDEX} missing); run `mixgrpo preprocess`")
    index = json.loads((folder / INDEX).read_text())
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in index["shards"]:
        for key, value in load_file(str(folder / shard["file"])).items():
            parts.setdefault(key, []).append(value)
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    n = len(index["prompts"])
    if any(len(v) != n for v in tensors.values()):
        raise ValueError(f"{folder}: {n} prompts but tensors of {sorted({len(v) for v in tensors.values()})} rows; re-run preprocess")
    dim, pooled = tensors["prompt_embeds"].shape[-1], tensors["pooled"].shape[-1]
    if (expect_dim is not None and dim != expect_dim) or (expect_pooled is not None and pooled != expect_pooled):
        raise ValueError(f"{folder} holds embeddings of width {dim} / pooled {pooled} (made with {index['pipeline']} from "
                         f"{index['model']}); this transformer expects {expect_dim} / {expect_pooled}: preprocess with its pipeline")
    return index["prompts"], tensors, index
