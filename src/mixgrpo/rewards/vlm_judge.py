"""A vision-language model as judge (``vlm-judge``), in the style of UnifiedReward.

UnifiedReward (CodeGoat24/UnifiedReward) asks a vision-language model how well an image
matches its prompt and reads the score from the answer. This reward does the same with any
local transformers folder that ``AutoProcessor`` and ``AutoModelForImageTextToText`` load
(Llava, Qwen2-VL/Qwen2.5-VL, Idefics3/SmolVLM, ...), including the UnifiedReward checkpoints.

The question: ``template`` with ``{prompt}`` replaced by the image's prompt, sent as one user
turn holding the image and that text through the processor's chat template (when the processor
has none: ``"<image token>\\n<question>\\n"``), then the assistant's turn is opened and
``answer_prefix`` appended (e.g. ``"Final Score: "`` for a model that answers in that form).
Images reach the model as 8-bit PIL images (``round(255 x)``), like generated images do.

Scores, one per image, normalised to [0, 1] with the ``levels`` (default the digits "1".."5",
each a single token of the tokenizer) as ``(s - min(levels)) / (max(levels) - min(levels))``:

* ``scoring="expected"`` (default): one forward pass; the logits of the first answer token,
  restricted to the level tokens, are softmaxed over the levels and the expected level is the
  score. Deterministic and smooth in the model's belief, with no text to parse.
  **This differs from UnifiedReward's public code**, which generates text and parses the
  number in it: the expectation is that rule's deterministic, logit-level counterpart (where
  a greedy answer would be the single most likely level, the expectation also weighs how sure
  the model is, so close calls give graded rather than stepped rewards). It needs the answer
  to start with the level token: the default template asks for a single digit, and
  ``answer_prefix`` opens answers that lead with words (e.g. ``"Final Score: "``).
* ``scoring="generate"``: UnifiedReward's rule. Greedy decoding of ``max_new_tokens`` tokens;
  the score is the first match of ``pattern`` in the answer (its first group if it has one;
  default: the first number). An answer without a number in [min(levels), max(levels)] raises
  ``ValueError`` naming the image and the answer, or, with ``on_unparsed="nan"``, scores NaN
  (the trainer drops such groups; call :func:`mixgrpo.rewards.score` with ``allow_nonfinite``).

Batches of ``batch_size`` images are left-padded and decoded with ``generate`` (which sets
each model family's padding-aware positions) under ``torch.no_grad`` on ``device``; scores
come back as ``(B,)`` float32 on the CPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import check_images, register_reward

__all__ = ["DEFAULT_TEMPLATE", "NUMBER_PATTERN", "VLMJudgeReward", "parse_score"]

DEFAULT_TEMPLATE = (
    "You are given a text caption and an image generated from it. Rate the image on how well it "
    "matches the caption (every object, attribute and relation it names) and on its overall quality, "
    "from 1 (poor) to 5 (excellent).\n"
    "Caption: {prompt}\n"
    "Answer with a single digit from 1 to 5."
)
NUMBER_PATTERN = r"[-+]?\d+(?:\.\d+)?"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SCORINGS = ("expected", "generate")
_UNPARSED = ("raise", "nan")


def parse_score(answer: str, pattern: str = NUMBER_PATTERN) -> float | None:
    """The number ``pattern`` first finds in ``answer`` (its first group if it has one), or None."""
    match = re.search(pattern, answer)
    if match is None:
        return None
    text = match.group(1) if match.re.groups else match.group(0)
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    grid = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in grid.permute(0, 2, 3, 1).cpu().numpy()]


@register_reward("vlm-judge")
class VLMJudgeReward:
    """A vision-language model rating image-prompt agreement (see the module doc).

    Args:
        path: local folder of a transformers image-text-to-text model and its processor.
        device: where the model runs.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        template: the question; ``{prompt}`` marks where the prompt goes.
        batch_size: images per forward pass.
        scoring: ``expected`` (level-token logit expectation) or ``generate`` (parse the answer).
        levels: the score levels, numbers written as single tokens, e.g. ``["1", "2", "3", "4", "5"]``.
        answer_prefix: text placed at the start of the answer (after the generation prompt).
        max_new_tokens: answer length in ``generate`` mode.
        pattern: regex for the score in ``generate`` mode (first group if it has one).
        on_unparsed: ``raise`` or ``nan`` for answers without a score in ``generate`` mode.
    """

    name = "vlm-judge"

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32", template: str = DEFAULT_TEMPLATE,
                 batch_size: int = 8, scoring: str = "expected", levels: Sequence[str] = ("1", "2", "3", "4", "5"),
                 answer_prefix: str = "", max_new_tokens: int = 8, pattern: str = NUMBER_PATTERN,
                 on_unparsed: str = "raise"):
        if dtype not in _DTYPES:
            raise ValueError(f"vlm-judge: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if scoring not in _SCORINGS:
            raise ValueError(f"vlm-judge: scoring must be one of {', '.join(_SCORINGS)}, got {scoring!r}")
        if on_unparsed not in _UNPARSED:
            raise ValueError(f"vlm-judge: on_unparsed must be one of {', '.join(_UNPARSED)}, got {on_unparsed!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"vlm-judge: batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"vlm-judge: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(template, str) or "{prompt}" not in template:
            raise ValueError("vlm-judge: template must contain {prompt}, where each image's prompt goes")
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"vlm-judge: pattern {pattern!r} is not a valid regex ({err}); pass e.g. {NUMBER_PATTERN!r}") from None
        self.levels = [str(level) for level in levels]
        try:
            values = [float(level) for level in self.levels]
        except ValueError:
            raise ValueError(f"vlm-judge: levels must be numbers written as text, got {self.levels}; "
                             "pass e.g. ['1', '2', '3', '4', '5']") from None
        if len(set(values)) < 2:
            raise ValueError(f"vlm-judge: levels need at least two different values, got {self.levels}")
        self.values = torch.tensor(values, dtype=torch.float64)
        self.low, self.high = min(values), max(values)

        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"vlm-judge: model folder {folder} does not exist; pass path: the local folder of a "
                             "transformers vision-language model (its config.json, weights and processor files)")
        if not (folder / "config.json").is_file():
            raise ValueError(f"vlm-judge: {folder} has no config.json; pass the folder a vision-language model "
                             "was saved to with save_pretrained")

        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"vlm-judge: cannot load a processor from {folder} ({' '.join(str(err).split())[:160]}); "
                             "save the model's processor into the same folder") from None
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None or not hasattr(self.processor, "image_processor"):
            raise ValueError(f"vlm-judge: the processor in {folder} ({type(self.processor).__name__}) lacks a tokenizer "
                             "or an image processor; pass the folder of a vision-language model")
        try:
            model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=_DTYPES[dtype])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"vlm-judge: cannot load an image-text-to-text model from {folder} "
                             f"({' '.join(str(err).split())[:160]}); pass the folder of a vision-language model") from None

        self.chat = bool(getattr(self.processor, "chat_template", None))
        self.image_token = getattr(self.processor, "image_token", None)
        if not self.chat and not self.image_token:
            raise ValueError(f"vlm-judge: the processor in {folder} has neither a chat template nor an image token; "
                             "add a chat_template to its processor files")
        self.level_ids = self._level_ids(tokenizer, folder)
        tokenizer.padding_side = "left"  # decoder-only generation continues every row from its end
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.device, self.dtype = torch.device(device), _DTYPES[dtype]
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.template, self.answer_prefix, self.pattern = template, answer_prefix, pattern
        self.scoring, self.on_unparsed, self.batch_size, self.max_new_tokens = scoring, on_unparsed, batch_size, max_new_tokens

    def _level_ids(self, tokenizer, folder: Path) -> list[int]:
        """The token id of each level: its tokenization when that is one token, else its vocabulary
        entry (SentencePiece tokenizers keep digits as pieces but tokenize "3" as "▁", "3")."""
        ids = []
        unk = tokenizer.unk_token_id
        for level in self.levels:
            encoded = tokenizer.encode(level, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] != unk:
                ids.append(int(encoded[0]))
                continue
            entry = tokenizer.convert_tokens_to_ids(level)
            if isinstance(entry, int) and entry != unk:
                ids.append(entry)
                continue
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            raise ValueError(f"vlm-judge: level {level!r} is not a single token of the tokenizer in {folder} "
                             f"(it becomes {pieces}); pass levels that are single tokens, e.g. the digits 1 to 5")
        if len(set(ids)) != len(ids):
            raise ValueError(f"vlm-judge: levels {self.levels} share tokens {ids}; pass levels with distinct tokens")
        return ids

    def text(self, prompt: str) -> str:
        """The model's input text for one prompt (the image stands where the processor expands it)."""
        question = self.template.replace("{prompt}", prompt)
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if isinstance(text, list):
                text = text[0]
        else:
            text = f"{self.image_token}\n{question}\n"
        return text + self.answer_prefix

    def inputs(self, images: torch.Tensor, prompts: list[str]):
        """Processor outputs for one chunk, on the model's device (floats in its dtype)."""
        texts = [self.text(p) for p in prompts]
        bos = self.tokenizer.bos_token  # as transformers' apply_chat_template: no second BOS after a template's own
        batch = self.processor(text=texts, images=[[im] for im in _to_pil(images)], padding=True, return_tensors="pt",
                               add_special_tokens=not (bos is not None and texts[0].startswith(bos)))
        return batch.to(self.device, dtype=self.dtype)

    def _generate(self, batch, max_new_tokens: int):
        return self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   output_logits=True, return_dict_in_generate=True,
                                   pad_token_id=self.tokenizer.pad_token_id)

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        """Normalised expected level from next-token ``logits`` ``(B, V)``."""
        probs = torch.softmax(logits[:, self.level_ids].double(), dim=-1)
        return ((probs * self.values.to(probs.device)).sum(-1).cpu() - self.low) / (self.high - self.low)

    def normalise(self, answer: str, index: int) -> float:
        """The normalised score in one generated ``answer`` (image ``index`` of the batch)."""
        value = parse_score(answer, self.pattern)
        if value is None or not self.low <= value <= self.high:
            if self.on_unparsed == "nan":
                return math.nan
            raise ValueError(f"vlm-judge: answer for image {index} has no score in [{self.low:g}, {self.high:g}] "
                             f"({answer[:200]!r}); make the template ask for one, or pass on_unparsed: nan")
        return (value - self.low) / (self.high - self.low)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self.inputs(images[start : start + self.batch_size], prompts[start : start + self.batch_size])
            if self.scoring == "expected":
                scores.append(self.expected(self._generate(batch, 1).logits[0].float()))
                continue
            out = self._generate(batch, self.max_new_tokens)
            answers = self.tokenizer.batch_decode(out.sequences[:, batch["input_ids"].shape[1]:],
                                                  skip_special_tokens=True)
            scores.append(torch.tensor([self.normalise(a, start + i) for i, a in enumerate(answers)],
                                       dtype=torch.float64))
        return torch.cat(scores).float()
