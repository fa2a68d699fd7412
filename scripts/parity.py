"""`make parity`, step 1: scores from the official hpsv2 and image-reward packages.

Runs in `.venv-official` (a CUDA build of torch, torchvision, hpsv2, image-reward and the
older transformers they import; see the Makefile), on the CPU, offline. For each scorer it
builds the **official** model class at toy size (hpsv2's open_clip with a ViT-H-14-shaped
config; ImageReward's BLIP + MLP with a small ViT), sets every weight from its name
(`tests/parity/common.py`), and scores fixed images and prompts with the official
preprocessing, tokenizer and forward. It also runs our `hps-official` / `imagereward-official`
plug-ins, and writes open_clip's BPE as a transformers tokenizer folder. Output:
`tests/parity/reference.json` (keys, shapes, token ids, scores: a few KB).

Step 2 (`tests/test_parity_reference.py`, main venv, also in the default suite) rebuilds the
same weights, saves them in the official file layout, scores with our loaders and compares.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests" / "parity")]

from common import BERT_VOCAB, HPS_TINY, IR_MED, IR_VISION, PROMPTS, parity_images, seeded_state  # noqa: E402
from PIL import Image  # noqa: E402

TOKENIZER = ROOT / ".venv-official" / "clip-tokenizer"  # step 2 checks our tokenizer path with it


def _pil(images: torch.Tensor) -> list[Image.Image]:
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def _clip_tokenizer_from_bpe(gz: Path, out: Path) -> Path:
    """open_clip's bundled BPE file as a transformers CLIP tokenizer folder (same merges, same ids)."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    with gzip.open(gz) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def hps(tmp: Path) -> dict:
    import hpsv2.src.open_clip as oc
    from hpsv2.src.open_clip import factory

    factory._MODEL_CONFIGS["parity-tiny"] = HPS_TINY
    model, _, preprocess_val = oc.create_model_and_transforms(
        "parity-tiny", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    keys = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(seeded_state(keys))
    model.eval()
    tokenizer = oc.get_tokenizer("parity-tiny")
    images = parity_images()
    ids = tokenizer(PROMPTS)
    with torch.no_grad():
        pixels = torch.stack([preprocess_val(p) for p in _pil(images)])
        out = model(pixels, ids)
        official = torch.diagonal(out["image_features"] @ out["text_features"].T)
    torch.save({"state_dict": model.state_dict()}, tmp / "HPS_v2.1_compressed.pt")
    from mixgrpo.rewards import get_reward

    wrapped = get_reward("hps-official", path=str(tmp / "HPS_v2.1_compressed.pt"), model_name="parity-tiny")
    _clip_tokenizer_from_bpe(Path(oc.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", TOKENIZER)
    return {"keys": keys, "token_ids": ids.tolist(), "official": official.tolist(),
            "wrapper_match": bool(torch.allclose(wrapped(images, PROMPTS), official, atol=1e-6))}


def imagereward(tmp: Path) -> dict:
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    (tmp / "bert").mkdir()
    (tmp / "bert" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")

    def init_tokenizer():  # the official one, from a local vocab instead of the hub
        tok = BertTokenizer.from_pretrained(str(tmp / "bert"))
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
        return tok

    def create_vit(vit, image_size, *args, **kwargs):  # BLIP's ViT class at toy width
        return VisionTransformer(img_size=image_size, patch_size=16, **IR_VISION), IR_VISION["embed_dim"]

    blip_pretrain.init_tokenizer, blip_pretrain.create_vit = init_tokenizer, create_vit
    from ImageReward.ImageReward import ImageReward

    (tmp / "med_config.json").write_text(json.dumps(IR_MED))
    model = ImageReward(med_config=str(tmp / "med_config.json"), device="cpu").eval()
    keys = [(k, list(v.shape)) for k, v in model.state_dict().items() if "position_ids" not in k]
    model.load_state_dict(seeded_state(keys), strict=False)
    images = parity_images()
    with torch.no_grad():
        official = torch.tensor([model.score(p, img) for p, img in zip(PROMPTS, _pil(images), strict=True)])
    torch.save(model.state_dict(), tmp / "ImageReward.pt")
    from mixgrpo.rewards import get_reward

    wrapped = get_reward("imagereward-official", path=str(tmp / "ImageReward.pt"),
                         med_config=str(tmp / "med_config.json"), tokenizer=str(tmp / "bert"))(images, PROMPTS)
    return {"keys": keys, "official": official.tolist(),
            "wrapper_match": bool(torch.allclose(wrapped, official, atol=1e-6))}


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        results = {"hps": hps(Path(d)), "imagereward": imagereward(Path(d))}
    for name, r in results.items():
        print(f"{name:12s} official scores {[round(x, 6) for x in r['official']]}; "
              f"our *-official plug-in agrees: {r['wrapper_match']}")
    out = ROOT / "tests" / "parity" / "reference.json"
    out.write_text(json.dumps({**results, "torch": torch.__version__}) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes) and the CLIP tokenizer folder {TOKENIZER}")
    return int(not all(r["wrapper_match"] for r in results.values()))


if __name__ == "__main__":
    sys.exit(main())
