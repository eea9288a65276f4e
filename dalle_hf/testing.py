"""Tiny random-weight pipelines for tests, benchmarks and demos (no download, a second to build)."""

from __future__ import annotations

import itertools

import torch

from .models import (
    DalleAlignmentConfig,
    DalleAlignmentModel,
    DalleImageDecoder,
    DalleImageDecoderConfig,
    DalleTextEncoder,
    DalleTextEncoderConfig,
)
from .pipeline_dalle import DallePipeline
from .tokenization import train_tokenizer

_COLORS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
_SHAPES = ["circle", "square", "triangle", "diamond"]
_PLACES = ["in the top left", "at the top", "in the center", "on the right", "at the bottom", "to the left of"]


def toy_captions() -> list[str]:
    """A few hundred ShapesWorld-like captions, enough to train a tokenizer that knows the world's words."""
    return [f"a small {c} {s} {p}" for c, s, p in itertools.product(_COLORS, _SHAPES, _PLACES)] + [
        f"two large {c} {s}s" for c, s in itertools.product(_COLORS, _SHAPES)
    ] + ["three circles above below right and"]


def build_pipeline(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    grid: int = 4,
    codebook_size: int = 64,
    text_hidden_size: int | None = None,
    text_layers: int = 2,
    max_text_len: int = 32,
    image_size: int | None = None,
    seed: int = 0,
) -> DallePipeline:
    """A random-weight pipeline of the given size: `grid` x `grid` codes, images of `image_size` (8 px per code)."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(toy_captions(), vocab_size=256, max_length=max_text_len)
    text_hidden = text_hidden_size or hidden_size
    text_encoder = DalleTextEncoder(DalleTextEncoderConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, num_hidden_layers=text_layers,
        num_attention_heads=num_heads, intermediate_size=4 * text_hidden, max_position_embeddings=max_text_len,
        projection_dim=text_hidden, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))
    image_decoder = DalleImageDecoder(DalleImageDecoderConfig(
        vocab_size=codebook_size, image_grid_size=grid, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=4 * hidden_size, cross_attention_dim=text_hidden,
    ))
    alignment = DalleAlignmentModel(DalleAlignmentConfig(
        image_size=image_size or grid * 8, patch_size=4, block_out_channels=[8, 16], codebook_size=codebook_size,
        codebook_dim=8, text_embed_dim=text_hidden, projection_dim=16, contrastive_width=16, contrastive_layers=1,
        contrastive_heads=2,
    ))
    pipe = DallePipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), image_decoder=image_decoder.eval(),
                         alignment=alignment.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def get_tiny_pipeline(seed: int = 0) -> DallePipeline:
    """The smallest useful pipeline: 4x4 codes, 32x32 images."""
    return build_pipeline(seed=seed)


def save_tiny_pipeline(path: str, seed: int = 0) -> str:
    """Write a tiny random pipeline folder (loadable with `DallePipeline.from_pretrained`) and return its path."""
    get_tiny_pipeline(seed).save_pretrained(path)
    return path
