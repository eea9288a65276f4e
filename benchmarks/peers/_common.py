"""Shared helpers for the peer runners (stdlib + torch only: imported from every benchmark venv).

Each runner is a script run by benchmarks/bench_peers.py as a subprocess, in its own virtualenv:

    python run_X.py --codes 64|256 --batch B --guidance G --warmup W --repeats R [--max-seconds S]
                    --threads 2 [--seed S]

and prints exactly one JSON line on stdout (last line), see `emit`. Anything else goes to stderr.
A timed call is one whole text-to-image batch: tokenisation, text encoding, all code-decoding steps
and the pixel decoder, ending with float pixels on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Captions in the style of the ShapesWorld data set the project trains on; only their length matters here.
PROMPTS = [
    "a red circle above a blue square",
    "a small green triangle to the left of a yellow circle",
    "two purple squares",
    "a large orange circle below a white triangle",
    "a blue triangle",
    "a yellow square to the right of a red triangle",
    "three green circles",
    "a white circle and a purple triangle",
]


def prompts_for(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def grid_for(codes: int) -> int:
    grid = int(round(codes ** 0.5))
    if grid * grid != codes:
        raise SystemExit(f"--codes must be a square number, got {codes}")
    return grid


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--codes", type=int, default=64, help="image codes per image: 64 (8x8) or 256 (16x16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="stop timing once this much timed time has passed (at least one timed call)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="build the smallest config, run one batch, exit 0")
    a, extra = p.parse_known_args(argv)
    a.extra = extra
    return a


def setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.set_grad_enabled(False)
    return torch


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def matmul_flops(fn) -> int:
    """FLOPs of the matrix products and convolutions fn() runs (torch FlopCounterMode); freeze parameters first."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def time_calls(fn, warmup: int, repeats: int, max_seconds: float = float("inf")) -> list[float]:
    """Run fn(i) `warmup` times untimed, then up to `repeats` times timed (stopping early once the timed calls
    add up to `max_seconds`, after at least one); returns seconds per timed call."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn(warmup + i)
        times.append(time.perf_counter() - t0)
        if sum(times) >= max_seconds:
            break
    return times


def emit(contender: str, args: argparse.Namespace, params: dict, param_count: int, times: list[float],
         notes: dict | None = None) -> None:
    import torch

    rec = {
        "contender": contender,
        "codes": args.codes,
        "batch": args.batch,
        "guidance": args.guidance,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "param_count": param_count,  # the matched number, see docs/bench_peers.md
        "params": params,  # breakdown
        "times": times,
        "median": statistics.median(times) if times else None,
        "pid": os.getpid(),
    }
    if notes:
        rec["notes"] = notes
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)
