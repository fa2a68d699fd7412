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

from common import BERT_VOCAB, PROMPTS, parity_images, seeded_state  # noqa: E402

from mixgrpo.rewards import get_reward  # noqa: E402
from mixgrpo.rewards.openclip import clip_from_open_clip  # noqa: E402
from mixgrpo.rewards.preference import hps_preprocess, projected  # noqa: E402

REFERENCE = Path(__file__).parent / "parity" / "reference.json"


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
    assert r["tokenizer_match"]
    assert (ours - torch.tensor(r["official"])).abs().max() <= 1e-4


def test_imagereward_matches_the_official_scores(reference, tmp_path):
    r = reference["imagereward"]
    torch.save(seeded_state(r["keys"]), tmp_path / "ImageReward.pt")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    reward = get_reward("imagereward", path=str(tmp_path / "ImageReward.pt"), tokenizer=str(tmp_path / "bert"))
    ours = reward(parity_images(), PROMPTS)
    assert (ours - torch.tensor(r["official"])).abs().max() <= 1e-4
