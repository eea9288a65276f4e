"""`dalle-hf eval`: score a pipeline on ShapesEval (and its image tokenizer on reconstructions)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="Score a pipeline on the ShapesEval compositional benchmark.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Pipeline folder or Hub id (DallePipeline.from_pretrained).")
    p.add_argument("--num-candidates", type=int, default=None,
                   help="Sample this many candidates per prompt and keep the best by alignment score.")
    p.add_argument("--output", default=None, help="Write the full JSON report here (atomically).")
    p.add_argument("--max-prompts", type=int, default=None,
                   help="Score at most this many prompts, taken evenly over the categories.")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="Prompt i is sampled with generator seed SEED + i.")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    p.add_argument("--no-reconstruction", action="store_true",
                   help="Skip the image-tokenizer reconstruction check.")
    p.add_argument("--reconstruction-images", type=int, default=512,
                   help="Number of scenes for the reconstruction check.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    p.set_defaults(func=main)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise SystemExit(f"error: {name} must be a positive integer, got {value}")


def main(args) -> int:
    import torch

    from .. import DallePipeline
    from ..evaluation import evaluate_pipeline, evaluate_reconstruction, format_table, write_report

    for name in ("num_candidates", "max_prompts", "batch_size", "reconstruction_images"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.seed < 0:
        raise SystemExit(f"error: --seed must be a non-negative integer, got {args.seed}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = DallePipeline.from_pretrained(args.model).to(device)
    pipe.set_progress_bar_config(disable=True)  # one bar, over prompts
    report = evaluate_pipeline(pipe, num_candidates=args.num_candidates, batch_size=args.batch_size,
                               seed=args.seed, max_prompts=args.max_prompts, progress=not args.no_progress)
    if not args.no_reconstruction:
        report["reconstruction"] = evaluate_reconstruction(pipe.alignment, num_images=args.reconstruction_images,
                                                           seed=args.seed + 1234)
    report["model"] = str(args.model)
    print(format_table(report))
    if args.output:
        write_report(args.output, report)
        print(f"Report written to {args.output}")
    return 0
