"""The SD3 adapter on a tiny random SD3Transformer2DModel saved and loaded back offline."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from mixgrpo.models.lora import adapters_disabled  # noqa: E402
from mixgrpo.models.sd3 import (  # noqa: E402
    SD3_LORA_TARGETS,
    SD3Condition,
    SD3VelocityModel,
    load_sd3_transformer,
)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16,
    )
    folder = tmp_path_factory.mktemp("sd3") / "pipe"
    model.save_pretrained(folder / "transformer")
    return folder


def _cond(b=2, negative=True):
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(b, 5, 16, generator=g), torch.randn(b, 12, generator=g)]
    if negative:
        args += [torch.randn(b, 5, 16, generator=g), torch.randn(b, 12, generator=g)]
    return SD3Condition(*args)


def test_velocity_and_cfg_match_the_pipeline_formula(tiny_sd3):
    model = SD3VelocityModel(load_sd3_transformer(tiny_sd3), latent_size=8)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.full((2,), 0.4), _cond()
    v_text = model.velocity(x, t, cond)
    uncond = SD3Condition(cond.negative_embeds, cond.negative_pooled)
    v_uncond = model.velocity(x, t, uncond)
    torch.testing.assert_close(model.velocity(x, t, cond, guidance=4.5), v_uncond + 4.5 * (v_text - v_uncond),
                               atol=1e-5, rtol=0)
    assert model.config.channels == 4 and v_text.shape == x.shape
    with pytest.raises(ValueError, match="negative-prompt embeddings"):
        model.velocity(x, t, _cond(negative=False), guidance=2.0)


def test_lora_switches_off_exactly(tiny_sd3):
    from peft import LoraConfig

    transformer = load_sd3_transformer(tiny_sd3)
    model = SD3VelocityModel(transformer, latent_size=8)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.full((2,), 0.4), _cond()
    base = model.velocity(x, t, cond)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=SD3_LORA_TARGETS, init_lora_weights=False))
    with adapters_disabled(transformer):
        assert torch.equal(model.velocity(x, t, cond), base)
    assert not torch.equal(model.velocity(x, t, cond), base)


def test_a_flux_folder_is_refused(tiny_sd3, tmp_path):
    with pytest.raises(ValueError, match="not a FluxTransformer2DModel"):
        from mixgrpo.models.flux import load_flux_transformer

        load_flux_transformer(tiny_sd3)
