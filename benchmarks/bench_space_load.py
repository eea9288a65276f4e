"""Bounded load check of the Gradio Space, against 127.0.0.1 only (it starts its own `python space/app.py`).

Measures:
  1. start -> ready: from launching the process to the app printing its URL (model load included);
  2. click -> first full images: a `/generate` call with the page's default settings (4 images, the pipeline's
     defaults), the first (cold) and the median of the next ones;
  3. a crowd: N clients (default 20) fire at once; every request must come back with images or with the queue's
     clean "queue is full" refusal (the queue holds 16 and runs 1) - none lost, no other error;
  4. memory: server RSS (psutil, process tree) after the first 10 requests of a run of 100 and after all 100;
     the check is that it grows by at most 10%.

    .venv/bin/python benchmarks/bench_space_load.py                 # the embedded model (or DALLE_HF_MODEL)
    .venv/bin/python benchmarks/bench_space_load.py --tiny --requests 20   # smoke run on a tiny random model
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SPACE_DIR = ROOT / "space"
PROMPTS = [
    "a red circle in the top left",
    "two blue squares",
    "a green triangle to the left of a yellow square",
    "a purple triangle",
    "a yellow circle at the bottom",
]
UI_DEFAULT_IMAGES = 4  # the page's "Images" slider starts here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, workdir: Path, timeout: float) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    env = {**os.environ, "DALLE_HF_MODEL": model, "GRADIO_SERVER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    env.pop("SPACE_ID", None)  # never 0.0.0.0 here
    log_path = workdir / "app.log"
    log = open(log_path, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=SPACE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    while time.perf_counter() - t0 < timeout:
        if "dalle-hf Space ready at" in log_path.read_text():
            return proc, f"http://127.0.0.1:{port}", time.perf_counter() - t0
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"the app did not start:\n{log_path.read_text()[-3000:]}")


def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def make_client(url: str, downloads: Path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(downloads))


def one_request(client, images: int, rng: random.Random) -> tuple[str, float, str]:
    """('ok' | 'refused' | 'error', seconds, detail)."""
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    t0 = time.perf_counter()
    try:
        gallery, info = client.predict(
            prompt=rng.choice(PROMPTS), num_images=images, seed=rng.randrange(2**31), api_name="/generate"
        )
    except QueueError as exc:
        return "refused", time.perf_counter() - t0, str(exc)
    except AppError as exc:
        kind = "refused" if "queue is full" in str(exc).lower() else "error"
        return kind, time.perf_counter() - t0, str(exc)
    except Exception as exc:  # noqa: BLE001 - anything else is a failure of the check
        return "error", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
    dt = time.perf_counter() - t0
    if len(gallery) != images or len(info["scores"]) != images or not all(Path(g["image"]).is_file() for g in gallery):
        return "error", dt, f"incomplete answer: {len(gallery)} images"
    return "ok", dt, ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="folder or Hub id (default: DALLE_HF_MODEL or the embedded model)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random-weight pipeline (smoke run)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=100, help="requests in the memory run (>= 10)")
    parser.add_argument("--memory-concurrency", type=int, default=4, help="clients in the memory run")
    parser.add_argument("--images", type=int, default=1, help="images per request in the crowd and memory runs")
    parser.add_argument("--latency-runs", type=int, default=3)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--request-timeout", type=float, default=900, help="seconds before a request counts as lost")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    if args.requests < 10:
        parser.error("--requests must be at least 10")

    work = Path(tempfile.mkdtemp(prefix="bench-space-"))
    if args.tiny:
        from dalle_hf.testing import save_tiny_pipeline

        model = save_tiny_pipeline(str(work / "tiny"))
    else:
        import dalle_hf

        model = args.model or os.environ.get("DALLE_HF_MODEL") or dalle_hf.DEFAULT_MODEL
    downloads = work / "downloads"
    rng = random.Random(0)
    summary: dict = {"model": "tiny random" if args.tiny else str(model), "cpu_count": os.cpu_count()}
    failures: list[str] = []

    proc, url, ready_s = start_app(model, work, args.start_timeout)
    try:
        summary["start_to_ready_s"] = round(ready_s, 2)
        summary["rss_at_ready_mb"] = round(rss_mb(proc.pid), 1)

        # 2. click -> first full images, the page's defaults
        client = make_client(url, downloads)
        latencies = []
        for _ in range(args.latency_runs):
            kind, dt, detail = one_request(client, UI_DEFAULT_IMAGES, rng)
            if kind != "ok":
                failures.append(f"latency request: {kind} {detail}")
            latencies.append(dt)
        summary["click_to_images_s"] = {
            "images": UI_DEFAULT_IMAGES,
            "first": round(latencies[0], 3),
            "median_after_first": round(statistics.median(latencies[1:]), 3) if len(latencies) > 1 else None,
        }

        # 3. a crowd, all at once
        clients = [make_client(url, downloads) for _ in range(args.clients)]
        barrier = threading.Barrier(args.clients)

        def crowd_member(i):
            barrier.wait()
            return one_request(clients[i], args.images, random.Random(i))

        with ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(crowd_member, i) for i in range(args.clients)]
            results = []
            for f in futures:
                try:
                    results.append(f.result(timeout=args.request_timeout))
                except Exception as exc:  # noqa: BLE001 - timed out: lost
                    results.append(("lost", args.request_timeout, repr(exc)))
        counts = {k: sum(r[0] == k for r in results) for k in ("ok", "refused", "error", "lost")}
        summary["crowd"] = {
            "clients": args.clients,
            **counts,
            "slowest_ok_s": round(max((r[1] for r in results if r[0] == "ok"), default=0), 2),
            "errors": sorted({r[2] for r in results if r[0] in ("error", "lost")})[:5],
        }
        if counts["error"] or counts["lost"] or counts["ok"] + counts["refused"] != args.clients:
            failures.append(f"crowd: {counts}")
        if counts["ok"] == 0:
            failures.append("crowd: no request was served")

        # 4. memory over a run of requests (a few clients at a time: the queue is used but never full)
        done = [0]
        lock = threading.Lock()
        rss_after: dict[int, float] = {}
        kinds: list[str] = []
        times: list[float] = []

        def member(i):
            c = make_client(url, downloads)
            r = random.Random(1000 + i)
            while True:
                with lock:  # claim the next request, if any are left
                    if len(kinds) >= args.requests:
                        return
                    kinds.append("pending")
                    slot = len(kinds) - 1
                kind, dt, detail = one_request(c, args.images, r)
                with lock:
                    kinds[slot] = kind
                    times.append(dt)
                    done[0] += 1
                    if done[0] in (10, args.requests):
                        rss_after[done[0]] = rss_mb(proc.pid)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=member, args=(i,)) for i in range(args.memory_concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.request_timeout * args.requests)
        wall = time.perf_counter() - t0
        growth = (rss_after[args.requests] - rss_after[10]) / rss_after[10] if len(rss_after) == 2 else None
        summary["memory_run"] = {
            "requests": args.requests,
            "images_per_request": args.images,
            "ok": kinds.count("ok"),
            "not_ok": len(kinds) - kinds.count("ok"),
            "rss_after_10_mb": round(rss_after.get(10, float("nan")), 1),
            f"rss_after_{args.requests}_mb": round(rss_after.get(args.requests, float("nan")), 1),
            "rss_growth_pct": None if growth is None else round(100 * growth, 2),
            "latency_p50_s": round(statistics.median(times), 3) if times else None,
            "latency_p95_s": round(sorted(times)[int(0.95 * (len(times) - 1))], 3) if times else None,
            "requests_per_s": round(len(times) / wall, 2),
        }
        if kinds.count("ok") != args.requests:
            failures.append(f"memory run: {kinds.count('ok')}/{args.requests} ok")
        if growth is None or growth > 0.10:
            failures.append(f"memory grew {growth if growth is None else f'{100 * growth:.1f}%'} (limit 10%)")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    summary["checks"] = "pass" if not failures else failures
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
