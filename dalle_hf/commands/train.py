"""`dalle-hf train`: run a recipe (all stages) or one of its stages, under `accelerate launch` or `torchrun`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="Train the model (all stages of a recipe, or one stage).",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default="shapes",
                   help="Recipe: 'shapes' (the embedded model from scratch), 'shapes-continue' (more decoder and "
                        "contrastive training for a finished pipeline, needs --init-from), 'tiny' (smoke test).")
    p.add_argument("--init-from", default=None,
                   help="A pipeline folder to continue training from (continuation recipes only).")
    p.add_argument("--stage", choices=["autoencoder", "decoder", "contrastive", "all"], default="all",
                   help="Run one stage of the recipe (earlier stages must be done) or all of them.")
    p.add_argument("--output-dir", required=True, help="Run folder; the pipeline is written to OUTPUT_DIR/pipeline.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--no-resume", action="store_true", help="Ignore checkpoints in the run folder.")
    p.add_argument("--max-steps", type=int, default=None, help="Override every stage's number of steps.")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="Precision of the saved pipeline weights.")
    p.add_argument("--train-data-dir", default=None, help="An imagefolder with metadata.jsonl (instead of ShapesWorld).")
    p.add_argument("--dataset-name", default=None, help="A `datasets` dataset with image and text columns.")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--no-tracking", action="store_true", help="Do not write tensorboard logs.")
    p.set_defaults(func=main)


def main(args) -> int:
    import torch

    from ..training import DataArguments, make_accelerator, run_recipe
    from ..training.recipe import STAGES, check_init_from, get_recipe

    if args.train_data_dir and args.dataset_name:
        raise SystemExit("error: give at most one of --train-data-dir and --dataset-name")
    recipe = get_recipe(args.recipe)  # validates the name (and --init-from) before anything starts
    try:
        check_init_from(args.recipe, recipe, args.init_from)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    data = DataArguments(train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
                         image_column=args.image_column, caption_column=args.caption_column,
                         resolution=recipe.alignment["image_size"])
    accelerator = make_accelerator(args.mixed_precision, project_dir=args.output_dir,
                                   log_with=None if args.no_tracking else "tensorboard")
    if not args.no_tracking:
        accelerator.init_trackers("logs", config={"recipe": args.recipe, "seed": args.seed})
    stages = STAGES if args.stage == "all" else ("tokenizer", args.stage)
    path = run_recipe(args.recipe, args.output_dir, accelerator, seed=args.seed, resume=not args.no_resume,
                      data=data, max_steps=args.max_steps, stages=stages,
                      save_dtype=getattr(torch, args.save_dtype) if args.save_dtype != "float32" else None,
                      init_from=args.init_from)
    accelerator.end_training()
    if args.stage == "all":
        accelerator.print(f"Pipeline written to {path}")
    return 0
