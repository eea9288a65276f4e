"""Contender runner: dalle-hf `DallePipeline`, random weights. Runs in the project venv (/work/main/.venv).

The pipeline comes from `dalle_hf.testing.build_pipeline(...)` (random weights, chosen size); the size is
DALLEHF below, picked so that text encoder + image decoder match the peers' counted parameters within 10%
(the orchestrator checks this). Called exactly as a user would:
`pipe(prompt=[...], guidance_scale=g, generator=[one torch.Generator per image], output_type="np")`.

With `--flops` (the orchestrator passes it in round 0), besides the timings it reports the FLOPs of one extra,
untimed call (see flops.py and docs/bench_peers.md): analytic counts for the image decoder and the text encoder,
FlopCounterMode for the pixel decoder, and FlopCounterMode over the whole call as a cross-check.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))  # the repo root, in case dalle_hf is not installed in the venv
from _common import count, emit, grid_for, log, parse_args, prompts_for, setup_torch, time_calls  # noqa: E402
import flops  # noqa: E402

DALLEHF = dict(hidden_size=256, num_layers=4, num_heads=8, codebook_size=512, text_hidden_size=256, text_layers=2,
               max_text_len=32)
# build_pipeline's alignment model is test-tiny; the benchmark swaps in one with the embedded default model's
# autoencoder sizes (the `shapes` recipe), whose pixel decoder costs about what the peers' do (~400 MFLOP per
# 64-px image, x4 at 128 px). Only the keys below are taken from the recipe.
PIXEL_KEYS = ("patch_size", "block_out_channels", "layers_per_block", "codebook_dim")


def build(torch, codes: int, seed: int):
    try:
        from dalle_hf.testing import build_pipeline
    except ImportError as e:  # the pipeline has not landed yet
        log(f"[dallehf] dalle_hf.testing.build_pipeline is not available: {e}")
        raise SystemExit(3)
    pipe = build_pipeline(grid=grid_for(codes), seed=seed, **DALLEHF)
    from dalle_hf.models import DalleAlignmentModel

    cfg = copy.deepcopy(pipe.alignment.config)
    for key, value in pixel_sizes().items():
        setattr(cfg, key, value)
    torch.manual_seed(seed + 1)
    pipe.register_modules(alignment=DalleAlignmentModel(cfg))
    for name in ("text_encoder", "image_decoder", "alignment"):
        m = getattr(pipe, name)
        m.eval()
        m.requires_grad_(False)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_sizes() -> dict:
    from dalle_hf.training.recipe import get_recipe

    sizes = get_recipe("shapes").alignment
    return {k: sizes[k] for k in PIXEL_KEYS if k in sizes}


def pixel_decoder_params(alignment) -> int:
    n = count(alignment.decoder)  # + the codebook the codes are looked up in
    return n + (count(alignment.quantizer) if getattr(alignment, "quantizer", None) is not None else 0)


def param_breakdown(pipe) -> tuple[dict, int]:
    te, dec = count(pipe.text_encoder), count(pipe.image_decoder)
    params = {
        "transformer_blocks": sum(count(b) for b in pipe.image_decoder.blocks),
        "image_transformer": dec,
        "text_encoder": te,
        "pixel_decoder": pixel_decoder_params(pipe.alignment),
        "alignment_total": count(pipe.alignment),
    }
    params["matched"] = te + dec
    return params, te + dec


def flop_report(torch, pipe, call, batch: int, guidance: float, codes: int) -> dict:
    """FLOPs of one pipeline call: analytic decoder + text encoder, counted pixel decoder, counted total."""
    text_calls = []
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: text_calls.append(tuple((args[0] if args else kwargs["input_ids"]).shape)),
        with_kwargs=True)
    try:
        total, by_op, _ = flops.count_flops(call, (pipe.text_encoder, pipe.image_decoder, pipe.alignment))
    finally:
        hook.remove()
    dec_cfg, te_cfg = pipe.image_decoder.config, pipe.text_encoder.config
    rows = batch * (2 if guidance != 1 else 1)
    text_len = max((s[1] for s in text_calls), default=te_cfg.max_position_embeddings)
    dec = flops.analytic_decoder_generate(dec_cfg, codes, rows, text_len)
    text = sum(flops.analytic_text_encoder(te_cfg, s[1], s[0]) for s in text_calls)
    sample = torch.randint(0, dec_cfg.vocab_size, (batch, codes))
    pixel, _, _ = flops.count_flops(lambda: pipe.alignment.decode(sample), (pipe.alignment,))
    analytic = dec["total"] + text + pixel
    return {
        "decoder": dec["total"], "decoder_breakdown": dec, "decoder_rows": rows, "text_len": text_len,
        "text_encoder": text, "text_encoder_calls": text_calls, "pixel_decoder": pixel,
        "total": analytic, "counted_total": total, "counted_by_op": by_op,
        "dtype": str(pipe.image_decoder.dtype).replace("torch.", ""),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.check:
        args.codes, args.batch, args.guidance, args.warmup, args.repeats = 64, 1, 3.0, 0, 1
    torch = setup_torch(args.threads)
    pipe = build(torch, args.codes, args.seed)
    params, matched = param_breakdown(pipe)
    prompts = prompts_for(args.batch)
    grid = grid_for(args.codes)
    log(f"[dallehf] codes={args.codes} batch={args.batch} g={args.guidance} params={params}")

    def call(i=0):
        gens = [torch.Generator().manual_seed(args.seed + 1000 * (i + 1) + j) for j in range(args.batch)]
        out = pipe(prompt=prompts, guidance_scale=args.guidance, generator=gens, output_type="np")
        images = out.images if hasattr(out, "images") else out[0]
        assert tuple(images.shape) == (args.batch, grid * 8, grid * 8, 3), images.shape
        return images

    times = time_calls(call, args.warmup, args.repeats, args.max_seconds)
    one = torch.zeros(1, args.codes, dtype=torch.long)
    pixel, _, _ = flops.count_flops(lambda: pipe.alignment.decode(one), (pipe.alignment,))
    notes = {"config": DALLEHF, "pixel_sizes": pixel_sizes(), "pixel_flops_per_image": pixel}
    if "--flops" in args.extra or args.check:  # one more, untimed call under FlopCounterMode
        notes["flops"] = flop_report(torch, pipe, call, args.batch, args.guidance, args.codes)
    emit("dalle-hf", args, params, matched, times, notes=notes)


if __name__ == "__main__":
    main()
