"""The embedded models (tiny U-Net, the shipped base; tiny DiT, the first round's), their
checkpoints and the text encoder cache."""

from __future__ import annotations

import json

import pytest
import torch

from mixgrpo.models.checkpoint import BASE_CHECKPOINT, build_embedded, load_embedded, save_embedded
from mixgrpo.models.tiny_dit import TextCondition, TinyDiTConfig
from mixgrpo.models.tiny_unet import TinyUNet, TinyUNetConfig
from tiny_runs import perturbed_embedded, random_condition

SMALL = {"tiny-dit": {"image_size": 16, "patch": 4, "width": 32, "depth": 2, "heads": 2},
         "tiny-unet": {"image_size": 16, "widths": [16, 32], "heads": 2}}
KINDS = pytest.mark.parametrize("kind", list(SMALL))


@KINDS
def test_default_model_is_small_and_starts_at_zero_velocity(kind):
    model = build_embedded(kind, {})
    assert model.num_parameters() * 4 < 20e6  # fp32 safetensors under 20 MB
    x = torch.randn(2, 3, 32, 32)
    v = model(x, torch.rand(2), random_condition(2, visible=5))
    assert v.shape == x.shape and torch.count_nonzero(v) == 0  # zero-initialised output layer


def test_the_shipped_base_is_the_unet_and_under_20_mb():
    assert json.loads((BASE_CHECKPOINT / "config.json").read_text())["model_type"] == "tiny-unet"
    assert (BASE_CHECKPOINT / "model.safetensors").stat().st_size < 20e6
    assert isinstance(load_embedded(), TinyUNet)


@KINDS
def test_padded_text_tokens_are_ignored_and_visible_ones_matter(kind):
    model = perturbed_embedded(kind, SMALL[kind])
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    cond = random_condition(2, visible=5)
    base = model(x, t, cond)
    padded = cond.tokens.clone()
    padded[:, 5:] += 10.0
    torch.testing.assert_close(model(x, t, TextCondition(padded, cond.mask, cond.pooled)), base)
    visible = cond.tokens.clone()
    visible[:, 1] += 1.0
    assert not torch.allclose(model(x, t, TextCondition(visible, cond.mask, cond.pooled)), base)


@KINDS
def test_guidance_combines_conditional_and_null_branches(kind):
    model = perturbed_embedded(kind, SMALL[kind])
    x, t, cond = torch.randn(3, 3, 16, 16), torch.rand(3), random_condition(3, visible=5)
    torch.testing.assert_close(model.velocity(x, t, cond, 1.0), model(x, t, cond))
    v_cond, v_null = model(x, t, cond), model(x, t, model.null_condition(3))
    torch.testing.assert_close(model.velocity(x, t, cond, 4.0), v_null + 4.0 * (v_cond - v_null), rtol=1e-4, atol=1e-5)


@KINDS
def test_checkpoint_roundtrip(kind, tmp_path):
    model = perturbed_embedded(kind, SMALL[kind])
    save_embedded(model, tmp_path / "ckpt", {"note": "test"})
    loaded = load_embedded(tmp_path / "ckpt")
    x, t, cond = torch.randn(2, 3, 16, 16), torch.rand(2), random_condition(2, visible=5)
    torch.testing.assert_close(loaded(x, t, cond), model(x, t, cond))
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["note"] == "test"


@KINDS
def test_bad_checkpoints_raise_errors_naming_the_file(kind, tmp_path):
    save_embedded(perturbed_embedded(kind, SMALL[kind]), tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match=r"no config\.json in checkpoint folder"):
        load_embedded(tmp_path / "nowhere")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model.safetensors are corrupt"):
        load_embedded(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors are missing"):
        load_embedded(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_embedded(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps({"model_type": "flux"}))
    with pytest.raises(ValueError, match="model_type 'flux', not an embedded model"):
        load_embedded(tmp_path / "ok")
    save_embedded(perturbed_embedded(kind, SMALL[kind]), tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    cfg["model"]["width" if kind == "tiny-dit" else "emb_dim"] = 64
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match its config"):
        load_embedded(tmp_path / "other")


@KINDS
def test_non_finite_weights_are_never_saved(kind, tmp_path):
    model = perturbed_embedded(kind, SMALL[kind])
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        save_embedded(model, tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_bad_model_config():
    with pytest.raises(ValueError, match="multiple of patch"):
        TinyDiTConfig(image_size=30, patch=4)
    with pytest.raises(ValueError, match="divisible by heads"):
        TinyDiTConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="divisible by 2 \\*\\* 3"):
        TinyUNetConfig(image_size=36)
    with pytest.raises(ValueError, match="divisible by groups 8"):
        TinyUNetConfig(widths=(12, 24, 48))
    with pytest.raises(ValueError, match="divisible by heads 5"):
        TinyUNetConfig(heads=5)
    for kind in SMALL:
        with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 16, 16\)"):
            perturbed_embedded(kind, SMALL[kind])(torch.zeros(1, 3, 32, 32), torch.rand(1), random_condition(1, visible=5))


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
