"""Shared helpers of benchmarks/profile_decode.py and benchmarks/profile_training.py (torch.profiler, CPU).

`categorize(prof)` walks the profiler's events and sums each event's *self* CPU time into an op category (matmul,
attention, layer norm, ...). Time that no op covers is Python: it shows up as the self time of the `record_function`
labels the scripts put around each phase (and of the autograd engine's per-node events in training).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(1, str(ROOT))

CATEGORY_ORDER = ["matmul", "attention (SDPA)", "conv", "layernorm", "softmax/loss", "gelu", "casts/copies",
                  "elementwise", "views/indexing", "sampling", "optimizer", "autograd engine", "python/other"]

_MATMUL = {"aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm", "aten::addbmm",
           "aten::_addmm_activation"}
_CASTS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::stack",
          "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::zero_", "aten::zeros", "aten::zeros_like",
          "aten::fill_", "aten::full", "aten::full_like", "aten::ones", "aten::ones_like", "aten::resize_",
          "aten::new_empty", "aten::new_zeros", "aten::type_as", "aten::_copy_from", "aten::_copy_from_and_resize",
          "aten::lift_fresh", "aten::detach_", "aten::set_"}
_VIEWS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::permute", "aten::transpose", "aten::t",
          "aten::slice", "aten::select", "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze",
          "aten::chunk", "aten::split", "aten::unbind", "aten::narrow", "aten::detach", "aten::alias",
          "aten::as_strided", "aten::index", "aten::index_select", "aten::embedding", "aten::arange",
          "aten::embedding_backward", "aten::embedding_dense_backward", "aten::_unsafe_view", "aten::flatten",
          "aten::numpy_T", "aten::_reshape_copy", "aten::unflatten", "aten::view_as", "aten::lift", "aten::item",
          "aten::_local_scalar_dense", "aten::split_with_sizes", "aten::index_put_", "aten::_index_put_impl_",
          "aten::embedding_renorm_", "aten::result_type", "aten::is_nonzero", "aten::_has_compatible_shallow_copy_type"}


def timed(fn, warmup: int, repeats: int) -> list[float]:
    """Call `fn` `warmup` times untimed, then `repeats` times; returns the wall seconds of each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def op_category(name: str) -> str:
    """The category of one event by its name (context, such as being inside the optimizer, is applied by the caller)."""
    if name.startswith("autograd::") or name.endswith(("Backward0", "Backward1")) or name.startswith("torch::autograd"):
        return "autograd engine"
    if not name.startswith("aten::"):
        return "python/other"  # record_function labels, Optimizer.step#..., etc.: their self time is Python
    if name in _MATMUL:
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention (SDPA)"
    if "conv" in name:
        return "conv"
    if "layer_norm" in name:
        return "layernorm"
    if "softmax" in name or "nll_loss" in name or "cross_entropy" in name:
        return "softmax/loss"
    if "gelu" in name:
        return "gelu"
    if name in _CASTS:
        return "casts/copies"
    if name in _VIEWS:
        return "views/indexing"
    return "elementwise"


def ancestors(ev):
    p = ev.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def sdpa_flops(ev) -> float:
    """Matmul FLOPs of one CPU SDPA event from its recorded input shapes: 4 b h Lq Lk d forward, 2x that backward."""
    shapes = getattr(ev, "input_shapes", None) or []
    if ev.name.endswith("_for_cpu_backward") and len(shapes) >= 4:
        q, k = shapes[1], shapes[2]  # (grad_out, q, k, v, ...)
        mult = 8
    elif ev.name.endswith("_for_cpu") and len(shapes) >= 2:
        q, k = shapes[0], shapes[1]
        mult = 4
    else:
        return 0.0
    if len(q) != 4 or len(k) != 4:
        return 0.0
    b, h, lq, d = q
    return float(mult * b * h * lq * k[2] * d)


def categorize(events, context: dict[str, str] | None = None) -> dict:
    """Self CPU time (s), event count and FLOPs per category over `events` (the profiler's FunctionEvents).

    `context` maps a label prefix to a category that overrides the op name for everything under such a label, e.g.
    {"Optimizer.step": "optimizer", "sample": "sampling"}.
    """
    context = context or {}
    out = {c: {"self_s": 0.0, "events": 0, "flops": 0.0} for c in CATEGORY_ORDER}
    for ev in events:
        cat = op_category(ev.name)
        for anc in [ev, *ancestors(ev)]:
            hit = next((c for prefix, c in context.items() if anc.name.startswith(prefix)), None)
            if hit:
                cat = hit
                break
        row = out[cat]
        row["self_s"] += ev.self_cpu_time_total / 1e6
        row["events"] += 1
        fl = float(getattr(ev, "flops", 0) or 0)
        if "scaled_dot_product" in ev.name:
            fl = sdpa_flops(ev)
        row["flops"] += fl
    return {c: v for c, v in out.items() if v["events"]}


def format_table(cats: dict, wall_s: float, peak_gflops: float | None, title: str) -> str:
    """A compact text table: category, self seconds, share of the wall time, events, GFLOP, GFLOP/s, % of the limit."""
    lines = [title, f"{'category':18s} {'self s':>8s} {'share':>6s} {'events':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} "
             f"{'% limit':>7s}"]
    total = 0.0
    for c, v in cats.items():
        total += v["self_s"]
        g = v["flops"] / 1e9
        rate = g / v["self_s"] if v["flops"] and v["self_s"] else None
        lines.append(f"{c:18s} {v['self_s']:8.3f} {100 * v['self_s'] / wall_s:5.1f}% {v['events']:8d} "
                     + (f"{g:8.2f} {rate:8.1f} " if rate else f"{'':8s} {'':8s} ")
                     + (f"{100 * rate / peak_gflops:6.1f}%" if rate and peak_gflops else ""))
    lines.append(f"{'sum of self times':18s} {total:8.3f} {100 * total / wall_s:5.1f}%   "
                 f"(profiled wall {wall_s:.3f} s)")
    return "\n".join(lines)


def add_rates(cats: dict, peak_gflops: float | None) -> dict:
    for v in cats.values():
        v["gflops_per_s"] = v["flops"] / 1e9 / v["self_s"] if v["flops"] and v["self_s"] else None
        v["pct_of_limit"] = (100 * v["gflops_per_s"] / peak_gflops) if v["gflops_per_s"] and peak_gflops else None
    return cats


class PhaseTimer:
    """Wall time per phase of unprofiled calls: `wrap(obj, "method", "label")` times every call of obj.method."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._patched = []

    def wrap(self, obj, attr: str, label: str, record: bool = True):
        import torch

        fn = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            if record:
                with torch.profiler.record_function(label):
                    out = fn(*args, **kwargs)
            else:
                out = fn(*args, **kwargs)
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
            self.calls[label] = self.calls.get(label, 0) + 1
            return out

        self._patched.append((obj, attr, vars(obj).get(attr)))  # an instance attribute to put back, if any
        setattr(obj, attr, wrapped)

    def reset(self):
        self.seconds.clear()
        self.calls.clear()

    def unwrap(self):
        for obj, attr, previous in reversed(self._patched):
            if previous is None:
                delattr(obj, attr)  # the instance attribute goes; the class's method shows through again
            else:
                setattr(obj, attr, previous)
        self._patched.clear()


def machine() -> dict:
    import platform

    import torch

    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "loadavg": os.getloadavg()}


def matmul_limits(threads: int, seconds: float) -> dict:
    from bench_peers import measure_matmul_peak

    return {dt: measure_matmul_peak(dt, threads, seconds) for dt in ("float32", "bfloat16")}
