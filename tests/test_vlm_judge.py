"""The ``vlm-judge`` reward on a tiny random Llava built offline.

The model (a 1-layer CLIP vision tower, a 1-layer Llama, 16-dim everywhere) and its processor
(a word-level tokenizer, a CLIP image processor, a chat template) are saved to a temporary
folder and loaded through the reward by ``path``, the way a user's config does. Its scores are
checked against a hand computation of the level-token expectation.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from mixgrpo.rewards import get_reward, list_rewards, score
from mixgrpo.rewards.vlm_judge import VLMJudgeReward, parse_score
from tiny_rewards import CHAT_TEMPLATE, build_tiny_llava
from tiny_rewards import VLM_WORDS as WORDS

TEMPLATE = "rate how well the image matches the caption : {prompt}"
PROMPTS = ["a red cat", "two blue circles", "a photo of a green dog", "an image", "a red circle"]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def judge(tiny_vlm):
    return get_reward("vlm-judge", path=str(tiny_vlm), template=TEMPLATE, batch_size=4)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(len(PROMPTS), 3, 24, 20, generator=g)


def test_registered():
    assert "vlm-judge" in list_rewards()


def test_expected_scores_shape_range_and_determinism(judge, images):
    first = score(judge, images, PROMPTS)
    second = judge(images, PROMPTS)
    assert first.shape == (len(PROMPTS),) and first.dtype == torch.float32
    assert torch.isfinite(first).all() and (first >= 0).all() and (first <= 1).all()
    assert torch.equal(first, second)
    assert first.std() > 1e-3, f"the tiny judge gives every image the same score: {first}"


def test_expected_matches_hand_computation(tiny_vlm, judge, images):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, local_files_only=True).eval()
    got = judge(images, PROMPTS)
    for i in (0, 2):
        pil = Image.fromarray((images[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        question = TEMPLATE.replace("{prompt}", PROMPTS[i])
        text = ("<s>USER: <image>\n" + question + "\nASSISTANT:")
        batch = processor(text=[text], images=[pil], return_tensors="pt", add_special_tokens=False)
        assert batch["input_ids"][0, 0].item() == WORDS.index("<s>") and (batch["input_ids"] == 1).sum() == 0
        with torch.no_grad():
            logits = model(**batch).logits[0, -1]
        ids = [WORDS.index(d) for d in "12345"]
        p = torch.softmax(logits[ids].double(), dim=0)
        want = ((p * torch.arange(1, 6, dtype=torch.float64)).sum() - 1) / 4
        assert abs(got[i].item() - want.item()) < 1e-5, (i, got[i].item(), want.item())


def test_batch_size_does_not_change_scores(tiny_vlm, judge, images):
    one = get_reward("vlm-judge", path=str(tiny_vlm), template=TEMPLATE, batch_size=1)(images, PROMPTS)
    torch.testing.assert_close(one, judge(images, PROMPTS), atol=1e-5, rtol=0)


def test_custom_levels_and_processor_without_chat_template(tmp_path, images):
    folder = build_tiny_llava(tmp_path / "plain", chat_template=None)
    reward = VLMJudgeReward(str(folder), template=TEMPLATE, levels=["1", "3", "5"], answer_prefix="Score :")
    assert reward.text("a red cat") == "<image>\n" + TEMPLATE.replace("{prompt}", "a red cat") + "\nScore :"
    got = reward(images[:2], PROMPTS[:2])
    assert got.shape == (2,) and torch.isfinite(got).all() and ((got >= 0) & (got <= 1)).all()


@pytest.mark.parametrize("template", ["own-bos", "no-bos", None])
def test_one_bos_token_whatever_the_chat_template(tmp_path, images, template):
    chat = {"own-bos": CHAT_TEMPLATE, "no-bos": CHAT_TEMPLATE.replace("{{ bos_token }}", ""), None: None}[template]
    reward = VLMJudgeReward(str(build_tiny_llava(tmp_path / "m", chat_template=chat)), template=TEMPLATE)
    ids = reward.inputs(images[:2], PROMPTS[:2])["input_ids"]
    assert ((ids == WORDS.index("<s>")).sum(1) == 1).all(), ids
    assert ((ids == WORDS.index("ASSISTANT")).sum(1) == (0 if chat is None else 1)).all()


def test_parse_score():
    assert parse_score("4") == 4.0
    assert parse_score("I would rate it 3.5 out of 5") == 3.5
    assert parse_score("Alignment is good. Final Score: 4", r"Final Score:\s*(\d+(?:\.\d+)?)") == 4.0
    assert parse_score("no digits here") is None
    assert parse_score("Final Score: none", r"Final Score:\s*(\d+)") is None


def test_generate_mode_parses_the_answer(tiny_vlm, images, monkeypatch):
    reward = VLMJudgeReward(str(tiny_vlm), template=TEMPLATE, scoring="generate", max_new_tokens=3, batch_size=2)
    # the random model's own greedy answers (left-padded batch), scored as their decoded new tokens parse
    reward.on_unparsed = "nan"
    own = reward(images[:2], PROMPTS[:2])
    for i in range(2):
        alone = reward.inputs(images[i : i + 1], PROMPTS[i : i + 1])
        new = reward._generate(alone, 3).sequences[0, alone["input_ids"].shape[1]:]
        value = parse_score(reward.tokenizer.decode(new, skip_special_tokens=True))
        want = math.nan if value is None or not 1 <= value <= 5 else (value - 1) / 4
        assert own[i].item() == want or (math.isnan(want) and math.isnan(own[i].item())), (i, own, want)
    reward.on_unparsed = "raise"
    # force the answers: "4", "2 . 5" (first number 2), "cat" (none) -> 0.75, 0.25, error or NaN
    answers = {0: "4", 1: "2 . 5", 2: "cat"}
    monkeypatch.setattr(reward.tokenizer, "batch_decode", lambda seqs, **kw: [answers[j] for j in range(len(seqs))])
    reward.batch_size = 3
    with pytest.raises(ValueError, match=r"^vlm-judge: answer for image 2 has no score in \[1, 5\] \('cat'\)") as err:
        reward(images[:3], PROMPTS[:3])
    assert "\n" not in str(err.value)
    reward.on_unparsed = "nan"
    got = reward(images[:3], PROMPTS[:3])
    assert got[:2].tolist() == [0.75, 0.25] and math.isnan(got[2].item())
    assert score(reward, images[:3], PROMPTS[:3], allow_nonfinite=True)[:2].tolist() == [0.75, 0.25]
    answers[0] = "9"  # outside the levels counts as unparsed
    assert math.isnan(reward(images[:1], PROMPTS[:1]).item())


@pytest.mark.parametrize("kwargs, message", [
    ({"path": "nowhere"}, "model folder nowhere does not exist; pass path"),
    ({"template": "rate the image"}, "template must contain {prompt}"),
    ({"levels": ["1", "2", "3.5"]}, "level '3.5' is not a single token"),
    ({"levels": ["1", "2", "10"]}, "level '10' is not a single token"),
    ({"levels": ["one", "two"]}, "levels must be numbers"),
    ({"scoring": "sample"}, "scoring must be one of expected, generate"),
    ({"on_unparsed": "zero"}, "on_unparsed must be one of raise, nan"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"dtype": "float64"}, "dtype must be one of"),
])
def test_bad_options_give_one_clear_line(tiny_vlm, kwargs, message):
    kwargs = {"path": str(tiny_vlm), **kwargs}
    with pytest.raises(ValueError) as err:
        VLMJudgeReward(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_folder_without_model_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"has no config\.json; pass the folder") as err:
        VLMJudgeReward(str(tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(2, 16, 16), r"expected images of shape \(B, 3, H, W\)"),
    (torch.rand(2, 1, 16, 16), r"expected images of shape \(B, 3, H, W\)"),
    (torch.rand(2, 3, 16, 16) * 2 - 1, r"images must be in \[0, 1\]"),
])
def test_bad_images_give_one_clear_line(judge, bad, message):
    with pytest.raises(ValueError, match=message) as err:
        judge(bad, PROMPTS[:2])
    assert "\n" not in str(err.value)
