"""`dalle-hf finetune`: fine-tune a trained pipeline on your images (LoRA or full), under `accelerate launch`/torchrun."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="Fine-tune a pipeline on your own images and captions (LoRA by default).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Writes OUTPUT_DIR: the merged pipeline (DallePipeline.from_pretrained loads it), its model card, "
                    "and OUTPUT_DIR/adapter with the LoRA adapter alone (dalle_hf.lora.load_lora).")
    p.add_argument("--pretrained", required=True, help="Pipeline folder or Hub repo id to start from.")
    p.add_argument("--revision", default=None, help="Branch, tag or commit of a Hub --pretrained.")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-data-dir", default=None, help="An imagefolder with metadata.jsonl (file_name, text).")
    data.add_argument("--dataset-name", default=None, help="A `datasets` dataset (name or path) with image and text "
                                                           "columns.")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--max-train-images", type=int, default=None, help="Use at most this many images.")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank; 0 = full fine-tuning.")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    p.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="Linear layers to adapt, by name or dotted suffix (default: qkv proj q kv fc1 fc2; e.g. "
                        "cross_attn.q cross_attn.kv cross_attn.proj for cross-attention only).")
    p.add_argument("--train-text-encoder", action="store_true",
                   help="Also adapt the text encoder (LoRA, or fully with --lora-rank 0).")
    p.add_argument("--no-new-words", action="store_true",
                   help="Do not add the captions' unknown words to the vocabulary as new tokens.")
    p.add_argument("--new-words", nargs="*", default=[], help="Words to add as new tokens even if not in captions.")
    p.add_argument("--init-from", default=None,
                   help="Initialise new words' embeddings from this known word (default: their old BPE pieces). Not recommended: "
                        "the adapter then learns that this word's embedding means the new concept, which damages the word.")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--distill-weight", type=float, default=0.0, metavar="W",
                   help="Keep old skills by distillation against the base model, W in [0, 1]: on replay samples "
                        "(captions with none of the new words) the loss becomes (1-W) x cross-entropy on the "
                        "ground-truth codes + W x KL(base || fine-tuned) of the next-code distributions; captions with "
                        "new words always train on ground truth. Needs new words and ordinary captions in the data. "
                        "Costs one more forward pass without gradient over the replay samples per step (about +20%% "
                        "step time at 60%% replay); with LoRA the base is the model with its adapters off, full "
                        "fine-tuning keeps a frozen copy of the weights. 0 = off.")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=None,
                   help="Default: 1e-3 with LoRA, 1e-4 for full fine-tuning.")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--save-every", type=int, default=250, help="Checkpoint every N steps (for --resume).")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--no-resume", action="store_true", help="Ignore checkpoints in the output folder.")
    p.add_argument("--no-tracking", action="store_true", help="Do not write tensorboard logs.")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="Push the merged pipeline (self-contained) and the adapter to this repo, in one commit.")
    p.add_argument("--hub-token", default=None)
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..training import DataArguments, TrainingArguments, make_accelerator, run_stage
    from ..training.finetune import FinetuneArguments, FinetuneStage

    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "save_every", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive integer")
    if args.lora_rank < 0:
        raise SystemExit("error: --lora-rank must be >= 0 (0 = full fine-tuning)")
    if not 0.0 <= args.distill_weight <= 1.0:
        raise SystemExit(f"error: --distill-weight must be in [0, 1] (0 = no distillation), got {args.distill_weight}")
    lr = args.learning_rate if args.learning_rate is not None else (1e-3 if args.lora_rank else 1e-4)
    ft = FinetuneArguments(pretrained=args.pretrained, revision=args.revision, token=args.hub_token,
                           lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                           lora_target_modules=args.lora_target_modules,
                           train_text_encoder=args.train_text_encoder, add_new_words=not args.no_new_words,
                           new_words=list(args.new_words), init_from=args.init_from,
                           caption_dropout=args.caption_dropout, distill_weight=args.distill_weight,
                           max_train_images=args.max_train_images)
    data = DataArguments(train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
                         image_column=args.image_column, caption_column=args.caption_column)
    training = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, batch_size=args.batch_size,
                                 learning_rate=lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                                 gradient_accumulation_steps=args.gradient_accumulation_steps,
                                 save_every=args.save_every, log_every=args.log_every, seed=args.seed,
                                 resume=not args.no_resume)
    accelerator = make_accelerator(args.mixed_precision, args.gradient_accumulation_steps, project_dir=args.output_dir,
                                   log_with=None if args.no_tracking else "tensorboard")
    if not args.no_tracking:
        accelerator.init_trackers("logs", config={"pretrained": args.pretrained, "lora_rank": args.lora_rank,
                                                  "max_steps": args.max_steps, "learning_rate": lr,
                                                  "distill_weight": args.distill_weight})
    stage = FinetuneStage(ft, data)
    logs = run_stage(stage, accelerator, training)
    accelerator.end_training()
    accelerator.print(f"Fine-tuned pipeline written to {args.output_dir}"
                      + (f" (adapter in {args.output_dir}/adapter)" if args.lora_rank else "")
                      + (f"; final loss {logs['loss']:.4f}" if "loss" in logs else ""))
    if args.push_to_hub and accelerator.is_main_process:
        import os

        from ..pipeline_dalle import DallePipeline

        pipe = DallePipeline.from_pretrained(args.output_dir)
        card = stage.model_card_info()
        card["repo_id"] = args.push_to_hub
        adapter = os.path.join(args.output_dir, "adapter")
        info = pipe.push_to_hub(args.push_to_hub, token=args.hub_token, private=args.private or None, model_card=card,
                                extra_folders={"adapter": adapter} if os.path.isdir(adapter) else None,
                                commit_message=f"Fine-tune of {args.pretrained} with dalle-hf")
        accelerator.print(f"Pushed to {getattr(info, 'commit_url', args.push_to_hub)}")
    return 0
