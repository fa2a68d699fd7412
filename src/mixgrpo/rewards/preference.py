"""Human-preference rewards on CLIP: HPS-v2.1, PickScore and CLIP score, from local files.

Each scores images the way its official code does, after the image has become 8-bit
(generated images reach the official scorers as PIL images):

* ``hps`` (HPS-v2.1, hpsv2 package): open_clip ViT-H-14 with the ``HPS_v2.1_compressed.pt``
  weights. Preprocessing ``preprocess_val``: ToTensor, resize the longest side to 224
  (bicubic, antialiased, on the tensor), pad to square with 0, normalise with the OpenAI CLIP
  mean/std. Score: ``<f_img, f_txt>`` of the L2-normalised features (about 0.2-0.35), no
  logit scale.
* ``pickscore`` (PickScore_v1): a transformers CLIP-H; the processor of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (shortest side 224, centre crop). Score:
  ``exp(logit_scale) * <f_img, f_txt>`` (about 18-23).
* ``clipscore``: any transformers CLIP folder (weights + processor); score
  ``100 * max(<f_img, f_txt>, 0)`` (torchmetrics' CLIPScore convention).

All run batched under ``torch.no_grad`` on ``device`` and return ``(B,)`` float32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .base import check_images, register_reward
from .checkpoints import load_state_dict
from .openclip import clip_from_open_clip

__all__ = ["CLIPScoreReward", "HPSv21Reward", "PickScoreReward", "hps_preprocess", "projected", "to_uint8_grid"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_uint8_grid(images: torch.Tensor) -> torch.Tensor:
    """``round(255 x) / 255``: the values a PIL image of ``images`` holds (diffusers' ``numpy_to_pil``)."""
    return (images.float() * 255).round().clamp(0, 255) / 255


def hps_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """hpsv2's ``preprocess_val`` on ``(B, 3, H, W)`` images in [0, 1] (see the module doc)."""
    x = to_uint8_grid(images)
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        ph, pw = size - nh, size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def projected(features) -> torch.Tensor:
    """CLIP's projected features: transformers 4 returns the tensor, 5 an output whose
    ``pooler_output`` holds it."""
    return features if torch.is_tensor(features) else features.pooler_output


def _folder(path: str | Path, what: str, *needs: str) -> Path:
    """``path`` if it holds one of the files ``needs`` names, else a clear error."""
    folder = Path(path)
    if not any((folder / n).is_file() for n in needs):
        raise FileNotFoundError(f"{what}: {folder} has no {' or '.join(needs)}; pass the local folder of the official files")
    return folder


class _ClipScorer:
    """Shared batching: features of image chunks and their prompts, one score per pair."""

    name = "clip-scorer"

    def __init__(self, model, tokenizer, *, device: str, batch_size: int, dtype: str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device, self.batch_size = torch.device(device), batch_size
        self.model = model.to(self.device, _DTYPES[dtype]).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dtype = _DTYPES[dtype]

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, cosine: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            chunk, texts = images[start : start + self.batch_size], prompts[start : start + self.batch_size]
            pixels = self.pixel_values(chunk).to(self.device, self.dtype)
            tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                    max_length=self.model.config.text_config.max_position_embeddings,
                                    return_tensors="pt").to(self.device)
            f_img = F.normalize(projected(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
            f_txt = F.normalize(projected(self.model.get_text_features(input_ids=tokens["input_ids"])).float(), dim=-1)
            scores.append(self.finish((f_img * f_txt).sum(-1)).cpu())
        return torch.cat(scores).float()


@register_reward("hps")
class HPSv21Reward(_ClipScorer):
    """HPS-v2.1. ``path``: ``HPS_v2.1_compressed.pt`` (or its state dict as .safetensors);
    ``tokenizer``: a CLIP tokenizer folder (``vocab.json`` + ``merges.txt``; open_clip's
    ViT-H-14 uses the standard CLIP BPE, e.g. the folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""

    def __init__(self, path: str, tokenizer: str, device: str = "cpu", batch_size: int = 32, dtype: str = "float32",
                 vision_heads: int | None = None, text_heads: int | None = None):
        from transformers import CLIPTokenizer

        state = load_state_dict(path, "HPS-v2.1")
        model = clip_from_open_clip(state, str(path), vision_heads=vision_heads, text_heads=text_heads)
        tok = CLIPTokenizer.from_pretrained(_folder(tokenizer, "hps tokenizer", "vocab.json"), local_files_only=True)
        super().__init__(model, tok, device=device, batch_size=batch_size, dtype=dtype)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        return hps_preprocess(images, self.model.config.vision_config.image_size)

    def finish(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine


class _ProcessorScorer(_ClipScorer):
    """CLIP scorers whose official preprocessing is a transformers ``CLIPProcessor`` on PIL images."""

    def __init__(self, path: str, processor: str | None, what: str, **kw):
        from transformers import CLIPModel, CLIPProcessor

        model_dir = _folder(path, what, "config.json")
        try:
            model = CLIPModel.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"{what}: cannot load a CLIPModel from {model_dir} ({str(err)[:160]})") from None
        proc_dir = _folder(processor or model_dir, f"{what} processor", "preprocessor_config.json",
                           "processor_config.json")
        self.processor = CLIPProcessor.from_pretrained(proc_dir, local_files_only=True)
        super().__init__(model, self.processor.tokenizer, **kw)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        grid = (to_uint8_grid(images) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        pil = [Image.fromarray(a) for a in grid]
        return self.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]


@register_reward("pickscore")
class PickScoreReward(_ProcessorScorer):
    """PickScore_v1. ``path``: its transformers folder; ``processor``: the folder of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K (where the official code takes its processor)."""

    def __init__(self, path: str, processor: str | None = None, device: str = "cpu", batch_size: int = 32,
                 dtype: str = "float32"):
        super().__init__(path, processor, "pickscore", device=device, batch_size=batch_size, dtype=dtype)

    def finish(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp().float().cpu() * cosine.cpu()


@register_reward("clipscore")
class CLIPScoreReward(_ProcessorScorer):
    """CLIP score with any transformers CLIP folder (e.g. openai/clip-vit-large-patch14)."""

    def __init__(self, path: str, processor: str | None = None, device: str = "cpu", batch_size: int = 32,
                 dtype: str = "float32"):
        super().__init__(path, processor, "clipscore", device=device, batch_size=batch_size, dtype=dtype)

    def finish(self, cosine: torch.Tensor) -> torch.Tensor:
        return 100 * cosine.clamp(min=0)
