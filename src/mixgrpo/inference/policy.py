"""Load any checkpoint users pass to ``sample``/``eval``, and export a run's weights.

A checkpoint argument is one of

* ``base``: the shipped embedded base model;
* a model folder (``config.json`` + ``model.safetensors``): written by ``mixgrpo pretrain``
  or ``mixgrpo export``;
* a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``): written by
  ``mixgrpo export --lora adapter``; applied to the model its config names;
* a run folder (``config.yaml`` + ``checkpoints/latest.json``): written by ``mixgrpo train``;
  its newest *intact* checkpoint (checksums verified, see :mod:`.verify`; a damaged newer
  one is named in one line, ``on_note``), the EMA weights when the run kept an EMA.

Every policy carries the base model it was trained from, for ``--blend``: for LoRA that is
the same network with the adapter switched off, otherwise a second copy.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.checkpoint import (
    BASE_CHECKPOINT,
    CONFIG,
    WEIGHTS,
    load_embedded,
    read_config,
    save_embedded,
)
from ..models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    add_lora,
    has_lora,
    in_place_lora_names,
    merged_state_dict,
    save_peft_adapter,
)
from .policy_base import AdapterOff, Policy
from .runs import latest_run_weights, load_named, load_safetensors, pick_weights

__all__ = ["Policy", "export_run", "load_policy"]



def _resolve_base(spec: str | None) -> Path:
    return BASE_CHECKPOINT if spec in (None, "base") else Path(spec)


def _load_run(folder: Path, name: str, ema: bool, on_note: Callable[[str], None] | None = None) -> Policy:
    from .runs import read_run_model  # the model section as YAML: inference does not import train

    m = read_run_model(folder)
    ckpt, state = latest_run_weights(folder, on_note)
    base = load_embedded(_resolve_base(m.checkpoint))
    model = copy.deepcopy(base)
    if m.lora_rank > 0:
        add_lora(model, m.lora_rank, m.lora_alpha)
        names = [n for n, _ in model.named_parameters() if "lora_" in n]
    else:
        names = [n for n, _ in model.named_parameters()]
    weights, which = pick_weights(state, ema)
    load_named(model, names, weights, ckpt)
    model.eval()
    return Policy(name, model, AdapterOff(model) if m.lora_rank > 0 else base, f"{ckpt} ({which}weights)")


def _load_adapter(folder: Path, name: str) -> Policy:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        rank, alpha, base_spec = int(config["r"]), float(config["lora_alpha"]), config.get("base_model_name_or_path")
    except (ValueError, KeyError) as err:
        raise ValueError(f"{folder / ADAPTER_CONFIG} is not a LoRA adapter config ({err})") from err
    model = add_lora(load_embedded(_resolve_base(base_spec)), rank, alpha)
    state = load_safetensors(folder / ADAPTER_WEIGHTS)
    state = in_place_lora_names(state, "base_model.model.")  # peft's file keys
    load_named(model, [n for n, _ in model.named_parameters() if "lora_" in n], state, folder / ADAPTER_WEIGHTS)
    return Policy(name, model.eval(), AdapterOff(model), str(folder))


def load_policy(spec: str | Path, *, ema: bool = True, on_note: Callable[[str], None] | None = None,
                **diffusers_options: Any) -> Policy:
    """Load ``base``, a model folder, a peft adapter folder or a run folder (see module doc);
    FLUX/SD3 runs, exports and pipeline folders go to
    :func:`~mixgrpo.inference.diffusers_policy.load_diffusers_policy`, which takes
    ``diffusers_options`` (embeddings, image_size, flux_guidance, device, offload, cache_dir, dtype, frames)."""
    name = str(spec)
    folder = Path(spec)
    if name != "base" and _is_diffusers(folder):
        from .diffusers_policy import load_diffusers_policy

        return load_diffusers_policy(folder, name, ema=ema, on_note=on_note, **diffusers_options)
    given = sorted(k for k, v in diffusers_options.items() if v not in (None, False, "cpu"))
    if given:
        raise ValueError(f"{name} is an embedded-model checkpoint; --{given[0].replace('_', '-')} applies to "
                         "FLUX/SD3 runs, exports and pipeline folders only")
    if name == "base":
        model = load_embedded(BASE_CHECKPOINT)
        return Policy("base", model, model, str(BASE_CHECKPOINT))
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {folder} does not exist; pass 'base', a model folder or a run folder")
    if (folder / "config.yaml").is_file():
        return _load_run(folder, name, ema, on_note)
    if (folder / ADAPTER_CONFIG).is_file():
        return _load_adapter(folder, name)
    if (folder / CONFIG).is_file():
        model = load_embedded(folder)
        base_spec = read_config(folder).get("base_checkpoint")
        base = load_embedded(_resolve_base(base_spec)) if base_spec else model
        return Policy(name, model, base, str(folder / WEIGHTS))
    raise FileNotFoundError(
        f"{folder} holds no weights: expected config.json + {WEIGHTS}, {ADAPTER_CONFIG}, a run's config.yaml, "
        "a `mixgrpo export` folder or a diffusers pipeline folder (model_index.json)"
    )


def _is_diffusers(folder: Path) -> bool:
    """A FLUX/SD3 run, a FLUX/SD3 export, or a diffusers pipeline folder."""
    if (folder / "config.yaml").is_file():
        from .runs import read_run_model

        return read_run_model(folder).kind != "embedded"
    return (folder / "mixgrpo_export.json").is_file() or (folder / "model_index.json").is_file()


def export_run(run: str | Path, out: str | Path, *, lora: str = "merged", ema: bool = True,
               on_note: Callable[[str], None] | None = None) -> Path:
    """Write a run's weights as a standalone folder.

    Full fine-tunes (and LoRA with ``lora="merged"``, ``W' = W + (alpha/r) B A``) become a model
    folder (``model.safetensors`` + ``config.json``, recording the base for ``--blend``);
    LoRA with ``lora="adapter"`` becomes a peft adapter folder."""
    if lora not in ("merged", "adapter"):
        raise ValueError(f"--lora must be 'merged' or 'adapter', got {lora!r}")
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run folder (config.yaml missing); export takes a `mixgrpo train --out` folder")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new --out (export never overwrites)")
    import yaml

    model_cfg = yaml.safe_load((run / "config.yaml").read_text())["model"]
    if model_cfg.get("kind", "embedded") not in ("embedded", "tiny-dit"):
        from .diffusers_export import export_diffusers_run

        return export_diffusers_run(run, out, lora=lora, ema=ema, on_note=on_note)
    base_spec = model_cfg.get("checkpoint") or "base"
    policy = load_policy(run, ema=ema, on_note=on_note)
    if has_lora(policy.model) and lora == "adapter":
        return save_peft_adapter(policy.model, out, rank=model_cfg["lora_rank"], alpha=model_cfg["lora_alpha"], base=base_spec)
    model = policy.model
    if has_lora(model):
        merged = type(model)(model.config)  # LoRA is injected in place: the class is the base's
        merged.load_state_dict(merged_state_dict(model))
        model = merged
    return save_embedded(model, out, extra={"base_checkpoint": base_spec, "exported_from": policy.source})
