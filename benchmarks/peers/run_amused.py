"""Peer runner: diffusers aMUSEd (AmusedPipeline, diffusers 0.42, deprecated but importable), random weights.
Runs in .venv-peers-amused.

Model (fixed; see docs/bench_peers.md): UVit2DModel hidden 256, 3 transformer layers (8 heads, FF 1024),
ConvNeXt down/up blocks (128 channels) with 1 res+attention block each, codebook 512 (+1 mask token); a tiny
CLIPTextModelWithProjection (hidden 128, 2 layers, 32 positions) with an in-memory character-level
CLIPTokenizer padded to 32 tokens; VQModel with 4 resolution levels (8x: 64 px -> 8x8 = 64 codes,
128 px -> 16x16 = 256 codes). 12 parallel-decoding (MaskGIT) steps, cosine masking schedule.
With guidance > 1 the pipeline runs the conditional and unconditional rows as one 2B batch per step;
with guidance 1 it runs B rows and skips the negative prompt.
"""
from __future__ import annotations

import string
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count, emit, grid_for, log, matmul_flops, parse_args, prompts_for, setup_torch, time_calls  # noqa: E402

TEXT_LEN = 32
STEPS = 12
CODEBOOK = 512
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=TEXT_LEN, projection_dim=128)
UVIT = dict(hidden_size=256, use_bias=False, cond_embed_dim=128, micro_cond_encode_dim=256,
            micro_cond_embed_dim=5 * 256, encoder_hidden_size=128, vocab_size=CODEBOOK + 1,
            codebook_size=CODEBOOK, in_channels=128, block_out_channels=128, num_res_blocks=1,
            downsample=False, upsample=False, block_num_heads=4, num_hidden_layers=3, num_attention_heads=8,
            intermediate_size=1024)
VQ = dict(block_out_channels=(16, 32, 32, 80), layers_per_block=1, latent_channels=64, norm_num_groups=16,
          num_vq_embeddings=CODEBOOK, mid_block_add_attention=False, lookup_from_codebook=True)


def build_tokenizer():
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = list(string.ascii_lowercase + string.digits)
    vocab = {t: i for i, t in enumerate(specials + chars + [c + "</w>" for c in chars])}
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = TEXT_LEN
    return tok


def build(torch, codes: int, seed: int):
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    grid = grid_for(codes)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    text = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tok), bos_token_id=0, eos_token_id=1,
                                                      pad_token_id=1, **TEXT)).eval()
    uvit = UVit2DModel(sample_size=grid, **UVIT).eval()
    n_lvls = len(VQ["block_out_channels"])
    vq = VQModel(down_block_types=("DownEncoderBlock2D",) * n_lvls, up_block_types=("UpDecoderBlock2D",) * n_lvls,
                 sample_size=grid * 2 ** (n_lvls - 1), **VQ).eval()
    sched = AmusedScheduler(mask_token_id=CODEBOOK, masking_schedule="cosine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = AmusedPipeline(vqvae=vq, tokenizer=tok, text_encoder=text, transformer=uvit, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    for m in (text, uvit, vq):
        m.requires_grad_(False)
    return pipe


def param_breakdown(pipe) -> tuple[dict, int]:
    uvit = count(pipe.transformer)
    layers = sum(count(m) for m in pipe.transformer.transformer_layers)
    text = count(pipe.text_encoder)
    params = {
        "transformer_blocks": layers,  # the 3 BasicTransformerBlocks only
        "image_transformer": uvit,  # whole UVit2DModel: conv embed, ConvNeXt/attention blocks, layers, MLM head
        "text_encoder": text,
        "pixel_decoder": count(pipe.vqvae.decoder) + count(pipe.vqvae.post_quant_conv) + count(pipe.vqvae.quantize),
        "pixel_autoencoder_total": count(pipe.vqvae),
    }
    matched = uvit + text
    params["matched"] = matched
    return params, matched


def main(argv=None):
    args = parse_args(argv)
    if args.check:
        args.codes, args.batch, args.guidance, args.warmup, args.repeats = 64, 1, 3.0, 0, 1
    torch = setup_torch(args.threads)
    pipe = build(torch, args.codes, args.seed)
    params, matched = param_breakdown(pipe)
    prompts = prompts_for(args.batch)
    grid = grid_for(args.codes)
    log(f"[amused] codes={args.codes} batch={args.batch} g={args.guidance} params={params}")

    def one(i):
        gen = torch.Generator().manual_seed(args.seed + 1000 + i)
        out = pipe(prompt=prompts, num_inference_steps=STEPS, guidance_scale=args.guidance, generator=gen,
                   output_type="np").images
        assert out.shape == (args.batch, grid * 8, grid * 8, 3), out.shape

    times = time_calls(one, args.warmup, args.repeats, args.max_seconds)
    lat = VQ["latent_channels"]
    pixel = matmul_flops(lambda: pipe.vqvae.decode(torch.zeros(1, grid, grid, dtype=torch.long), force_not_quantize=True,
                                                   shape=(1, grid, grid, lat)))
    emit("aMUSEd", args, params, matched, times,
         notes={"pixel_flops_per_image": pixel, "steps": STEPS, "text": TEXT, "uvit": UVIT, "vq": {k: list(v) if isinstance(v, tuple) else v
                                                                   for k, v in VQ.items()}})


if __name__ == "__main__":
    main()
