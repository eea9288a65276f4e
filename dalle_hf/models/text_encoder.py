"""DalleTextEncoder: a bidirectional Transformer over the prompt's BPE tokens.

It returns per-token states (the image decoder cross-attends to them) and a pooled text vector (attention pooling,
then a projection) that the alignment model's contrastive head scores against images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .layers import AttentionPool, EncoderBlock, padding_mask


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_probability(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a float in [0, 1), got {value!r}.")


class DalleTextEncoderConfig(PretrainedConfig):
    r"""
    Configuration of a [`DalleTextEncoder`].

    Args:
        vocab_size (`int`, defaults to 512): Size of the BPE vocabulary (the tokenizer's `len(tokenizer)`).
        hidden_size (`int`, defaults to 256): Width of the token states.
        num_hidden_layers (`int`, defaults to 4): Number of Transformer blocks.
        num_attention_heads (`int`, defaults to 4): Attention heads per block; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 1024): Width of each block's MLP.
        max_position_embeddings (`int`, defaults to 32): Longest prompt in tokens (special tokens included); longer
            prompts are truncated by the pipeline with a warning.
        projection_dim (`int`, defaults to 256): Size of the projected pooled text vector (`text_embeds`).
        dropout (`float`, defaults to 0.0): Dropout on attention weights and MLP outputs during training.
        layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon.
        initializer_range (`float`, defaults to 0.02): Std of the normal initialisation. Token and position embeddings
            use the same scale, so that the encoder sees word order from the first step.
        pad_token_id, bos_token_id, eos_token_id (`int`): Special token ids of the tokenizer.
    """

    model_type = "dalle_text_encoder"

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 1024,
        max_position_embeddings: int = 32,
        projection_dim: int = 256,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        **kwargs,
    ):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "projection_dim"):
            _check_positive(name, locals()[name])
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` ({num_attention_heads})."
            )
        _check_probability("dropout", dropout)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.projection_dim = projection_dim
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)


@dataclass
class DalleTextEncoderOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, length, hidden_size)`): per-token states.
        pooled_output (`torch.FloatTensor` of shape `(batch, hidden_size)`): attention-pooled text vector.
        text_embeds (`torch.FloatTensor` of shape `(batch, projection_dim)`): the pooled vector after the projection.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooled_output: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


class DalleTextEncoderPreTrainedModel(PreTrainedModel):
    config_class = DalleTextEncoderConfig
    base_model_prefix = "text_encoder"
    main_input_name = "input_ids"
    _no_split_modules = ["EncoderBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AttentionPool):
            nn.init.normal_(module.query, std=self.config.initializer_range)


class DalleTextEncoder(DalleTextEncoderPreTrainedModel):
    """Bidirectional pre-norm Transformer over token ids, with learned token and position embeddings."""

    def __init__(self, config: DalleTextEncoderConfig):
        super().__init__(config)
        D = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, D)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, D)
        self.blocks = nn.ModuleList(
            EncoderBlock(D, config.num_attention_heads, config.intermediate_size, config.dropout, config.layer_norm_eps)
            for _ in range(config.num_hidden_layers)
        )
        self.final_layer_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.pooler = AttentionPool(D, config.num_attention_heads)
        self.text_projection = nn.Linear(D, config.projection_dim)
        self.post_init()

    def get_input_embeddings(self):
        return self.token_embedding

    def set_input_embeddings(self, value):
        self.token_embedding = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DalleTextEncoderOutput | tuple:
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(
                f"`input_ids` has length {L}, longer than max_position_embeddings="
                f"{self.config.max_position_embeddings}; truncate the prompt first."
            )
        positions = torch.arange(L, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)[None]  # (B, L, D)
        mask = padding_mask(attention_mask)
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        x = self.final_layer_norm(x)
        pooled = self.pooler(x, mask)
        text_embeds = self.text_projection(pooled)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return (x, pooled, text_embeds)
        return DalleTextEncoderOutput(last_hidden_state=x, pooled_output=pooled, text_embeds=text_embeds)
