"""Where the time of one guided text-to-image call goes: torch.profiler over the pipeline's cached decode.

    .venv/bin/python benchmarks/profile_decode.py                      # 256 codes, batch 16, guidance 3 (~1 min)
    .venv/bin/python benchmarks/profile_decode.py --codes 64 --tiny    # a few-second smoke run

The pipeline is the one benchmarks/bench_peers.py times for dalle-hf (random weights, `run_dallehf.build`: 4-layer
decoder of width 256, 2-layer text encoder, the embedded model's autoencoder sizes), called as a user would, text to
float pixels. The script reports:

1. unprofiled wall time per call (median) and per phase (text encoding, decode steps, sampling, scoring, pixels);
2. one profiled call: self CPU time per op category (matmul, attention, conv, ...), with GFLOP/s and the share of
   the fp32 matmul limit measured in the same run; Python time is the self time of the phase labels;
3. the decode step: wall per step, aten ops per step, and what a step costs with 2 rows (the fixed per-step
   overhead) against the real row count, at a few cache lengths.

Results go to benchmarks/results/profile_decode.json (`--out`). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from profiling import (CATEGORY_ORDER, timed, ROOT, PhaseTimer, add_rates, ancestors, categorize, format_table,
                       machine, matmul_limits)

from dalle_hf.models import DalleImageDecoder  # noqa: E402 (profiling puts the repository on the path)

sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
import flops  # noqa: E402
import run_dallehf  # noqa: E402
from _common import prompts_for  # noqa: E402

PHASES = [  # (object attribute path, method, label)
    ("pipe", "encode_prompt", "encode_prompt"),
    ("decoder", "init_cache", "init_cache"),
    ("decoder", "prefill", "prefill"),
    ("decoder", "step", "decode_step"),
    ("pipe", "_sample", "sample"),
    ("alignment", "score", "score"),
    ("pipe", "_codes_to_images", "pixels"),
]


@contextmanager
def old_decode_path(decoder, enabled: bool = True):
    """The decoder's cached path as it was before docs/profile.md: the boolean cross-attention mask (attention turns
    it into an additive one at every step, in every layer) and the position embeddings looked up at every step."""
    from dalle_hf.models.layers import padding_mask

    if not enabled:
        yield
        return

    @torch.no_grad()
    def init_cache(encoder_hidden_states, encoder_attention_mask=None):
        cache = DalleImageDecoder.init_cache(decoder, encoder_hidden_states, encoder_attention_mask)
        cache.cross_mask, cache.row_embeds, cache.col_embeds = padding_mask(encoder_attention_mask), None, None
        return cache

    @torch.no_grad()
    def forward_cached(tokens, cache):
        start = cache.length
        x = decoder._embed(tokens, start)  # no cache: arange, //, %, two embedding look-ups per step
        for block, self_kv, cross_kv in zip(decoder.blocks, cache.self_kv, cache.cross_kv):
            x = block(x, context_mask=cache.cross_mask, cross_kv=cross_kv, self_kv=self_kv, start=start)
        cache.length = start + tokens.shape[1]
        return decoder.lm_head(decoder.final_layer_norm(x[:, -1]))

    decoder.init_cache, decoder.forward_cached = init_cache, forward_cached
    try:
        yield
    finally:
        del decoder.init_cache, decoder.forward_cached


@contextmanager
def step_inference_mode(decoder, enabled: bool = True):
    """Run each cached decoder step under torch.inference_mode instead of no_grad."""
    if not enabled:
        yield
        return
    forward_cached = decoder.forward_cached
    decoder.forward_cached = torch.inference_mode()(forward_cached)
    try:
        yield
    finally:
        del decoder.forward_cached


@contextmanager
def sdpa_decode_step(decoder, enabled: bool = True, strided_cross: bool = True):
    """The cached decode step as before the plain-matmul `layers.single_query_attention`: the step's self-attention
    through SDPA (`layers.attention`), and (`strided_cross`) the cross-attention keys/values left as strided views of
    the projection instead of contiguous tensors."""
    from dalle_hf.models import layers

    if not enabled:
        yield
        return
    matmul, had, prev = layers.single_query_attention, "init_cache" in vars(decoder), decoder.init_cache

    def init_cache(encoder_hidden_states, encoder_attention_mask=None):
        cache = prev(encoder_hidden_states, encoder_attention_mask)
        with torch.no_grad():
            context = encoder_hidden_states.to(decoder.lm_head.weight.dtype)
            cache.cross_kv = [block.cross_attn.project_context(context) for block in decoder.blocks]
        return cache

    layers.single_query_attention = lambda q, k, v: layers.attention(q, k, v)
    if strided_cross:
        decoder.init_cache = init_cache
    try:
        yield
    finally:
        layers.single_query_attention = matmul
        if had:
            decoder.init_cache = prev
        elif strided_cross:
            del decoder.init_cache


VARIANTS = {  # name -> (old decode path, torch.inference_mode around: None, "call" or "step", bfloat16 weights,
    #                   the decode step as before single_query_attention: True, or "attention" (only its SDPA))
    "old": (True, None, False, True),
    "sdpa-step": (False, None, False, True),  # before the plain-matmul step attention and contiguous cross K/V
    "new": (False, None, False, False),
    "new+sdpa_step_attention": (False, None, False, "attention"),  # contiguous cross K/V, but SDPA in the step
    "new+inference_mode": (False, "call", False, False),
    "new+inference_mode_step": (False, "step", False, False),
    "new+bf16": (False, None, True, False),  # not output-identical: shown for what bf16 inference would give
}


def compare(pipe, args, peak: float) -> dict:
    """Whole calls of each variant, one after the other in rotating order, `--rounds` rounds after a warm-up each."""
    import copy

    pipes = {False: pipe}
    if any(VARIANTS[v][2] for v in args.compare):
        pipes[True] = copy.deepcopy(pipe).to(torch.bfloat16)
    calls = {}
    for v in args.compare:
        old, inference, bf16, sdpa = VARIANTS[v]
        p = pipes[bf16]
        call = make_call(p, args)

        def run(p=p, call=call, old=old, inference=inference, sdpa=sdpa):
            with old_decode_path(p.image_decoder, old), step_inference_mode(p.image_decoder, inference == "step"), \
                    sdpa_decode_step(p.image_decoder, bool(sdpa), sdpa is True), \
                    (torch.inference_mode() if inference == "call" else contextlib.nullcontext()):
                return call()

        calls[v] = run
    ref = calls[args.compare[0]]()
    outs = {v: calls[v]() for v in args.compare}  # also each variant's warm-up call
    same = {v: bool((outs[v] == ref).all()) for v in args.compare}
    max_diff = {v: float(abs(outs[v].astype("float64") - ref.astype("float64")).max()) for v in args.compare}
    times = {v: [] for v in args.compare}
    for r in range(args.rounds):
        order = args.compare[r % len(args.compare):] + args.compare[: r % len(args.compare)]
        for v in order:
            t0 = time.perf_counter()
            calls[v]()
            times[v].append(time.perf_counter() - t0)
    base = statistics.median(times[args.compare[0]])
    bound = flop_bound(pipe, args, peak)
    out = {}
    print(f"\nvariants, {args.rounds} rounds, rotating order (speed-up vs {args.compare[0]}; "
          f"FLOP-bound {bound:.3f} s):")
    for v in args.compare:
        med = statistics.median(times[v])
        per_round = [a / b for a, b in zip(times[args.compare[0]], times[v])]
        out[v] = {"times": times[v], "median_s": med, "speedup": base / med, "per_round_speedup": per_round,
                  "share_of_flop_bound": bound / med, "same_images": same[v], "max_abs_pixel_diff": max_diff[v]}
        print(f"  {v:24s} {med:.3f} s  {base / med:.3f}x  share {100 * bound / med:.1f}%  images identical to "
              f"{args.compare[0]}'s: {same[v]} (max diff {max_diff[v]:.2e}); per round "
              + " ".join(f"{x:.3f}" for x in per_round))
    return out


def flop_bound(pipe, args, peak: float) -> float:
    """Seconds one call would take at the fp32 matmul limit (bench_peers' analytic FLOP count)."""
    decoder = pipe.image_decoder
    text_len = pipe._tokenize(prompts_for(args.batch) + [""])[0].shape[1]
    rows = args.batch * (2 if args.guidance != 1 else 1)
    dec_flops = flops.analytic_decoder_generate(decoder.config, args.codes, rows, text_len)["total"]
    te_flops = flops.analytic_text_encoder(pipe.text_encoder.config, text_len, args.batch + 1)
    pix_flops, _, _ = flops.count_flops(lambda: pipe.alignment.decode(
        torch.zeros(args.batch, args.codes, dtype=torch.long)), (pipe.alignment,))
    return (dec_flops + te_flops + pix_flops) / (peak * 1e9)


def kernels(args) -> dict:
    """Memory read bandwidth, and one decode step's attention over the cache: SDPA against plain matmuls, fp32/bf16."""
    x = torch.randn(64 * 2**20)  # 256 MB
    best = min(_time(lambda: x.sum(), 5) for _ in range(3))
    bandwidth = x.numel() * 4 / best / 1e9
    print(f"\nmemory read bandwidth (sum over 256 MB): {bandwidth:.1f} GB/s")
    rows, H, Dh, N = args.batch * 2, 8, 32, args.codes
    out = {"read_bandwidth_gb_s": bandwidth, "attention": []}
    for dtype in (torch.float32, torch.bfloat16):
        kb, vb = torch.randn(rows, H, N, Dh, dtype=dtype), torch.randn(rows, H, N, Dh, dtype=dtype)
        q = torch.randn(rows, H, 1, Dh, dtype=dtype)
        for t in (N // 4, N // 2, N):
            k, v = kb[:, :, :t], vb[:, :, :t]
            impls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                     "matmul": lambda: ((q @ k.transpose(-1, -2)) * Dh**-0.5).softmax(-1) @ v}
            nbytes = 2 * rows * H * t * Dh * k.element_size()
            for name, fn in impls.items():
                s = min(_time(fn, 20) for _ in range(3))
                out["attention"].append({"dtype": str(dtype)[6:], "keys": t, "impl": name, "us": 1e6 * s,
                                         "kv_mb": nbytes / 1e6, "gb_s": nbytes / s / 1e9})
                print(f"  attention {str(dtype)[6:]:8s} {rows} rows x {H} heads, {t:3d} keys, {name:6s}: "
                      f"{1e6 * s:7.1f} us, K+V {nbytes / 1e6:5.1f} MB -> {nbytes / s / 1e9:5.1f} GB/s")
    return out


def _time(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def build(args):
    if args.tiny:
        from dalle_hf.testing import build_pipeline

        return build_pipeline(hidden_size=64, num_layers=2, num_heads=4, grid=int(args.codes**0.5), codebook_size=64)
    return run_dallehf.build(torch, args.codes, args.seed)


def make_call(pipe, args):
    prompts = prompts_for(args.batch)

    def call():
        gens = [torch.Generator().manual_seed(args.seed + j) for j in range(args.batch)]
        return pipe(prompt=prompts, guidance_scale=args.guidance, generator=gens, output_type="np").images

    return call


def step_events(events):
    """Per decode step (label `decode_step`): profiled wall, aten ops inside, top-level aten ops, Python self time."""
    rows = []
    for ev in events:
        if ev.name != "decode_step":
            continue
        all_ops, top = 0, 0
        stack = [(c, False) for c in ev.cpu_children]
        while stack:
            e, inside_op = stack.pop()
            is_op = e.name.startswith("aten::")
            all_ops += is_op
            top += is_op and not inside_op
            stack.extend((c, inside_op or is_op) for c in e.cpu_children)
        rows.append({"wall_us": ev.cpu_time_total, "aten_ops": all_ops, "top_level_ops": top,
                     "python_self_us": ev.self_cpu_time_total})
    return rows


@torch.no_grad()
def step_cost(decoder, rows: int, length: int, text_len: int, repeats: int) -> float:
    """Seconds of one cached decode step for `rows` rows with `length` positions already in the cache."""
    d = decoder.config
    states = torch.randn(rows, text_len, d.cross_attention_dim)
    cache = decoder.init_cache(states, torch.ones(rows, text_len, dtype=torch.long))
    for k, v in cache.self_kv:
        k.normal_()
        v.normal_()
    tokens = torch.zeros(rows, 1, dtype=torch.long)
    for _ in range(3):
        cache.length = length
        decoder.forward_cached(tokens, cache)
    t0 = time.perf_counter()
    for _ in range(repeats):
        cache.length = length
        decoder.forward_cached(tokens, cache)
    return (time.perf_counter() - t0) / repeats


def step_flops(dec_cfg, rows: int, length: int, text_len: int) -> float:
    """Matmul FLOPs of one cached step (the bench_peers convention): linears + self-attention over length + 1 keys."""
    D, n = dec_cfg.hidden_size, dec_cfg.num_hidden_layers
    per_token = flops.decoder_matmul_params(dec_cfg)["per_token"]
    return rows * (2 * per_token + n * 4 * D * (length + 1) + n * 4 * D * text_len)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codes", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="unprofiled timed calls (after one warm-up)")
    p.add_argument("--matmul-seconds", type=float, default=1.5)
    p.add_argument("--tiny", action="store_true", help="a tiny random pipeline: checks the script, not the speed")
    p.add_argument("--old", action="store_true", help="profile the decode path as it was before docs/profile.md")
    p.add_argument("--no-profile", action="store_true", help="skip sections 1-3")
    p.add_argument("--compare", nargs="*", default=None, choices=list(VARIANTS),
                   help="time these variants side by side (the first is the reference), e.g. old new")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kernels", action="store_true", help="also: memory bandwidth and attention micro-benchmarks")
    p.add_argument("--out", default=None,
                   help="JSON report (default benchmarks/results/profile_decode.json; with --tiny, profile_decode_tiny.json)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / f"profile_decode{'_tiny' if args.tiny else ''}.json")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = {"when": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:], "machine": machine()}
    limits = matmul_limits(args.threads, 0.2 if args.tiny else args.matmul_seconds)
    peak = limits["float32"]["gflops"]
    print(f"matmul limit: fp32 {peak:.1f}, bf16 {limits['bfloat16']['gflops']:.1f} GFLOP/s", flush=True)

    pipe = build(args)
    result = {"meta": info, "matmul_limit": limits}
    if not args.no_profile:
        with old_decode_path(pipe.image_decoder, args.old), sdpa_decode_step(pipe.image_decoder, args.old):
            result.update(profile(pipe, args, peak))
    if args.compare:
        result["compare"] = compare(pipe, args, peak)
    if args.kernels:
        result["kernels"] = kernels(args)
    result["meta"].update(elapsed_s=time.perf_counter() - started, loadavg_end=os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out} in {result['meta']['elapsed_s']:.0f} s")
    return result


def profile(pipe, args, peak: float) -> dict:
    decoder = pipe.image_decoder
    objs = {"pipe": pipe, "decoder": decoder, "alignment": pipe.alignment}
    call = make_call(pipe, args)

    # 1. unprofiled calls, whole and per phase
    times = timed(call, 1, args.repeats)
    timer = PhaseTimer()
    for obj, attr, label in PHASES:
        timer.wrap(objs[obj], attr, label, record=False)
    phase_times = []
    for _ in range(args.repeats):
        timer.reset()
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
        phase_times.append({"wall": wall, **timer.seconds})
    timer.unwrap()
    median = statistics.median(times)
    phases = {k: statistics.median(pt.get(k, 0.0) for pt in phase_times) for k in phase_times[0]}
    phases["sample"] = phases.get("sample", 0.0)
    loop_rest = phases["wall"] - sum(v for k, v in phases.items() if k != "wall")
    print(f"unprofiled: {median:.3f} s per call (median of {len(times)}: "
          + ", ".join(f"{t:.3f}" for t in times) + ")")
    print("  phases: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items() if k != "wall")
          + f", rest (guidance arithmetic, loop, checks) {loop_rest:.3f} s")

    # FLOPs of one call (bench_peers' analytic convention) -> the FLOP-bound time and the share
    dec_cfg, te_cfg = decoder.config, pipe.text_encoder.config
    text_len = pipe._tokenize(prompts_for(args.batch) + [""])[0].shape[1]
    rows = args.batch * (2 if args.guidance != 1 else 1)
    dec_flops = flops.analytic_decoder_generate(dec_cfg, args.codes, rows, text_len)["total"]
    te_flops = flops.analytic_text_encoder(te_cfg, text_len, args.batch + 1)
    pix_flops, _, _ = flops.count_flops(lambda: pipe.alignment.decode(
        torch.zeros(args.batch, args.codes, dtype=torch.long)), (pipe.alignment,))
    total_flops = dec_flops + te_flops + pix_flops
    bound = total_flops / (peak * 1e9)
    print(f"FLOPs: decoder {dec_flops / 1e9:.2f} + text {te_flops / 1e9:.2f} + pixels {pix_flops / 1e9:.2f} = "
          f"{total_flops / 1e9:.2f} GFLOP; FLOP-bound {bound:.3f} s = {100 * bound / median:.1f}% of the call")

    # 2. one profiled call
    timer = PhaseTimer()
    for obj, attr, label in PHASES:
        timer.wrap(objs[obj], attr, label, record=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                with_flops=True) as prof:
        t0 = time.perf_counter()
        with torch.profiler.record_function("call"):
            call()
        prof_wall = time.perf_counter() - t0
    timer.unwrap()
    events = prof.events()
    n_events = sum(1 for e in events if e.name.startswith("aten::"))
    cats = add_rates(categorize(events, {"sample": "sampling"}), peak)
    print()
    print(format_table(cats, prof_wall, peak, f"profiled call: {prof_wall:.3f} s ({n_events} aten ops; "
                       f"unprofiled {median:.3f} s, so ~{1e6 * (prof_wall - median) / n_events:.1f} us of profiler "
                       f"overhead per op)"))
    by_phase = {}
    for label in ["encode_prompt", "init_cache", "prefill", "decode_step", "sample", "score", "pixels"]:
        sub = [e for e in events if any(a.name == label for a in [e, *ancestors(e)])]
        by_phase[label] = add_rates(categorize(sub, {"sample": "sampling"}), peak)

    # 3. the decode step
    steps = step_events(events)
    per_step = {k: statistics.mean(s[k] for s in steps) for k in steps[0]} if steps else {}
    n_steps = len(steps)
    unprof_step = phases.get("decode_step", 0.0) / max(1, n_steps)
    unprof_sample = phases.get("sample", 0.0) / max(1, n_steps + 1)
    print(f"\ndecode step (profiled mean of {n_steps}): {per_step.get('wall_us', 0) / 1e3:.2f} ms, "
          f"{per_step.get('aten_ops', 0):.0f} aten ops ({per_step.get('top_level_ops', 0):.0f} called from Python); "
          f"unprofiled {1e3 * unprof_step:.2f} ms per step + {1e3 * unprof_sample:.2f} ms sampling")
    costs = []
    lengths = [0, args.codes // 2, args.codes - 1] if not args.tiny else [0, args.codes - 1]
    for length in lengths:
        for r in sorted({2, rows}):
            s = step_cost(decoder, r, length, text_len, 5 if args.tiny else 40)
            f = step_flops(dec_cfg, r, length, text_len)
            costs.append({"rows": r, "cache_length": length, "step_s": s, "flops": f,
                          "gflops_per_s": f / s / 1e9, "pct_of_limit": 100 * f / s / 1e9 / peak})
            print(f"  step, {r:3d} rows, {length:3d} cached: {1e3 * s:6.2f} ms, {f / 1e6:7.1f} MFLOP, "
                  f"{f / s / 1e9:6.1f} GFLOP/s ({100 * f / s / 1e9 / peak:.1f}% of the limit)")

    return {
        "config": {"codes": args.codes, "batch": args.batch, "guidance": args.guidance, "rows": rows,
                   "text_len": text_len, "threads": args.threads, "tiny": args.tiny, "old_decode_path": args.old,
                   "decoder": {k: getattr(dec_cfg, k) for k in ("hidden_size", "num_hidden_layers",
                                                                 "num_attention_heads", "intermediate_size",
                                                                 "vocab_size", "image_grid_size")}},
        "unprofiled": {"call_times": times, "median_s": median, "phases_median_s": phases, "loop_rest_s": loop_rest},
        "flops": {"decoder": dec_flops, "text_encoder": te_flops, "pixel_decoder": pix_flops, "total": total_flops,
                  "flop_bound_s": bound, "share": bound / median},
        "profile": {"wall_s": prof_wall, "aten_ops": n_events, "categories": cats, "by_phase": by_phase,
                    "category_order": CATEGORY_ORDER},
        "decode_step": {"profiled_mean": per_step, "unprofiled_step_s": unprof_step,
                        "unprofiled_sample_s": unprof_sample, "step_cost": costs},
    }


if __name__ == "__main__":
    main()
