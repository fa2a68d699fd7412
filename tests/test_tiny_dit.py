"""The embedded tiny DiT, its checkpoints and the text encoder cache."""

from __future__ import annotations

import json

import pytest
import torch

from mixgrpo.models.checkpoint import load_tiny_dit, save_tiny_dit
from mixgrpo.models.tiny_dit import TextCondition, TinyDiT, TinyDiTConfig

SMALL = TinyDiTConfig(image_size=16, patch=4, width=32, depth=2, heads=2)


def _cond(batch: int, seed: int = 0, visible: int = 5) -> TextCondition:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 16, dtype=torch.bool)
    mask[:, :visible] = True
    return TextCondition(torch.randn(batch, 16, 384, generator=gen), mask, torch.randn(batch, 384, generator=gen))


def _randomized(config: TinyDiTConfig = SMALL, seed: int = 0) -> TinyDiT:
    torch.manual_seed(seed)
    model = TinyDiT(config)
    with torch.no_grad():  # leave the zero-init so outputs depend on every input
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_default_model_is_small_and_starts_at_zero_velocity():
    model = TinyDiT()
    assert model.num_parameters() < 3_000_000
    x = torch.randn(2, 3, 32, 32)
    v = model(x, torch.rand(2), _cond(2))
    assert v.shape == x.shape and torch.count_nonzero(v) == 0  # adaLN-Zero output layer


def test_padded_text_tokens_are_ignored_and_visible_ones_matter():
    model = _randomized()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    cond = _cond(2)
    base = model(x, t, cond)
    padded = cond.tokens.clone()
    padded[:, 5:] += 10.0
    torch.testing.assert_close(model(x, t, TextCondition(padded, cond.mask, cond.pooled)), base)
    visible = cond.tokens.clone()
    visible[:, 1] += 1.0
    assert not torch.allclose(model(x, t, TextCondition(visible, cond.mask, cond.pooled)), base)


def test_guidance_combines_conditional_and_null_branches():
    model = _randomized()
    x, t, cond = torch.randn(3, 3, 16, 16), torch.rand(3), _cond(3)
    torch.testing.assert_close(model.velocity(x, t, cond, 1.0), model(x, t, cond))
    v_cond, v_null = model(x, t, cond), model(x, t, model.null_condition(3))
    torch.testing.assert_close(model.velocity(x, t, cond, 4.0), v_null + 4.0 * (v_cond - v_null), rtol=1e-4, atol=1e-5)


def test_checkpoint_roundtrip(tmp_path):
    model = _randomized()
    save_tiny_dit(model, tmp_path / "ckpt", {"note": "test"})
    loaded = load_tiny_dit(tmp_path / "ckpt")
    x, t, cond = torch.randn(2, 3, 16, 16), torch.rand(2), _cond(2)
    torch.testing.assert_close(loaded(x, t, cond), model(x, t, cond))
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["note"] == "test"


def test_bad_checkpoints_raise_errors_naming_the_file(tmp_path):
    save_tiny_dit(_randomized(), tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match=r"no config\.json in checkpoint folder"):
        load_tiny_dit(tmp_path / "nowhere")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model.safetensors are corrupt"):
        load_tiny_dit(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors are missing"):
        load_tiny_dit(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_tiny_dit(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps({"model_type": "flux"}))
    with pytest.raises(ValueError, match="not 'tiny-dit'"):
        load_tiny_dit(tmp_path / "ok")
    save_tiny_dit(_randomized(), tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    cfg["model"]["width"] = 64
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match its config"):
        load_tiny_dit(tmp_path / "other")


def test_non_finite_weights_are_never_saved(tmp_path):
    model = _randomized()
    with torch.no_grad():
        model.pos.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        save_tiny_dit(model, tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_bad_model_config():
    with pytest.raises(ValueError, match="multiple of patch"):
        TinyDiTConfig(image_size=30, patch=4)
    with pytest.raises(ValueError, match="divisible by heads"):
        TinyDiTConfig(width=30, heads=4)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 16, 16\)"):
        _randomized()(torch.zeros(1, 3, 32, 32), torch.rand(1), _cond(1))


def test_text_embeddings_are_token_level_and_cached(tmp_path):
    from mixgrpo.text import cached_embeddings

    prompts = ["one red circle", "a blue square left of a green triangle"]
    emb = cached_embeddings(prompts, tmp_path)
    assert emb.tokens.shape == (2, 16, 384) and emb.pooled.shape == (2, 384)
    assert emb.mask.sum(1).tolist()[0] < emb.mask.sum(1).tolist()[1]
    torch.testing.assert_close(emb.pooled.norm(dim=1), torch.ones(2))
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    again = cached_embeddings(prompts, tmp_path)  # read back from disk
    torch.testing.assert_close(again.tokens, emb.tokens)
    files[0].write_bytes(b"corrupt")  # a broken cache is rebuilt, not trusted
    torch.testing.assert_close(cached_embeddings(prompts, tmp_path).pooled, emb.pooled)
    with pytest.raises(KeyError, match="no cached embedding"):
        emb.lookup(["two pink circles"])
