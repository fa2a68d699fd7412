"""``mixgrpo preprocess``: text embeddings of a prompt file, computed once with a diffusers
pipeline's own text encoders and stored as safetensors shards, so RL never loads the
encoders (MixGRPO precomputes them the same way before training).

Layout of the output folder::

    index.json                 pipeline class, model folder, prompts, shard ranges, shapes
    embeddings-00000.safetensors  prompt_embeds (n, L, D) and the pipeline's other text tensors

FLUX: ``prompt_embeds`` are T5 states, ``pooled`` the CLIP pooled output. SD3: the joint
CLIP-L/G + T5 states and the concatenated CLIP pooled outputs, plus the empty negative
prompt's (``negative_embeds``, ``negative_pooled``: SD3 uses real classifier-free guidance).
Qwen-Image: Qwen2.5-VL states with their 0/1 ``prompt_mask``, zero-padded to the longest
prompt, plus the negative prompt ``" "``'s (``negative_embeds``, ``negative_mask``) for its
true CFG. FLUX.2: Mistral-3 states of three layers, padded to the sequence length (no mask,
no pooled vector; about 31 MB per prompt at length 512 in float32). Stable Diffusion 1.x / 2.x:
the CLIP text encoder's last states ``(n, 77, D)`` and the empty negative prompt's; SDXL: both
CLIP encoders' penultimate states side by side and text_encoder_2's pooled projection, and the
negative prompt's (zeros where the pipeline's ``force_zeros_for_empty_prompt`` says so). CLIP
always pads to its tokenizer's length (77), whatever ``max_sequence_length`` says; SDXL's time
ids depend on the image size only and are made by the adapter. Wan: UMT5 states, zero after each
prompt's tokens, at the full sequence length (512; about 8 MB per prompt in float32), plus the
negative prompt ``""``'s (``negative_embeds``), the pipeline's default, for its CFG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["SUPPORTED_PIPELINES", "load_embeddings", "pipeline_class", "preprocess_prompts", "write_embeddings"]

IMAGE_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline", "QwenImagePipeline", "Flux2Pipeline",
                   "StableDiffusionPipeline", "StableDiffusionXLPipeline")
VIDEO_PIPELINES = ("WanPipeline",)
SUPPORTED_PIPELINES = IMAGE_PIPELINES + VIDEO_PIPELINES
# the text length each pipeline encodes at by default (its __call__'s max_sequence_length)
DEFAULT_LENGTH = {"FluxPipeline": 512, "StableDiffusion3Pipeline": 256, "QwenImagePipeline": 512, "Flux2Pipeline": 512,
                  "WanPipeline": 512}
CLIP_ONLY = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # padded to the tokenizer's own length
# the components the text encoders do not need (the UNet pipelines' denoiser is "unet"; SD1's
# safety checker and its feature extractor only look at decoded images)
_SKIPPED = {"StableDiffusionPipeline": {"unet": None, "vae": None, "safety_checker": None, "feature_extractor": None,
                                       "requires_safety_checker": False},
            "StableDiffusionXLPipeline": {"unet": None, "vae": None}}
QWEN_NEGATIVE_PROMPT = " "  # the "empty" negative prompt diffusers' Qwen-Image docs use for true CFG
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
        raise ValueError(f"{index} describes {name!r}; supported pipelines (text-to-image): "
                         f"{', '.join(IMAGE_PIPELINES)}; (text-to-video): {', '.join(VIDEO_PIPELINES)}: "
                         "pass the folder of one of them")
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
    try:
        skipped = _SKIPPED.get(name, {"transformer": None, "vae": None})
        pipe = getattr(diffusers, name).from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                                        **skipped)
    except ImportError as err:  # e.g. FLUX.2's PixtralProcessor wants torchvision
        raise ValueError(f"cannot load the text encoder of {model_dir}: {str(err).strip().splitlines()[0]} "
                         "(install the library it names)") from None
    length = pipe.tokenizer.model_max_length if name in CLIP_ONLY else max_sequence_length or DEFAULT_LENGTH[name]
    columns: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        for key, value in _encode(pipe, name, batch, length).items():
            columns.setdefault(key, []).append(value.float().cpu())
        if on_batch is not None:
            on_batch(len(batch))
    tensors = {k: _cat_padded(v) for k, v in columns.items()}
    return write_embeddings(out, tensors, prompts, pipeline=name, model=str(model_dir.resolve()),
                            max_sequence_length=length, shard_size=shard_size)


def _encode(pipe, name: str, batch: list[str], length: int) -> dict[str, torch.Tensor]:
    """One batch through the pipeline's own ``encode_prompt``."""
    if name == "FluxPipeline":
        embeds, pooled, _ = pipe.encode_prompt(batch, None, max_sequence_length=length)
        return {"prompt_embeds": embeds, "pooled": pooled}
    if name == "StableDiffusion3Pipeline":
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(batch, None, None, do_classifier_free_guidance=True,
                                                             negative_prompt="", max_sequence_length=length)
        return {"prompt_embeds": embeds, "pooled": pooled, "negative_embeds": neg, "negative_pooled": neg_pooled}
    if name == "QwenImagePipeline":
        parts = {}
        for key, text in (("prompt", batch), ("negative", [QWEN_NEGATIVE_PROMPT] * len(batch))):
            embeds, mask = pipe.encode_prompt(text, max_sequence_length=length)
            mask = torch.ones(embeds.shape[:2]) if mask is None else mask  # None: no padding in this batch
            parts["prompt_embeds" if key == "prompt" else "negative_embeds"] = embeds
            parts[f"{key}_mask"] = mask
        return parts
    if name == "StableDiffusionPipeline":  # negative_prompt None: the pipeline's "" per prompt
        embeds, neg = pipe.encode_prompt(batch, pipe.device, 1, True)
        return {"prompt_embeds": embeds, "negative_embeds": neg}
    if name == "StableDiffusionXLPipeline":
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(batch, device=pipe.device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True)
        return {"prompt_embeds": embeds, "pooled": pooled, "negative_embeds": neg, "negative_pooled": neg_pooled}
    if name == "WanPipeline":
        embeds, neg = pipe.encode_prompt(batch, negative_prompt="", do_classifier_free_guidance=True,
                                         max_sequence_length=length)
        return {"prompt_embeds": embeds, "negative_embeds": neg}
    embeds, _ = pipe.encode_prompt(batch, max_sequence_length=length)  # Flux2Pipeline
    return {"prompt_embeds": embeds}


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Batches stacked, zero-padded along the text axis to the longest (Qwen-Image's batches
    are as long as their longest prompt; the zeros are masked out)."""
    longest = max(p.shape[1] for p in parts) if parts[0].ndim > 1 else None
    if longest is None or all(p.shape[1] == longest for p in parts):
        return torch.cat(parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0) * (p.ndim - 2) + (0, longest - p.shape[1])) for p in parts])


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
    ``pooled_projection_dim``, ``None`` for models without a pooled vector: Qwen-Image, FLUX.2)
    catch embeddings made for another model before any work; ``expect_dim=None`` checks nothing."""
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
    dim = tensors["prompt_embeds"].shape[-1]
    pooled = tensors["pooled"].shape[-1] if "pooled" in tensors else None  # Qwen-Image, FLUX.2: none
    if expect_dim is not None and (dim != expect_dim or pooled != expect_pooled):
        raise ValueError(f"{folder} holds embeddings of width {dim} / pooled {pooled} (made with {index['pipeline']} from "
                         f"{index['model']}); this transformer expects {expect_dim} / {expect_pooled}: preprocess with its pipeline")
    return index["prompts"], tensors, index
