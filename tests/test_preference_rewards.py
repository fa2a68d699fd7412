"""HPS-v2.1, PickScore and CLIP score on tiny random checkpoints in the official layouts.

The HPS check builds a tiny CLIP the way open_clip does (``nn.MultiheadAttention`` blocks,
``x @ proj`` projections, argmax pooling) with open_clip's parameter names, saves its state dict
as ``{"state_dict": ...}`` like ``HPS_v2.1_compressed.pt``, and compares our loader's scores
with that reference's. (``make parity`` runs the official packages themselves.)
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from mixgrpo.rewards import get_reward, score
from mixgrpo.rewards.preference import hps_preprocess, projected, to_uint8_grid
from tiny_rewards import make_clip_folder, make_hps_files, make_imagereward_files


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    return make_hps_files(tmp_path_factory.mktemp("hps"))


def _images(n=4, size=24, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a red cat", "two blue circles", "a photo of a dog", "a cat"]


def test_hps_matches_the_open_clip_reference(hps_files):
    root, ref, tok = hps_files
    reward = get_reward("hps", path=str(root / "HPS_v2.1_compressed.pt"), tokenizer=str(root / "tokenizer"),
                        vision_heads=2, text_heads=2, batch_size=3)
    images = _images()
    ours = score(reward, images, PROMPTS)
    ids = tok(PROMPTS, padding="max_length", truncation=True, max_length=8, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = ref.hps(hps_preprocess(images, 16), ids)
    assert ours.shape == (4,) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max() <= 1.5e-7  # measured 1.2e-7
    assert torch.equal(ours, score(reward, images, PROMPTS))  # deterministic
    assert not torch.allclose(ours, score(reward, _images(seed=1), PROMPTS))  # it looks at the images


def test_hps_preprocessing_follows_preprocess_val():
    square = _images(2, 224)
    out = hps_preprocess(square)  # no resize at 224: only 8-bit rounding and the CLIP normalisation
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.allclose(out, (to_uint8_grid(square) - mean) / std)
    wide = hps_preprocess(torch.ones(1, 3, 100, 200))  # longest side -> 224, padded top and bottom with 0
    assert wide.shape == (1, 3, 224, 224)
    assert torch.allclose(wide[0, :, 112], (1 - mean[0, :, 0]) / std[0, :, 0])
    assert torch.allclose(wide[0, :, 0], (0 - mean[0, :, 0]) / std[0, :, 0])


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_clip_folder(tmp_path_factory.mktemp("clip"))


@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_processor_scorers_score_like_the_official_recipe(clip_folder, name):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    reward = get_reward(name, path=str(clip_folder), batch_size=3)
    images = _images()
    ours = score(reward, images, PROMPTS)
    model, proc = CLIPModel.from_pretrained(clip_folder), CLIPProcessor.from_pretrained(clip_folder)
    pil = [Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for x in images]
    with torch.no_grad():
        f_img = projected(model.get_image_features(**proc(images=pil, return_tensors="pt")))
        f_txt = projected(model.get_text_features(**proc(text=PROMPTS, padding="max_length", max_length=8, truncation=True,
                                                         return_tensors="pt")))
        cos = nn.functional.cosine_similarity(f_img, f_txt)
    expected = model.logit_scale.exp() * cos if name == "pickscore" else 100 * cos.clamp(min=0)
    assert ours.shape == (4,) and torch.isfinite(ours).all()
    assert (ours - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max().item())  # measured 8.3e-7 of 1.1


def test_reward_checkpoint_errors(hps_files, tmp_path):
    root, ref, _ = hps_files
    tok = str(root / "tokenizer")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_reward("hps", path=str(tmp_path / "nope.pt"), tokenizer=tok)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((root / "HPS_v2.1_compressed.pt").read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"not a readable HPS-v2\.1 checkpoint"):
        get_reward("hps", path=str(truncated), tokenizer=tok)
    partial = {k: v for k, v in ref.state_dict().items() if not k.startswith("ln_final")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"lacks 1 key\(s\).*ln_final.weight"):
        get_reward("hps", path=str(tmp_path / "partial.pt"), tokenizer=tok)
    torch.save({"blip.visual_encoder.patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="checkpoint of ImageReward"):
        get_reward("hps", path=str(tmp_path / "ImageReward.pt"), tokenizer=tok)
    with pytest.raises(ValueError, match="takes options path, tokenizer"):
        get_reward("hps", path="x", tokeniser=tok)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        get_reward("pickscore", path=str(tmp_path))


def test_images_of_the_wrong_range_are_refused(hps_files):
    root, _, _ = hps_files
    reward = get_reward("hps", path=str(root / "HPS_v2.1_compressed.pt"), tokenizer=str(root / "tokenizer"),
                        vision_heads=2, text_heads=2)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*\(x \+ 1\) / 2"):
        score(reward, _images() * 2 - 1, PROMPTS)
    with pytest.raises(ValueError, match="divide by 255"):
        score(reward, _images() * 255, PROMPTS)
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        score(reward, _images()[:, :1], PROMPTS)


def test_reward_options_come_from_the_config(hps_files, tmp_path):
    from mixgrpo.train.config import apply_overrides
    from mixgrpo.train.presets import make_preset

    root, _, _ = hps_files
    spec = (f"rewards={{composition: 1.0, hps: {{weight: 0.5, path: {root / 'HPS_v2.1_compressed.pt'}, "
            f"tokenizer: {root / 'tokenizer'}, vision_heads: 2, text_heads: 2}}}}")
    cfg = apply_overrides(make_preset("mixgrpo"), [spec])
    assert cfg.reward_weights == {"composition": 1.0, "hps": 0.5}
    assert cfg.reward_options["hps"]["vision_heads"] == 2 and cfg.reward_options["composition"] == {}
    with pytest.raises(ValueError, match="weights >= 0"):
        apply_overrides(make_preset("mixgrpo"), ["rewards={hps: {weight: -1}}"])
    with pytest.raises(ValueError, match="weight must be a number"):
        apply_overrides(make_preset("mixgrpo"), ["rewards={hps: {weight: high}}"])


def test_a_reward_from_an_entry_point_trains(tmp_path, monkeypatch):
    """A user's package declares `[mixgrpo.rewards] redness = user_reward:Redness`; the
    registry finds it by name and the trainer runs an iteration with it."""
    from mixgrpo.rewards import base
    from mixgrpo.train.trainer import GRPOTrainer
    from tiny_runs import make_tiny_checkpoint, tiny_config

    (tmp_path / "user_reward.py").write_text(
        "import torch\n\nclass Redness:\n    name = 'redness'\n\n"
        "    def __call__(self, images, prompts):\n        return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))\n")
    info = tmp_path / "user_reward-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: user-reward\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mixgrpo.rewards]\nredness = user_reward:Redness\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    assert "redness" in base.list_rewards()
    cfg = tiny_config(make_tiny_checkpoint(tmp_path / "tiny"), "mixgrpo", "rewards={redness: 1.0}", "iterations=1")
    row = GRPOTrainer(cfg).step(0)
    assert "reward_redness" in row and row["nonfinite_samples"] == 0
    sys.modules.pop("user_reward", None)


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    return make_imagereward_files(tmp_path_factory.mktemp("imagereward"))


def test_imagereward_loads_the_official_layout_and_scores(imagereward_files):
    from transformers import BertTokenizer

    from mixgrpo.rewards.imagereward import (
        IMAGEREWARD_MEAN,
        IMAGEREWARD_STD,
        imagereward_preprocess,
    )

    root, (vision, text, mlp) = imagereward_files
    reward = get_reward("imagereward", path=str(root / "ImageReward.pt"), tokenizer=str(root / "bert"), batch_size=3)
    images = _images(4, 48)
    ours = score(reward, images, PROMPTS)
    assert ours.shape == (4,) and torch.isfinite(ours).all() and torch.equal(ours, score(reward, images, PROMPTS))
    # the official forward, written out: BLIP image tokens -> BERT with cross-attention -> MLP on [CLS]
    tok = BertTokenizer.from_pretrained(root / "bert")
    t = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        emb = vision(pixel_values=imagereward_preprocess(images, 32)).last_hidden_state
        h = text(input_ids=t["input_ids"], attention_mask=t["attention_mask"], encoder_hidden_states=emb,
                 encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long), is_decoder=False).last_hidden_state
        expected = (mlp(h[:, 0]).squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
    assert (ours - expected).abs().max() <= 3e-7  # measured 2.4e-7
    assert t["input_ids"][0, 0] == tok.cls_token_id  # [CLS] first: the official score keeps it


def test_imagereward_preprocessing_is_resize_shorter_then_centre_crop():
    from mixgrpo.rewards.imagereward import imagereward_preprocess

    wide = torch.zeros(1, 3, 40, 80)
    wide[..., 20:60] = 1.0  # a white centre band exactly as wide as the crop
    out = imagereward_preprocess(wide, 20)
    assert out.shape == (1, 3, 20, 20)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.allclose(out[..., 2:-2], ((1 - mean) / std).expand(1, 3, 20, 16), atol=0.05)


def test_imagereward_errors(imagereward_files, hps_files, tmp_path):
    root, _ = imagereward_files
    with pytest.raises(ValueError, match="checkpoint of an open_clip CLIP"):
        get_reward("imagereward", path=str(hps_files[0] / "HPS_v2.1_compressed.pt"), tokenizer=str(root / "bert"))
    state = torch.load(root / "ImageReward.pt", weights_only=True)
    del state["blip.visual_encoder.blocks.1.attn.qkv.weight"]
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match=r"lacks key blip\.visual_encoder\.blocks\.1\.attn\.qkv\.weight"):
        get_reward("imagereward", path=str(tmp_path / "cut.pt"), tokenizer=str(root / "bert"))
    with pytest.raises(FileNotFoundError, match=r"no vocab\.txt"):
        get_reward("imagereward", path=str(root / "ImageReward.pt"), tokenizer=str(tmp_path))
