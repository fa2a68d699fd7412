"""The prompt-embedding cache: several writers at once, and only a broken file is rebuilt."""

from __future__ import annotations

import pytest
import torch

from mixgrpo.text import encoder as E

PROMPTS = ["one red circle", "two blue squares"]


@pytest.fixture()
def fake_encoder(monkeypatch):
    """A stand-in for MiniLM (same shapes), counting how often it runs."""
    runs = []

    def encode(prompts, batch_size=256):
        runs.append(list(prompts))
        n = len(prompts)
        g = torch.Generator().manual_seed(len(runs))
        return E.PromptEmbeddings(list(prompts), torch.randn(n, E.MAX_TOKENS, E.TEXT_DIM, generator=g),
                                  torch.ones(n, E.MAX_TOKENS, dtype=torch.bool), torch.randn(n, E.TEXT_DIM, generator=g))

    monkeypatch.setattr(E, "encode_prompts", encode)
    return runs


def test_two_writers_at_once_both_finish_and_leave_one_complete_file(fake_encoder, tmp_path, monkeypatch):
    """A second process (another rank) writes the same cache while the first is mid-write:
    each goes through its own temporary file, so neither loses its file under it."""
    real_save = E.save_file
    nested = []

    def save_while_another_rank_writes(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        if not nested:  # the other rank writes (and renames) before this one renames
            nested.append(filename)
            E.cached_embeddings(PROMPTS, tmp_path)

    monkeypatch.setattr(E, "save_file", save_while_another_rank_writes)
    first = E.cached_embeddings(PROMPTS, tmp_path)
    assert len(fake_encoder) == 2  # both ranks encoded
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].endswith(".safetensors"), files  # no temporary file left behind
    again = E.cached_embeddings(PROMPTS, tmp_path)
    assert len(fake_encoder) == 2  # read back, complete
    torch.testing.assert_close(again.pooled, first.pooled)  # the last rename wins; both were whole


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_shapes"])
def test_a_broken_cache_file_is_rebuilt(fake_encoder, tmp_path, damage):
    E.cached_embeddings(PROMPTS, tmp_path)
    (path,) = tmp_path.iterdir()
    if damage == "garbage":
        path.write_bytes(b"corrupt")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        from safetensors.torch import save_file

        save_file({"tokens": torch.zeros(1, 16, 384), "mask": torch.zeros(1, 16, dtype=torch.uint8),
                   "pooled": torch.zeros(1, 384)}, path)
    rebuilt = E.cached_embeddings(PROMPTS, tmp_path)
    assert len(fake_encoder) == 2 and rebuilt.tokens.shape[0] == 2
    assert E.cached_embeddings(PROMPTS, tmp_path).pooled.equal(rebuilt.pooled)  # and written back


def test_other_errors_are_raised_and_the_cache_is_kept(fake_encoder, tmp_path, monkeypatch):
    E.cached_embeddings(PROMPTS, tmp_path)
    (path,) = tmp_path.iterdir()
    before = path.read_bytes()

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(E, "load_file", unreadable)
    with pytest.raises(PermissionError):
        E.cached_embeddings(PROMPTS, tmp_path)
    assert path.read_bytes() == before and len(fake_encoder) == 1  # not deleted, not re-encoded
