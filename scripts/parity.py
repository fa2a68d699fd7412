"""`make parity`: our HPS-v2.1 and ImageReward scorers against the official packages.

Runs in `.venv-official` (a CUDA build of torch, torchvision, hpsv2, image-reward; see the
Makefile), on the CPU, offline. For each scorer it builds the **official** model class at toy
size (hpsv2's open_clip with a ViT-H-14-shaped config; ImageReward's BLIP + MLP with a small
ViT), sets every weight from its name (`tests/parity/common.py`), saves the state dict in the
official file layout, scores the same images and prompts with the official preprocessing,
tokenizer and forward, then with ours, and compares (max abs diff <= 1e-4). It writes
`tests/parity/reference.json` (keys, shapes, official token ids and scores: a few KB), which the
default suite uses to check our side without the official packages.
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

TOLERANCE = 1e-4


def _pil(images: torch.Tensor) -> list[Image.Image]:
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def _clip_tokenizer_from_bpe(gz: Path, out: Path) -> Path:
    """open_clip's bundled BPE file as a transformers CLIP tokenizer folder (same merges, same ids)."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    merges = gzip.open(gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
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
    # ours, end to end: the file, a tokenizer folder made from open_clip's own BPE, our preprocessing
    from mixgrpo.rewards import get_reward

    gz = Path(oc.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    reward = get_reward("hps", path=str(tmp / "HPS_v2.1_compressed.pt"),
                        tokenizer=str(_clip_tokenizer_from_bpe(gz, tmp / "clip-tokenizer")), vision_heads=2, text_heads=2)
    ours = reward(images, PROMPTS)
    our_ids = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    eot = ids.argmax(-1)  # tokens up to end-of-text decide the score; padding after it differs by design
    same = all(torch.equal(ids[i, : eot[i] + 1], our_ids["input_ids"][i, : eot[i] + 1]) for i in range(len(PROMPTS)))
    print(f"hps tokenizer: ids up to end-of-text identical to open_clip's: {same}")
    return {"keys": keys, "token_ids": ids.tolist(), "official": official.tolist(), "ours": ours.tolist(),
            "tokenizer_match": same}


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

    ours = get_reward("imagereward", path=str(tmp / "ImageReward.pt"), tokenizer=str(tmp / "bert"))(images, PROMPTS)
    return {"keys": keys, "official": official.tolist(), "ours": ours.tolist()}


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        results = {"hps": hps(Path(d)), "imagereward": imagereward(Path(d))}
    failed = False
    for name, r in results.items():
        diff = (torch.tensor(r["official"]) - torch.tensor(r["ours"])).abs().max().item()
        ok = diff <= TOLERANCE and r.get("tokenizer_match", True)
        failed |= not ok
        print(f"{name:12s} official {[round(x, 6) for x in r['official']]}")
        print(f"{'':12s} ours     {[round(x, 6) for x in r['ours']]}  max |diff| {diff:.2e} {'OK' if ok else 'FAIL'}")
    out = ROOT / "tests" / "parity" / "reference.json"
    out.write_text(json.dumps({**results, "torch": torch.__version__}, indent=None) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
