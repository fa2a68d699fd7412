"""Text conditioning: bundled sentence-encoder embeddings, cached per prompt set."""

from .encoder import (
    MAX_TOKENS,
    TEXT_DIM,
    PromptEmbeddings,
    cached_embeddings,
    encode_prompts,
    encoder_path,
)

__all__ = ["MAX_TOKENS", "TEXT_DIM", "PromptEmbeddings", "cached_embeddings", "encode_prompts", "encoder_path"]
