"""A ShapesWorld extension with a shape the default model never saw: the heart ("heart", plural "hearts").

It is the data of the new-concept fine-tuning demo (docs/hub.md): `export_extension_imagefolder` writes an imagefolder
(metadata.jsonl) mixing scenes with hearts and ordinary ShapesWorld scenes (replay, so that the model keeps its old
skills); `detect_extended` is the ShapesEval detector taught one more shape; `new_shape_prompts` and
`evaluate_new_shape` score a pipeline on prompts with the new shape, with the seeding convention of
`dalle_hf.evaluation.evaluate_pipeline` (prompt i uses `torch.Generator().manual_seed(seed + i)`).

The base world (shapesworld.py) and detector (detector.py) are used as they are, never modified: this module has its
own heart template, placement, captions and shape classifier, and reuses their public pieces.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .shapesworld import (
    CELL_CENTERS,
    COLORS,
    IMAGE_SIZE,
    JITTER,
    MAX_PLACEMENT_TRIES,
    MIN_GAP,
    NUMBER_WORDS,
    PLURALS,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    CaptionSpec,
    ObjectSpec,
    ShapeObject,
    ShapesWorld,
    _clamp_center,
    _dilate,
    _free_cells,
    _shape_mask,
    caption_for,
    cell_row_col,
    render,
)

NEW_SHAPE = "heart"
NEW_PLURAL = "hearts"
EXT_SHAPES: tuple[str, ...] = (*SHAPES, NEW_SHAPE)
EXT_PLURALS: dict[str, str] = {**PLURALS, NEW_SHAPE: NEW_PLURAL}
#: Caption kinds of the scenes with a heart, and their weights.
NEW_KIND_WEIGHTS: dict[str, float] = {"one_object": 0.4, "counting": 0.2, "two_objects": 0.2, "relation": 0.2}


# ---- the heart ----------------------------------------------------------------------------------------------------


def heart_mask(size: int) -> np.ndarray:
    """Boolean (size, size) heart filling its box: two lobes at the top, the point at the bottom middle.

    The classic implicit heart (x^2 + y^2 - 1)^3 <= x^2 y^3 (y up), scaled to the box; a pixel is in when its centre
    is inside.
    """
    x_lo, x_hi, y_lo, y_hi = -1.1393, 1.1393, -1.0, 1.2360  # the curve's bounding box
    c = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    x = (x_lo + c * (x_hi - x_lo))[None, :]
    y = (y_hi - c * (y_hi - y_lo))[:, None]  # row 0 at the top
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


def shape_mask(shape: str, size: int) -> np.ndarray:
    """The mask of any extended shape (ShapesWorld's own templates for the old ones)."""
    return heart_mask(size) if shape == NEW_SHAPE else _shape_mask(shape, size)


_MASKS = {(s, n): shape_mask(s, SIZES[n]) for s in EXT_SHAPES for n in SIZES}
_HALOS = {k: _dilate(m, MIN_GAP) for k, m in _MASKS.items()}


def render_extended(objects: Sequence[ShapeObject]) -> np.ndarray:
    """Render objects of any extended shape as a (64, 64, 3) uint8 image (same colours and canvas as ShapesWorld)."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    for o in objects:
        mask = _MASKS[(o.shape, o.size)]
        n = mask.shape[0]
        y0, x0 = o.cy - n // 2, o.cx - n // 2
        if y0 < 0 or x0 < 0 or y0 + n > IMAGE_SIZE or x0 + n > IMAGE_SIZE:
            raise ValueError(f"object {o} does not fit inside the {IMAGE_SIZE}x{IMAGE_SIZE} canvas")
        image[y0:y0 + n, x0:x0 + n][mask] = COLORS[o.color]
    return image


# ---- captions and placement -----------------------------------------------------------------------------------------


def _check_ext_spec(spec: CaptionSpec) -> None:
    for o in spec.objects:
        if o.shape not in EXT_SHAPES:
            raise ValueError(f"shape={o.shape!r} is not one of {list(EXT_SHAPES)}")
        if o.color not in COLORS:
            raise ValueError(f"color={o.color!r} is not one of {list(COLORS)}")


def _phrase(o: ObjectSpec, with_size: bool = True, with_cell: bool = True) -> str:
    words = ["a"] + ([o.size] if with_size and o.size else []) + [o.color, o.shape]
    if with_cell and o.cell is not None:
        words.append(POSITION_PHRASES[o.cell])
    return " ".join(words)


def caption_for_extended(spec: CaptionSpec) -> str:
    """The caption of a spec in the ShapesWorld grammar, hearts allowed."""
    _check_ext_spec(spec)
    if all(o.shape in SHAPES for o in spec.objects):
        return caption_for(spec)
    if spec.kind == "one_object":
        return _phrase(spec.objects[0])
    if spec.kind == "two_objects":
        return " and ".join(_phrase(o, with_size=False) for o in spec.objects)
    if spec.kind == "relation":
        a, b = (_phrase(o, with_size=False, with_cell=False) for o in spec.objects)
        return f"{a} {RELATIONS[spec.relation]} {b}"
    if spec.kind == "counting":
        o = spec.objects[0]
        return f"{NUMBER_WORDS[spec.count]} {o.color} {EXT_PLURALS[o.shape]}"
    raise ValueError(f"kind={spec.kind!r} is not a caption kind")


def _fits(canvas: np.ndarray, o: ShapeObject) -> bool:
    mask = _MASKS[(o.shape, o.size)]
    n = mask.shape[0]
    y0, x0 = o.cy - n // 2 + MIN_GAP, o.cx - n // 2 + MIN_GAP
    return not (canvas[y0:y0 + n, x0:x0 + n] & mask).any()


def _stamp(canvas: np.ndarray, o: ShapeObject) -> None:
    halo = _HALOS[(o.shape, o.size)]
    n = halo.shape[0]
    y0, x0 = o.cy - n // 2 + MIN_GAP, o.cx - n // 2 + MIN_GAP
    canvas[y0:y0 + n, x0:x0 + n] |= halo


def realise_extended(spec: CaptionSpec, rng: np.random.Generator) -> tuple[ShapeObject, ...]:
    """Concrete objects for a spec with hearts (the placement rules of ShapesWorld: cells, jitter, gaps)."""
    _check_ext_spec(spec)
    specs = spec.object_specs()
    relation = spec.relation if spec.kind == "relation" else None
    for _ in range(MAX_PLACEMENT_TRIES):
        cells = _free_cells(rng, specs, relation)
        canvas = np.zeros((IMAGE_SIZE + 2 * MIN_GAP,) * 2, dtype=bool)
        objects = []
        for o, cell in zip(specs, cells):
            size = o.size if o.size is not None else tuple(SIZES)[int(rng.integers(len(SIZES)))]
            row, col = cell_row_col(cell)
            jx, jy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2))
            obj = ShapeObject(shape=o.shape, color=o.color, size=size, cell=cell,
                              cx=_clamp_center(CELL_CENTERS[col] + jx, SIZES[size]),
                              cy=_clamp_center(CELL_CENTERS[row] + jy, SIZES[size]))
            if not _fits(canvas, obj):
                break
            _stamp(canvas, obj)
            objects.append(obj)
        else:
            return tuple(objects)
    raise ValueError(f"spec {spec} cannot be placed without objects touching")


def draw_new_spec(rng: np.random.Generator, kind: str | None = None) -> CaptionSpec:
    """A random caption spec with at least one heart (any colour)."""
    colors = list(COLORS)
    if kind is None:
        kinds, weights = list(NEW_KIND_WEIGHTS), np.array(list(NEW_KIND_WEIGHTS.values()))
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    heart = ObjectSpec(colors[int(rng.integers(len(colors)))], NEW_SHAPE)
    if kind == "one_object":
        size = tuple(SIZES)[int(rng.integers(len(SIZES)))] if rng.random() < 0.5 else None
        cell = int(rng.integers(9)) if rng.random() < 0.5 else None
        return CaptionSpec(kind, (ObjectSpec(heart.color, NEW_SHAPE, size, cell),))
    if kind == "counting":
        return CaptionSpec(kind, (heart,), count=list(NUMBER_WORDS)[int(rng.integers(len(NUMBER_WORDS)))])
    c, s = TRAIN_PAIRS[int(rng.integers(len(TRAIN_PAIRS)))]
    pair = [heart, ObjectSpec(c, s)]
    if rng.random() < 0.5:
        pair.reverse()
    if kind == "two_objects":
        first = int(rng.integers(9))
        second = (first + 1 + int(rng.integers(8))) % 9
        return CaptionSpec(kind, (ObjectSpec(pair[0].color, pair[0].shape, None, first),
                                  ObjectSpec(pair[1].color, pair[1].shape, None, second)))
    if kind == "relation":
        return CaptionSpec(kind, tuple(pair), relation=list(RELATIONS)[int(rng.integers(len(RELATIONS)))])
    raise ValueError(f"kind={kind!r} is not one of {list(NEW_KIND_WEIGHTS)}")


class ExtensionWorld:
    """Scenes with hearts (fraction `new_fraction`) mixed with ordinary ShapesWorld training scenes (the rest).

    Scene i depends only on (seed, i). The ordinary scenes are `ShapesWorld(seed + 1)`'s, so they replay what the
    model was trained on (held-out pairs stay held out).
    """

    def __init__(self, seed: int = 0, new_fraction: float = 0.5):
        if not 0.0 <= new_fraction <= 1.0:
            raise ValueError(f"new_fraction={new_fraction!r} must be in [0, 1]")
        self.seed, self.new_fraction = int(seed), float(new_fraction)
        self.base = ShapesWorld(self.seed + 1)

    def scene(self, index: int) -> tuple[np.ndarray, str]:
        """(uint8 image, caption) of scene `index`."""
        rng = np.random.default_rng([self.seed, 7, int(index)])
        if rng.random() < self.new_fraction:
            spec = draw_new_spec(rng)
            return render_extended(realise_extended(spec, rng)), caption_for_extended(spec)
        scene = self.base.scene(index)
        return render(scene), scene.caption


def export_extension_imagefolder(path: str | os.PathLike, num_images: int, seed: int = 0, new_fraction: float = 0.5,
                                 overwrite: bool = False) -> Path:
    """Write `num_images` scenes of `ExtensionWorld(seed, new_fraction)` as PNGs + metadata.jsonl (atomically)."""
    from PIL import Image

    world = ExtensionWorld(seed, new_fraction)
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"path={str(path)!r} already exists and is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as meta:
            for i in range(num_images):
                image, caption = world.scene(i)
                name = f"{i:08d}.png"
                Image.fromarray(image).save(tmp / name, compress_level=1)
                meta.write(json.dumps({"file_name": name, "text": caption}) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---- detection ------------------------------------------------------------------------------------------------------

HEART_SKEW = -0.45  # skew below this (much wider in the upper half than in the lower half): heart
HEART_CENTROID = 0.45  # ... or mass this high up (symmetric shapes 0.5, triangles ~0.67)


def classify_shape_extended(mask: np.ndarray) -> str:
    """`classify_shape` with one more rule first: a shape that narrows to a point at the bottom is a heart.

    A heart is the only shape much wider in its upper half (skew ~ -1, centroid ~ 0.42); a triangle is the
    opposite (skew ~ +1); circles, squares and diamonds are symmetric (skew ~ 0).
    """
    from ..evaluation.detector import classify_shape, shape_features

    f = shape_features(mask)
    if f["skew"] <= HEART_SKEW or (f["centroid"] <= HEART_CENTROID and f["skew"] < 0):
        return NEW_SHAPE
    return classify_shape(mask)


def detect_extended(image: np.ndarray, min_area: int | None = None):
    """`dalle_hf.evaluation.detect` with the extended shape classifier (same regions, colours, sizes, cells)."""
    from ..evaluation import detector as d

    min_area = d.MIN_AREA if min_area is None else min_area
    image = d._as_uint8_64(image)
    labels, n = d.label_components(d.opacity_map(image) >= d.LOOSE_OPACITY)
    objects = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if len(ys) < min_area:
            continue
        y0, y1 = max(ys.min() - 1, 0), ys.max() + 2
        x0, x1 = max(xs.min() - 1, 0), xs.max() + 2
        region = labels[y0:y1, x0:x1] == k
        for mask, color in d._split_region(image[y0:y1, x0:x1], region, min_area):
            base = d._describe(mask, color, y0, x0)
            my, mx = np.nonzero(mask)
            shape = classify_shape_extended(mask[my.min():my.max() + 1, mx.min():mx.max() + 1])
            objects.append(d.DetectedObject(shape=shape, color=base.color, size=base.size, cell=base.cell,
                                            cx=base.cx, cy=base.cy, area=base.area))
    return objects


# ---- the new-shape benchmark ------------------------------------------------------------------------------------------


def new_shape_prompts() -> list[dict]:
    """32 prompts with the new shape: every colour alone ("a red heart"), in both sizes ("a small red heart"), and
    counted ("two red hearts" / "three ..."), as benchmark prompt dicts (id, category, prompt, spec)."""
    prompts = []

    def add(category, spec):
        prompts.append({"id": len(prompts), "category": category, "prompt": caption_for_extended(spec),
                        "spec": spec.to_dict()})

    colors = list(COLORS)
    for c in colors:
        add("new_single_object", CaptionSpec("one_object", (ObjectSpec(c, NEW_SHAPE),)))
    for c in colors:
        for size in SIZES:
            add("new_color_shape_size", CaptionSpec("one_object", (ObjectSpec(c, NEW_SHAPE, size),)))
    for i, c in enumerate(colors):
        add("new_counting", CaptionSpec("counting", (ObjectSpec(c, NEW_SHAPE),), count=2 + i % 2))
    return prompts


def evaluate_images_extended(prompts: Sequence[dict], images) -> dict:
    """Score one image per prompt with `detect_extended` (report format of `evaluate_images`)."""
    from ..evaluation.benchmark import _report, matches, to_uint8

    images = to_uint8(images)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    detections = [detect_extended(im) for im in images]
    passed = [matches(p["spec"], dets) for p, dets in zip(prompts, detections)]
    return _report(prompts, passed, detections)


def evaluate_new_shape(pipe, prompts: Sequence[dict] | None = None, seed: int = 0, batch_size: int = 16,
                       num_candidates: int | None = None, **pipe_kwargs) -> dict:
    """Generate one image per new-shape prompt (prompt i with seed + i, as `evaluate_pipeline`) and score it."""
    import torch

    from ..evaluation.benchmark import to_uint8

    prompts = list(prompts) if prompts is not None else new_shape_prompts()
    images = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        generators = [torch.Generator().manual_seed(seed + int(p["id"])) for p in batch]
        out = pipe(prompt=[p["prompt"] for p in batch], generator=generators, output_type="np",
                   num_candidates=num_candidates, **pipe_kwargs)
        images.extend(to_uint8(out.images))
    report = evaluate_images_extended(prompts, np.stack(images))
    report["settings"] = {"seed": seed, "num_candidates": num_candidates, **pipe_kwargs}
    return report


def render_new_shape_prompts(prompts: Sequence[dict] | None = None, seed: int = 0) -> np.ndarray:
    """Ground-truth renders of the new-shape prompts (what a perfect model would draw)."""
    prompts = list(prompts) if prompts is not None else new_shape_prompts()
    return np.stack([render_extended(realise_extended(CaptionSpec.from_dict(p["spec"]),
                                                      np.random.default_rng([seed, int(p["id"])])))
                     for p in prompts])
