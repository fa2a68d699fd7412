"""FLUX.1 / FLUX.2 / SD3 / Qwen-Image / Wan / Stable Diffusion policies for ``sample`` and
``eval``: a run, an export or a pipeline folder.

* a ``mixgrpo train`` run with ``model.kind=flux|sd3|qwen-image|flux2|wan|sd``: its newest intact checkpoint. LoRA:
  the adapter on the pipeline's transformer, and the base for ``--blend`` is the same network
  with the adapter switched off (no second copy). Full fine-tune: the trained transformer, and
  the base loaded once beside it (``offload``: each kept on the CPU while the other samples);
* a ``mixgrpo export`` folder (``mixgrpo_export.json``): a ``transformer/`` folder (SD:
  ``unet/``; full or merged LoRA) or diffusers' ``pytorch_lora_weights.safetensors``, over the
  base it names;
* a diffusers pipeline folder (``model_index.json``): the base model itself.

Prompts become conditions from `mixgrpo preprocess` folders: the one passed as
``embeddings``, else the run's evaluation or training embeddings when they hold every
prompt, else the pipeline's own text encoders encode them once into ``cache_dir``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.lora import add_lora, in_place_lora_names
from ..text.encoder import default_cache_dir
from .diffusers_models import (
    DEFAULT_GUIDANCE,
    WAN_FRAMES,
    DiffusersModel,
    EmbeddingConditions,
    encode_or_load_embeddings,
    load_diffusers_model,
    load_transformer_of,
    network_folder,
    pipeline_kind,
    scheduler_shift,
    to_device,
)
from .policy_base import AdapterOff, Policy
from .runs import latest_run_weights, load_named, load_safetensors, pick_weights, read_run_model

__all__ = ["EXPORT_META", "load_diffusers_policy"]

EXPORT_META = "mixgrpo_export.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LORA_FILE = "pytorch_lora_weights.safetensors"
PIPELINE_STEPS = 50  # the step count Policy.shift is quoted at where it depends on it (the pipelines' default)


class _Offloaded(nn.Module):
    """One of two models that take turns on ``device``: calling it moves it there and the
    other to the CPU, so a full fine-tune and its base never share accelerator memory."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model, self.config, self.device = model, model.config, device
        self.others: tuple[nn.Module, ...] = ()  # a tuple, not a submodule: the pair would be a module cycle

    def velocity(self, x, t, cond, guidance: float = 1.0):
        for other in self.others:
            other.to("cpu")
        self.model.to(self.device)
        return self.model.velocity(x, t, cond, guidance)


def _apply_lora(parts: DiffusersModel, rank: int, alpha: float, targets: list[str] | None,
                state: dict[str, torch.Tensor], source: Path) -> None:
    add_lora(parts.transformer, rank, alpha, targets or parts.lora_targets)
    names = [n for n, _ in parts.transformer.named_parameters() if "lora_" in n]
    for n, p in parts.transformer.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # the adapter in fp32 over a bf16 base, as it trained
    load_named(parts.transformer, names, state, source)


def load_diffusers_policy(folder: Path, name: str, *, embeddings: str | Path | None = None,
                          image_size: int | None = None, flux_guidance: float | None = None,
                          device: str | torch.device = "cpu", ema: bool = True, offload: bool = False,
                          cache_dir: Path | None = None, on_note: Callable[[str], None] | None = None,
                          dtype: str | None = None, frames: int | None = None) -> Policy:
    """A diffusers-model policy from ``folder`` (see the module doc); ``None`` options take the
    run's (or export's) own values (``dtype``: the weights' float type, default the run's
    ``model.dtype``, else float32; ``frames``: Wan's video frames, else WanPipeline's 81)."""
    device = torch.device(device)
    folder = Path(folder)
    if dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    known: list[str] = []  # preprocess folders the run itself used
    length = None  # the text length prompts are encoded at when no folder holds them (None: the run's, else 512/256)
    if (folder / "config.yaml").is_file():
        m = read_run_model(folder)
        if not m.path:
            raise ValueError(f"{folder}/config.yaml names no model.path (the pipeline folder it was trained from)")
        pipeline, size = Path(m.path), image_size or m.image_size
        weights_dtype = _DTYPES[dtype or m.dtype]
        parts = load_diffusers_model(m.kind, pipeline, image_size=size, device=device, dtype=weights_dtype,
                                     flux_guidance=flux_guidance if flux_guidance is not None else m.flux_guidance,
                                     frames=frames or m.frames)
        ckpt, state = latest_run_weights(folder, on_note)
        weights, which = pick_weights(state, ema)
        weights = {k.removeprefix("transformer."): v for k, v in weights.items()}  # the trainer's wrapper prefix
        source = f"{ckpt} ({which}weights)"
        known = [p for p in (m.eval_embeddings, m.embeddings) if p]
        shift = m.shift
        if m.lora_rank > 0:
            _apply_lora(parts, m.lora_rank, m.lora_alpha, m.lora_targets, weights, ckpt)
            model, base = parts.model, AdapterOff(parts.model)
        else:
            trained = load_transformer_of(m.kind, pipeline)  # fp32, as the checkpoint's master weights
            load_named(trained, [n for n, _ in trained.named_parameters()], weights, ckpt)
            trained.to(weights_dtype)
            model, base = parts.velocity_model(trained), parts.model
    elif (folder / EXPORT_META).is_file():
        meta = json.loads((folder / EXPORT_META).read_text())
        if "base_model" not in meta:
            raise ValueError(f"{folder / EXPORT_META} names no base_model; export the run again with `mixgrpo export`")
        pipeline = Path(meta["base_model"])
        kind = pipeline_kind(pipeline)
        weights_dtype = _DTYPES[dtype or "float32"]
        size = image_size or meta.get("image_size")
        if size is None:
            raise ValueError(f"{folder / EXPORT_META} does not record the image size; pass --image-size")
        guidance = flux_guidance if flux_guidance is not None else meta.get("flux_guidance", 3.5)
        parts = load_diffusers_model(kind, pipeline, image_size=size, device=device, flux_guidance=guidance,
                                     dtype=weights_dtype, frames=frames or meta.get("frames", WAN_FRAMES))
        shift, source = meta.get("shift", "scheduler"), str(folder)
        length = meta.get("max_sequence_length")
        if (folder / LORA_FILE).is_file():  # keys "<network folder>.<module>.lora_A.weight"
            state = in_place_lora_names(load_safetensors(folder / LORA_FILE), network_folder(kind) + ".")
            _apply_lora(parts, int(meta["rank"]), float(meta["alpha"]), meta.get("targets"), state, folder / LORA_FILE)
            model, base = parts.model, AdapterOff(parts.model)
        else:
            trained = load_transformer_of(kind, folder / network_folder(kind), weights_dtype)
            model, base = parts.velocity_model(trained), parts.model
    else:  # a pipeline folder: the base model
        kind = pipeline_kind(folder)
        if image_size is None:
            raise ValueError(f"sampling the pipeline in {folder} needs --image-size (pixels per side)")
        parts = load_diffusers_model(kind, folder, image_size=image_size, device=device,
                                     flux_guidance=DEFAULT_GUIDANCE.get(kind, 3.5) if flux_guidance is None
                                     else flux_guidance,
                                     dtype=_DTYPES[dtype or "float32"], frames=frames or WAN_FRAMES)
        model = base = parts.model
        shift, source = "scheduler", str(folder)
    shift_at = None
    if shift == "scheduler":  # the pipeline's own: FLUX.2's depends on the step count, the others' do not
        shift_at = functools.lru_cache(maxsize=None)(
            functools.partial(scheduler_shift, parts.folder, parts.latent_size))
        shift = shift_at(PIPELINE_STEPS)
    second_network = base is not model and not isinstance(base, AdapterOff)  # a full fine-tune's base
    if second_network and offload:
        model, base = _Offloaded(model, device), _Offloaded(base, device)
        model.others, base.others = (base.model,), (model.model,)
        base.model.to("cpu")
    else:
        model.to(device)
        base.to(device)  # the same network (or its adapter-off view) costs nothing more
    model.eval()
    base.eval()
    conditions = _Conditions(parts, embeddings, known, cache_dir, device, length)
    return Policy(name, model, base, source, kind=parts.kind, decode=parts.decode, shift=float(shift),
                  device=str(device), prompt_conditions=conditions, shift_at=shift_at,
                  time_grid=getattr(parts.model, "time_grid", None),
                  initial_noise_scale=getattr(parts.model, "initial_noise_scale", None))


class _Conditions:
    """``prompts -> (prompts -> condition)``: see the module doc for where embeddings come from."""

    def __init__(self, parts: DiffusersModel, given: str | Path | None, known: list[str], cache_dir: Path | None,
                 device: torch.device, length: int | None = None):
        self.parts, self.given, self.known, self.device, self.length = parts, given, known, device, length
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._loaded: dict[str, EmbeddingConditions] = {}

    def _load(self, folder: str | Path) -> EmbeddingConditions:
        key = str(folder)
        if key not in self._loaded:
            self._loaded[key] = self.parts.conditions(folder)
        return self._loaded[key]

    def __call__(self, prompts: Sequence[str]) -> Callable[[Sequence[str]], Any]:
        if self.given is not None:
            chosen = self._load(self.given)
            missing = chosen.missing(prompts)
            if missing:
                raise ValueError(f"prompt {missing[0]!r} has no embedding in {self.given}; preprocess the prompt file "
                                 "with `mixgrpo preprocess`, or leave out --embeddings to encode them now")
        else:
            chosen = next((c for c in map(self._load, self.known) if not c.missing(prompts)), None)
            if chosen is None:  # the pipeline's text encoders, once per prompt set, at the run's text length
                cache = self.cache_dir or default_cache_dir() / "diffusers"
                length = self.length or next((json.loads((Path(k) / "index.json").read_text()).get("max_sequence_length")
                                              for k in self.known), None)
                chosen = self._load(encode_or_load_embeddings(self.parts.folder, prompts, cache, length))
        return lambda chunk: to_device(chosen(chunk), self.device)
