"""ShapesWorld: a tiny, deterministic world of coloured shapes with captions.

Every scene is a 64x64 RGB image on a white background holding one to three flat-coloured shapes, placed on a
3x3 grid, together with a lower-case caption that names exactly what is drawn. Four caption forms exist:

    one_object   "a small red circle in the top left"   (size word and position phrase are optional)
    two_objects  "a red circle on the left and a blue square at the bottom"
    relation     "a red circle to the left of a blue square"
    counting     "three green triangles"

A caption is first drawn as a structured `CaptionSpec`, then turned into text (`caption_for`) and realised as
concrete objects (`realise`). Scene `i` of a `ShapesWorld(seed)` depends only on `(seed, i)`, so any number of
workers can shard the stream by index and still produce the same data. Rendering is pure numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------
# The world's vocabulary

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 0),
    "yellow": (235, 200, 0),
    "green": (30, 160, 60),
    "cyan": (0, 180, 200),
    "blue": (30, 70, 220),
    "purple": (130, 50, 190),
    "pink": (235, 90, 170),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
SIZES: dict[str, int] = {"small": 14, "large": 24}
CELL_CENTERS: tuple[int, ...] = (11, 32, 53)
NUM_CELLS = 9
POSITION_PHRASES: tuple[str, ...] = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)
RELATIONS: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three"}
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("yellow", "circle"), ("cyan", "diamond"), ("orange", "square")}
)
KINDS: tuple[str, ...] = ("one_object", "two_objects", "relation", "counting")
DEFAULT_WEIGHTS: dict[str, float] = {"one_object": 0.25, "two_objects": 0.3, "relation": 0.25, "counting": 0.2}
HELD_OUT_MODES: tuple[str, ...] = ("exclude", "only", "include")
JITTER = 2  # max shift of an object's centre from its cell centre, in pixels
MARGIN = 1  # min distance between an object and the canvas border
MIN_GAP = 2  # min number of white pixels between two objects (Chebyshev distance)
MAX_PLACEMENT_TRIES = 1000

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
HELD_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p in HELD_OUT_PAIRS)


def cell_row_col(cell: int) -> tuple[int, int]:
    """(row, column) of a grid cell 0..8, row-major from the top left."""
    return cell // 3, cell % 3


def relation_holds(relation: str, cell_a: int, cell_b: int) -> bool:
    """Whether object A in `cell_a` stands in `relation` to object B in `cell_b` (strict row/column order)."""
    (ra, ca), (rb, cb) = cell_row_col(cell_a), cell_row_col(cell_b)
    if relation == "left_of":
        return ca < cb
    if relation == "right_of":
        return ca > cb
    if relation == "above":
        return ra < rb
    if relation == "below":
        return ra > rb
    raise ValueError(f"relation={relation!r} is not one of {sorted(RELATIONS)}")


RELATION_CELLS: dict[str, tuple[tuple[int, int], ...]] = {
    rel: tuple((a, b) for a in range(NUM_CELLS) for b in range(NUM_CELLS) if a != b and relation_holds(rel, a, b))
    for rel in RELATIONS
}

# ----------------------------------------------------------------------------------------------------------------
# Structured captions and scenes


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a caption asks for it; `size` and `cell` are None when the caption leaves them free."""

    color: str
    shape: str
    size: str | None = None
    cell: int | None = None


@dataclass(frozen=True)
class CaptionSpec:
    """The content of a caption. Counting captions hold one object spec repeated `count` times."""

    kind: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    count: int | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "objects": [asdict(o) for o in self.objects],
                "relation": self.relation, "count": self.count}

    @classmethod
    def from_dict(cls, d: Mapping) -> "CaptionSpec":
        objects = tuple(ObjectSpec(**o) for o in d["objects"])
        return cls(kind=d["kind"], objects=objects, relation=d.get("relation"), count=d.get("count"))

    def object_specs(self) -> list[ObjectSpec]:
        """One spec per object in the scene (counting captions expand to `count` copies)."""
        return list(self.objects) * (self.count if self.kind == "counting" else 1)


@dataclass(frozen=True)
class ShapeObject:
    """A concrete object: its bounding box is `SIZES[size]` px wide, centred on (cx, cy) in pixel-edge units."""

    shape: str
    color: str
    size: str
    cell: int
    cx: int
    cy: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    caption: str
    kind: str
    spec: CaptionSpec | None = field(default=None, compare=False)


def _check_spec(spec: CaptionSpec) -> None:
    if spec.kind not in KINDS:
        raise ValueError(f"kind={spec.kind!r} is not one of {list(KINDS)}")
    expected = {"one_object": 1, "two_objects": 2, "relation": 2, "counting": 1}[spec.kind]
    if len(spec.objects) != expected:
        raise ValueError(f"a {spec.kind} caption needs {expected} object(s), got {len(spec.objects)}")
    for o in spec.objects:
        if o.color not in COLORS:
            raise ValueError(f"color={o.color!r} is not one of {list(COLORS)}")
        if o.shape not in SHAPES:
            raise ValueError(f"shape={o.shape!r} is not one of {list(SHAPES)}")
        if o.size is not None and o.size not in SIZES:
            raise ValueError(f"size={o.size!r} is not one of {list(SIZES)} or None")
        if o.cell is not None and o.cell not in range(NUM_CELLS):
            raise ValueError(f"cell={o.cell!r} is not in 0..{NUM_CELLS - 1} or None")
    if spec.kind == "relation" and spec.relation not in RELATIONS:
        raise ValueError(f"relation={spec.relation!r} is not one of {list(RELATIONS)}")
    if spec.kind == "counting" and spec.count not in NUMBER_WORDS:
        raise ValueError(f"count={spec.count!r} is not one of {list(NUMBER_WORDS)}")


def _object_phrase(o: ObjectSpec, with_size: bool = True, with_cell: bool = True) -> str:
    words = ["a"]
    if with_size and o.size is not None:
        words.append(o.size)
    words += [o.color, o.shape]
    if with_cell and o.cell is not None:
        words.append(POSITION_PHRASES[o.cell])
    return " ".join(words)


def caption_for(spec: CaptionSpec) -> str:
    """The caption text of a spec."""
    _check_spec(spec)
    if spec.kind == "one_object":
        return _object_phrase(spec.objects[0])
    if spec.kind == "two_objects":
        a, b = (_object_phrase(o, with_size=False) for o in spec.objects)
        return f"{a} and {b}"
    if spec.kind == "relation":
        a, b = (_object_phrase(o, with_size=False, with_cell=False) for o in spec.objects)
        return f"{a} {RELATIONS[spec.relation]} {b}"
    o = spec.objects[0]
    return f"{NUMBER_WORDS[spec.count]} {o.color} {PLURALS[o.shape]}"


def _parse_object(words: list[str], allow_size: bool, allow_cell: bool) -> ObjectSpec:
    """Parse "a [size] color shape [position phrase]" (exactly these words)."""
    bad = ValueError(f"cannot parse object phrase {' '.join(words)!r}")
    if len(words) < 3 or words[0] != "a":
        raise bad
    rest = words[1:]
    size = None
    if allow_size and rest[0] in SIZES:
        size, rest = rest[0], rest[1:]
    if len(rest) < 2 or rest[0] not in COLORS or rest[1] not in SHAPES:
        raise bad
    color, shape, tail = rest[0], rest[1], " ".join(rest[2:])
    cell = None
    if tail:
        if not allow_cell or tail not in POSITION_PHRASES:
            raise bad
        cell = POSITION_PHRASES.index(tail)
    return ObjectSpec(color=color, shape=shape, size=size, cell=cell)


def parse_caption(caption: str) -> CaptionSpec:
    """Read a ShapesWorld caption back into its `CaptionSpec`; raises ValueError outside the caption grammar."""
    if not isinstance(caption, str):
        raise ValueError(f"caption={caption!r} must be a string")
    words = caption.strip().lower().split()
    if len(words) == 3 and words[0] in NUMBER_WORDS.values() and words[1] in COLORS:
        shape = next((s for s, p in PLURALS.items() if p == words[2]), None)
        if shape is not None:
            count = next(n for n, w in NUMBER_WORDS.items() if w == words[0])
            return CaptionSpec("counting", (ObjectSpec(words[1], shape),), count=count)
    text = " ".join(words)
    for rel, phrase in RELATIONS.items():
        head, sep, tail = text.partition(f" {phrase} ")
        if sep and tail.startswith("a "):
            try:
                a = _parse_object(head.split(), allow_size=False, allow_cell=False)
                b = _parse_object(tail.split(), allow_size=False, allow_cell=False)
            except ValueError:
                continue
            return CaptionSpec("relation", (a, b), relation=rel)
    head, sep, tail = text.partition(" and ")
    if sep:
        a = _parse_object(head.split(), allow_size=False, allow_cell=True)
        b = _parse_object(tail.split(), allow_size=False, allow_cell=True)
        return CaptionSpec("two_objects", (a, b))
    try:
        return CaptionSpec("one_object", (_parse_object(words, allow_size=True, allow_cell=True),))
    except ValueError:
        raise ValueError(f"caption={caption!r} is not a ShapesWorld caption") from None


# ----------------------------------------------------------------------------------------------------------------
# Shape templates and rendering


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask: a pixel belongs to the shape when its centre lies inside it."""
    c = (np.arange(size) + 0.5) - size / 2  # pixel-centre offsets from the box centre
    x, y = c[None, :], c[:, None]
    r = size / 2
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "triangle":  # apex at the top middle, base along the bottom edge
        return np.abs(x) <= (y + r) / 2
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= r
    raise ValueError(f"shape={shape!r} is not one of {list(SHAPES)}")


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (Chebyshev) dilation, growing the array by `radius` on each side."""
    h, w = mask.shape
    out = np.zeros((h + 2 * radius, w + 2 * radius), dtype=bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out[dy:dy + h, dx:dx + w] |= mask
    return out


_MASKS = {(s, n): _shape_mask(s, SIZES[n]) for s in SHAPES for n in SIZES}
_HALOS = {k: _dilate(m, MIN_GAP) for k, m in _MASKS.items()}  # the object plus the gap it keeps free


def _clamp_center(center: int, size: int) -> int:
    half = size // 2
    return min(max(center, MARGIN + half), IMAGE_SIZE - MARGIN - half)


def render(scene: Scene | Sequence[ShapeObject]) -> np.ndarray:
    """Render a scene (or a list of objects) as a (64, 64, 3) uint8 RGB image."""
    objects = scene.objects if isinstance(scene, Scene) else scene
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    for o in objects:
        mask = _MASKS[(o.shape, o.size)]
        n = mask.shape[0]
        y0, x0 = o.cy - n // 2, o.cx - n // 2
        if y0 < 0 or x0 < 0 or y0 + n > IMAGE_SIZE or x0 + n > IMAGE_SIZE:
            raise ValueError(f"object {o} does not fit inside the {IMAGE_SIZE}x{IMAGE_SIZE} canvas")
        image[y0:y0 + n, x0:x0 + n][mask] = COLORS[o.color]
    return image


# ----------------------------------------------------------------------------------------------------------------
# Drawing specs and placing objects


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _pick_weighted(rng: np.random.Generator, names: Sequence[str], weights: Sequence[float]) -> str:
    cdf = np.cumsum(weights) / np.sum(weights)
    return names[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(names) - 1)]


def _fits(halo_canvas: np.ndarray, o: ShapeObject) -> bool:
    mask = _MASKS[(o.shape, o.size)]
    n = mask.shape[0]
    y0, x0 = o.cy - n // 2 + MIN_GAP, o.cx - n // 2 + MIN_GAP  # halo canvas is padded by MIN_GAP
    return not (halo_canvas[y0:y0 + n, x0:x0 + n] & mask).any()


def _stamp(halo_canvas: np.ndarray, o: ShapeObject) -> None:
    halo = _HALOS[(o.shape, o.size)]
    n = halo.shape[0]
    y0, x0 = o.cy - n // 2 + MIN_GAP, o.cx - n // 2 + MIN_GAP
    halo_canvas[y0:y0 + n, x0:x0 + n] |= halo


def _free_cells(rng: np.random.Generator, specs: Sequence[ObjectSpec], relation: str | None) -> list[int]:
    """Cells for the specs: fixed ones kept, free ones drawn distinct (satisfying `relation` for a pair)."""
    if relation is not None:
        return list(_pick(rng, RELATION_CELLS[relation]))
    taken = {o.cell for o in specs if o.cell is not None}
    if len(taken) != sum(o.cell is not None for o in specs):
        raise ValueError(f"objects {list(specs)} share a cell")
    free = [c for c in range(NUM_CELLS) if c not in taken]
    cells = []
    for o in specs:
        if o.cell is None:
            cells.append(free.pop(int(rng.integers(len(free)))))
        else:
            cells.append(o.cell)
    return cells


def _place_once(rng: np.random.Generator, specs: Sequence[ObjectSpec], relation: str | None) -> list[ShapeObject] | None:
    cells = _free_cells(rng, specs, relation)
    halo_canvas = np.zeros((IMAGE_SIZE + 2 * MIN_GAP,) * 2, dtype=bool)
    objects = []
    for o, cell in zip(specs, cells):
        size = o.size if o.size is not None else _pick(rng, tuple(SIZES))
        row, col = cell_row_col(cell)
        jx, jy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2))
        cx = _clamp_center(CELL_CENTERS[col] + jx, SIZES[size])
        cy = _clamp_center(CELL_CENTERS[row] + jy, SIZES[size])
        obj = ShapeObject(shape=o.shape, color=o.color, size=size, cell=cell, cx=cx, cy=cy)
        if not _fits(halo_canvas, obj):
            return None
        _stamp(halo_canvas, obj)
        objects.append(obj)
    return objects


def realise(spec: CaptionSpec, rng: np.random.Generator) -> tuple[ShapeObject, ...]:
    """Concrete objects for a spec: free sizes/cells drawn at random, re-drawn until no two objects touch."""
    _check_spec(spec)
    specs = spec.object_specs()
    for _ in range(MAX_PLACEMENT_TRIES):
        objects = _place_once(rng, specs, spec.relation if spec.kind == "relation" else None)
        if objects is not None:
            return tuple(objects)
    raise ValueError(f"spec {spec} cannot be placed without objects touching")


def _draw_pairs(rng: np.random.Generator, n: int, held_out: str) -> list[tuple[str, str]]:
    """`n` distinct (color, shape) pairs; with held_out="only", one of them (at random) is a held-out pair."""
    if held_out == "exclude":
        pool = list(TRAIN_PAIRS)
    else:
        pool = list(ALL_PAIRS)
    forced = _pick(rng, HELD_PAIRS) if held_out == "only" else None
    pairs = []
    for _ in range(n):
        candidates = [p for p in pool if p not in pairs and p != forced]
        pairs.append(_pick(rng, candidates))
    if forced is not None:
        pairs[int(rng.integers(n))] = forced
    return pairs


def draw_spec(rng: np.random.Generator, kind: str, held_out: str = "exclude") -> CaptionSpec:
    """Draw a random caption spec of the given kind."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {list(KINDS)}")
    if held_out not in HELD_OUT_MODES:
        raise ValueError(f"held_out={held_out!r} is not one of {list(HELD_OUT_MODES)}")
    if kind == "one_object":
        (color, shape), = _draw_pairs(rng, 1, held_out)
        size = _pick(rng, tuple(SIZES)) if rng.random() < 0.5 else None
        cell = int(rng.integers(NUM_CELLS)) if rng.random() < 0.5 else None
        return CaptionSpec(kind, (ObjectSpec(color, shape, size, cell),))
    if kind == "two_objects":
        pairs = _draw_pairs(rng, 2, held_out)
        first = int(rng.integers(NUM_CELLS))
        second = (first + 1 + int(rng.integers(NUM_CELLS - 1))) % NUM_CELLS  # any other cell
        cells = (first, second)
        return CaptionSpec(kind, tuple(ObjectSpec(c, s, None, cell) for (c, s), cell in zip(pairs, cells)))
    if kind == "relation":
        pairs = _draw_pairs(rng, 2, held_out)
        return CaptionSpec(kind, tuple(ObjectSpec(c, s) for c, s in pairs), relation=_pick(rng, tuple(RELATIONS)))
    (color, shape), = _draw_pairs(rng, 1, held_out)
    return CaptionSpec(kind, (ObjectSpec(color, shape),), count=_pick(rng, tuple(NUMBER_WORDS)))


def scene_from_spec(spec: CaptionSpec, rng: np.random.Generator) -> Scene:
    """A scene that shows exactly what `spec` asks for."""
    return Scene(objects=realise(spec, rng), caption=caption_for(spec), kind=spec.kind, spec=spec)


# ----------------------------------------------------------------------------------------------------------------
# The world


def _check_seed(seed: int, name: str = "seed") -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name}={seed!r} must be a non-negative integer")
    return int(seed)


def _check_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights={weights!r} must be a mapping from caption kind to weight")
    unknown = set(weights) - set(KINDS)
    if unknown:
        raise ValueError(f"weights has unknown kinds {sorted(unknown)}; allowed: {list(KINDS)}")
    out = {k: float(weights.get(k, 0.0)) for k in KINDS}
    if any(not np.isfinite(w) or w < 0 for w in out.values()) or sum(out.values()) <= 0:
        raise ValueError(f"weights={dict(weights)!r} must be finite, non-negative and not all zero")
    return out


class ShapesWorld:
    """A deterministic stream of scenes.

    seed: any non-negative integer; scene `i` is a function of `(seed, i)` only.
    held_out: "exclude" (training: the held-out colour-shape pairs never appear), "only" (every scene holds at
        least one held-out pair) or "include" (all pairs).
    weights: relative frequency of each caption kind, e.g. {"one_object": 1, "counting": 1}; missing kinds get 0.
    """

    def __init__(self, seed: int = 0, held_out: str = "exclude", weights: Mapping[str, float] | None = None):
        self.seed = _check_seed(seed)
        if held_out not in HELD_OUT_MODES:
            raise ValueError(f"held_out={held_out!r} is not one of {list(HELD_OUT_MODES)}")
        self.held_out = held_out
        self.weights = _check_weights(weights)
        self._kinds = [k for k in KINDS if self.weights[k] > 0]
        self._kind_weights = [self.weights[k] for k in self._kinds]
        self._next = 0

    def __repr__(self) -> str:
        return f"ShapesWorld(seed={self.seed}, held_out={self.held_out!r}, weights={self.weights})"

    def rng(self, index: int) -> np.random.Generator:
        """The random generator of scene `index`."""
        return np.random.default_rng([self.seed, _check_seed(index, "index")])

    def spec(self, index: int) -> CaptionSpec:
        """The caption spec of scene `index`."""
        return self._spec(self.rng(index))

    def _spec(self, rng: np.random.Generator) -> CaptionSpec:
        kind = _pick_weighted(rng, self._kinds, self._kind_weights)
        return draw_spec(rng, kind, self.held_out)

    def scene(self, index: int) -> Scene:
        """Scene number `index` (random access; independent of any other call)."""
        rng = self.rng(index)
        return scene_from_spec(self._spec(rng), rng)

    def sample(self) -> Scene:
        """The next scene of this world's stream: scene 0, then 1, 2, ..."""
        scene = self.scene(self._next)
        self._next += 1
        return scene

    def __iter__(self) -> Iterator[Scene]:
        index = 0
        while True:
            yield self.scene(index)
            index += 1


def to_pixel_values(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) image -> float32 tensor (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


class ShapesWorldDataset(torch.utils.data.IterableDataset):
    """ShapesWorld as a torch IterableDataset of {"pixel_values": (3, 64, 64) in [-1, 1], "text": caption}.

    The stream is sharded by scene index across distributed ranks and DataLoader workers: shard
    `worker_id * world_size + rank` of `n = world_size * num_workers` yields scenes shard, shard + n, ... So rank
    r always gets the scenes r, r + world_size, r + 2 * world_size, ..., however many workers it uses.
    `num_samples` (None = infinite) counts scenes over all shards together, each index exactly once.
    """

    def __init__(self, seed: int = 0, held_out: str = "exclude", weights: Mapping[str, float] | None = None,
                 num_samples: int | None = None, rank: int = 0, world_size: int = 1, start_index: int = 0):
        super().__init__()
        self.world = ShapesWorld(seed, held_out, weights)
        if num_samples is not None:
            _check_seed(num_samples, "num_samples")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size={world_size!r} must be a positive integer")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} must be an integer in 0..world_size-1 ({world_size - 1})")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.start_index = _check_seed(start_index, "start_index")

    def _shard(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return worker_id * self.world_size + self.rank, self.world_size * num_workers

    def __iter__(self) -> Iterator[dict]:
        shard, num_shards = self._shard()
        index = self.start_index + shard
        end = None if self.num_samples is None else self.start_index + self.num_samples
        while end is None or index < end:
            scene = self.world.scene(index)
            yield {"pixel_values": to_pixel_values(render(scene)), "text": scene.caption}
            index += num_shards


# ----------------------------------------------------------------------------------------------------------------
# Export and caption helpers


def export_imagefolder(path: str | os.PathLike, num_images: int, seed: int = 0, held_out: str = "exclude",
                       weights: Mapping[str, float] | None = None, overwrite: bool = False) -> Path:
    """Write `num_images` scenes as PNGs plus `metadata.jsonl` ({"file_name", "text"}) into `path`.

    The folder appears atomically (built in a temporary sibling, then renamed) and loads with
    `datasets.load_dataset("imagefolder", data_dir=path)`.
    """
    from PIL import Image

    _check_seed(num_images, "num_images")
    world = ShapesWorld(seed, held_out, weights)
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"path={str(path)!r} already exists and is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as meta:
            for i in range(num_images):
                scene = world.scene(i)
                name = f"{i:08d}.png"
                Image.fromarray(render(scene)).save(tmp / name, compress_level=1)
                meta.write(json.dumps({"file_name": name, "text": scene.caption}) + "\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def all_caption_words() -> list[str]:
    """Every word any ShapesWorld caption can contain, sorted."""
    words = {"a", "and"} | set(SIZES) | set(COLORS) | set(SHAPES) | set(PLURALS.values())
    words |= set(NUMBER_WORDS.values())
    for phrase in (*POSITION_PHRASES, *RELATIONS.values()):
        words |= set(phrase.split())
    return sorted(words)


def sample_captions(n: int, seed: int = 0, held_out: str = "include",
                    weights: Mapping[str, float] | None = None) -> list[str]:
    """`n` captions of `ShapesWorld(seed, held_out, weights)` (scenes 0..n-1), e.g. to train a tokenizer."""
    _check_seed(n, "n")
    world = ShapesWorld(seed, held_out, weights)
    return [caption_for(world.spec(i)) for i in range(n)]
