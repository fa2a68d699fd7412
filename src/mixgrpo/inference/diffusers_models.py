"""FLUX.1, FLUX.2, SD3, Qwen-Image, Stable Diffusion 1.x / 2.x / XL and Wan (text-to-video) for
inference: the velocity model, its VAE decoder, its scheduler's time shift (or, for SD, its DDIM
grid: the model's ``time_grid``) and prompt conditions from `mixgrpo preprocess` folders, loaded
from local diffusers folders.

Training (:mod:`mixgrpo.train.backends`) builds its diffusers backend from the same pieces, so
``sample`` and ``eval`` see the model exactly as the trainer did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DEFAULT_GUIDANCE", "DiffusersModel", "EmbeddingConditions", "encode_or_load_embeddings",
           "load_diffusers_model", "lora_targets", "make_velocity_model", "network_folder", "scheduler_shift",
           "to_device", "vae_decoder"]

logger = logging.getLogger(__name__)

TRANSFORMERS = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel",
                "qwen-image": "QwenImageTransformer2DModel", "flux2": "Flux2Transformer2DModel",
                "wan": "WanTransformer3DModel", "sd": "UNet2DConditionModel"}
# the pipeline folder's subfolder holding that network (and its name in LoRA files: "<name>.<module>...")
NETWORK_FOLDERS = {"sd": "unet"}
PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3", "QwenImagePipeline": "qwen-image",
             "Flux2Pipeline": "flux2", "WanPipeline": "wan", "StableDiffusionPipeline": "sd",
             "StableDiffusionXLPipeline": "sd"}
VAES = {"flux": "AutoencoderKL", "sd3": "AutoencoderKL", "qwen-image": "AutoencoderKLQwenImage",
        "flux2": "AutoencoderKLFlux2", "wan": "AutoencoderKLWan", "sd": "AutoencoderKL"}
WAN_FRAMES = 81  # WanPipeline's default frame count, for a pipeline folder sampled without --frames
# the distilled guidance a pipeline folder samples with when none is given (each pipeline's default)
DEFAULT_GUIDANCE = {"flux": 3.5, "flux2": 4.0}


def lora_targets(kind: str) -> list[str]:
    """The default LoRA target modules of a diffusers ``kind``."""
    from ..models.flux import FLUX_LORA_TARGETS
    from ..models.flux2 import FLUX2_LORA_TARGETS
    from ..models.qwen_image import QWEN_IMAGE_LORA_TARGETS
    from ..models.sd import SD_LORA_TARGETS
    from ..models.sd3 import SD3_LORA_TARGETS
    from ..models.wan import WAN_LORA_TARGETS

    return list({"flux": FLUX_LORA_TARGETS, "sd3": SD3_LORA_TARGETS, "qwen-image": QWEN_IMAGE_LORA_TARGETS,
                 "flux2": FLUX2_LORA_TARGETS, "wan": WAN_LORA_TARGETS, "sd": SD_LORA_TARGETS}[kind])


def network_folder(kind: str) -> str:
    """The pipeline subfolder of ``kind``'s denoising network: ``transformer``, or ``unet`` for SD."""
    return NETWORK_FOLDERS.get(kind, "transformer")


def to_device(cond: Any, device: torch.device | str) -> Any:
    """A condition dataclass with every tensor field moved to ``device``."""
    moved = {f.name: getattr(cond, f.name).to(device) for f in dataclasses.fields(cond)
             if torch.is_tensor(getattr(cond, f.name))}
    return dataclasses.replace(cond, **moved)


def scheduler_shift(pipeline_dir: Path, latent_size: int, num_steps: int | None = None) -> float:
    """The shift ``s`` of ``t' = s t / (1 + (s - 1) t)`` the pipeline's scheduler uses.

    SD3: the config's ``shift``. FLUX.1 and Qwen-Image (``use_dynamic_shifting``): ``mu``
    interpolated linearly in the image token count ``(latent / 2)^2`` between ``base_shift`` at
    ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len`` (diffusers'
    ``calculate_shift``), then ``s = exp(mu)`` (``s = mu`` for ``time_shift_type: linear``).
    FLUX.2 ignores those four numbers: its ``mu`` comes from the token count ``latent^2`` (its
    latents are patchified already) and the step count (diffusers' ``compute_empirical_mu``), so
    it needs ``num_steps``. A ``shift_terminal`` (Qwen-Image's scheduler stretches its grid to end
    at 0.02) is not reproduced; a warning says so. Wan's ``UniPCMultistepScheduler`` on flow
    sigmas: its ``flow_shift`` (its grid starts at ``1 - 1/1000`` where ours starts at 1)."""
    path = Path(pipeline_dir) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pass the pipeline folder, or give the time shift as a number")
    c = json.loads(path.read_text())
    if c.get("shift_terminal"):
        logger.warning("%s stretches its grid to end at shift_terminal=%s; our grid ends at 0 (set sampler.shift to a "
                       "number to silence this)", path, c["shift_terminal"])
    if not c.get("use_dynamic_shifting"):
        return float(c["flow_shift"]) if c.get("use_flow_sigmas") else float(c.get("shift", 1.0))
    index = Path(pipeline_dir) / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == "Flux2Pipeline":
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        if num_steps is None:
            raise ValueError("FLUX.2's scheduler shift depends on the number of steps; give the steps, or the time "
                             "shift as a number")
        mu = compute_empirical_mu(latent_size**2, num_steps)
    else:
        seq = (latent_size // 2) ** 2
        lo, hi = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        mu = c.get("base_shift", 0.5) + (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) * (seq - lo) / (hi - lo)
    return mu if c.get("time_shift_type") == "linear" else math.exp(mu)


def vae_decoder(pipeline_dir: Path, device: torch.device,
                kind: str = "flux") -> tuple[Callable[[torch.Tensor], torch.Tensor], int, int]:
    """``latents -> images (B, 3, H, W) in [0, 1]`` with the pipeline's VAE and its latent
    normalisation, the pixels per latent cell, and the multiple image sides must be.

    FLUX.1 / SD3 / SD (``AutoencoderKL``): ``z / scaling + shift`` (SDXL-style VAEs with
    ``latents_mean`` / ``latents_std``: ``z std / scaling + mean``). Qwen-Image
    (``AutoencoderKLQwenImage``, a one-frame video VAE): ``z / (1 / std) + mean`` per channel on
    ``(B, C, 1, H, W)``. FLUX.2 (``AutoencoderKLFlux2``): our latents are its patchified ones, so
    ``z * sqrt(var + eps) + mean`` with the BatchNorm running statistics, then the 2x2 patches go
    back to pixels of the VAE latent. Wan (``AutoencoderKLWan``): ``(B, C, F, H, W)`` latents,
    ``z / (1 / std) + mean`` per channel as ``WanPipeline`` computes it, decoded one clip at a time
    (a causal video decoder: memory grows with the frames, not the batch) into videos
    ``(B, F, 3, H, W)``."""
    import diffusers

    folder = Path(pipeline_dir) / "vae"
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no VAE in {pipeline_dir} (vae/config.json missing); pass the pipeline folder")
    found = json.loads(config.read_text()).get("_class_name")
    if found != VAES[kind]:
        raise ValueError(f"{config} describes {found!r}; a {kind} pipeline has an {VAES[kind]}: pass a {kind} pipeline folder")
    vae = getattr(diffusers, found).from_pretrained(folder, local_files_only=True, use_safetensors=True)
    vae = vae.eval().requires_grad_(False).to(device)
    c = vae.config
    if kind == "qwen-image":
        factor = 2 ** len(c.temperal_downsample)
        mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1).to(device, vae.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, -1, 1, 1).to(device, vae.dtype)

        def to_vae(z: torch.Tensor) -> torch.Tensor:  # the pipeline's own arithmetic, on one frame
            return (z.to(device, vae.dtype) / inv_std + mean)[:, :, None]

    elif kind == "wan":
        factor = c.scale_factor_spatial
        mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1).to(device, vae.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, -1, 1, 1, 1).to(device, vae.dtype)

        def to_vae(z: torch.Tensor) -> torch.Tensor:
            return z.to(device, vae.dtype) / inv_std + mean

    elif kind == "flux2":
        factor = 2 ** (len(c.block_out_channels) - 1)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + c.batch_norm_eps)

        def to_vae(z: torch.Tensor) -> torch.Tensor:
            z = z.to(device, vae.dtype) * std.to(vae.dtype) + mean.to(vae.dtype)
            b, ch, h, w = z.shape  # (B, 4C, H/2, W/2) -> (B, C, H, W): channel 4c + 2i + j is patch pixel (i, j)
            return z.view(b, ch // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, ch // 4, 2 * h, 2 * w)

    elif kind == "sd" and getattr(c, "latents_mean", None) is not None and getattr(c, "latents_std", None) is not None:
        factor = 2 ** (len(c.block_out_channels) - 1)
        mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(c.latents_std).view(1, -1, 1, 1)

        def to_vae(z: torch.Tensor) -> torch.Tensor:  # StableDiffusionXLPipeline's arithmetic
            return (z * std.to(z) / c.scaling_factor + mean.to(z)).to(device, vae.dtype)

    else:
        factor = 2 ** (len(c.block_out_channels) - 1)
        scale, shift = c.scaling_factor, c.shift_factor or 0.0

        def to_vae(z: torch.Tensor) -> torch.Tensor:
            return (z / scale + shift).to(device, vae.dtype)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        if kind == "wan":  # (B, 3, F, H, W) -> (B, F, 3, H, W), the video rewards' layout
            clips = [vae.decode(to_vae(z[None]), return_dict=False)[0] for z in latents]
            return ((torch.cat(clips).float() + 1) / 2).clamp(0, 1).transpose(1, 2)
        images = vae.decode(to_vae(latents), return_dict=False)[0]
        images = images[:, :, 0] if images.ndim == 5 else images  # Qwen-Image's VAE returns one frame
        return ((images.float() + 1) / 2).clamp(0, 1)

    # FLUX.2's latents are patchified: one cell covers 2 VAE cells, and any side that is a
    # multiple of it works; SD's UNet takes any latent side; the others pack 2x2 VAE cells into a token
    if kind == "flux2":
        return decode, 2 * factor, 2 * factor
    return decode, factor, factor if kind == "sd" else 2 * factor


class EmbeddingConditions:
    """``prompts -> condition`` from a `mixgrpo preprocess` folder; a prompt it lacks is one line
    naming the folder and the fix."""

    def __init__(self, folder: str | Path, make: Callable[..., Any], *, expect_dim: int, expect_pooled: int):
        from ..text.preprocess import load_embeddings

        self.folder = str(folder)
        self.prompts, self.tensors, _ = load_embeddings(folder, expect_dim=expect_dim, expect_pooled=expect_pooled)
        self.row = {p: i for i, p in enumerate(self.prompts)}
        self.make = make

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.row

    def missing(self, prompts: Sequence[str]) -> list[str]:
        return [p for p in prompts if p not in self.row]

    def __call__(self, prompts: Sequence[str]):
        missing = self.missing(prompts)
        if missing:
            raise ValueError(f"prompt {missing[0]!r} has no embedding in {self.folder}; "
                             "preprocess it first (`mixgrpo preprocess`)")
        idx = torch.tensor([self.row[p] for p in prompts])
        return self.make(**{k: v[idx] for k, v in self.tensors.items()})


def make_velocity_model(kind: str, transformer: nn.Module, latent_size: int, flux_guidance: float = 3.5, *,
                        frames: int | None = None, expand_timesteps: bool = False,
                        pipeline_dir: str | Path | None = None, image_size: int | None = None) -> nn.Module:
    """``kind``'s adapter over ``transformer`` (``flux_guidance``: FLUX.1 / FLUX.2's distilled
    guidance; ``frames``: Wan's latent frames; ``expand_timesteps``: Wan2.2 TI2V's per-token
    timesteps; SD needs ``pipeline_dir`` for its scheduler and ``image_size`` for SDXL's time ids)."""
    if kind == "wan":
        from ..models.wan import WanVelocityModel

        if frames is None:
            raise ValueError("a Wan velocity model needs its latent frame count")
        return WanVelocityModel(transformer, latent_size, frames, expand_timesteps)
    if kind == "sd":
        from ..models.sd import SDVelocityModel, load_vp_schedule

        if pipeline_dir is None or image_size is None:
            raise ValueError("an sd velocity model needs its pipeline folder (the DDIM schedule) and the image size")
        return SDVelocityModel(transformer, latent_size, load_vp_schedule(pipeline_dir), image_size)
    if kind == "flux":
        from ..models.flux import FluxVelocityModel

        return FluxVelocityModel(transformer, latent_size, flux_guidance)
    if kind == "flux2":
        from ..models.flux2 import Flux2VelocityModel

        return Flux2VelocityModel(transformer, latent_size, flux_guidance)
    if kind == "qwen-image":
        from ..models.qwen_image import QwenImageVelocityModel

        return QwenImageVelocityModel(transformer, latent_size)
    from ..models.sd3 import SD3VelocityModel

    return SD3VelocityModel(transformer, latent_size)


@dataclass
class DiffusersModel:
    """What sampling needs of a diffusers pipeline folder."""

    kind: str  # flux | sd3 | qwen-image | flux2 | wan | sd
    folder: Path  # the pipeline folder
    transformer: nn.Module  # the diffusers transformer, or SD's UNet (LoRA goes here)
    model: nn.Module  # velocity(x, t, cond, guidance) over it
    decode: Callable[[torch.Tensor], torch.Tensor]  # final samples -> images (SD: from c(tau_end) y)
    latent_size: int
    lora_targets: list[str]
    image_size: int | None = None  # pixels per side

    def make_condition(self, **tensors: torch.Tensor):
        if self.kind == "flux":
            from ..models.flux import FluxCondition

            return FluxCondition(tensors["prompt_embeds"], tensors["pooled"])
        if self.kind == "flux2":
            from ..models.flux2 import Flux2Condition

            return Flux2Condition(tensors["prompt_embeds"])
        if self.kind == "wan":
            from ..models.wan import WanCondition

            return WanCondition(tensors["prompt_embeds"], tensors.get("negative_embeds"))
        if self.kind == "qwen-image":
            from ..models.qwen_image import QwenImageCondition

            return QwenImageCondition(tensors["prompt_embeds"], tensors["prompt_mask"], tensors.get("negative_embeds"),
                                      tensors.get("negative_mask"))
        if self.kind == "sd":
            from ..models.sd import SDCondition

            return SDCondition(tensors["prompt_embeds"], tensors.get("pooled"), tensors.get("negative_embeds"),
                               tensors.get("negative_pooled"))
        from ..models.sd3 import SD3Condition

        return SD3Condition(tensors["prompt_embeds"], tensors["pooled"], tensors.get("negative_embeds"),
                            tensors.get("negative_pooled"))

    def conditions(self, embeddings: str | Path) -> EmbeddingConditions:
        c = self.transformer.config
        if self.kind == "sd":  # SDXL's added embedding: the pooled text vector, then 6 time ids
            pooled = (c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
                      if c.addition_embed_type == "text_time" else None)
            return EmbeddingConditions(embeddings, self.make_condition, expect_dim=c.cross_attention_dim,
                                       expect_pooled=pooled)
        pooled = c.pooled_projection_dim if self.kind in ("flux", "sd3") else None  # Qwen-Image, FLUX.2, Wan: none
        dim = c.text_dim if self.kind == "wan" else c.joint_attention_dim
        return EmbeddingConditions(embeddings, self.make_condition, expect_dim=dim, expect_pooled=pooled)

    @property
    def video(self) -> bool:
        """Whether samples decode to videos ``(B, F, 3, H, W)`` (latents with a frame axis)."""
        return hasattr(self.model.config, "frames")

    def velocity_model(self, transformer: nn.Module) -> nn.Module:
        """Another transformer (a fine-tune) behind the same adapter settings."""
        return make_velocity_model(self.kind, transformer, self.latent_size, getattr(self.model, "guidance_scale", 3.5),
                                   frames=getattr(self.model.config, "frames", None),
                                   expand_timesteps=getattr(self.model, "expand_timesteps", False),
                                   pipeline_dir=self.folder, image_size=self.image_size)


def pipeline_kind(folder: Path) -> str:
    """``flux``, ``sd3``, ``qwen-image``, ``flux2``, ``wan`` or ``sd`` from a pipeline folder's ``model_index.json``."""
    from ..text.preprocess import pipeline_class

    return PIPELINES[pipeline_class(folder)]


def load_transformer_of(kind: str, folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from ..models.diffusers_io import load_transformer

    return load_transformer(folder, TRANSFORMERS[kind], dtype, subfolder=network_folder(kind))


def load_diffusers_model(kind: str, folder: str | Path, *, image_size: int, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, flux_guidance: float = 3.5,
                         frames: int = WAN_FRAMES) -> DiffusersModel:
    """The transformer of the pipeline in ``folder`` behind ``velocity``, its VAE decoder and
    latent size for ``image_size`` pixels (and, for Wan, ``frames`` video frames)."""
    if kind not in TRANSFORMERS:
        raise ValueError(f"model kind must be one of {', '.join(TRANSFORMERS)}, got {kind!r}")
    folder = Path(folder)
    _check_pipeline(kind, folder)
    video: dict[str, Any] = {}
    if kind == "wan":  # the pipeline class, its experts and the frame count are checked before any weight loads
        from ..models.wan import check_wan_pipeline, latent_frames

        expand = bool(check_wan_pipeline(folder).get("expand_timesteps"))
        vae_config = folder / "vae" / "config.json"
        temporal = json.loads(vae_config.read_text()).get("scale_factor_temporal", 4) if vae_config.is_file() else 4
        video = {"frames": latent_frames(frames, temporal), "expand_timesteps": expand}
    transformer = load_transformer_of(kind, folder, dtype)
    decode, factor, multiple = vae_decoder(folder, torch.device(device), kind)
    if image_size % multiple:
        raise ValueError(f"image size {image_size} must be a multiple of {multiple} for this VAE")
    latent = image_size // factor
    model = make_velocity_model(kind, transformer, latent, flux_guidance, pipeline_dir=folder, image_size=image_size,
                                **video)
    final = getattr(model, "final_latents", None)  # a VP model's last sample is y = x / c(tau_end)
    if final is not None:
        decode = _decoding_from(final, decode)
    return DiffusersModel(kind, folder, transformer, model, decode, latent, lora_targets(kind), image_size)


def _check_pipeline(kind: str, folder: Path) -> None:
    """A pipeline folder without ``kind``'s network folder: one line naming the kind it is."""
    index = folder / "model_index.json"
    if (folder / network_folder(kind)).is_dir() or not index.is_file():
        return  # the network's own folder, or the loader names what it finds
    found = json.loads(index.read_text()).get("_class_name")
    fix = (f"set model.kind={PIPELINES[found]}" if found in PIPELINES else
           f"pass a {' or '.join(p for p, k in PIPELINES.items() if k == kind)} folder")
    raise ValueError(f"{index} describes {found!r}, which has no {network_folder(kind)}/ for model.kind={kind}: {fix}")


def _decoding_from(final_latents: Callable[[torch.Tensor], torch.Tensor],
                   decode: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda samples: decode(final_latents(samples))


def encode_or_load_embeddings(pipeline_dir: Path, prompts: Sequence[str], cache_dir: Path,
                              max_sequence_length: int | None = None) -> Path:
    """A `mixgrpo preprocess` folder holding ``prompts``: made once with the pipeline's own text
    encoders under ``cache_dir`` (keyed by pipeline, prompts and length), reused afterwards."""
    from ..text.preprocess import preprocess_prompts

    unique = list(dict.fromkeys(prompts))
    key = json.dumps([str(Path(pipeline_dir).resolve()), unique, max_sequence_length])
    out = Path(cache_dir) / f"embeddings-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (out / "index.json").is_file():
        return out
    os.makedirs(cache_dir, exist_ok=True)
    return preprocess_prompts(pipeline_dir, unique, out, max_sequence_length=max_sequence_length)
