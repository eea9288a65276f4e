"""DalleImageDecoder: an autoregressive Transformer that writes an image as a raster sequence of discrete codes.

Input position i holds the previous code (BOS at i = 0) plus the 2-D position (row, column) of the code it predicts,
so `logits[:, i]` is the distribution of code i given codes < i and the text. Every block attends causally to the
codes so far, then to the text states (cross-attention), then applies an MLP.

Sampling uses `DalleDecoderCache`: self-attention keys/values are written into preallocated buffers one step at a
time, and the cross-attention keys/values of the text are computed once per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .layers import MLP, CrossAttention, SelfAttention, padding_mask


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


class DalleImageDecoderConfig(PretrainedConfig):
    r"""
    Configuration of a [`DalleImageDecoder`].

    Args:
        vocab_size (`int`, defaults to 512): Number of image codes (the alignment model's `codebook_size`). The decoder's
            embedding table has one more row, for the begin-of-image token (id `vocab_size`).
        image_grid_size (`int`, defaults to 8): The image is `image_grid_size` x `image_grid_size` codes.
        hidden_size (`int`, defaults to 256): Width of the decoder.
        num_hidden_layers (`int`, defaults to 8): Number of blocks.
        num_attention_heads (`int`, defaults to 8): Heads per attention layer; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 1024): Width of each block's MLP.
        cross_attention_dim (`int`, defaults to 256): Width of the text states (the text encoder's `hidden_size`).
        dropout (`float`, defaults to 0.0): Dropout on attention weights and MLP outputs during training.
        layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon.
        initializer_range (`float`, defaults to 0.02): Std of the normal initialisation.
    """

    model_type = "dalle_image_decoder"

    def __init__(
        self,
        vocab_size: int = 512,
        image_grid_size: int = 8,
        hidden_size: int = 256,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        intermediate_size: int = 1024,
        cross_attention_dim: int = 256,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        for name in ("vocab_size", "image_grid_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "cross_attention_dim"):
            _check_positive(name, locals()[name])
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` ({num_attention_heads})."
            )
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be a float in [0, 1), got {dropout!r}.")
        self.vocab_size = vocab_size
        self.image_grid_size = image_grid_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.cross_attention_dim = cross_attention_dim
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid_size**2

    @property
    def image_bos_token_id(self) -> int:
        """The begin-of-image token: one past the last code."""
        return self.vocab_size


@dataclass
class DalleImageDecoderOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor`, *optional*): next-code cross-entropy, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch, length, vocab_size)`): `logits[:, i]` predicts code i.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


@dataclass
class DalleDecoderCache:
    """Preallocated self-attention keys/values and precomputed cross-attention keys/values, one entry per layer."""

    self_kv: list  # per layer: (k, v), each (B, H, N, Dh)
    cross_kv: list  # per layer: (k, v), each (B, H, Lt, Dh)
    cross_mask: torch.Tensor | None  # (B, 1, 1, Lt) additive float mask (0 or -inf), or None
    length: int = 0  # number of input positions already written
    row_embeds: torch.Tensor | None = None  # (N, D): the row embedding of every position, looked up once
    col_embeds: torch.Tensor | None = None  # (N, D): the column embedding of every position


class DecoderBlock(nn.Module):
    def __init__(self, config: DalleImageDecoderConfig):
        super().__init__()
        D, H, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
        self.ln_1 = nn.LayerNorm(D, eps=eps)
        self.attn = SelfAttention(D, H, config.dropout)
        self.ln_2 = nn.LayerNorm(D, eps=eps)
        self.cross_attn = CrossAttention(D, config.cross_attention_dim, H, config.dropout)
        self.ln_3 = nn.LayerNorm(D, eps=eps)
        self.mlp = MLP(D, config.intermediate_size, config.dropout)

    def forward(self, x, context=None, context_mask=None, cross_kv=None, self_kv=None, start=0):
        x = x + self.attn(self.ln_1(x), is_causal=self_kv is None, cache=self_kv, start=start)
        x = x + self.cross_attn(self.ln_2(x), context=context, context_mask=context_mask, kv=cross_kv)
        return x + self.mlp(self.ln_3(x))


class DalleImageDecoderPreTrainedModel(PreTrainedModel):
    config_class = DalleImageDecoderConfig
    base_model_prefix = "image_decoder"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        # GPT-2 style: scale the residual output projections by depth so deep stacks start near the identity.
        if isinstance(module, (SelfAttention, CrossAttention)):
            nn.init.normal_(module.proj.weight, std=self.config.initializer_range / (2 * self.config.num_hidden_layers) ** 0.5)
        if isinstance(module, MLP):
            nn.init.normal_(module.fc2.weight, std=self.config.initializer_range / (2 * self.config.num_hidden_layers) ** 0.5)


class DalleImageDecoder(DalleImageDecoderPreTrainedModel):
    """Causal Transformer over image codes with cross-attention to the text encoder's states."""

    def __init__(self, config: DalleImageDecoderConfig):
        super().__init__(config)
        D, G = config.hidden_size, config.image_grid_size
        self.code_embedding = nn.Embedding(config.vocab_size + 1, D)  # + the begin-of-image token
        self.row_embedding = nn.Embedding(G, D)
        self.col_embedding = nn.Embedding(G, D)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(D, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.code_embedding

    def set_input_embeddings(self, value):
        self.code_embedding = value

    def _embed(self, tokens: torch.LongTensor, start: int, cache: DalleDecoderCache | None = None) -> torch.Tensor:
        """Input tokens at positions [start, start + L) plus the 2-D position of the code each one predicts."""
        L, G = tokens.shape[1], self.config.image_grid_size
        if cache is not None:  # position embeddings looked up once per call (fewer small ops per decode step)
            rows, cols = cache.row_embeds[start : start + L], cache.col_embeds[start : start + L]
        else:
            pos = torch.arange(start, start + L, device=tokens.device)
            rows, cols = self.row_embedding(pos // G), self.col_embedding(pos % G)
        return self.code_embedding(tokens) + rows[None] + cols[None]

    def _shift_right(self, codes: torch.LongTensor) -> torch.LongTensor:
        """(B, T) codes -> (B, T) inputs: BOS followed by codes[:, :-1]."""
        bos = torch.full_like(codes[:, :1], self.config.image_bos_token_id)
        return torch.cat([bos, codes[:, :-1]], dim=1)

    def forward(
        self,
        input_ids: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DalleImageDecoderOutput | tuple:
        """Teacher-forced pass over `input_ids` (B, T) codes, T <= image_grid_size**2; `logits[:, i]` predicts code i."""
        T = input_ids.shape[1]
        if T > self.config.num_image_tokens:
            raise ValueError(f"`input_ids` has {T} codes, more than the image's {self.config.num_image_tokens}.")
        x = self._embed(self._shift_right(input_ids), 0)  # (B, T, D)
        mask = padding_mask(encoder_attention_mask)
        for block in self.blocks:
            x = block(x, context=encoder_hidden_states, context_mask=mask)
        logits = self.lm_head(self.final_layer_norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return (loss, logits) if loss is not None else (logits,)
        return DalleImageDecoderOutput(loss=loss, logits=logits)

    # ---- cached decoding -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_cache(self, encoder_hidden_states, encoder_attention_mask=None) -> DalleDecoderCache:
        """Preallocate the self-attention buffers and compute the text's cross-attention keys/values once."""
        B = encoder_hidden_states.shape[0]
        H = self.config.num_attention_heads
        shape = (B, H, self.config.num_image_tokens, self.config.hidden_size // H)
        ref = self.lm_head.weight
        self_kv = [(ref.new_empty(shape), ref.new_empty(shape)) for _ in self.blocks]
        context = encoder_hidden_states.to(ref.dtype)
        # contiguous (B, H, Lt, Dh) keys/values: each decode step's cross-attention reads them from memory that is
        # mostly out of the CPU caches, and strided views of the projection cost ~30% more there (docs/profile.md)
        cross_kv = [tuple(t.contiguous() for t in block.cross_attn.project_context(context)) for block in self.blocks]
        mask = padding_mask(encoder_attention_mask)
        if mask is not None:  # the additive form attention would build from the boolean mask at every step
            mask = torch.zeros(mask.shape, dtype=ref.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        G, pos = self.config.image_grid_size, torch.arange(self.config.num_image_tokens, device=ref.device)
        return DalleDecoderCache(self_kv, cross_kv, mask, row_embeds=self.row_embedding(pos // G),
                                 col_embeds=self.col_embedding(pos % G))

    @torch.no_grad()
    def forward_cached(self, tokens: torch.LongTensor, cache: DalleDecoderCache) -> torch.Tensor:
        """Run input tokens (B, L) at positions [cache.length, cache.length + L); returns logits of the last (B, V).

        The tokens are inputs, not codes: pass BOS first, then each sampled code (see `prefill` and `step`).
        """
        start = cache.length
        x = self._embed(tokens, start, cache)
        for block, self_kv, cross_kv in zip(self.blocks, cache.self_kv, cache.cross_kv):
            x = block(x, context_mask=cache.cross_mask, cross_kv=cross_kv, self_kv=self_kv, start=start)
        cache.length = start + tokens.shape[1]
        return self.lm_head(self.final_layer_norm(x[:, -1]))

    def prefill(self, codes: torch.LongTensor | None, cache: DalleDecoderCache) -> torch.Tensor:
        """Start decoding: BOS plus an optional prefix of known codes (B, P); returns the logits of code P."""
        B = cache.self_kv[0][0].shape[0]
        bos = torch.full((B, 1), self.config.image_bos_token_id, dtype=torch.long, device=self.lm_head.weight.device)
        tokens = bos if codes is None or codes.shape[1] == 0 else torch.cat([bos, codes], dim=1)
        return self.forward_cached(tokens, cache)

    def step(self, codes: torch.LongTensor, cache: DalleDecoderCache) -> torch.Tensor:
        """Feed the code just sampled (B,) and get the logits of the next one (B, V)."""
        return self.forward_cached(codes[:, None], cache)
