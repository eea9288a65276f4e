"""One accelerate training loop, shared by every stage.

The loop owns what all stages have in common: seeding, warm-up + cosine schedules, gradient accumulation, bf16
autocast (through accelerate's `mixed_precision`), the tqdm bar, tensorboard logging, atomic checkpoints with
`accelerator.save_state` and `--resume`. A stage owns its models, its data and one `training_step`.

Distributed training (DDP, FSDP, DeepSpeed, several CPU processes) is accelerate's: launch with `accelerate launch`
or `torchrun`; nothing here talks to torch.distributed directly.

Debugging data sharding: with the environment variable `DALLE_HF_DEBUG_DATA_LOG=PATH`, every process appends JSON
lines to `PATH.rank{N}`: for the first `DEBUG_DATA_LOG_STEPS` steps of each stage (counted from the start or the
resume point) `{"stage", "step", "samples"}`, a short hash per sample of the batch (its caption, image and codes),
and at the end of each stage `{"stage", "step", "weights"}`, one hash of all the stage's trained weights. Ranks
that shard correctly log disjoint samples; ranks that stay in sync end with the same weights hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel, set_seed
from tqdm.auto import tqdm

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
DEBUG_DATA_LOG_ENV = "DALLE_HF_DEBUG_DATA_LOG"
DEBUG_DATA_LOG_STEPS = 3
_SAMPLE_KEYS = ("text", "pixel_values", "codes")  # what identifies a sample (not its padding-dependent tokens)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class TrainingArguments:
    """Settings of one stage's loop (the recipe fills one per stage)."""

    output_dir: str
    max_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    eval_every: int = 0
    resume: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "save_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "eval_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        for name, positive in (("learning_rate", True), ("max_grad_norm", True), ("weight_decay", False)):
            value = getattr(self, name)
            if not _is_real(value) or not (value > 0 if positive else value >= 0):  # NaN fails both
                raise ValueError(f"`{name}` must be {'positive' if positive else 'non-negative'}, got {value!r}.")
        if not _is_real(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio!r}.")


def make_accelerator(mixed_precision: str = "bf16", gradient_accumulation_steps: int = 1, project_dir: str = ".",
                     log_with: str | None = "tensorboard", cpu: bool | None = None) -> Accelerator:
    """The one Accelerator of a run. On machines without CUDA, `cpu=True` gives several CPU processes under torchrun."""
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"`mixed_precision` must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}.")
    if cpu is None:
        cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps,
                       project_dir=project_dir, log_with=log_with, cpu=cpu)


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def latest_checkpoint(checkpoint_root: str) -> tuple[int, str] | None:
    """The newest complete checkpoint (step, path). Incomplete ones never carry the final name."""
    if not os.path.isdir(checkpoint_root):
        return None
    found = [(int(m.group(1)), os.path.join(checkpoint_root, d))
             for d in os.listdir(checkpoint_root) if (m := CHECKPOINT_RE.match(d))]
    return max(found) if found else None


def save_checkpoint(accelerator: Accelerator, checkpoint_root: str, step: int, keep: int) -> str:
    """`save_state` into a temporary folder, then rename it: a kill at any moment leaves the last one intact."""
    final = os.path.join(checkpoint_root, f"step_{step}")
    tmp = os.path.join(checkpoint_root, f".tmp_step_{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(checkpoint_root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted((int(m.group(1)), d) for d in os.listdir(checkpoint_root) if (m := CHECKPOINT_RE.match(d)))
        for _, d in old[:-keep] if keep else []:
            shutil.rmtree(os.path.join(checkpoint_root, d), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def batch_fingerprints(batch: dict) -> list[str]:
    """A short hash per sample of a batch dict, from its caption / image / codes (tensors split along dim 0)."""
    keys = [k for k in _SAMPLE_KEYS if k in batch]
    if not keys:
        return []
    out = []
    for i in range(len(batch[keys[0]])):
        h = hashlib.sha1()
        for k in keys:
            v = batch[k][i]
            h.update(_tensor_bytes(v) if isinstance(v, torch.Tensor) else repr(v).encode())
        out.append(h.hexdigest()[:16])
    return out


def weights_fingerprint(modules) -> str:
    """One hash of the modules' state dicts (DDP and other wrappers removed)."""
    h = hashlib.sha1()
    for module in modules:
        for name, value in sorted(extract_model_from_parallel(module).state_dict().items()):
            h.update(name.encode())
            h.update(_tensor_bytes(value))
    return h.hexdigest()


def _debug_log(accelerator: Accelerator, record: dict) -> None:
    path = os.environ.get(DEBUG_DATA_LOG_ENV)
    if path:
        with open(f"{path}.rank{accelerator.process_index}", "a") as f:
            f.write(json.dumps(record) + "\n")


class Stage:
    """What a stage provides to the loop. Subclasses set `name` and implement the methods below."""

    name = "stage"
    resume_step = 0  # set by the loop before `setup`: the step it resumes from, so a stream can continue

    def setup(self, accelerator: Accelerator, args: TrainingArguments) -> None:
        """Build models, optimizers and data; `accelerator.prepare` them. Must set `self.optimizers`."""
        raise NotImplementedError

    def models(self) -> list[torch.nn.Module]:
        """The prepared trainable modules (used for gradient accumulation)."""
        raise NotImplementedError

    def next_batch(self):
        raise NotImplementedError

    def training_step(self, batch, step: int) -> dict[str, float]:
        """Forward, `accelerator.backward`, clip, step and zero the optimizers; return scalars to log."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, float]:
        return {}

    def save(self, output_dir: str) -> None:
        """Write the final weights (main process only is enough; called on every process)."""
        raise NotImplementedError


def run_stage(stage: Stage, accelerator: Accelerator, args: TrainingArguments) -> dict[str, float]:
    """Train `stage` to `args.max_steps`, resuming from the newest checkpoint in `args.output_dir` if asked."""
    set_seed(args.seed, device_specific=True)
    checkpoint_root = os.path.join(args.output_dir, "checkpoints")
    start = 0
    found = latest_checkpoint(checkpoint_root) if args.resume else None
    stage.resume_step = found[0] if found is not None else 0
    stage.setup(accelerator, args)
    schedule = warmup_cosine(args.warmup_steps, args.max_steps, args.min_lr_ratio)
    schedulers = [accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(opt, schedule)) for opt in stage.optimizers]
    if found is not None:
        start, path = found
        accelerator.load_state(path)
        set_seed(args.seed + start, device_specific=True)  # fresh data order after a resume
        accelerator.print(f"[{stage.name}] resumed from {path} at step {start}")
    bar = tqdm(total=args.max_steps, initial=start, desc=stage.name, disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    logs: dict[str, float] = {}
    debug_log = bool(os.environ.get(DEBUG_DATA_LOG_ENV))
    t0, seen = time.perf_counter(), 0
    for step in range(start, args.max_steps):
        for _ in range(args.gradient_accumulation_steps):
            batch = stage.next_batch()
            if debug_log and step - start < DEBUG_DATA_LOG_STEPS:
                _debug_log(accelerator, {"stage": stage.name, "step": step, "samples": batch_fingerprints(batch)})
            with accelerator.accumulate(*stage.models()):
                logs = stage.training_step(batch, step)
            seen += args.batch_size
        for scheduler in schedulers:
            scheduler.step()
        done = step + 1
        if done % args.log_every == 0 or done == args.max_steps:
            elapsed = time.perf_counter() - t0
            logs.update(lr=schedulers[0].get_last_lr()[0] if schedulers else 0.0,
                        samples_per_second=seen * accelerator.num_processes / max(elapsed, 1e-9))
            accelerator.log({f"{stage.name}/{k}": v for k, v in logs.items()}, step=done)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if "loss" in k})
        if args.eval_every and done % args.eval_every == 0:
            metrics = stage.evaluate(done)
            accelerator.log({f"{stage.name}/eval/{k}": v for k, v in metrics.items()}, step=done)
        if done % args.save_every == 0 and done < args.max_steps:
            save_checkpoint(accelerator, checkpoint_root, done, args.keep_checkpoints)
        bar.update(1)
    bar.close()
    if debug_log:
        _debug_log(accelerator, {"stage": stage.name, "step": args.max_steps,
                                 "weights": weights_fingerprint(stage.models())})
    accelerator.wait_for_everyone()
    stage.save(args.output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2, default=str)
        shutil.rmtree(checkpoint_root, ignore_errors=True)  # the final weights supersede the checkpoints
    accelerator.free_memory()  # the next stage prepares its own objects
    return logs
