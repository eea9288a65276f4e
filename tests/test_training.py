"""Training (dalle_hf/training): two CPU processes, kill and resume, a corrupt image, and the loop's pieces.

The end-to-end tests run `dalle-hf train --recipe tiny` in subprocesses (a few CPU-seconds each) with the debug hook
`DALLE_HF_DEBUG_DATA_LOG` (see dalle_hf/training/loop.py): every rank logs per-sample hashes of its first batches and
a hash of its final weights for each stage.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dalle_hf.training.loop import (
    CHECKPOINT_RE,
    DEBUG_DATA_LOG_ENV,
    DEBUG_DATA_LOG_STEPS,
    TrainingArguments,
    latest_checkpoint,
    warmup_cosine,
    weights_fingerprint,
)
from dalle_hf.training.recipe import get_recipe
from dalle_hf.training.stages import _SWAP_GROUPS, swap_attributes

STAGES = ("autoencoder", "decoder", "contrastive")
TIMEOUT = 540  # generous: the tests take a few CPU-seconds, but a busy machine stretches the wall time


def train_cmd(output_dir, *extra, launcher=()):
    return [*launcher, "-m", "dalle_hf.cli", "train", "--recipe", "tiny", "--output-dir", str(output_dir),
            "--no-tracking", *map(str, extra)]


def env_for(debug_log=None, **extra):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **extra)
    env.setdefault("OMP_NUM_THREADS", "1")
    if debug_log is not None:
        env[DEBUG_DATA_LOG_ENV] = str(debug_log)
    return env


def run(cmd, env, log_file):
    """Run to completion, output into `log_file`; returns (returncode, output)."""
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=TIMEOUT)
    return proc.returncode, Path(log_file).read_text(errors="replace")


def tail(text, n=4000):
    return text[-n:]


def read_debug_log(path, rank):
    with open(f"{path}.rank{rank}") as f:
        return [json.loads(line) for line in f]


def logged_samples(records, stage):
    """{step: [sample hashes]} of one stage (several runs into one log: steps never repeat within a stage)."""
    return {r["step"]: r["samples"] for r in records if r["stage"] == stage and "samples" in r}


def logged_weights(records, stage):
    return [r["weights"] for r in records if r["stage"] == stage and "weights" in r]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_pipeline_generates(pipeline_dir):
    from dalle_hf import DallePipeline

    pipe = DallePipeline.from_pretrained(pipeline_dir)
    images = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np").images
    size = pipe.alignment.config.image_size
    assert images.shape == (1, size, size, 3) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def assert_stages_done(output_dir, max_steps=None):
    for stage in STAGES:
        args = json.loads((output_dir / stage / "training_args.json").read_text())
        expected = max_steps or getattr(get_recipe("tiny"), f"{stage}_args")["max_steps"]
        assert args["max_steps"] == expected
        assert not (output_dir / stage / "checkpoints").exists()  # the final weights supersede them
    assert (output_dir / "pipeline" / "model_index.json").is_file()


# ---- 1. two processes on CPU -----------------------------------------------------------------------------------


def test_two_cpu_processes_shard_the_data_and_stay_in_sync(tmp_path):
    """torchrun, 2 ranks (accelerate MULTI_CPU, gloo): disjoint samples, identical final weights, a working pipeline."""
    from dalle_hf.models import DalleAlignmentModel, DalleImageDecoder, DalleTextEncoder
    from dalle_hf.training.stages import ContrastiveModel, TextToCodes

    out, log = tmp_path / "run", tmp_path / "data"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()))
    env = env_for(log, CUDA_VISIBLE_DEVICES="")  # two CPU ranks even where there is a GPU
    code, output = run(train_cmd(out, launcher=launcher), env, tmp_path / "out.txt")
    assert code == 0, tail(output)

    records = [read_debug_log(log, rank) for rank in (0, 1)]  # a rank-1 log exists only with two processes
    recipe = get_recipe("tiny")
    for stage in STAGES:
        batch_size = getattr(recipe, f"{stage}_args")["batch_size"]
        per_rank = [logged_samples(r, stage) for r in records]
        for samples in per_rank:
            assert sorted(samples) == list(range(DEBUG_DATA_LOG_STEPS))
            assert all(len(batch) == batch_size for batch in samples.values())
        seen = [{h for batch in samples.values() for h in batch} for samples in per_rank]
        assert seen[0].isdisjoint(seen[1]), f"{stage}: the two ranks trained on the same samples"
        weights = [logged_weights(r, stage) for r in records]
        assert len(weights[0]) == 1 and weights[0] == weights[1], f"{stage}: the ranks ended with different weights"

    # what was saved is what both ranks ended with
    saved_decoder = TextToCodes(DalleTextEncoder.from_pretrained(out / "decoder" / "text_encoder"),
                                DalleImageDecoder.from_pretrained(out / "decoder" / "image_decoder"))
    assert weights_fingerprint([saved_decoder]) == logged_weights(records[0], "decoder")[0]
    saved_contrastive = ContrastiveModel(DalleTextEncoder.from_pretrained(out / "contrastive" / "text_encoder"),
                                         DalleAlignmentModel.from_pretrained(out / "contrastive" / "alignment"))
    assert weights_fingerprint([saved_contrastive]) == logged_weights(records[0], "contrastive")[0]

    assert_stages_done(out)
    assert_pipeline_generates(out / "pipeline")


# ---- 2. kill and resume ---------------------------------------------------------------------------------------


def test_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path):
    max_steps = 40  # per stage; the tiny recipe saves the autoencoder every 3 steps
    out, log = tmp_path / "run", tmp_path / "data"
    cmd = train_cmd(out, "--max-steps", max_steps, launcher=(sys.executable,))
    checkpoints = out / "autoencoder" / "checkpoints"

    with open(tmp_path / "first.txt", "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env_for(log), start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while latest_checkpoint(str(checkpoints)) is None:
            assert proc.poll() is None, "the run ended before its first checkpoint:\n" + tail(
                (tmp_path / "first.txt").read_text())
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mid-stage, possibly mid-save
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # only complete checkpoints carry the final name; anything half-written is a .tmp folder
    entries = os.listdir(checkpoints)
    complete = sorted(int(m.group(1)) for e in entries if (m := CHECKPOINT_RE.match(e)))
    assert complete and all(e.startswith(".tmp") or CHECKPOINT_RE.match(e) for e in entries), entries
    for step in complete:
        folder = checkpoints / f"step_{step}"
        assert json.loads((folder / "trainer_state.json").read_text()) == {"step": step}
        assert (folder / "model.safetensors").is_file() and (folder / "optimizer.bin").is_file()
    resume_step = complete[-1]
    assert 0 < resume_step < max_steps
    assert not (out / "autoencoder" / "training_args.json").exists() and not (out / "pipeline").exists()

    code, output = run(cmd, env_for(log), tmp_path / "second.txt")
    assert code == 0, tail(output)
    assert f"[autoencoder] resumed from {checkpoints / f'step_{resume_step}'} at step {resume_step}" in output
    assert_stages_done(out, max_steps)
    assert_pipeline_generates(out / "pipeline")

    # the resumed run continues the data stream instead of replaying the samples the first run started with
    samples = logged_samples(read_debug_log(log, 0), "autoencoder")
    first = {h for step in range(DEBUG_DATA_LOG_STEPS) for h in samples[step]}
    resumed = {h for step in range(resume_step, resume_step + DEBUG_DATA_LOG_STEPS) for h in samples[step]}
    assert resumed and first.isdisjoint(resumed)


# ---- 3. a corrupt image in the training folder ----------------------------------------------------------------


COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 230), "yellow": (240, 220, 40)}


def shape_image(colour, shape, size=64):
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    box = (16, 16, 48, 48)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def test_corrupt_image_in_folder_is_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for colour in COLOURS:
        for shape in ("circle", "square"):
            name = f"{colour}_{shape}.png"
            shape_image(colour, shape).save(folder / name)
            rows.append({"file_name": name, "text": f"a {colour} {shape}"})
    valid = (folder / "red_circle.png").read_bytes()
    (folder / "broken.png").write_bytes(valid[: len(valid) // 2])  # truncated PNG
    rows.insert(3, {"file_name": "broken.png", "text": "a blue circle"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "run"
    code, output = run(train_cmd(out, "--train-data-dir", folder, launcher=(sys.executable,)), env_for(),
                       tmp_path / "out.txt")
    assert code == 0, tail(output)
    warnings = [line for line in output.splitlines() if "Skipping" in line and "broken.png" in line]
    assert warnings, tail(output)
    assert all("unreadable image" in line for line in warnings)
    assert not any("Skipping" in line and "broken.png" not in line for line in output.splitlines())
    assert_stages_done(out)
    assert_pipeline_generates(out / "pipeline")


# ---- 4. the loop's pieces -------------------------------------------------------------------------------------


def test_warmup_cosine_shape():
    warmup, total, floor = 10, 110, 0.1
    f = warmup_cosine(warmup, total, floor)
    ramp = [f(s) for s in range(warmup)]
    assert ramp == pytest.approx([(s + 1) / warmup for s in range(warmup)])  # linear, never 0, reaches 1
    assert f(warmup) == pytest.approx(1.0)
    assert f(warmup + (total - warmup) // 2) == pytest.approx((1 + floor) / 2)  # cosine: half-way at the middle
    decay = [f(s) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert f(total) == pytest.approx(floor) and f(10 * total) == pytest.approx(floor)  # flat after the end
    assert min(decay) >= floor
    assert warmup_cosine(0, 5, 0.0)(0) == pytest.approx(1.0)  # no warm-up: the full rate at once


def test_latest_checkpoint_ignores_incomplete_and_other_folders(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(str(root)) is None  # no folder yet
    root.mkdir()
    assert latest_checkpoint(str(root)) is None
    (root / ".tmp_step_30").mkdir()
    assert latest_checkpoint(str(root)) is None  # a save that was killed half-way
    for name in ("step_3", "step_12", "step_9", ".tmp_step_40", "step_x", "step_5_old", "logs"):
        (root / name).mkdir()
    assert latest_checkpoint(str(root)) == (12, str(root / "step_12"))  # numeric, not lexicographic order


@pytest.mark.parametrize("bad", [
    dict(max_steps=0), dict(max_steps=-5), dict(max_steps=2.5), dict(max_steps=True), dict(batch_size=0),
    dict(gradient_accumulation_steps=0), dict(save_every=0), dict(log_every=-1), dict(warmup_steps=-1),
    dict(eval_every=-1), dict(keep_checkpoints=-1), dict(learning_rate=0), dict(learning_rate=-1e-3),
    dict(learning_rate=math.nan), dict(learning_rate="1e-3"), dict(max_grad_norm=0), dict(weight_decay=-0.1),
    dict(min_lr_ratio=-0.1), dict(min_lr_ratio=1.5),
])
def test_training_arguments_reject_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainingArguments(output_dir="x", **bad)


def test_training_arguments_accept_the_recipes():
    for name in ("shapes", "tiny", "shapes-continue", "tiny-continue"):
        recipe = get_recipe(name)
        for stage in STAGES:
            TrainingArguments(output_dir="x", **getattr(recipe, f"{stage}_args"))
    TrainingArguments(output_dir="x", warmup_steps=0, eval_every=0, keep_checkpoints=0, min_lr_ratio=0.0,
                      weight_decay=0.0)


# ---- 4. continuing a trained pipeline ---------------------------------------------------------------------------


def test_continuation_recipe_trains_on_from_a_pipeline_and_keeps_its_tokenizer_and_autoencoder(tmp_path):
    from safetensors.torch import load_file

    env = env_for()
    code, out = run([sys.executable, *train_cmd(tmp_path / "base")], env, tmp_path / "base.log")
    assert code == 0, tail(out)
    base = tmp_path / "base" / "pipeline"
    cmd = [sys.executable, "-m", "dalle_hf.cli", "train", "--recipe", "tiny-continue", "--init-from", str(base),
           "--output-dir", str(tmp_path / "more"), "--seed", "1", "--no-tracking"]
    code, out = run(cmd, env, tmp_path / "more.log")
    assert code == 0, tail(out)
    more = tmp_path / "more" / "pipeline"
    assert not (tmp_path / "more" / "autoencoder").exists()  # the autoencoder is taken as it is
    assert (more / "tokenizer" / "tokenizer.json").read_text() == (base / "tokenizer" / "tokenizer.json").read_text()

    def weights(folder, component):
        return load_file(str(folder / component / "model.safetensors"))

    old, new = weights(base, "alignment"), weights(more, "alignment")
    for name in old:  # the autoencoder is frozen; the contrastive head trains on
        same = torch.equal(old[name], new[name])
        assert same == (name.split(".")[0] in ("encoder", "quantizer", "decoder")), name
    old, new = weights(base, "image_decoder"), weights(more, "image_decoder")
    assert old.keys() == new.keys() and any(not torch.equal(old[k], new[k]) for k in old)
    assert_pipeline_generates(more)


def test_continuation_recipe_and_init_from_must_go_together(tmp_path):
    env = env_for()
    code, out = run([sys.executable, "-m", "dalle_hf.cli", "train", "--recipe", "tiny-continue", "--output-dir",
                     str(tmp_path / "a"), "--no-tracking"], env, tmp_path / "a.log")
    assert code != 0 and "needs --init-from" in out
    code, out = run([sys.executable, *train_cmd(tmp_path / "b", "--init-from", tmp_path)], env, tmp_path / "b.log")
    assert code != 0 and "does not take --init-from" in out
    from dalle_hf.training.recipe import run_recipe

    with pytest.raises(ValueError, match="not a pipeline folder"):
        run_recipe("tiny-continue", str(tmp_path / "c"), accelerator=None, init_from=str(tmp_path))


def test_swap_attributes_swaps_the_words_of_two_colour_captions():
    from dalle_hf.data import sample_captions

    colours = set(_SWAP_GROUPS[0])
    captions = [c for c in sample_captions(300, seed=0, held_out="include") if len(colours & set(c.split())) >= 2]
    assert len(captions) > 50
    for i, caption in enumerate(captions):
        negative = swap_attributes(caption, random.Random(i))
        assert negative != caption
        assert Counter(negative.split()) == Counter(caption.split()), (caption, negative)  # a swap, not a change
    rng = random.Random(0)
    assert swap_attributes("a red circle above a blue square", rng) in {
        "a blue circle above a red square", "a red square above a blue circle"}  # colours or shapes swapped
    assert swap_attributes("two", random.Random(0)) == "three"  # nothing to swap: one word changes
    assert swap_attributes("hello world", random.Random(0)) == "hello world"  # no attribute words


def test_swap_attributes_changes_one_word_when_nothing_can_be_swapped():
    for i, caption in enumerate(["a red circle", "three pink diamonds", "a small blue square on the left"]):
        negative = swap_attributes(caption, random.Random(i))
        before, after = caption.split(), negative.split()
        assert len(before) == len(after) and sum(a != b for a, b in zip(before, after)) == 1
