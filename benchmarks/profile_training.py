"""Where the time of a decoder-stage training step goes: torch.profiler over fp32 and bf16-autocast steps.

    .venv/bin/python benchmarks/profile_training.py                 # the embedded model's sizes, batch 64 (~2 min)
    .venv/bin/python benchmarks/profile_training.py --tiny          # a few-second smoke run

The step is the one benchmarks/bench_peers.py `--train` times (the decoder stage's model, `TextToCodes`: text
encoder + image decoder, teacher-forced cross-entropy on all codes, backward, AdamW; random weights, codes and token
ids, batch 64, text 16 tokens with some padding). Sizes: the pipeline folder `--config` (default: the embedded
model), else the `shapes` recipe. For each mode (fp32, bf16 autocast) it reports

1. the unprofiled step time (median) and the model FLOP utilisation against the matmul limit of that mode's dtype,
   measured in the same run (MFU as in bench_peers: 3 x analytic forward FLOPs / step time / limit);
2. one profiled step: self CPU time per op category (matmul, attention, layer norm, softmax/loss, GELU,
   casts/copies, elementwise, optimizer, autograd engine, Python), with the matmuls' own GFLOP/s;
3. with `--compare`, variants timed side by side in rotating rounds (ratios from one run): `old` is the attention
   as it was before docs/profile.md (bf16 under autocast), `adamw` the current code, `adamw-foreach`/`adamw-fused`
   the current code with those AdamW implementations.

Results go to benchmarks/results/profile_training.json (`--out`). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from profiling import CATEGORY_ORDER, ROOT, add_rates, categorize, format_table, machine, matmul_limits

sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
import flops  # noqa: E402

VARIANTS = {  # name -> (extra AdamW arguments, attention as before: bf16 under autocast)
    "old": ({}, True),  # the code before docs/profile.md: F.scaled_dot_product_attention as autocast leaves it
    "adamw": ({}, False),  # AdamW's default: on the CPU, the per-parameter (for-loop) implementation
    "adamw-foreach": ({"foreach": True}, False),
    "adamw-fused": ({"fused": True}, False),
}


@contextmanager
def old_attention(enabled: bool):
    """Swap the layers' attention back to plain F.scaled_dot_product_attention (bf16 under autocast)."""
    from dalle_hf.models import layers

    saved = layers.attention
    if enabled:
        layers.attention = torch.nn.functional.scaled_dot_product_attention
    try:
        yield
    finally:
        layers.attention = saved


def configs(args):
    from dalle_hf.models import DalleImageDecoderConfig, DalleTextEncoderConfig

    if args.tiny:
        te = DalleTextEncoderConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=16, projection_dim=32)
        dec = DalleImageDecoderConfig(vocab_size=32, image_grid_size=4, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=64, cross_attention_dim=32)
        return te, dec, "tiny"
    from bench_peers import load_train_configs

    return load_train_configs(args.config)


class Trainer:
    """One model + optimizer + fixed random batch; `step()` runs forward (autocast per mode), backward, AdamW."""

    def __init__(self, te_cfg, dec_cfg, args, mode: str, variant: str = "adamw"):
        from dalle_hf.models import DalleImageDecoder, DalleTextEncoder
        from dalle_hf.training.stages import TextToCodes

        torch.manual_seed(args.seed)
        self.model = TextToCodes(DalleTextEncoder(te_cfg), DalleImageDecoder(dec_cfg)).train()
        opt_kwargs, self.old_attention = VARIANTS[variant]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                     **opt_kwargs)
        self.mode = mode
        self.losses: list[float] = []
        B, L, N = args.batch, args.text_len, dec_cfg.image_grid_size**2
        g = torch.Generator().manual_seed(args.seed)
        self.ids = torch.randint(3, te_cfg.vocab_size, (B, L), generator=g)
        self.mask = torch.ones(B, L, dtype=torch.long)
        self.mask[: B // 2, L - L // 4:] = 0  # some padding, as in real batches
        self.codes = torch.randint(0, dec_cfg.vocab_size, (B, N), generator=g)
        self.phase_s: dict[str, float] = {}

    def _timed(self, label, fn):
        t0 = time.perf_counter()
        with torch.profiler.record_function(label):
            out = fn()
        self.phase_s[label] = self.phase_s.get(label, 0.0) + time.perf_counter() - t0
        return out

    def step(self) -> float:
        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(self.mode == "bf16")):
                with old_attention(self.old_attention):
                    return self.model(self.ids, self.mask, self.codes)

        loss = self._timed("forward", forward)
        self._timed("backward", loss.backward)

        def update():
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        self._timed("optimizer", update)
        self.losses.append(float(loss.detach()))
        return self.losses[-1]


def timed_steps(trainer: Trainer, warmup: int, steps: int) -> list[float]:
    with torch.enable_grad():
        for _ in range(warmup):
            trainer.step()
        trainer.phase_s.clear()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.step()
            times.append(time.perf_counter() - t0)
    return times


def profile_mode(te_cfg, dec_cfg, args, mode: str, peak: float, step_flops: float, variant: str) -> dict:
    trainer = Trainer(te_cfg, dec_cfg, args, mode, variant)
    times = timed_steps(trainer, args.warmup, args.steps)
    med = statistics.median(times)
    phases = {k: v / len(times) for k, v in trainer.phase_s.items()}
    with torch.enable_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                     record_shapes=True, with_flops=True) as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile_steps):
            trainer.step()
        prof_wall = (time.perf_counter() - t0) / args.profile_steps
    events = prof.events()
    cats = categorize(events, {"Optimizer.": "optimizer", "optimizer": "optimizer"})
    for v in cats.values():  # per step
        v["self_s"] /= args.profile_steps
        v["events"] //= args.profile_steps
        v["flops"] /= args.profile_steps
    add_rates(cats, peak)
    n_ops = sum(1 for e in events if e.name.startswith("aten::")) // args.profile_steps
    achieved = step_flops / med / 1e9
    print(f"\n== {mode}, {variant}: {med:.3f} s/step unprofiled (median of {len(times)}), {achieved:.1f} GFLOP/s = "
          f"MFU {100 * achieved / peak:.1f}% of the {mode} limit {peak:.1f}; phases "
          + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()) + " s")
    print(format_table(cats, prof_wall, peak, f"profiled step: {prof_wall:.3f} s, {n_ops} aten ops"))
    mm = cats.get("matmul", {})
    return {"variant": variant, "step_times": times, "median_step_s": med, "phases_s": phases,
            "achieved_gflops": achieved,
            "peak_gflops": peak, "mfu": achieved / peak, "profiled_step_s": prof_wall, "aten_ops_per_step": n_ops,
            "categories": cats, "matmul_flops_profiled": mm.get("flops"),
            "matmul_s_at_limit": (mm.get("flops") or 0) / (peak * 1e9)}


def compare(te_cfg, dec_cfg, args, mode: str, variants: list[str], peak: float, step_flops: float) -> dict:
    """Variants side by side: each warmed up, then `rounds` rounds of `steps` steps, in rotating order."""
    trainers = {v: Trainer(te_cfg, dec_cfg, args, mode, v) for v in variants}
    times = {v: [] for v in variants}
    opt_s = {v: [] for v in variants}
    for v, t in trainers.items():
        timed_steps(t, args.warmup, 0)
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            t = trainers[v]
            t.phase_s.clear()
            times[v] += timed_steps(t, 0, args.steps)
            opt_s[v].append(t.phase_s["optimizer"] / args.steps)
    base = statistics.median(times[variants[0]])
    out = {}
    print(f"\n== {mode}: variants, {args.rounds} rounds x {args.steps} steps, rotating order")
    for v in variants:
        med = statistics.median(times[v])
        out[v] = {"step_times": times[v], "median_step_s": med, "optimizer_s": statistics.median(opt_s[v]),
                  "first_losses": trainers[v].losses[:3],
                  "speedup_vs_" + variants[0]: base / med, "mfu": step_flops / med / 1e9 / peak}
        print(f"  {v:14s} {med:.3f} s/step (optimizer {statistics.median(opt_s[v]):.3f} s), "
              f"{base / med:.3f}x vs {variants[0]}, MFU {100 * step_flops / med / 1e9 / peak:.1f}%")
    # same updates? the first losses, and the parameters after the same number of steps, against the first variant
    ref = dict(trainers[variants[0]].model.named_parameters())
    for v in variants[1:]:
        diff = max((p - ref[n]).abs().max().item() for n, p in trainers[v].model.named_parameters())
        out[v]["max_param_diff_vs_" + variants[0]] = diff
        print(f"  {v}: first losses {', '.join(f'{x:.5f}' for x in trainers[v].losses[:3])} (vs "
              f"{', '.join(f'{x:.5f}' for x in trainers[variants[0]].losses[:3])}); max |param - "
              f"{variants[0]}'s| after {len(trainers[v].losses)} steps: {diff:.2e}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="pipeline folder (default: the embedded model), else the recipe")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps (per round with --compare)")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--profile-variants", nargs="+", default=["adamw"], choices=list(VARIANTS),
                   help="variants to profile (default: the current code with AdamW's defaults)")
    p.add_argument("--compare", nargs="*", default=None, choices=list(VARIANTS),
                   help="variants to time side by side (the first is the reference), e.g. old adamw adamw-fused")
    p.add_argument("--compare-modes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--matmul-seconds", type=float, default=1.5)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default=None,
                   help="JSON report (default benchmarks/results/profile_training.json; with --tiny, profile_training_tiny.json)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / f"profile_training{'_tiny' if args.tiny else ''}.json")
    if args.tiny:
        args.batch, args.text_len = min(args.batch, 4), min(args.text_len, 8)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = {"when": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:], "machine": machine()}
    limits = matmul_limits(args.threads, 0.2 if args.tiny else args.matmul_seconds)
    print(f"matmul limit: fp32 {limits['float32']['gflops']:.1f}, bf16 {limits['bfloat16']['gflops']:.1f} GFLOP/s")
    te_cfg, dec_cfg, source = configs(args)
    N = dec_cfg.image_grid_size**2
    fwd = (flops.analytic_text_encoder(te_cfg, args.text_len, args.batch)
           + flops.analytic_decoder_train_forward(dec_cfg, N, args.batch, args.text_len))
    step_flops = 3 * fwd
    print(f"sizes from {source}; batch {args.batch}, text {args.text_len}, {N} codes; "
          f"{step_flops / 1e9:.1f} GFLOP per step (3 x forward)")
    result = {"meta": info, "source": source, "batch": args.batch, "text_len": args.text_len, "codes": N,
              "step_flops": step_flops, "matmul_limit": limits, "modes": {}, "compare": {}}
    for mode in args.modes:
        peak = limits["bfloat16" if mode == "bf16" else "float32"]["gflops"]
        if not args.no_profile:
            result["modes"][mode] = {v: profile_mode(te_cfg, dec_cfg, args, mode, peak, step_flops, v)
                                     for v in args.profile_variants}
        if args.compare and mode in args.compare_modes:
            result["compare"][mode] = compare(te_cfg, dec_cfg, args, mode, args.compare, peak, step_flops)
    result["meta"].update(elapsed_s=time.perf_counter() - started, loadavg_end=os.getloadavg(),
                          category_order=CATEGORY_ORDER)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out} in {result['meta']['elapsed_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
