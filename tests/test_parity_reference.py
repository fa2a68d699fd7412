"""Our HPS-v2.1 and ImageReward scorers against scores the official packages computed
(`make parity` writes tests/parity/reference.json from hpsv2 and image-reward themselves; the
weights are regenerated here from their names, so no checkpoint is committed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent / "parity"))

from common import BERT_VOCAB, PROMPTS, parity_images, seeded_state

from mixgrpo.rewards import get_reward
from mixgrpo.rewards.openclip import clip_from_open_clip
from mixgrpo.rewards.preference import hps_preprocess, projected

REFERENCE = Path(__file__).parent / "parity" / "reference.json"
OPEN_CLIP_TOKENIZER = Path(__file__).parents[1] / ".venv-official" / "clip-tokenizer"
# max |ours - official| allowed, as the README states it; measured on the CPU: HPS 1.2e-7,
# ImageReward 8.9e-8 (scores of size 0.2-0.35: a few float32 ulps, summation order only)
TOL = {"hps": 1.5e-7, "imagereward": 1e-7}


@pytest.fixture(scope="module")
def reference():
    assert REFERENCE.is_file(), "tests/parity/reference.json is missing: run `make parity` and commit it"
    return json.loads(REFERENCE.read_text())


def test_hps_matches_the_official_hpsv2_scores(reference):
    r = reference["hps"]
    model = clip_from_open_clip(seeded_state(r["keys"]), "reference", vision_heads=2, text_heads=2)
    with torch.no_grad():
        pixels = hps_preprocess(parity_images(), model.config.vision_config.image_size)
        f_img = F.normalize(projected(model.get_image_features(pixel_values=pixels)), dim=-1)
        f_txt = F.normalize(projected(model.get_text_features(input_ids=torch.tensor(r["token_ids"]))), dim=-1)
    ours = (f_img * f_txt).sum(-1)
    assert (ours - torch.tensor(r["official"])).abs().max() <= TOL["hps"]


def test_hps_end_to_end_with_a_tokenizer_made_from_open_clips_bpe(reference, tmp_path):
    """The whole `hps` plug-in (file, tokenizer folder, preprocessing) against hpsv2; the
    tokenizer folder comes from `make parity`'s first step (open_clip's own BPE file)."""
    if not OPEN_CLIP_TOKENIZER.is_dir():
        pytest.skip("run `make parity` (writes .venv-official/clip-tokenizer from open_clip's BPE)")
    r = reference["hps"]
    torch.save({"state_dict": seeded_state(r["keys"])}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = get_reward("hps", path=str(tmp_path / "HPS_v2.1_compressed.pt"), tokenizer=str(OPEN_CLIP_TOKENIZER),
                        vision_heads=2, text_heads=2)
    ids = torch.tensor(r["token_ids"])
    ours_ids = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77,
                                return_tensors="pt")["input_ids"]
    for i, end in enumerate(ids.argmax(-1).tolist()):  # through end-of-text; padding after it never counts
        assert torch.equal(ours_ids[i, : end + 1], ids[i, : end + 1])
    assert (reward(parity_images(), PROMPTS) - torch.tensor(r["official"])).abs().max() <= TOL["hps"]


def test_imagereward_matches_the_official_scores(reference, tmp_path):
    r = reference["imagereward"]
    torch.save(seeded_state(r["keys"]), tmp_path / "ImageReward.pt")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    reward = get_reward("imagereward", path=str(tmp_path / "ImageReward.pt"), tokenizer=str(tmp_path / "bert"))
    ours = reward(parity_images(), PROMPTS)
    assert (ours - torch.tensor(r["official"])).abs().max() <= TOL["imagereward"]
