"""The official reward packages behind the same plug-in contract (extra ``mixgrpo[official]``).

``hps-official`` (package ``hpsv2``) and ``imagereward-official`` (package ``image-reward``)
score with the authors' own model code, from local files only: useful to cross-check our
scorers (``make parity``) or to reproduce a paper's numbers exactly. Both packages need
torchvision, hence a separate environment with a CUDA build of torch (see the README).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import check_images, register_reward
from .checkpoints import load_state_dict

__all__ = ["OfficialHPS", "OfficialImageReward"]


def _pil(images: torch.Tensor) -> list:
    from PIL import Image

    arrays = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def _need(package: str, extra: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(f"{package} is not installed ({err}); `pip install {extra}` in an environment with "
                          "torchvision (see the README), or use the built-in scorer") from None


@register_reward("hps-official")
class OfficialHPS:
    """HPS-v2.1 through hpsv2's open_clip. ``path``: ``HPS_v2.1_compressed.pt``; the tokenizer
    is open_clip's bundled BPE (no download)."""

    def __init__(self, path: str, device: str = "cpu", model_name: str = "ViT-H-14"):
        oc = _need("hpsv2.src.open_clip", "hpsv2")
        self.model, _, self.preprocess = oc.create_model_and_transforms(
            model_name, None, precision="fp32", device=device, jit=False, force_quick_gelu=False,
            force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
            image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
            with_score_predictor=False, with_region_predictor=False)
        self.model.load_state_dict(load_state_dict(path, "HPS-v2.1"))
        self.model.eval()
        self.tokenizer, self.device = oc.get_tokenizer(model_name), torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts)
        pixels = torch.stack([self.preprocess(p) for p in _pil(images)]).to(self.device)
        out = self.model(pixels, self.tokenizer(prompts).to(self.device))
        return (out["image_features"] * out["text_features"]).sum(-1).float().cpu()


@register_reward("imagereward-official")
class OfficialImageReward:
    """ImageReward through the image-reward package. ``path``: ``ImageReward.pt``;
    ``med_config``: its ``med_config.json``; ``tokenizer``: a local bert-base-uncased folder
    (the package would otherwise fetch it from the hub)."""

    def __init__(self, path: str, med_config: str, tokenizer: str, device: str = "cpu"):
        blip_pretrain = _need("ImageReward.models.BLIP.blip_pretrain", "image-reward")
        from transformers import BertTokenizer

        def init_tokenizer():  # the package's own recipe, from a local folder
            tok = BertTokenizer.from_pretrained(str(Path(tokenizer)), local_files_only=True)
            tok.add_special_tokens({"bos_token": "[DEC]"})
            tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
            tok.enc_token_id = tok.additional_special_tokens_ids[0]
            return tok

        blip_pretrain.init_tokenizer = init_tokenizer
        from ImageReward.ImageReward import ImageReward

        self.model = ImageReward(med_config=med_config, device=device).to(device).eval()
        self.model.load_state_dict(load_state_dict(path, "ImageReward"), strict=False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts)
        return torch.tensor([self.model.score(p, img) for p, img in zip(prompts, _pil(images), strict=True)],
                            dtype=torch.float32)
