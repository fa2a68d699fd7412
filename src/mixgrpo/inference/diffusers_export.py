"""Export a FLUX.1 / FLUX.2 / SD3 / Qwen-Image / Stable Diffusion / Wan run in the formats diffusers
reads.

* LoRA, ``lora="adapter"``: ``pytorch_lora_weights.safetensors`` written by the pipeline
  class's own ``save_lora_weights`` (keys ``transformer.<module>.lora_A.weight``; SD and SDXL:
  ``unet.<module>...``), so ``pipe.load_lora_weights(out)`` applies it to the base pipeline;
* LoRA, ``lora="merged"`` (``W' = W + (alpha/r) B A``), or a full fine-tune: a transformer
  folder ``out/transformer`` (SD: ``out/unet``; ``save_pretrained``) to drop into the pipeline,
  ``FluxTransformer2DModel.from_pretrained(out / "transformer")``.

The base weights come from the run's own ``model.path``; only the trained tensors are read
from its newest intact checkpoint (checksums verified; safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..models.diffusers_io import load_transformer
from ..models.lora import add_lora, lora_config, merged_state_dict
from .diffusers_models import TRANSFORMERS, lora_targets, network_folder
from .runs import latest_run_weights, load_named, pick_weights, read_run_model

__all__ = ["LORA_WEIGHTS", "export_diffusers_run"]

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for


def export_diffusers_run(run: Path, out: Path, *, lora: str, ema: bool = True, on_note=None) -> Path:
    """Write the run's trained transformer (or its LoRA) to ``out``; see the module doc."""
    import diffusers

    from ..text.preprocess import pipeline_class as pipeline_class_of

    m = read_run_model(run)
    transformer_class, pipeline_class = TRANSFORMERS[m.kind], pipeline_class_of(m.path)
    folder = network_folder(m.kind)  # transformer, or SD's unet
    ckpt, state = latest_run_weights(run, on_note)  # the newest intact checkpoint, verified
    weights, which = pick_weights(state, ema)
    # the trainer names parameters from its velocity wrapper: "transformer.<module>..."
    weights = {k.removeprefix("transformer."): v for k, v in weights.items()}
    transformer = load_transformer(m.path, transformer_class, subfolder=folder)
    if m.lora_rank > 0:
        targets = m.lora_targets or lora_targets(m.kind)
        add_lora(transformer, m.lora_rank, m.lora_alpha, targets)
        load_named(transformer, [n for n, _ in transformer.named_parameters() if "lora_" in n], weights, ckpt)
    else:
        load_named(transformer, [n for n, _ in transformer.named_parameters()], weights, ckpt)
    out.mkdir(parents=True, exist_ok=True)
    if m.lora_rank > 0 and lora == "adapter":
        from peft import get_peft_model_state_dict

        layers = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
        # the LoRA config (rank, alpha, targets) goes into the file's metadata, so
        # load_lora_weights restores the scale alpha / r
        getattr(diffusers, pipeline_class).save_lora_weights(
            out, weight_name=LORA_WEIGHTS, safe_serialization=True,
            **{f"{folder}_lora_layers": layers,
               f"{folder}_lora_adapter_metadata": lora_config(m.lora_rank, m.lora_alpha, targets).to_dict()})
        meta = {"base_model": str(m.path), "rank": m.lora_rank, "alpha": m.lora_alpha, "targets": list(targets),
                "exported_from": f"{ckpt} ({which}weights)"}
    else:
        if m.lora_rank > 0:
            merged = load_transformer(m.path, transformer_class, subfolder=folder)
            merged.load_state_dict(merged_state_dict(transformer))
            transformer = merged
        transformer.save_pretrained(out / folder, safe_serialization=True)
        meta = {"base_model": str(m.path), "exported_from": f"{ckpt} ({which}weights)"}
    # what `mixgrpo sample/eval` need to sample the export as the run did
    meta.update(image_size=m.image_size, flux_guidance=m.flux_guidance, shift=m.shift, frames=m.frames)
    if m.embeddings and (Path(m.embeddings) / "index.json").is_file():  # the text length its prompts were encoded at
        meta["max_sequence_length"] = json.loads((Path(m.embeddings) / "index.json").read_text()).get("max_sequence_length")
    (out / "mixgrpo_export.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out
