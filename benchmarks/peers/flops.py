"""FLOP accounting for the dalle-hf contender (project venv only).

Conventions (see docs/bench_peers.md): a multiply-add is 2 FLOPs; only matrix products are counted
(linear layers, attention score/value products, convolutions); embeddings look-ups, norms, activations,
softmax and sampling are free. Attention is counted as executed: with the KV cache, generated code t
(0-based) attends to t + 1 keys, so self-attention costs 4 * D * (t + 1) per layer.

`analytic_*` take plain config dicts (a `config.json` loaded with json works), so they can be used
without building a model. `count_flops(fn)` measures what actually runs with torch's FlopCounterMode,
with a formula added for the CPU fused attention kernel that FlopCounterMode does not know.
"""
from __future__ import annotations


def _get(cfg, name, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def decoder_matmul_params(dec) -> dict:
    """Weights used in matmuls by DalleImageDecoder, per token (`per_token`) and per text token (`per_text_token`)."""
    D = _get(dec, "hidden_size")
    I = _get(dec, "intermediate_size")
    Dc = _get(dec, "cross_attention_dim", D)
    V = _get(dec, "vocab_size")
    n = _get(dec, "num_hidden_layers")
    per_layer = 3 * D * D + D * D + D * D + D * D + 2 * D * I  # qkv, proj, cross q, cross proj, mlp
    return {"per_token": n * per_layer + D * V, "per_text_token": n * Dc * 2 * D}  # + lm_head; cross k/v


def analytic_decoder_generate(dec, n_codes: int, rows: int, text_len: int) -> dict:
    """FLOPs to generate `n_codes` codes for `rows` sequences with the KV cache (BOS + n_codes - 1 inputs)."""
    D = _get(dec, "hidden_size")
    n = _get(dec, "num_hidden_layers")
    p = decoder_matmul_params(dec)
    linear = 2 * p["per_token"] * n_codes
    self_attn = n * 4 * D * n_codes * (n_codes + 1) // 2
    cross_attn = n * 4 * D * text_len * n_codes
    cross_kv = 2 * p["per_text_token"] * text_len  # once per prompt row
    per_row = linear + self_attn + cross_attn + cross_kv
    return {"linear": linear * rows, "self_attention": self_attn * rows, "cross_attention": cross_attn * rows,
            "cross_kv": cross_kv * rows, "total": per_row * rows, "per_code": per_row / n_codes}


def analytic_decoder_train_forward(dec, n_codes: int, rows: int, text_len: int) -> int:
    """Teacher-forced forward over n_codes positions; causal self-attention counted as the useful half."""
    D = _get(dec, "hidden_size")
    n = _get(dec, "num_hidden_layers")
    p = decoder_matmul_params(dec)
    per_row = (2 * p["per_token"] * n_codes + n * 4 * D * n_codes * (n_codes + 1) // 2
               + n * 4 * D * text_len * n_codes + 2 * p["per_text_token"] * text_len)
    return per_row * rows


def analytic_text_encoder(te, text_len: int, rows: int) -> int:
    D = _get(te, "hidden_size")
    I = _get(te, "intermediate_size")
    n = _get(te, "num_hidden_layers")
    P = _get(te, "projection_dim", D)
    L = text_len
    blocks = n * (2 * L * (4 * D * D + 2 * D * I) + 4 * L * L * D)
    pool = 2 * (D * D + L * 2 * D * D + D * D) + 4 * L * D  # query proj, k/v over L tokens, out proj, attention
    proj = 2 * D * P
    return (blocks + pool + proj) * rows


def sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, lq, d = query_shape
    return 4 * b * h * lq * key_shape[-2] * d


def count_flops(fn, modules=()) -> tuple[int, dict, object]:
    """Run fn() under FlopCounterMode; returns (total, {op: flops}, fn's result).

    Pass the inference modules as `modules`: their parameters are frozen while counting (FlopCounterMode's
    module tracker fails on views of trainable parameters made under no_grad).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    extra = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(aten, name, None)
        if op is not None:
            extra[op] = sdpa_cpu_flops
    frozen = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=extra) as fc:
            out = fn()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    counts = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return int(fc.get_total_flops()), counts, out
