"""ShapesEval: a fixed compositional benchmark for ShapesWorld text-to-image models.

The prompt set (`prompts.json`, made once by `build_prompts` and shipped) covers seven categories:

    single_object     "a red circle"                      every training colour-shape pair
    color_shape_size  "a small red circle"                every training pair in both sizes
    position          "a red circle in the top left"      8 random pairs in each of the 9 cells
    two_objects       "a red circle on the left and a blue square at the bottom"
    relation          "a red circle to the left of a blue square"    20 per relation
    counting          "three red circles"                 every training pair with two and with three
    held_out          held-out colour-shape pairs (never in training) in one- and two-object prompts

An image passes a prompt only when the detector finds exactly the objects the prompt asks for: each with its
requested colour, shape and (when given) size and cell, the requested count, the relation true, and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, replace
from itertools import permutations
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data.shapesworld import (
    HELD_PAIRS,
    IMAGE_SIZE,
    NUM_CELLS,
    RELATIONS,
    SIZES,
    TRAIN_PAIRS,
    CaptionSpec,
    ObjectSpec,
    ShapesWorld,
    caption_for,
    draw_spec,
    parse_caption,
    relation_holds,
    render,
    scene_from_spec,
)
from .detector import DetectedObject, detect

CATEGORIES: tuple[str, ...] = (
    "single_object", "color_shape_size", "position", "two_objects", "relation", "counting", "held_out",
)
PROMPTS_PATH = Path(__file__).with_name("prompts.json")
PROMPTS_SEED = 2024
PROMPTS_VERSION = 1
ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "cell")

# ----------------------------------------------------------------------------------------------------------------
# The prompt set


def _category_specs(rng: np.random.Generator) -> dict[str, list[CaptionSpec]]:
    one = lambda color, shape, size=None, cell=None: CaptionSpec(  # noqa: E731
        "one_object", (ObjectSpec(color, shape, size, cell),))
    specs: dict[str, list[CaptionSpec]] = {c: [] for c in CATEGORIES}
    specs["single_object"] = [one(c, s) for c, s in TRAIN_PAIRS]
    specs["color_shape_size"] = [one(c, s, size) for c, s in TRAIN_PAIRS for size in SIZES]
    for cell in range(NUM_CELLS):
        for i in rng.permutation(len(TRAIN_PAIRS))[:8]:
            specs["position"].append(one(*TRAIN_PAIRS[i], cell=cell))
    specs["two_objects"] = [draw_spec(rng, "two_objects") for _ in range(80)]
    specs["relation"] = [replace(draw_spec(rng, "relation"), relation=r) for r in RELATIONS for _ in range(20)]
    specs["counting"] = [CaptionSpec("counting", (ObjectSpec(c, s),), count=n) for n in (2, 3) for c, s in TRAIN_PAIRS]
    for c, s in HELD_PAIRS:
        specs["held_out"] += [one(c, s), one(c, s, "small"), one(c, s, "large"), one(c, s, cell=int(rng.integers(9)))]
    specs["held_out"] += [draw_spec(rng, "two_objects", held_out="only") for _ in range(24)]
    return specs


def build_prompts(seed: int = PROMPTS_SEED) -> list[dict]:
    """The benchmark prompts: [{"id", "category", "prompt", "spec"}], deterministic in `seed`.

    Random draws that repeat an earlier prompt are re-drawn, so every prompt is distinct.
    """
    rng = np.random.default_rng(seed)
    prompts: list[dict] = []
    seen: set[str] = set()
    for category, specs in _category_specs(rng).items():
        for spec in specs:
            text = caption_for(spec)
            for _ in range(1000):  # only randomly drawn prompts can collide: re-draw, keeping relation and count
                if text not in seen:
                    break
                redrawn = draw_spec(rng, spec.kind, held_out="only" if category == "held_out" else "exclude")
                spec = replace(redrawn, relation=spec.relation, count=spec.count)
                text = caption_for(spec)
            else:
                raise RuntimeError(f"cannot draw a new distinct {category} prompt")
            seen.add(text)
            prompts.append({"id": len(prompts), "category": category, "prompt": text, "spec": spec.to_dict()})
    return prompts


def write_prompts(path: str | os.PathLike = PROMPTS_PATH, seed: int = PROMPTS_SEED) -> Path:
    """Write `build_prompts(seed)` as JSON, one prompt a line (how the shipped prompts.json was made)."""
    head = json.dumps({"version": PROMPTS_VERSION, "seed": seed, "categories": list(CATEGORIES)})[:-1]
    rows = ",\n".join("  " + json.dumps(p) for p in build_prompts(seed))
    return _write_text_atomic(path, f"{head}, \"prompts\": [\n{rows}\n]}}\n")


def load_prompts(path: str | os.PathLike | None = None) -> list[dict]:
    """The shipped benchmark prompts (or those in `path`)."""
    with open(path or PROMPTS_PATH, encoding="utf-8") as f:
        return json.load(f)["prompts"]


def select_prompts(prompts: Sequence[dict], max_prompts: int | None) -> list[dict]:
    """At most `max_prompts` prompts, taken round-robin over categories so each stays represented."""
    prompts = list(prompts)
    if max_prompts is None:
        return prompts
    if isinstance(max_prompts, bool) or not isinstance(max_prompts, int) or max_prompts < 1:
        raise ValueError(f"max_prompts={max_prompts!r} must be a positive integer or None")
    if max_prompts >= len(prompts):
        return prompts
    queues: dict[str, list[dict]] = {}
    for p in prompts:
        queues.setdefault(p["category"], []).append(p)
    chosen: list[dict] = []
    while len(chosen) < max_prompts:
        for queue in queues.values():
            if queue and len(chosen) < max_prompts:
                chosen.append(queue.pop(0))
    return sorted(chosen, key=lambda p: p["id"])


def _normalise_prompts(prompts: Sequence[dict | str] | None) -> list[dict]:
    """Prompt dicts from the shipped set (None), prompt dicts, or plain ShapesWorld captions."""
    if prompts is None:
        return load_prompts()
    if isinstance(prompts, (str, dict)):
        raise ValueError(f"prompts={prompts!r} must be a list of prompt dicts or captions, not a single one")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            spec = parse_caption(p)
            out.append({"id": i, "category": spec.kind, "prompt": p, "spec": spec.to_dict()})
        elif isinstance(p, Mapping) and {"prompt", "spec"} <= set(p):
            out.append({"id": p.get("id", i), "category": p.get("category", p["spec"]["kind"]), **p})
        else:
            raise ValueError(f"prompts[{i}]={p!r} must be a caption string or a dict with 'prompt' and 'spec'")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def _object_ok(want: ObjectSpec, got: DetectedObject) -> bool:
    return (got.color == want.color and got.shape == want.shape
            and want.size in (None, got.size) and want.cell in (None, got.cell))


def matches(spec: CaptionSpec | Mapping, detected: Sequence[DetectedObject]) -> bool:
    """Whether the detected objects are exactly what `spec` asks for (free attributes may be anything)."""
    if isinstance(spec, Mapping):
        spec = CaptionSpec.from_dict(spec)
    wanted = spec.object_specs()
    if len(detected) != len(wanted):
        return False
    for order in permutations(detected):
        if not all(_object_ok(w, g) for w, g in zip(wanted, order)):
            continue
        if spec.kind == "relation" and not relation_holds(spec.relation, order[0].cell, order[1].cell):
            continue
        return True
    return False


def to_uint8(images: Any) -> np.ndarray:
    """Pipeline output (float numpy/torch (B, H, W, 3) in [0, 1], or uint8) -> uint8 numpy (B, H, W, 3)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _report(prompts: Sequence[dict], passed: Sequence[bool], detections: Sequence[list[DetectedObject]]) -> dict:
    categories: dict[str, dict] = {}
    for p, ok in zip(prompts, passed):
        c = categories.setdefault(p["category"], {"passed": 0, "total": 0})
        c["passed"] += int(ok)
        c["total"] += 1
    order = [c for c in CATEGORIES if c in categories] + sorted(set(categories) - set(CATEGORIES))
    categories = {c: {**categories[c], "accuracy": categories[c]["passed"] / categories[c]["total"]} for c in order}
    results = [{"id": p["id"], "category": p["category"], "prompt": p["prompt"], "passed": bool(ok),
                "detected": [asdict(d) for d in dets]}
               for p, ok, dets in zip(prompts, passed, detections)]
    return {
        "overall": float(np.mean(passed)) if len(passed) else float("nan"),
        "num_prompts": len(prompts),
        "categories": categories,
        "results": results,
    }


def evaluate_images(prompts: Sequence[dict | str] | None, images: Any) -> dict:
    """Score one image per prompt (uint8 (N, H, W, 3), or floats in [0, 1]); returns the report dict."""
    prompts = _normalise_prompts(prompts)
    images = to_uint8(images) if not isinstance(images, (list, tuple)) else [to_uint8(im) for im in images]
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; need one image per prompt")
    detections = [detect(im) for im in images]
    passed = [matches(p["spec"], d) for p, d in zip(prompts, detections)]
    return _report(prompts, passed, detections)


def render_prompts(prompts: Sequence[dict | str] | None = None, seed: int = 0) -> np.ndarray:
    """Ground-truth renders of prompts (uint8 (N, 64, 64, 3)): what a perfect model would draw."""
    prompts = _normalise_prompts(prompts)
    world = ShapesWorld(seed, held_out="include")
    images = [render(scene_from_spec(CaptionSpec.from_dict(p["spec"]), world.rng(int(p["id"])))) for p in prompts]
    return np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def evaluate_pipeline(pipe, prompts: Sequence[dict | str] | None = None, num_candidates: int | None = None,
                      batch_size: int = 16, seed: int = 0, max_prompts: int | None = None, progress: bool = True,
                      **pipe_kwargs) -> dict:
    """Generate one image per benchmark prompt with `pipe` and score it.

    Prompt `i` (its "id") is drawn with `torch.Generator().manual_seed(seed + i)`, so a subset (`max_prompts`,
    taken evenly over categories) gives the same images as the full run. Extra keyword arguments go to the pipeline
    (guidance_scale, temperature, top_k, ...). Returns the report: "overall", "categories" (accuracy per category),
    "results" (per prompt) and "settings".
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    if pipe_kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError(f"num_images_per_prompt={pipe_kwargs['num_images_per_prompt']!r} is not supported: the "
                         "benchmark scores one image per prompt (use num_candidates to rerank)")
    prompts = select_prompts(_normalise_prompts(prompts), max_prompts)
    images, start = [], time.perf_counter()
    with tqdm(total=len(prompts), desc="ShapesEval", unit="prompt", disable=not progress) as bar:
        for b in range(0, len(prompts), batch_size):
            batch = prompts[b:b + batch_size]
            generators = [torch.Generator().manual_seed(seed + int(p["id"])) for p in batch]
            out = pipe(prompt=[p["prompt"] for p in batch], generator=generators, output_type="np",
                       num_candidates=num_candidates, **pipe_kwargs)
            batch_images = to_uint8(out.images if hasattr(out, "images") else out[0])
            if len(batch_images) != len(batch):
                raise RuntimeError(f"pipeline returned {len(batch_images)} images for {len(batch)} prompts")
            images.extend(batch_images)
            bar.update(len(batch))
    elapsed = time.perf_counter() - start
    report = evaluate_images(prompts, images)
    report["settings"] = {"num_candidates": num_candidates, "seed": seed, "batch_size": batch_size,
                          "max_prompts": max_prompts, "elapsed_s": round(elapsed, 3),
                          **{k: _jsonable(v) for k, v in pipe_kwargs.items()}}
    return report


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


# ----------------------------------------------------------------------------------------------------------------
# Reconstruction quality of the image tokenizer


def _match_objects(truth, detected, max_dist: float = 8.0) -> list[DetectedObject | None]:
    """For each true object, the nearest unused detection within `max_dist` px of its centre (or None)."""
    free = list(detected)
    out = []
    for t in truth:
        dists = [math.hypot(d.cx - t.cx, d.cy - t.cy) for d in free]
        if dists and min(dists) <= max_dist:
            out.append(free.pop(int(np.argmin(dists))))
        else:
            out.append(None)
    return out


def detector_accuracy(scenes: Sequence, images: Any) -> dict:
    """How well the detector reads scenes back from images: per-attribute accuracy over true objects (a missed
    object counts as wrong in every attribute), object-count accuracy and exact-scene rate over images."""
    images = to_uint8(images)
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes")
    right = {a: 0 for a in ATTRIBUTES}
    total = count_ok = exact = 0
    for scene, image in zip(scenes, images):
        detected = detect(image)
        count_ok += len(detected) == len(scene.objects)
        key = lambda o: (o.shape, o.color, o.size, o.cell)  # noqa: E731
        exact += sorted(map(key, detected)) == sorted(map(key, scene.objects))
        for t, d in zip(scene.objects, _match_objects(scene.objects, detected)):
            total += 1
            for a in ATTRIBUTES:
                right[a] += d is not None and getattr(d, a) == getattr(t, a)
    n = max(len(scenes), 1)
    return {"accuracy": {a: right[a] / max(total, 1) for a in ATTRIBUTES}, "count": count_ok / n,
            "exact_scene": exact / n, "num_images": len(scenes), "num_objects": total}


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) images resized to (N, size, size, 3) (bilinear), or as they are when already that size."""
    if images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


@torch.no_grad()
def evaluate_reconstruction(alignment, num_images: int = 512, seed: int = 1234, batch_size: int = 64) -> dict:
    """Encode and decode `num_images` ShapesWorld scenes (all colour-shape pairs) with the image tokenizer.

    Scenes are resized to `alignment.config.image_size` when that is not 64. Returns detector accuracy per
    attribute on the reconstructions, count accuracy, exact-scene rate, PSNR (dB, on [0, 1] images, at the
    tokenizer's resolution) and codebook usage (fraction of the `alignment.config.codebook_size` codes used).
    """
    for name, value in (("num_images", num_images), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    param = next(alignment.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    world = ShapesWorld(seed, held_out="include")
    scenes = [world.scene(i) for i in range(num_images)]
    truth = _resize(np.stack([render(s) for s in scenes]), getattr(alignment.config, "image_size", IMAGE_SIZE))
    recon, used, psnrs = [], set(), []
    for b in range(0, num_images, batch_size):
        target = truth[b:b + batch_size]
        batch = torch.from_numpy(target).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        codes = alignment.encode(batch.to(device=device, dtype=dtype))
        used.update(torch.unique(codes).tolist())
        out = alignment.decode(codes).float().clamp(-1, 1).cpu()
        images01 = ((out + 1) / 2).permute(0, 2, 3, 1).numpy()
        mse = ((images01 - target / 255.0) ** 2).reshape(len(images01), -1).mean(1)
        psnrs.extend(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))
        recon.append(to_uint8(images01))
    report = detector_accuracy(scenes, np.concatenate(recon))
    report["psnr"] = float(np.mean(psnrs))
    report["codebook_usage"] = len(used) / alignment.config.codebook_size
    report["codes_used"] = len(used)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def format_table(report: Mapping) -> str:
    """The report as markdown: accuracy per category and overall, then reconstruction metrics if present."""
    lines = []
    if "categories" in report:
        lines += ["| category | prompts | accuracy |", "| --- | ---: | ---: |"]
        for name, c in report["categories"].items():
            lines.append(f"| {name} | {c['total']} | {100 * c['accuracy']:.1f}% |")
        lines.append(f"| **overall** | {report['num_prompts']} | **{100 * report['overall']:.1f}%** |")
    recon = report.get("reconstruction")
    if recon:
        if lines:
            lines.append("")
        lines += ["| reconstruction | value |", "| --- | ---: |"]
        for a, v in recon["accuracy"].items():
            lines.append(f"| {a} accuracy | {100 * v:.1f}% |")
        lines += [f"| object count | {100 * recon['count']:.1f}% |",
                  f"| exact scene | {100 * recon['exact_scene']:.1f}% |",
                  f"| PSNR | {recon['psnr']:.2f} dB |",
                  f"| codebook usage | {100 * recon['codebook_usage']:.1f}% ({recon['codes_used']} codes) |"]
    return "\n".join(lines)


def _write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to a temporary file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_report(path: str | os.PathLike, report: Mapping) -> Path:
    """Write a report as indented JSON, atomically (temporary file, then rename)."""
    return _write_text_atomic(path, json.dumps(report, indent=1, default=_jsonable) + "\n")
