"""Side-by-side benchmark of dalle-hf against two peers at matched size, on this machine's CPUs.

    benchmarks/peers/setup_peers.sh                 # once: the peers' virtualenvs (+ matplotlib for the plot)
    .venv/bin/python benchmarks/bench_peers.py      # the full run (about 35-45 min on a quiet 2-core machine)
    .venv/bin/python benchmarks/bench_peers.py --quick          # a ~1-2 min smoke run
    .venv/bin/python benchmarks/bench_peers.py --train-only     # only the training-throughput section

Contenders (each in its own virtualenv, each a runner script in benchmarks/peers/ started as a subprocess):
dalle-hf (`DallePipeline`), DALLE-pytorch 1.6.6 and diffusers' aMUSEd, all with random weights, about 6.4-7.0M
parameters in text side + image transformer, 512 codes, 64 (8x8) or 256 (16x16) codes per image. Every config
(codes x batch x guidance) is timed in several rounds; inside a round the contenders run one after the other in a
rotating order, so slow drifts of the machine hit all of them alike. The reported number is the median over all
timed calls. See docs/bench_peers.md for what is matched and how the FLOP-bound time is computed.

The same run measures the machine's matmul limit (fp32 and bf16, 2 threads) and, for dalle-hf, the FLOP-bound time
of each config and the share of it achieved; `--train` adds the training throughput of the decoder stage.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))
sys.path.insert(1, str(ROOT))  # dalle_hf, for the training section, whether or not it is pip-installed
import flops  # noqa: E402

CONTENDERS = {
    # name: (python, runner)
    "dalle-hf": (ROOT / ".venv" / "bin" / "python", PEERS / "run_dallehf.py"),
    "DALLE-pytorch": (ROOT / ".venv-peers-dallepytorch" / "bin" / "python", PEERS / "run_dallepytorch.py"),
    "aMUSEd": (ROOT / ".venv-peers-amused" / "bin" / "python", PEERS / "run_amused.py"),
}
PEER_NAMES = ["DALLE-pytorch", "aMUSEd"]
PARAM_TOLERANCE = 0.10
PIXEL_TOLERANCE = 0.25


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ---- the machine's matmul limit ------------------------------------------------------------------------------------


def measure_matmul_peak(dtype_name: str, threads: int, seconds: float) -> dict:
    """Best GFLOP/s of large square matmuls (torch.mm) at `threads` threads; n grows from 1024 until one mm >= 50 ms."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    n = 1024
    while True:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t0
        if dt >= 0.05 or n >= 4096:
            break
        n *= 2
    best, calls, t_end = 0.0, 0, time.perf_counter() + seconds
    while calls < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt / 1e9)
        calls += 1
    return {"dtype": dtype_name, "n": n, "calls": calls, "gflops": best}


# ---- running the contenders ----------------------------------------------------------------------------------------


def run_contender(name: str, cfg: dict, args, first: bool = True) -> dict:
    python, runner = CONTENDERS[name]
    cmd = [str(python), str(runner), "--codes", str(cfg["codes"]), "--batch", str(cfg["batch"]),
           "--guidance", str(cfg["guidance"]), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--max-seconds", str(args.max_seconds), "--threads", str(args.threads), "--seed", str(args.seed)]
    if name == "dalle-hf" and first:
        cmd.append("--flops")
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["TOKENIZERS_PARALLELISM"] = "false"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"contender": name, **cfg, "error": f"timeout after {args.timeout}s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"contender": name, **cfg, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    rec = json.loads(lines[-1])
    rec["wall_s"] = wall
    return rec


def check_venvs(names) -> list[str]:
    missing = [n for n in names if not CONTENDERS[n][0].exists()]
    for n in missing:
        log(f"[bench] {n}: {CONTENDERS[n][0]} is missing; run benchmarks/peers/setup_peers.sh")
    return [n for n in names if n not in missing]


# ---- training throughput -------------------------------------------------------------------------------------------


def load_train_configs(path: str | None):
    """Text encoder + image decoder configs: from a pipeline folder, else the `shapes` recipe's sizes."""
    from dalle_hf.models import DalleImageDecoderConfig, DalleTextEncoderConfig

    if path is None:
        try:
            import dalle_hf

            path = dalle_hf.DEFAULT_MODEL
        except (ImportError, AttributeError):
            path = None
    if path and (Path(path) / "image_decoder" / "config.json").exists():
        te = DalleTextEncoderConfig.from_pretrained(str(Path(path) / "text_encoder"))
        dec = DalleImageDecoderConfig.from_pretrained(str(Path(path) / "image_decoder"))
        return te, dec, str(path)
    from dalle_hf.training.recipe import get_recipe

    r = get_recipe("shapes")
    te = DalleTextEncoderConfig(vocab_size=r.tokenizer_vocab_size, **r.text)
    dec = DalleImageDecoderConfig(vocab_size=r.alignment["codebook_size"], cross_attention_dim=r.text["hidden_size"],
                                  **r.decoder)
    log(f"[train] no pipeline folder at {path!r}; using the `shapes` recipe's sizes")
    return te, dec, f"recipe:shapes (no folder at {path})"


def train_throughput(args, peaks: dict) -> dict:
    """Decoder-stage training steps (text encoder + image decoder, AdamW) in fp32 and in bf16 autocast."""
    import torch

    from dalle_hf.models import DalleImageDecoder, DalleTextEncoder

    torch.set_num_threads(args.threads)
    te_cfg, dec_cfg, source = load_train_configs(args.config)
    B, L, N = args.train_batch, args.train_text_len, dec_cfg.image_grid_size**2
    fwd = (flops.analytic_text_encoder(te_cfg, L, B)
           + flops.analytic_decoder_train_forward(dec_cfg, N, B, L))
    step_flops = 3 * fwd  # forward + backward (backward = 2 x forward); the optimizer step is not counted
    out = {"source": source, "batch": B, "text_len": L, "codes_per_image": N, "forward_flops": fwd,
           "step_flops": step_flops, "params": {}, "modes": {}}
    for mode in args.train_modes:
        torch.manual_seed(args.seed)
        te, dec = DalleTextEncoder(te_cfg).train(), DalleImageDecoder(dec_cfg).train()
        out["params"] = {"text_encoder": sum(p.numel() for p in te.parameters()),
                         "image_decoder": sum(p.numel() for p in dec.parameters())}
        params = list(te.parameters()) + list(dec.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(3, te_cfg.vocab_size, (B, L), generator=g)
        mask = torch.ones(B, L, dtype=torch.long)
        mask[: B // 2, L - L // 4:] = 0  # some padding, as in real batches
        codes = torch.randint(0, dec_cfg.vocab_size, (B, N), generator=g)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(mode == "bf16")):
                states = te(ids, attention_mask=mask).last_hidden_state
                loss = dec(input_ids=codes, encoder_hidden_states=states, encoder_attention_mask=mask,
                           labels=codes).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        with torch.enable_grad():
            for _ in range(args.train_warmup):
                step()
            times = []
            for _ in range(args.train_steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        peak = peaks.get("bfloat16" if mode == "bf16" else "float32", {}).get("gflops")
        achieved = step_flops / med / 1e9
        out["modes"][mode] = {"step_times": times, "median_step_s": med, "codes_per_s": B * N / med,
                              "images_per_s": B / med, "achieved_gflops": achieved,
                              "peak_gflops": peak, "mfu": achieved / peak if peak else None}
        log(f"[train] {mode}: {med:.3f} s/step, {B * N / med:,.0f} codes/s, "
            f"{achieved:.1f} GFLOP/s" + (f" = {100 * achieved / peak:.1f}% of the {mode} matmul limit" if peak else ""))
    return out


# ---- reporting -----------------------------------------------------------------------------------------------------


def summarize(records: list[dict], peaks: dict) -> dict:
    by_key: dict = {}
    for r in records:
        if "error" in r:
            continue
        key = (r["codes"], r["batch"], float(r["guidance"]), r["contender"])
        e = by_key.setdefault(key, {"times": [], "round_medians": [], "params": r["params"],
                                    "param_count": r["param_count"], "notes": r.get("notes", {})})
        if "flops" in r.get("notes", {}):
            e["notes"] = r["notes"]
        e["times"].extend(r["times"])
        e["round_medians"].append(r["median"])
    rows = []
    for (codes, batch, g) in sorted({k[:3] for k in by_key}):
        row = {"codes": codes, "batch": batch, "guidance": g, "median_s": {}, "n_calls": {}}
        for c in CONTENDERS:
            e = by_key.get((codes, batch, g, c))
            if e:
                row["median_s"][c] = statistics.median(e["times"])
                row["n_calls"][c] = len(e["times"])
        hf = row["median_s"].get("dalle-hf")
        row["speedup"] = {p: row["median_s"][p] / hf for p in PEER_NAMES if hf and p in row["median_s"]}
        e = by_key.get((codes, batch, g, "dalle-hf"))
        if e and "flops" in e["notes"]:
            f = e["notes"]["flops"]
            peak = peaks.get(f.get("dtype", "float32"), {}).get("gflops")
            row["flops"] = {k: f[k] for k in ("decoder", "text_encoder", "pixel_decoder", "total", "counted_total")}
            if peak and hf:
                row["flop_bound_s"] = f["total"] / (peak * 1e9)
                row["flop_share"] = row["flop_bound_s"] / hf
        rows.append(row)
    params = {}
    for (codes, batch, g, c), e in by_key.items():
        params.setdefault(c, {})[codes] = {"param_count": e["param_count"], **e["params"],
                                           "pixel_flops_per_image": e["notes"].get("pixel_flops_per_image")}
    return {"rows": rows, "params": params}


def param_check(params: dict) -> list[str]:
    """Matched parameters within PARAM_TOLERANCE of dalle-hf's; pixel decoder FLOPs within PIXEL_TOLERANCE."""
    msgs = []
    for codes in sorted({k for v in params.values() for k in v}):
        hf = params.get("dalle-hf", {}).get(codes, {})
        for p in PEER_NAMES:
            peer = params.get(p, {}).get(codes, {})
            n, ref = peer.get("param_count"), hf.get("param_count")
            if ref and n:
                rel = n / ref - 1
                msgs.append(f"{codes} codes: {p} {n / 1e6:.2f}M vs dalle-hf {ref / 1e6:.2f}M params ({rel:+.1%})"
                            + ("" if abs(rel) <= PARAM_TOLERANCE else f"  ** outside +-{PARAM_TOLERANCE:.0%} **"))
            n, ref = peer.get("pixel_flops_per_image"), hf.get("pixel_flops_per_image")
            if ref and n:
                rel = n / ref - 1
                msgs.append(f"{codes} codes: {p} pixel decoder {n / 1e6:.0f} vs dalle-hf {ref / 1e6:.0f} MFLOP/image "
                            f"({rel:+.1%})" + ("" if abs(rel) <= PIXEL_TOLERANCE else
                                               f"  ** outside +-{PIXEL_TOLERANCE:.0%} **"))
    return msgs


def markdown(summary: dict, peaks: dict, train: dict | None, meta: dict) -> str:
    out = [f"## Peer benchmark ({meta['when']}, {meta['threads']} threads, {meta['rounds']} round(s), "
           f"median of {meta['calls_hint']})", ""]
    if peaks:
        out.append("Matmul limit: " + ", ".join(f"{k} {v['gflops']:.1f} GFLOP/s (n={v['n']})" for k, v in peaks.items()))
        out.append("")
    hdr = ["codes", "batch", "guidance", "dalle-hf s", "DALLE-pytorch s", "aMUSEd s", "vs DALLE-pytorch", "vs aMUSEd",
           "dalle-hf GFLOP", "FLOP-bound s", "share"]
    out += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in summary["rows"]:
        m = r["median_s"]
        cells = [str(r["codes"]), str(r["batch"]), f"{r['guidance']:g}"]
        cells += [f"{m[c]:.3f}" if c in m else "n/a" for c in CONTENDERS]
        cells += [f"{r['speedup'][p]:.2f}x" if p in r["speedup"] else "n/a" for p in PEER_NAMES]
        cells.append(f"{r['flops']['total'] / 1e9:.2f}" if "flops" in r else "n/a")
        cells.append(f"{r['flop_bound_s']:.3f}" if "flop_bound_s" in r else "n/a")
        cells.append(f"{100 * r['flop_share']:.1f}%" if "flop_share" in r else "n/a")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Speed-up = peer median / dalle-hf median (seconds per batch, text to float pixels). "
            "Share = FLOP-bound time / measured dalle-hf time.", "", "Parameters (text side + image transformer):"]
    for c, per_codes in summary["params"].items():
        for codes, p in sorted(per_codes.items()):
            pix = p.get("pixel_flops_per_image")
            out.append(f"- {c} ({codes} codes): {p['param_count']:,} counted; "
                       + ", ".join(f"{k} {v:,}" for k, v in p.items()
                                   if k not in ("param_count", "matched", "pixel_flops_per_image") and v is not None)
                       + (f"; pixel decoder {pix / 1e6:.0f} MFLOP/image" if pix else ""))
    out += ["", *[f"- {m}" for m in param_check(summary["params"])]]
    if train:
        out += ["", f"### Training throughput, decoder stage ({train['source']}; batch {train['batch']}, "
                f"text {train['text_len']} tokens, {train['codes_per_image']} codes/image; "
                f"{train['step_flops'] / 1e9:.1f} GFLOP/step = 3 x forward)", "",
                "| mode | s/step | codes/s | images/s | GFLOP/s | matmul limit | MFU |", "|---|---|---|---|---|---|---|"]
        for mode, t in train["modes"].items():
            out.append(f"| {mode} | {t['median_step_s']:.3f} | {t['codes_per_s']:,.0f} | {t['images_per_s']:.1f} | "
                       f"{t['achieved_gflops']:.1f} | " + (f"{t['peak_gflops']:.1f}" if t["peak_gflops"] else "n/a")
                       + " | " + (f"{100 * t['mfu']:.1f}%" if t["mfu"] else "n/a") + " |")
    errors = meta.get("errors") or []
    if errors:
        out += ["", "Failed runs:", *[f"- {e}" for e in errors]]
    return "\n".join(out) + "\n"


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[bench] matplotlib is not installed in this venv: no PNG (benchmarks/peers/setup_peers.sh installs it)")
        return False
    rows = summary["rows"]
    panels = sorted({(r["codes"], r["guidance"]) for r in rows})
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    colors = {"dalle-hf": "tab:blue", "DALLE-pytorch": "tab:orange", "aMUSEd": "tab:green"}
    for ax, (codes, g) in zip(axes[0], panels):
        sel = sorted((r for r in rows if r["codes"] == codes and r["guidance"] == g), key=lambda r: r["batch"])
        for c in CONTENDERS:
            pts = [(r["batch"], r["median_s"][c]) for r in sel if c in r["median_s"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c, color=colors[c])
        bound = [(r["batch"], r["flop_bound_s"]) for r in sel if "flop_bound_s" in r]
        if bound:
            ax.plot(*zip(*bound), ls="--", marker="x", color=colors["dalle-hf"], alpha=0.5, label="dalle-hf FLOP bound")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([r["batch"] for r in sel], [str(r["batch"]) for r in sel])
        ax.set_title(f"{codes} codes, guidance {g:g}")
        ax.set_xlabel("batch")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("seconds per batch (median)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 64 codes, batch 1 and 4, 1 timed call")
    p.add_argument("--codes", type=int, nargs="+", default=None, help="default 64 256 (quick: 64)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 4 16 (quick: 1 4)")
    p.add_argument("--guidances", type=float, nargs="+", default=None, help="default 1 3")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--rounds", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per runner start (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per runner start, at most (default 3, quick 1)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="a runner stops timing once this much timed time has passed, after at least 1 call "
                        "(default 20, quick 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="per runner start")
    p.add_argument("--matmul-seconds", type=float, default=None, help="per dtype (default 3, quick 0.5)")
    p.add_argument("--train", action="store_true", help="also measure decoder-stage training throughput")
    p.add_argument("--train-only", action="store_true", help="only the matmul limit and the training throughput")
    p.add_argument("--config", default=None,
                   help="pipeline folder whose text_encoder/ and image_decoder/ configs size the training section "
                        "(default: dalle_hf.DEFAULT_MODEL, else the `shapes` recipe)")
    p.add_argument("--train-batch", type=int, default=None, help="default 64 (quick: 8)")
    p.add_argument("--train-text-len", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=None, help="timed steps (default 5, quick 1)")
    p.add_argument("--train-warmup", type=int, default=None, help="default 2 (quick 1)")
    p.add_argument("--train-modes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None, help="file name stem (default bench_peers, or bench_peers_quick)")
    a = p.parse_args(argv)
    defaults = dict(codes=[64, 256], batches=[1, 4, 16], guidances=[1.0, 3.0], rounds=3, repeats=3, max_seconds=20.0,
                    matmul_seconds=3.0, train_batch=64, train_steps=5, train_warmup=2)
    if a.quick:
        defaults.update(codes=[64], batches=[1, 4], rounds=1, repeats=1, max_seconds=5.0, matmul_seconds=0.5,
                        train_batch=8, train_steps=1, train_warmup=1)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.train_only:
        a.train = True
    a.tag = a.tag or ("bench_peers_quick" if a.quick else "bench_peers")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta = {"when": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "rounds": args.rounds,
            "calls_hint": f"{args.repeats} timed call(s) x {args.rounds} round(s) after {args.warmup} warm-up",
            "host": platform.node(), "cpu_count": os.cpu_count(), "argv": sys.argv[1:],
            "loadavg_start": os.getloadavg()}
    log(f"[bench] load average at start: {meta['loadavg_start']}")

    peaks = {}
    for dt in ("float32", "bfloat16"):
        peaks[dt] = measure_matmul_peak(dt, args.threads, args.matmul_seconds)
        log(f"[bench] matmul limit {dt}: {peaks[dt]['gflops']:.1f} GFLOP/s (n={peaks[dt]['n']})")

    records, errors = [], []
    if not args.train_only:
        contenders = check_venvs(args.contenders)
        configs = [{"codes": c, "batch": b, "guidance": g}
                   for c in args.codes for g in args.guidances for b in args.batches]
        for rnd in range(args.rounds):
            for i, cfg in enumerate(configs):
                k = (rnd + i) % len(contenders)
                for name in contenders[k:] + contenders[:k]:  # rotate who goes first
                    rec = run_contender(name, cfg, args, first=(rnd == 0))
                    rec["round"] = rnd
                    records.append(rec)
                    if "error" in rec:
                        errors.append(f"{name} {cfg}: {rec['error']}")
                        log(f"[bench] round {rnd} {name} {cfg}: ERROR {rec['error']}")
                    else:
                        log(f"[bench] round {rnd} {name:13s} codes={cfg['codes']:3d} batch={cfg['batch']:2d} "
                            f"g={cfg['guidance']:g}: " + ", ".join(f"{t:.3f}" for t in rec["times"]) + " s")

    summary = summarize(records, peaks)
    train = train_throughput(args, peaks) if args.train else None
    meta["errors"] = errors
    meta["loadavg_end"] = os.getloadavg()
    meta["elapsed_s"] = time.perf_counter() - started
    table = markdown(summary, peaks, train, meta)
    print(table)
    for m in param_check(summary["params"]):
        log("[bench] params " + m)

    result = {"meta": meta, "matmul_peak": peaks, "summary": summary, "train": train, "records": records}
    (out_dir / f"{args.tag}.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / f"{args.tag}.md").write_text(table)
    wrote = [f"{args.tag}.json", f"{args.tag}.md"]
    if summary["rows"] and plot(summary, out_dir / f"{args.tag}.png"):
        wrote.append(f"{args.tag}.png")
    log(f"[bench] wrote {', '.join(str(out_dir / w) for w in wrote)} in {meta['elapsed_s']:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
