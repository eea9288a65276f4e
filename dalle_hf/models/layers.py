"""Transformer building blocks shared by the text encoder, the image decoder and the alignment head.

Each model file imports these by name (`from .layers import ...`); when a pipeline is saved, the exporter inlines this
file into each component's single-file remote code (see `dalle_hf/hub.py`), so keep it free of other package imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection.

    With `cache=(k_buffer, v_buffer)` the keys and values of this chunk are written into the preallocated buffers at
    positions `[start, start + L)` and the queries attend to everything up to the end of the chunk.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False, cache=None, start: int = 0):
        B, L, D = x.shape
        # (B, L, 3D) -> 3 x (B, H, L, Dh)
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k_buf, v_buf = cache
            k_buf[:, :, start : start + L] = k
            v_buf[:, :, start : start + L] = v
            k, v = k_buf[:, :, : start + L], v_buf[:, :, : start + L]
            if L > 1:  # a prefill chunk: causal inside the chunk, full view of the cached past
                attn_mask = causal_mask(L, start, x.device)
            is_causal = False
        dropout = self.dropout if self.training else 0.0
        if cache is not None and L == 1 and dropout == 0.0:  # a decode step: one new query over the whole cache
            y = single_query_attention(q, k, v)
        else:
            y = attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, H, L, Dh) -> (B, L, D)
        return self.proj(y)


class CrossAttention(nn.Module):
    """Multi-head attention from `x` to a context (the text states); keys and values can be computed once."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def project_context(self, context):
        """(B, Lc, Dc) -> keys, values, each (B, H, Lc, Dh)."""
        B, Lc, _ = context.shape
        k, v = self.kv(context).view(B, Lc, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x, context=None, context_mask=None, kv=None):
        B, L, D = x.shape
        k, v = kv if kv is not None else self.project_context(context)
        q = self.q(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask=context_mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, H, L, Dh) -> (B, L, D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional Transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class AttentionPool(nn.Module):
    """Pools a sequence into one vector with a learned query (multi-head attention pooling)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = CrossAttention(dim, dim, num_heads)

    def forward(self, x, mask=None):
        query = self.query.expand(x.shape[0], -1, -1).to(x.dtype)
        return self.attn(query, context=x, context_mask=mask)[:, 0]  # (B, 1, D) -> (B, D)


def attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):
    """`F.scaled_dot_product_attention`, run in float32 where CPU autocast would run it in bfloat16.

    On the CPU the bf16 attention kernel (forward and backward) is about 3x slower than the float32 one at this
    project's sizes (head dim 32, sequences of 16-256), so under bf16 autocast it took 44% of a decoder training step
    (benchmarks/profile_training.py, docs/profile.md). The result is float32; the next linear layer casts it back.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                  is_causal=is_causal, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)


def single_query_attention(q, k, v):
    """Attention of one query position (B, H, 1, Dh) over all keys (B, H, T, Dh), no mask: a cached decode step.

    In float32 on the CPU without autograd this is `softmax(q k^T / sqrt(Dh)) v` with two batched matmuls, which is
    faster than the SDPA kernel for one query over the cache (benchmarks/profile_decode.py, docs/profile.md); results
    agree with it to float rounding. Anything else goes through `attention()`.
    """
    if q.device.type == "cpu" and q.dtype == torch.float32 and not torch.is_grad_enabled():
        scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (B, H, 1, T)
        return torch.matmul(scores.softmax(-1), v)
    return attention(q, k, v)


def causal_mask(length: int, start: int, device) -> torch.Tensor:
    """Boolean (length, start + length) mask: query i (absolute position start + i) sees keys j <= start + i."""
    rows = torch.arange(start, start + length, device=device)[:, None]
    cols = torch.arange(start + length, device=device)[None, :]
    return cols <= rows


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) 0/1 mask -> (B, 1, 1, L) boolean mask for scaled_dot_product_attention (True = attend)."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]
