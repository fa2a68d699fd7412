"""`mixgrpo preprocess` on a tiny FLUX pipeline built and saved offline."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("diffusers")

from mixgrpo.cli import app
from mixgrpo.models.flux import FluxCondition, FluxVelocityModel, load_flux_transformer
from mixgrpo.text.preprocess import load_embeddings, preprocess_prompts
from tiny_pipelines import make_tiny_flux_pipeline

PROMPTS = ["two red circles", "a blue square left of a green triangle", "one yellow triangle", "a photo of a cat",
           "three blue squares"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("pipes") / "flux")


def test_preprocess_cli_writes_shards_equal_to_the_pipeline_encoder(flux_dir, tmp_path):
    from diffusers import FluxPipeline

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    out = tmp_path / "emb"
    result = CliRunner().invoke(app, ["preprocess", "--model", str(flux_dir), "--prompts", str(tmp_path / "p.txt"),
                                      "--out", str(out), "--max-sequence-length", "16", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    prompts, tensors, index = load_embeddings(out, expect_dim=32, expect_pooled=16)
    assert prompts == PROMPTS and index["pipeline"] == "FluxPipeline"
    pipe = FluxPipeline.from_pretrained(flux_dir, local_files_only=True)
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=16)
    torch.testing.assert_close(tensors["prompt_embeds"], embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(tensors["pooled"], pooled, atol=1e-6, rtol=0)
    # and the adapter takes them as they are
    model = FluxVelocityModel(load_flux_transformer(flux_dir), latent_size=8)
    cond = FluxCondition(tensors["prompt_embeds"], tensors["pooled"])
    assert model.velocity(torch.randn(5, 4, 8, 8), torch.full((5,), 0.5), cond).shape == (5, 4, 8, 8)


def test_shards_split_and_reassemble(flux_dir, tmp_path):
    out = preprocess_prompts(flux_dir, PROMPTS, tmp_path / "emb", max_sequence_length=16, shard_size=2)
    prompts, tensors, index = load_embeddings(out)
    assert [s["file"] for s in index["shards"]] == [f"embeddings-0000{i}.safetensors" for i in range(3)]
    assert tensors["prompt_embeds"].shape == (5, 16, 32) and prompts == PROMPTS


def test_preprocess_errors(flux_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        preprocess_prompts(tmp_path, PROMPTS, tmp_path / "x")
    out = preprocess_prompts(flux_dir, PROMPTS[:2], tmp_path / "emb", max_sequence_length=16)
    with pytest.raises(ValueError, match="not empty"):
        preprocess_prompts(flux_dir, PROMPTS, out)
    with pytest.raises(ValueError, match="expects 64 / 16: preprocess with its pipeline"):
        load_embeddings(out, expect_dim=64, expect_pooled=16)
    with pytest.raises(FileNotFoundError, match="run `mixgrpo preprocess`"):
        load_embeddings(tmp_path)
