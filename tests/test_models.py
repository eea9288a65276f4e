"""Tiny-config tests of the three components: shapes, learning, causality, the cache, save/load, Auto classes."""

import pytest
import torch
from transformers import AutoConfig, AutoModel

from dalle_hf import (
    DalleAlignmentConfig,
    DalleAlignmentModel,
    DalleImageDecoder,
    DalleImageDecoderConfig,
    DalleTextEncoder,
    DalleTextEncoderConfig,
)
from dalle_hf.models.image_decoder import DalleDecoderCache


def text_config(**kw):
    return DalleTextEncoderConfig(**{**dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=16, projection_dim=24), **kw})


def decoder_config(**kw):
    return DalleImageDecoderConfig(**{**dict(vocab_size=20, image_grid_size=4, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, cross_attention_dim=32), **kw})


def alignment_config(**kw):
    return DalleAlignmentConfig(**{**dict(image_size=16, patch_size=2, block_out_channels=[8, 16], codebook_size=20,
                                          codebook_dim=8, text_embed_dim=24, projection_dim=16, contrastive_width=16,
                                          contrastive_layers=1, contrastive_heads=2), **kw})


@pytest.fixture
def text_batch():
    torch.manual_seed(0)
    ids = torch.randint(3, 40, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def test_text_encoder_shapes_and_padding(text_batch):
    ids, mask = text_batch
    model = DalleTextEncoder(text_config()).eval()
    out = model(ids, attention_mask=mask)
    assert out.last_hidden_state.shape == (3, 7, 32)
    assert out.pooled_output.shape == (3, 32)
    assert out.text_embeds.shape == (3, 24)
    # padding positions must not change the pooled vector of the padded prompt
    ids2 = ids.clone()
    ids2[1, 5:] = 7
    out2 = model(ids2, attention_mask=mask)
    torch.testing.assert_close(out.text_embeds[1], out2.text_embeds[1])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_text_encoder_sees_word_order(text_batch):
    ids, _ = text_batch
    model = DalleTextEncoder(text_config()).eval()
    swapped = ids.clone()
    swapped[:, [1, 2]] = swapped[:, [2, 1]]
    assert not torch.allclose(model(ids).text_embeds, model(swapped).text_embeds, atol=1e-4)


def test_position_embeddings_start_at_token_scale():
    model = DalleTextEncoder(text_config())
    ratio = model.position_embedding.weight.norm(dim=1).mean() / model.token_embedding.weight.norm(dim=1).mean()
    assert 0.5 < ratio < 2.0


@pytest.mark.parametrize("cls,config", [(DalleTextEncoderConfig, dict(hidden_size=30, num_attention_heads=4)),
                                        (DalleTextEncoderConfig, dict(vocab_size=0)),
                                        (DalleImageDecoderConfig, dict(image_grid_size=-1)),
                                        (DalleImageDecoderConfig, dict(dropout=1.5)),
                                        (DalleAlignmentConfig, dict(image_size=30)),
                                        (DalleAlignmentConfig, dict(block_out_channels=[7]))])
def test_config_validation(cls, config):
    with pytest.raises(ValueError):
        cls(**config)


def test_decoder_shapes_and_loss(text_batch):
    ids, mask = text_batch
    states = DalleTextEncoder(text_config())(ids, attention_mask=mask).last_hidden_state
    decoder = DalleImageDecoder(decoder_config())
    codes = torch.randint(0, 20, (3, 16))
    out = decoder(codes, states, mask, labels=codes)
    assert out.logits.shape == (3, 16, 20)
    assert out.loss.ndim == 0 and out.loss.item() > 0
    with pytest.raises(ValueError, match="codes"):
        decoder(torch.zeros(1, 17, dtype=torch.long), states[:1])


def test_decoder_is_causal(text_batch):
    ids, mask = text_batch
    states = DalleTextEncoder(text_config())(ids, attention_mask=mask).last_hidden_state
    decoder = DalleImageDecoder(decoder_config()).eval()
    codes = torch.randint(0, 20, (3, 16))
    t = 6
    changed = codes.clone()
    changed[:, t:] = (changed[:, t:] + 5) % 20
    a = decoder(codes, states, mask).logits
    b = decoder(changed, states, mask).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])  # logits[:, t] predict code t from codes < t
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_cached_decoding_matches_uncached(text_batch):
    ids, mask = text_batch
    states = DalleTextEncoder(text_config())(ids, attention_mask=mask).last_hidden_state
    decoder = DalleImageDecoder(decoder_config()).eval()
    # greedy decoding with the cache
    cache = decoder.init_cache(states, mask)
    assert isinstance(cache, DalleDecoderCache)
    logits = decoder.prefill(None, cache)
    codes, cached_logits = [], []
    for t in range(16):
        cached_logits.append(logits)
        codes.append(logits.argmax(-1))
        if t < 15:
            logits = decoder.step(codes[-1], cache)
    codes = torch.stack(codes, 1)
    full = decoder(codes, states, mask).logits
    torch.testing.assert_close(torch.stack(cached_logits, 1), full, atol=1e-5, rtol=0)
    assert torch.equal(full.argmax(-1), codes)
    # a prefix prefilled at once gives the same next-code logits
    cache = decoder.init_cache(states, mask)
    torch.testing.assert_close(decoder.prefill(codes[:, :5], cache), full[:, 5], atol=1e-5, rtol=0)


def test_attention_runs_in_float32_under_cpu_bf16_autocast():
    from dalle_hf.models.layers import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, requires_grad=True) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()  # what the q/k/v linear layers give under autocast
        y = attention(qb, kb, vb, is_causal=True)
    assert y.dtype == torch.float32  # computed in float32 (the bf16 CPU kernel is slower); the next linear casts
    torch.testing.assert_close(y, reference, atol=2e-2, rtol=0)
    y.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert attention(q, k, v, is_causal=True).dtype == torch.float32  # no autocast: plain SDPA
    assert attention(qb.detach(), kb.detach(), vb.detach()).dtype == torch.bfloat16


def test_alignment_autoencoder_and_score():
    model = DalleAlignmentModel(alignment_config()).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    assert out.reconstruction.shape == (2, 3, 16, 16)
    assert out.codes.shape == (2, 16) and out.codes.max() < 20
    codes = model.encode(x)
    assert torch.equal(codes, out.codes)
    pixels = model.decode(codes)
    assert pixels.shape == (2, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    text = torch.randn(2, 24)
    s_codes = model.score(text, codes=codes)
    s_pixels = model.score(text, pixel_values=x)
    assert s_codes.shape == (2,)
    torch.testing.assert_close(s_codes, s_pixels)
    with pytest.raises(ValueError, match="exactly one"):
        model.score(text)
    with pytest.raises(ValueError, match="pixel_values"):
        model.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="codes"):
        model.decode(torch.zeros(1, 5, dtype=torch.long))


def _loss_falls(params, loss_fn, steps=25, lr=3e-3):
    opt = torch.optim.Adam(params, lr=lr)
    first = None
    for _ in range(steps):
        loss = loss_fn()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss_fn().item()


def test_decoder_and_text_encoder_learn_a_fixed_batch(text_batch):
    torch.manual_seed(0)
    ids, mask = text_batch
    enc, dec = DalleTextEncoder(text_config()), DalleImageDecoder(decoder_config())
    codes = torch.randint(0, 20, (3, 16))

    def loss():
        return dec(codes, enc(ids, attention_mask=mask).last_hidden_state, mask, labels=codes).loss

    first, last = _loss_falls(list(enc.parameters()) + list(dec.parameters()), loss)
    assert last < 0.5 * first


def test_autoencoder_and_contrastive_losses_fall():
    torch.manual_seed(0)
    model = DalleAlignmentModel(alignment_config())
    x = torch.rand(4, 3, 16, 16) * 2 - 1

    def rec_loss():
        out = model(x)
        return (out.reconstruction - x).abs().mean() + out.quantization_loss

    first, last = _loss_falls(model.parameters(), rec_loss)
    assert last < 0.7 * first
    text, codes = torch.randn(6, 24), torch.randint(0, 20, (6, 16))
    first, last = _loss_falls(model.parameters(), lambda: model.contrastive_loss(text, codes, negative_text_embeds=text[:2] + 1))
    assert last < 0.5 * first


@pytest.mark.parametrize("model_cls,config_fn", [(DalleTextEncoder, text_config), (DalleImageDecoder, decoder_config),
                                                 (DalleAlignmentModel, alignment_config)])
def test_save_load_round_trip_and_auto_model(tmp_path, model_cls, config_fn):
    model = model_cls(config_fn()).eval()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    for loaded in (model_cls.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is model_cls
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
    assert type(AutoConfig.from_pretrained(tmp_path)) is type(model.config)


def test_bf16_loading(tmp_path):
    model = DalleImageDecoder(decoder_config())
    model.save_pretrained(tmp_path)
    assert DalleImageDecoder.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
