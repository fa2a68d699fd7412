"""The FLUX adapter on a tiny random FluxTransformer2DModel saved and loaded back offline."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from mixgrpo.core.grids import uniform_grid  # noqa: E402
from mixgrpo.core.sampler import mixed_plan, sample  # noqa: E402
from mixgrpo.core.steps import SDENoise  # noqa: E402
from mixgrpo.models.flux import (  # noqa: E402
    FLUX_LORA_TARGETS,
    FluxCondition,
    FluxVelocityModel,
    load_flux_transformer,
    pack_latents,
    unpack_latents,
)
from mixgrpo.models.lora import adapters_disabled  # noqa: E402


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    folder = tmp_path_factory.mktemp("flux") / "pipe"
    model.save_pretrained(folder / "transformer")
    return folder


def _cond(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return FluxCondition(torch.randn(b, 7, 32, generator=g), torch.randn(b, 24, generator=g))


def test_pack_and_unpack_are_inverse_and_match_diffusers():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(pack_latents(x), 6, 8), x)
    with pytest.raises(ValueError, match="even height and width"):
        pack_latents(torch.randn(1, 4, 5, 8))


def test_loaded_from_a_pipeline_folder_it_samples_with_every_method(tiny_flux):
    model = FluxVelocityModel(load_flux_transformer(tiny_flux), latent_size=8)
    assert (model.config.channels, model.config.image_size) == (4, 8)
    cond = _cond()
    x = torch.randn(3, 4, 8, 8)
    v = model.velocity(x, torch.full((3,), 0.7), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    # the whole batch is one call: row i's velocity depends on row i only
    v0 = model.velocity(x[:1], torch.full((1,), 0.7), cond.index(torch.tensor([0])))
    torch.testing.assert_close(v[:1], v0, atol=1e-5, rtol=0)
    out = sample(lambda z, t: model.velocity(z, t, cond), x, mixed_plan(uniform_grid(6), [1, 2]),
                 SDENoise("flow_grpo", 0.7), generator=torch.Generator().manual_seed(0))
    assert out.x0.shape == x.shape and out.transitions.log_prob.shape == (2, 3)


def test_lora_changes_only_the_adapter_and_switches_off_exactly(tiny_flux):
    from peft import LoraConfig

    transformer = load_flux_transformer(tiny_flux)
    model = FluxVelocityModel(transformer, latent_size=8)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.full((2,), 0.5), _cond(2)
    base = model.velocity(x, t, cond)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=FLUX_LORA_TARGETS, init_lora_weights=False))
    with adapters_disabled(transformer):
        assert torch.equal(model.velocity(x, t, cond), base)
    assert not torch.equal(model.velocity(x, t, cond), base)
    trainable = [n for n, p in transformer.named_parameters() if p.requires_grad and "lora_" in n]
    assert trainable


def test_missing_or_wrong_folders_are_named(tmp_path, tiny_flux):
    with pytest.raises(FileNotFoundError, match="no FluxTransformer2DModel in"):
        load_flux_transformer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(ValueError, match="not a FluxTransformer2DModel"):
        load_flux_transformer(tmp_path)
    model = FluxVelocityModel(load_flux_transformer(tiny_flux), latent_size=8)
    with pytest.raises(ValueError, match="guidance-distilled"):
        model.velocity(torch.randn(1, 4, 8, 8), torch.full((1,), 0.5), _cond(1), guidance=2.0)
