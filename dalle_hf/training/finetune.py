"""Community fine-tuning: a trained pipeline + your images and captions -> a new pipeline (and a small LoRA adapter).

`FinetuneStage` plugs into the shared loop (`loop.run_stage`), so it gets accelerate's distribution, bf16 autocast,
gradient accumulation, checkpoints and `--resume` for free:

1. The pretrained pipeline is loaded (a folder or a Hub repo id, through `DallePipeline.from_pretrained`).
2. Every training image (an imagefolder with metadata.jsonl, or a `datasets` dataset with image and text columns; see
   `dalle_hf.data.folder`) is resized, centre-cropped and encoded ONCE by the frozen autoencoder; codes and captions
   are cached in OUTPUT_DIR/codes. Fine-tuning sets are small, and the autoencoder is frozen, so on-the-fly encoding
   would only repeat the same work every epoch.
3. Words of the captions that the model never learned (`pipe.unknown_words`) become new whole-word tokens with new
   embedding rows (`dalle_hf.lora.add_new_words`); only those rows of the embedding train.
4. The image decoder (and with `train_text_encoder` the text encoder) trains with LoRA on its attention/MLP Linear
   layers (`lora_rank` > 0), or fully (`lora_rank=0`), on next-code cross-entropy with caption dropout (so guidance
   keeps working). With `distill_weight` > 0, samples whose caption has none of the new words ("replay" samples:
   the model's old skills) also learn the base model's next-code distribution (KL distillation; see
   `FinetuneArguments.distill_weight`).
5. OUTPUT_DIR holds the merged pipeline (loads with `DallePipeline.from_pretrained`), its model card, and
   OUTPUT_DIR/adapter with the adapter alone (`dalle_hf.lora.load_lora`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .loop import Stage, TrainingArguments
from .stages import (
    CaptionCollator,
    CodesDataset,
    DataArguments,
    TextToCodes,
    backward_and_step,
    decay_groups,
    infinite,
)

logger = logging.getLogger(__name__)


@dataclass
class FinetuneArguments:
    """What to fine-tune and how (the loop's own settings are in `TrainingArguments`)."""

    pretrained: str
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None: dalle_hf.lora.LORA_TARGET_MODULES
    train_text_encoder: bool = False
    add_new_words: bool = True
    new_words: list[str] = field(default_factory=list)
    init_from: str | None = None
    caption_dropout: float = 0.1
    # Keep old skills: on replay samples (captions with none of the new words) the loss is
    # (1 - distill_weight) * cross-entropy on the ground-truth codes + distill_weight * KL(base || fine-tuned model)
    # of the next-code distributions; samples with new words always train on ground truth. 0 = off. Costs one more
    # forward pass (no backward) over the replay samples per step; full fine-tuning keeps a frozen copy of the weights.
    distill_weight: float = 0.0
    max_train_images: int | None = None
    revision: str | None = None
    cache_dir: str | None = None
    token: str | None = None

    def __post_init__(self):
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"`lora_rank` must be a non-negative integer (0 = full fine-tuning), got {self.lora_rank!r}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"`caption_dropout` must be in [0, 1), got {self.caption_dropout!r}.")
        w = self.distill_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:  # NaN fails too
            raise ValueError(f"`distill_weight` must be a number in [0, 1] (0 = no distillation), got {w!r}.")
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ValueError(f"`max_train_images` must be a positive integer, got {self.max_train_images!r}.")


@torch.no_grad()
def encode_dataset(accelerator, alignment, data: DataArguments, cache_dir: str, max_images: int | None = None,
                   batch_size: int = 64):
    """Encode one pass over the dataset with the frozen autoencoder: (codes (N, grid*grid), captions).

    Every rank encodes its shard; all ranks get everything. Cached in `cache_dir` (written atomically) and reused.
    """
    from accelerate.utils import gather_object

    from ..data.folder import build_train_dataset

    codes_file, captions_file = os.path.join(cache_dir, "codes.safetensors"), os.path.join(cache_dir, "captions.json")
    if os.path.exists(codes_file) and os.path.exists(captions_file):
        with open(captions_file, encoding="utf-8") as f:
            return load_file(codes_file)["codes"].long(), json.load(f)
    dataset = build_train_dataset(train_data_dir=data.train_data_dir, dataset_name=data.dataset_name,
                                  image_column=data.image_column, caption_column=data.caption_column,
                                  resolution=alignment.config.image_size, infinite=False, shuffle=False,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
    codes, captions = [], []
    pixels, texts = [], []

    def flush():
        if pixels:
            with accelerator.autocast():
                codes.append(alignment.encode(torch.stack(pixels).to(accelerator.device)).cpu())
            captions.extend(texts)
            pixels.clear()
            texts.clear()

    limit = None if max_images is None else -(-max_images // accelerator.num_processes)
    for n, example in enumerate(dataset):
        if limit is not None and n >= limit:
            break
        pixels.append(example["pixel_values"])
        texts.append(example["text"])
        if len(pixels) == batch_size:
            flush()
    flush()
    local = torch.cat(codes) if codes else torch.zeros(0, alignment.config.num_codes, dtype=torch.long)
    all_codes = torch.cat(gather_object([local])) if accelerator.num_processes > 1 else local
    all_captions = gather_object(captions) if accelerator.num_processes > 1 else captions
    if len(all_captions) == 0:
        raise ValueError("the training data yielded no usable image-caption pair")
    if accelerator.is_main_process:
        os.makedirs(cache_dir, exist_ok=True)
        save_file({"codes": all_codes.to(torch.int32)}, codes_file + ".tmp")
        with open(captions_file + ".tmp", "w", encoding="utf-8") as f:
            json.dump(all_captions, f)
        os.replace(codes_file + ".tmp", codes_file)
        os.replace(captions_file + ".tmp", captions_file)
    accelerator.wait_for_everyone()
    return all_codes.long(), all_captions


def find_new_words(pipe, captions, extra=()) -> list[str]:
    """Words of `captions` (plus `extra`) that are not whole tokens of the pipeline's vocabulary, in first-seen order."""
    words: dict[str, None] = {}
    for text in list(extra) + list(captions):
        for w in pipe.unknown_words(text):
            words.setdefault(w)
    return list(words)


def replay_flags(tokenizer, captions, new_token_ids) -> torch.BoolTensor:
    """True for the captions without any of the new words: the replay samples, distilled against the base model."""
    new = set(new_token_ids)
    ids = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    return torch.tensor([not new.intersection(row) for row in ids], dtype=torch.bool)


class ReplayCollator(CaptionCollator):
    """`CaptionCollator` + `replay`: which samples are replay samples (judged on the caption before dropout)."""

    def __init__(self, *args, new_token_ids=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.new_token_ids = list(new_token_ids)

    def __call__(self, batch):
        out = super().__call__(batch)
        out["replay"] = replay_flags(self.tokenizer, [b[1] for b in batch], self.new_token_ids)
        return out


class TextToLogits(TextToCodes):
    """Text encoder + image decoder -> next-code logits (B, T, V); the stage computes its losses from them."""

    def forward(self, input_ids, attention_mask, codes):
        states = self.text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state
        return self.image_decoder(codes, states, attention_mask).logits


def distillation_kl(student_logits, base_logits):
    """KL(base || student) of the next-code distributions at every position: (B, T); 0 where the two agree."""
    return F.kl_div(student_logits.float().log_softmax(-1), base_logits.float().log_softmax(-1), log_target=True,
                    reduction="none").sum(-1)


class FinetuneStage(Stage):
    name = "finetune"

    def __init__(self, finetune: FinetuneArguments, data: DataArguments):
        if data.builtin:
            raise ValueError("fine-tuning needs your data: give `train_data_dir` or `dataset_name`.")
        self.ft, self.data = finetune, data
        self.new_words: list[str] = []
        self.new_token_ids: list[int] = []

    # -- setup -----------------------------------------------------------------------------------------------------

    def setup(self, accelerator, args: TrainingArguments):
        from ..lora import LORA_TARGET_MODULES, add_lora, add_new_words
        from ..pipeline_dalle import DallePipeline

        self.accelerator, self.args = accelerator, args
        ft = self.ft
        with accelerator.main_process_first():  # one download of a repo id, the others read the cache
            pipe = DallePipeline.from_pretrained(ft.pretrained, revision=ft.revision, cache_dir=ft.cache_dir,
                                                 token=ft.token, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        alignment = pipe.alignment.to(accelerator.device).eval()
        codes, captions = encode_dataset(accelerator, alignment, self.data, os.path.join(args.output_dir, "codes"),
                                         ft.max_train_images)
        alignment.cpu()
        accelerator.print(f"[finetune] {len(captions)} training images encoded")

        if ft.add_new_words or ft.new_words:
            self.new_words = find_new_words(pipe, captions if ft.add_new_words else [], ft.new_words)
            self.new_token_ids = add_new_words(pipe, self.new_words, init_from=ft.init_from)
            if self.new_words:
                accelerator.print(f"[finetune] new words (new tokens {self.new_token_ids}): {self.new_words}")
        self.base = None  # full fine-tuning + distillation: a frozen copy of the model before fine-tuning
        if ft.distill_weight:
            if not self.new_token_ids:
                raise ValueError("`distill_weight` > 0 needs new words (the captions' unknown words, or `new_words`) "
                                 "to tell new-concept captions from replay captions; none were added.")
            replay = replay_flags(pipe.tokenizer, captions, self.new_token_ids)
            if replay.all():
                raise ValueError(f"`distill_weight` > 0 but no training caption has the new words {self.new_words}: "
                                 "every sample would be distilled towards the base model.")
            if not replay.any():
                raise ValueError("`distill_weight` > 0 needs replay samples (captions without the new words "
                                 f"{self.new_words}) in the training data; every caption has one.")
            accelerator.print(f"[finetune] distillation (weight {ft.distill_weight}) on {int(replay.sum())} replay "
                              f"captions of {len(captions)}")
            if not ft.lora_rank:
                self.base = copy.deepcopy(TextToLogits(pipe.text_encoder, pipe.image_decoder))
                self.base.requires_grad_(False).eval().to(accelerator.device)

        text_encoder, decoder = pipe.text_encoder.train(), pipe.image_decoder.train()
        if ft.lora_rank > 0:
            targets = tuple(ft.lora_target_modules or LORA_TARGET_MODULES)
            add_lora(pipe, "image_decoder", rank=ft.lora_rank, alpha=ft.lora_alpha, dropout=ft.lora_dropout,
                     target_modules=targets)
            if ft.train_text_encoder or self.new_token_ids:
                add_lora(pipe, "text_encoder", rank=ft.lora_rank if ft.train_text_encoder else 0,
                         alpha=ft.lora_alpha, dropout=ft.lora_dropout, new_token_ids=self.new_token_ids,
                         target_modules=targets)
            else:
                text_encoder.requires_grad_(False)
        else:  # full fine-tuning of the decoder (and the text encoder if asked); new rows only otherwise
            decoder.requires_grad_(True)
            text_encoder.requires_grad_(ft.train_text_encoder)
            if self.new_token_ids and not ft.train_text_encoder:
                weight = text_encoder.get_input_embeddings().weight
                weight.requires_grad_(True)
                mask = torch.zeros(weight.shape[0], 1)
                mask[self.new_token_ids] = 1.0
                weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))
        model = TextToLogits(text_encoder, decoder)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        accelerator.print(f"[finetune] trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")
        opt = torch.optim.AdamW(decay_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.99))
        collate_args = (pipe.tokenizer, text_encoder.config.max_position_embeddings, ft.caption_dropout)
        seed = args.seed + accelerator.process_index
        collate = (ReplayCollator(*collate_args, seed=seed, new_token_ids=self.new_token_ids) if ft.distill_weight
                   else CaptionCollator(*collate_args, seed=seed))
        dataset = CodesDataset(codes, captions)
        loader = DataLoader(dataset, batch_size=min(args.batch_size, len(dataset)), shuffle=True, drop_last=True,
                            collate_fn=collate)
        self.model, opt, loader = accelerator.prepare(model, opt, loader)
        self.optimizers = [opt]
        self.batches = infinite(loader)

    def models(self):
        return [self.model]

    def next_batch(self):
        return next(self.batches)

    def training_step(self, batch, step):
        acc, w = self.accelerator, self.ft.distill_weight
        ids, mask, codes = batch["input_ids"], batch["attention_mask"], batch["codes"]
        with acc.autocast():
            logits = self.model(ids, mask, codes)
        ce = F.cross_entropy(logits.float().transpose(1, 2), codes, reduction="none")  # (B, T)
        logs = {}
        if w and batch["replay"].any():
            replay = batch["replay"]
            kl = distillation_kl(logits[replay], self.base_logits(ids[replay], mask[replay], codes[replay]))
            loss = ((ce * (1 - w * replay.float()[:, None])).sum() + w * kl.sum()) / ce.numel()
            logs["distill_kl"] = kl.mean().item()
        else:
            loss = ce.mean()
        backward_and_step(acc, loss, self.optimizers[0], [p for p in self.model.parameters() if p.requires_grad],
                          self.args.max_grad_norm)
        return {"loss": loss.item(), **logs}

    @torch.no_grad()
    def base_logits(self, input_ids, attention_mask, codes):
        """Next-code logits of the model before fine-tuning: adapters switched off (LoRA) or the frozen copy (full)."""
        from ..lora import active_adapters

        with contextlib.ExitStack() as stack, self.accelerator.autocast():
            if self.base is not None:
                return self.base(input_ids, attention_mask, codes)
            model = self.accelerator.unwrap_model(self.model)
            stack.callback(model.train, model.training)  # eval for the base pass: no dropout
            model.eval()
            for peft_model in active_adapters(self.pipe).values():
                stack.enter_context(peft_model.disable_adapter())
            return model(input_ids, attention_mask, codes)

    # -- output ----------------------------------------------------------------------------------------------------

    def save(self, output_dir):
        """OUTPUT_DIR: the merged pipeline + model card; OUTPUT_DIR/adapter: the adapter alone (LoRA runs)."""
        from ..lora import active_adapters, merge_lora, save_lora

        acc = self.accelerator
        if acc.is_main_process:
            pipe = self.pipe
            pipe.text_encoder.eval()
            pipe.image_decoder.eval()
            adapter_dir = os.path.join(output_dir, "adapter")
            if active_adapters(pipe):
                shutil.rmtree(adapter_dir, ignore_errors=True)
                save_lora(pipe, adapter_dir, base_model=self.ft.pretrained)
                merge_lora(pipe)
            pipe.save_pretrained(output_dir, model_card=self.model_card_info())
            shutil.rmtree(os.path.join(output_dir, "codes"), ignore_errors=True)
        acc.wait_for_everyone()

    def model_card_info(self) -> dict:
        ft, args = self.ft, self.args
        from ..hub import looks_like_repo_id

        base = ft.pretrained if (looks_like_repo_id(ft.pretrained) and not os.path.isdir(ft.pretrained)) else None
        source = self.data.dataset_name or self.data.train_data_dir
        training = {
            "base model": ft.pretrained,
            "method": (f"LoRA rank {ft.lora_rank} on the image decoder" + (" and the text encoder" if ft.train_text_encoder else "")
                       if ft.lora_rank else "full fine-tuning of the image decoder"
                       + (" and the text encoder" if ft.train_text_encoder else "")),
            "new words": ", ".join(self.new_words) if self.new_words else "none",
            "steps": args.max_steps, "batch size": args.batch_size, "learning rate": args.learning_rate,
            "caption dropout": ft.caption_dropout,
        }
        if ft.distill_weight:
            training["distillation"] = f"weight {ft.distill_weight} on the replay samples, against the base model"
        return {
            "repo_id": os.path.basename(os.path.abspath(args.output_dir)),
            "base_model": base,
            "datasets": [self.data.dataset_name] if self.data.dataset_name and looks_like_repo_id(self.data.dataset_name)
            and not os.path.exists(self.data.dataset_name) else None,
            "training_data": f"Fine-tuned on `{source}` (images and captions).",
            "training": training,
            "adapter": "adapter" if ft.lora_rank else None,
        }
