"""The new-concept demo (issue: Hub and fine-tuning): teach the embedded model hearts with LoRA, on 2 CPU cores.

    .venv/bin/python benchmarks/demo_new_concept.py [--distill-weight 0.5] [--seeds 0 1000 2000 3000]

Steps (the export and the fine-tune are skipped when their output exists, so a killed run continues; the evaluation
always runs):
1. export 4,000 ShapesWorld-extension scenes (40% with a heart) as an imagefolder (`out/hearts-data-4k`);
2. `dalle-hf finetune` of `dalle_hf/default_model` with LoRA (rank 8, 500 steps of 32) into `--output-dir`; its CPU
   time (user + sys of the subprocess) is recorded;
3. ShapesEval on the 32 new-shape prompts and on the original 412 prompts, before (the embedded model) and after (the
   fine-tuned pipeline), one image per prompt, for each seed; the table goes to stdout and the JSON report to
   `benchmarks/results/demo_new_concept.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finetune(data_dir: str, output_dir: str, distill_weight: float, steps: int, learning_rate: float) -> dict:
    """Run the fine-tune as a subprocess; returns its CPU minutes and wall minutes."""
    cmd = [sys.executable, "-m", "dalle_hf.cli", "finetune", "--pretrained", "dalle_hf/default_model",
           "--train-data-dir", data_dir, "--output-dir", output_dir, "--lora-rank", "8", "--max-steps", str(steps),
           "--batch-size", "32", "--learning-rate", str(learning_rate), "--warmup-steps", "20", "--log-every", "25",
           "--save-every", "250", "--no-tracking", "--distill-weight", str(distill_weight)]
    print(" ".join(cmd), flush=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="2"))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_minutes": cpu / 60, "wall_minutes": (time.perf_counter() - start) / 60, "command": " ".join(cmd)}


def evaluate(path: str, seeds: list[int]) -> dict:
    from dalle_hf import DallePipeline
    from dalle_hf.data.extension import evaluate_new_shape
    from dalle_hf.evaluation import evaluate_pipeline

    pipe = DallePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    out = {"new": [], "original": [], "new_categories": [], "original_categories": []}
    for seed in seeds:
        new, old = evaluate_new_shape(pipe, seed=seed), evaluate_pipeline(pipe, seed=seed, progress=False)
        out["new"].append(new["overall"])
        out["original"].append(old["overall"])
        out["new_categories"].append({c: v["accuracy"] for c, v in new["categories"].items()})
        out["original_categories"].append({c: v["accuracy"] for c, v in old["categories"].items()})
        print(f"{path} seed {seed}: new-shape {new['overall']:.3f}, ShapesEval {old['overall']:.3f}", flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="out/hearts-data-4k")
    parser.add_argument("--output-dir", default="out/finetune-hearts")
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--learning-rate", type=float, default=1.5e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1000, 2000, 3000])
    parser.add_argument("--report", default=os.path.join(ROOT, "benchmarks", "results", "demo_new_concept.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    os.chdir(ROOT)
    if not os.path.isfile(os.path.join(args.data_dir, "metadata.jsonl")):
        from dalle_hf.data.extension import export_extension_imagefolder

        export_extension_imagefolder(args.data_dir, 4000, seed=0, new_fraction=0.4)
    report = {"distill_weight": args.distill_weight, "seeds": args.seeds}
    if not os.path.isfile(os.path.join(args.output_dir, "model_index.json")):
        report["finetune"] = finetune(args.data_dir, args.output_dir, args.distill_weight, args.max_steps,
                                      args.learning_rate)
    import dalle_hf

    report["before"] = evaluate(dalle_hf.DEFAULT_MODEL, args.seeds)
    report["after"] = evaluate(args.output_dir, args.seeds)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for part in ("new", "original"):
        b, a = mean(report["before"][part]), mean(report["after"][part])
        print(f"{part:>8}: before {b:.3f}  after {a:.3f}  change {100 * (a - b):+.1f} points", flush=True)
    tmp = args.report + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, args.report)


if __name__ == "__main__":
    main()
