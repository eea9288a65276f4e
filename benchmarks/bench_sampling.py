"""Sampling speed of the image decoder: the pipeline's cached loop against a plain recompute-everything loop.

    .venv/bin/python benchmarks/bench_sampling.py [--repeats 3] [--threads 2] [--json out.json]

For 4 and 16 images at 64 and 256 codes per image (guidance 3, so 2 rows per image), it reports image codes per
second of (a) `DallePipeline` with its key/value cache, text encoding and pixel decoding included, and (b) the same
decoder sampled by re-running the whole prefix at every step (no cache). Random weights, decoder of the embedded
model's size. Run by hand on an otherwise idle machine; not part of the test run.

Other load matters more than usual here: with `--threads 2` on a 2-core machine that is already busy, every small
op's OpenMP threads wait for each other behind the other process, and a call can take 100x longer (the 64-code,
4-image call took 38.8 s instead of 0.4 s that way; see docs/profile.md). The script records the load average before
each configuration and warns when the machine is busy; use `--threads 1` there, or wait.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from profiling import timed  # benchmarks/profiling.py (this folder is on the path when run as a script)

from dalle_hf.testing import build_pipeline


@torch.no_grad()
def recompute_loop(pipe, prompts, guidance_scale: float, generator) -> torch.LongTensor:
    """The reference: every step runs the decoder over all codes so far (guidance batched, same sampler)."""
    states, mask, _ = pipe.encode_prompt(prompts + [""])
    B, N = len(prompts), pipe.num_codes
    rows = torch.cat([torch.arange(B), torch.full((B,), B)])
    states, mask = states[rows], mask[rows]
    u = pipe._draw_uniforms(generator, B, 1)
    codes = torch.zeros(B, N, dtype=torch.long)
    for t in range(N):
        # logits of code t from codes < t: the decoder shifts its input right by one (BOS first)
        logits = pipe.image_decoder(torch.cat([codes, codes])[:, : t + 1], states, mask).logits[:, t]
        cond, uncond = logits.float().chunk(2)
        codes[:, t] = pipe._sample(uncond + guidance_scale * (cond - uncond), u[:, t], 1.0, 0, 1.0)
    pipe._codes_to_images(codes)
    return codes


def busy(threads: int) -> float | None:
    """The 1-minute load average when it says other work is running on the cores this benchmark wants, else None."""
    load = os.getloadavg()[0]
    return load if load > 0.5 and threads >= (os.cpu_count() or 1) else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--codes", type=int, nargs="+", default=[64, 256], choices=[64, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for grid in [int(c**0.5) for c in args.codes]:
        pipe = build_pipeline(hidden_size=256, num_layers=6, num_heads=8, grid=grid, codebook_size=512,
                              text_hidden_size=256, text_layers=3)
        N = grid * grid
        for batch in args.batches:
            prompts = ["a red circle to the left of a blue square"] * batch
            gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]  # noqa: E731
            load = os.getloadavg()[0]
            if busy(args.threads):
                print(f"WARNING: load average {load:.1f} with --threads {args.threads} on {os.cpu_count()} cores: "
                      "other processes are running, so these timings can be far off (use --threads 1 or wait)",
                      flush=True)
            cached_times = timed(lambda: pipe(prompts, guidance_scale=3.0, generator=gens(), output_type="np"), 1,
                                 args.repeats)
            plain_times = timed(lambda: recompute_loop(pipe, prompts, 3.0, gens()), 1, max(1, args.repeats - 1))
            cached, plain = statistics.median(cached_times), statistics.median(plain_times)
            row = dict(codes=N, images=batch, cached_s=cached, recompute_s=plain,
                       cached_codes_per_s=batch * N / cached, recompute_codes_per_s=batch * N / plain,
                       speedup=plain / cached, cached_times=cached_times, recompute_times=plain_times,
                       threads=args.threads, loadavg_before=load)
            results.append(row)
            print(f"{N:>4} codes x {batch:>2} images: cached {cached:6.3f} s ({row['cached_codes_per_s']:8.0f} codes/s)"
                  f"  recompute {plain:7.3f} s ({row['recompute_codes_per_s']:7.0f} codes/s)  speed-up {row['speedup']:.1f}x",
                  flush=True)
    print("\n| codes/image | images | cached (s) | cached codes/s | recompute (s) | recompute codes/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['codes']} | {r['images']} | {r['cached_s']:.3f} | {r['cached_codes_per_s']:.0f} | "
              f"{r['recompute_s']:.3f} | {r['recompute_codes_per_s']:.0f} | {r['speedup']:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return {"results": results}


if __name__ == "__main__":
    main()
