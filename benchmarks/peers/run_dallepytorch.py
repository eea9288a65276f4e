"""Peer runner: DALLE-pytorch 1.6.6 (lucidrains), random weights. Runs in .venv-peers-dallepytorch.

Model (fixed; see docs/bench_peers.md): a decoder-only transformer over [text | image codes],
dim 256, depth 6, heads 8, dim_head 32, text length 32, GEGLU FF x4, rotary + token shift (library
defaults), its own text/image embeddings and logits head; DiscreteVAE with codebook 512 as the pixel
decoder, 3 down/up-sampling layers (64 px -> 8x8 = 64 codes, 128 px -> 16x16 = 256 codes).

Generation API used: `DALLE.generate_images(text_ids, cond_scale=g, use_cache=True)`; its defaults
filter_thres=0.5 (top-k keeping half the logits), temperature 1. Note: in 1.6.6 `forward_with_cond_scale`
drops the cache when cond_scale == 1, so guidance 1 recomputes the whole prefix at every step (this
is what a user of the library gets, and we time it as is); with guidance != 1 it runs the conditional
and the unconditional batch as two cached passes per step.
"""
from __future__ import annotations

import sys
import types
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count, emit, grid_for, log, matmul_flops, parse_args, prompts_for, setup_torch, time_calls  # noqa: E402

TEXT_SEQ_LEN = 32
NUM_TEXT_TOKENS = 256  # word-level vocabulary of a ShapesWorld-sized caption language
CONFIG = dict(dim=256, depth=6, heads=8, dim_head=32, text_seq_len=TEXT_SEQ_LEN, num_text_tokens=NUM_TEXT_TOKENS)
VAE = dict(num_tokens=512, codebook_dim=256, num_layers=3, hidden_dim=94, num_resnet_blocks=1)


def _stub_taming():
    # dalle_pytorch.vae imports taming-transformers' VQModel at module level (only used by VQGanVAE,
    # which we do not use); taming-transformers cannot be installed here, so register an empty module.
    for name in ("taming", "taming.models", "taming.models.vqgan"):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
    sys.modules["taming.models.vqgan"].VQModel = None
    sys.modules["taming.models.vqgan"].GumbelVQ = None


def tokenize(torch, prompts: list[str]):
    """Word-level ids in [1, NUM_TEXT_TOKENS), 0-padded to TEXT_SEQ_LEN (DALLE-pytorch treats 0 as padding)."""
    ids = torch.zeros(len(prompts), TEXT_SEQ_LEN, dtype=torch.long)
    for i, p in enumerate(prompts):
        toks = [1 + zlib.crc32(w.encode()) % (NUM_TEXT_TOKENS - 1) for w in p.lower().split()][:TEXT_SEQ_LEN]
        ids[i, : len(toks)] = torch.tensor(toks)
    return ids


def build(torch, codes: int, seed: int):
    _stub_taming()
    from dalle_pytorch import DALLE, DiscreteVAE

    grid = grid_for(codes)
    torch.manual_seed(seed)
    vae = DiscreteVAE(image_size=grid * 2 ** VAE["num_layers"], **VAE)
    dalle = DALLE(vae=vae, **CONFIG).eval()
    dalle.requires_grad_(False)
    return dalle


def param_breakdown(dalle) -> tuple[dict, int]:
    vae = count(dalle.vae)
    total = count(dalle)
    blocks = count(dalle.transformer)
    emb = count(dalle.text_emb) + count(dalle.image_emb)
    head = count(dalle.to_logits)
    matched = total - vae  # everything that runs per token: blocks + text/image embeddings + logits head
    params = {
        "transformer_blocks": blocks,
        "embeddings": emb,
        "logits_head": head,
        "text_encoder": 0,  # the text is a prefix of the same transformer
        "pixel_decoder": vae,
        "matched": matched,
    }
    return params, matched


def main(argv=None):
    args = parse_args(argv)
    if args.check:
        args.codes, args.batch, args.guidance, args.warmup, args.repeats = 64, 1, 3.0, 0, 1
    torch = setup_torch(args.threads)
    dalle = build(torch, args.codes, args.seed)
    params, matched = param_breakdown(dalle)
    prompts = prompts_for(args.batch)
    log(f"[dallepytorch] codes={args.codes} batch={args.batch} g={args.guidance} params={params}")

    def one(i):
        torch.manual_seed(args.seed + 1000 + i)
        text = tokenize(torch, prompts)
        images = dalle.generate_images(text, cond_scale=args.guidance, use_cache=True)
        # same output contract as the others: float32 (B, H, W, 3) in [0, 1] on the CPU
        out = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().numpy()
        grid = grid_for(args.codes)
        assert out.shape == (args.batch, grid * 8, grid * 8, 3), out.shape

    times = time_calls(one, args.warmup, args.repeats, args.max_seconds)
    pixel = matmul_flops(lambda: dalle.vae.decode(torch.zeros(1, args.codes, dtype=torch.long)))
    emit("DALLE-pytorch", args, params, matched, times,
         notes={"config": CONFIG, "vae": VAE, "use_cache": args.guidance != 1, "pixel_flops_per_image": pixel})


if __name__ == "__main__":
    main()
