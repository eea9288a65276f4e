"""ShapesWorld: determinism, captions that match the drawings, held-out pairs, sharding, export, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dalle_hf.data import (
    COLORS,
    HELD_OUT_PAIRS,
    KINDS,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    CaptionSpec,
    ObjectSpec,
    ShapeObject,
    ShapesWorld,
    ShapesWorldDataset,
    all_caption_words,
    caption_for,
    export_imagefolder,
    parse_caption,
    render,
    sample_captions,
)
from dalle_hf.evaluation import detect, matches


def test_same_seed_same_scenes_and_images():
    a, b = ShapesWorld(seed=7), ShapesWorld(seed=7)
    for i in range(50):
        sa, sb = a.sample(), b.scene(i)  # the sequential stream is scene(0), scene(1), ...
        assert sa == sb and sa.caption == sb.caption
        assert np.array_equal(render(sa), render(sb))


def test_different_seeds_differ():
    a, b = ShapesWorld(seed=0), ShapesWorld(seed=1)
    captions_a = [a.scene(i).caption for i in range(50)]
    captions_b = [b.scene(i).caption for i in range(50)]
    assert captions_a != captions_b
    assert sum(ca != cb for ca, cb in zip(captions_a, captions_b)) > 40


def test_random_access_does_not_depend_on_call_order():
    world = ShapesWorld(seed=3)
    forward = [world.scene(i) for i in range(20)]
    backward = [world.scene(i) for i in reversed(range(20))][::-1]
    assert forward == backward


def test_known_scene_is_stable_across_machines():
    """A pinned value: changing the generator changes the data every trained model saw."""
    scene = ShapesWorld(seed=0).scene(0)
    assert scene.caption == "a cyan circle to the right of a yellow square"
    assert [(o.shape, o.color, o.size, o.cell, o.cx, o.cy) for o in scene.objects] == [
        ("circle", "cyan", "small", 1, 30, 9), ("square", "yellow", "large", 3, 13, 34)]


def test_image_format_and_palette():
    world = ShapesWorld(seed=0)
    for i in range(20):
        scene = world.scene(i)
        image = render(scene)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert tuple(image[0, 0]) == (255, 255, 255)
        colours = {tuple(c) for c in image.reshape(-1, 3)}
        assert colours == {(255, 255, 255)} | {COLORS[o.color] for o in scene.objects}


def test_shapes_fill_their_boxes_as_expected():
    """Each shape's pixel count in its box: square full, circle ~pi/4, triangle and diamond ~1/2."""
    for shape, lo, hi in [("square", 1.0, 1.0), ("circle", 0.75, 0.82), ("triangle", 0.45, 0.55),
                          ("diamond", 0.5, 0.6)]:
        for size, px in SIZES.items():
            image = render([ShapeObject(shape, "red", size, 4, 32, 32)])
            fg = (image != 255).any(-1)
            ys, xs = np.nonzero(fg)
            assert ys.max() - ys.min() + 1 <= px and xs.max() - xs.min() + 1 <= px
            assert lo <= fg.sum() / px**2 <= hi, (shape, size)
    triangle = (render([ShapeObject("triangle", "red", "large", 4, 32, 32)]) != 255).any(-1)
    rows = triangle.sum(1)[triangle.any(1)]
    assert rows[0] < rows[-1]  # apex up: widest at the bottom


def test_objects_inside_canvas_and_apart():
    world = ShapesWorld(seed=5, held_out="include")
    for i in range(300):
        scene = world.scene(i)
        cells = [o.cell for o in scene.objects]
        assert len(set(cells)) == len(cells)
        masks = []
        for o in scene.objects:
            mask = (render([o]) != 255).any(-1)
            ys, xs = np.nonzero(mask)
            assert ys.min() >= 1 and xs.min() >= 1 and ys.max() <= 62 and xs.max() <= 62
            # within the jitter of the cell centre (the inward move of large objects stays inside it too)
            assert abs(o.cx - (11, 32, 53)[o.cell % 3]) <= 2 and abs(o.cy - (11, 32, 53)[o.cell // 3]) <= 2
            masks.append(mask)
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                ya, xa = np.nonzero(masks[a])
                yb, xb = np.nonzero(masks[b])
                gap = np.maximum(np.abs(ya[:, None] - yb[None]), np.abs(xa[:, None] - xb[None])).min()
                assert gap >= 3  # at least 2 white pixels in between


@pytest.mark.parametrize("kind", KINDS)
def test_every_caption_form_matches_its_drawing(kind):
    world = ShapesWorld(seed=11, weights={kind: 1.0}, held_out="include")
    for i in range(60):
        scene = world.scene(i)
        assert scene.kind == kind
        spec = parse_caption(scene.caption)
        assert spec == scene.spec and caption_for(spec) == scene.caption
        assert matches(spec, detect(render(scene))), scene


def test_caption_forms_and_object_counts():
    world = ShapesWorld(seed=2)
    expected = {"one_object": {1}, "two_objects": {2}, "relation": {2}, "counting": {2, 3}}
    seen = set()
    for i in range(400):
        scene = world.scene(i)
        seen.add(scene.kind)
        assert len(scene.objects) in expected[scene.kind]
        assert scene.caption == scene.caption.lower()
        words = scene.caption.split()
        if scene.kind == "counting":
            assert words[0] == {2: "two", 3: "three"}[len(scene.objects)]
            assert words[2] == scene.objects[0].shape + "s"
    assert seen == set(KINDS)


def test_one_object_captions_omit_size_and_position_sometimes():
    specs = [ShapesWorld(seed=4, weights={"one_object": 1}).spec(i).objects[0] for i in range(200)]
    assert {o.size is None for o in specs} == {True, False}
    assert {o.cell is None for o in specs} == {True, False}


def test_default_weights_favour_multi_object_scenes():
    kinds = [ShapesWorld(seed=1).spec(i).kind for i in range(2000)]
    assert kinds.count("one_object") / len(kinds) < 0.35
    assert all(kinds.count(k) > 250 for k in KINDS)


def test_held_out_pairs_never_in_training_draws():
    world = ShapesWorld(seed=0)  # held_out="exclude"
    for i in range(20_000):
        for o in world.spec(i).objects:
            assert (o.color, o.shape) not in HELD_OUT_PAIRS


def test_held_out_only_and_include():
    only = ShapesWorld(seed=0, held_out="only")
    for i in range(300):
        assert any((o.color, o.shape) in HELD_OUT_PAIRS for o in only.scene(i).objects)
    include = ShapesWorld(seed=0, held_out="include")
    pairs = {(o.color, o.shape) for i in range(500) for o in include.spec(i).objects}
    assert HELD_OUT_PAIRS <= pairs


def test_parse_caption_round_trip_and_rejects_other_text():
    spec = CaptionSpec("two_objects", (ObjectSpec("red", "circle", cell=0), ObjectSpec("blue", "square", cell=8)))
    text = "a red circle in the top left and a blue square in the bottom right"
    assert caption_for(spec) == text and parse_caption(text) == spec
    assert parse_caption("a small pink diamond").objects[0].size == "small"
    assert parse_caption("three green triangles").count == 3
    assert parse_caption("a red circle below a blue square").relation == "below"
    for bad in ["a red dog", "four red circles", "a red circle somewhere", "", "a big red circle"]:
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_caption_words_and_sample_captions():
    words = set(all_caption_words())
    assert set(COLORS) | set(SHAPES) | set(SIZES) <= words
    assert {"circles", "two", "three", "left", "above", "below", "center", "and", "a"} <= words
    captions = sample_captions(300, seed=0)
    assert captions == sample_captions(300, seed=0) and captions != sample_captions(300, seed=1)
    assert {w for c in captions for w in c.split()} <= words
    assert all(phrase.split()[-1] in words for phrase in POSITION_PHRASES)


def _collect(dataset, num_workers=0):
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [item["text"] for item in loader]


def test_dataset_items():
    item = next(iter(ShapesWorldDataset(seed=0)))
    pv = item["pixel_values"]
    assert pv.shape == (3, 64, 64) and pv.dtype == torch.float32
    assert pv.min() >= -1 and pv.max() == 1  # white background
    assert item["text"] == ShapesWorld(seed=0).scene(0).caption
    image = render(ShapesWorld(seed=0).scene(0))
    assert torch.allclose((pv + 1) * 127.5, torch.from_numpy(image).permute(2, 0, 1).float(), atol=1e-4)


def test_dataset_shards_by_rank_and_worker():
    full = [ShapesWorld(seed=0).scene(i).caption for i in range(24)]
    ranks = [_collect(ShapesWorldDataset(seed=0, num_samples=24, rank=r, world_size=2)) for r in range(2)]
    assert ranks[0] == full[0::2] and ranks[1] == full[1::2]
    two_workers = _collect(ShapesWorldDataset(seed=0, num_samples=24, rank=1, world_size=2), num_workers=2)
    assert sorted(two_workers) == sorted(full[1::2])  # rank 1's share, split over its workers
    infinite = iter(ShapesWorldDataset(seed=0))
    assert [next(infinite)["text"] for _ in range(30)][24:] == [ShapesWorld(seed=0).scene(i).caption
                                                               for i in range(24, 30)]


def test_export_imagefolder_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = export_imagefolder(tmp_path / "shapes", num_images=12, seed=3)
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and set(lines[0]) == {"file_name", "text"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 12 and "text" in ds.column_names
    by_text = {row["text"]: np.asarray(row["image"].convert("RGB")) for row in ds}
    scene = ShapesWorld(seed=3).scene(0)
    assert np.array_equal(by_text[scene.caption], render(scene))
    with pytest.raises(ValueError, match="already exists"):
        export_imagefolder(out, num_images=2)
    export_imagefolder(out, num_images=2, overwrite=True)
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("call, match", [
    (lambda: ShapesWorld(seed=-1), "seed=-1"),
    (lambda: ShapesWorld(seed=1.5), "seed=1.5"),
    (lambda: ShapesWorld(held_out="never"), "held_out='never'"),
    (lambda: ShapesWorld(weights={"pictures": 1.0}), "pictures"),
    (lambda: ShapesWorld(weights={"counting": -1.0}), "non-negative"),
    (lambda: ShapesWorld(weights={"counting": 0.0}), "not all zero"),
    (lambda: ShapesWorld().scene(-3), "index=-3"),
    (lambda: ShapesWorldDataset(rank=2, world_size=2), "rank=2"),
    (lambda: ShapesWorldDataset(world_size=0), "world_size=0"),
    (lambda: ShapesWorldDataset(num_samples=-5), "num_samples=-5"),
    (lambda: sample_captions(-1), "n=-1"),
    (lambda: caption_for(CaptionSpec("one_object", (ObjectSpec("black", "circle"),))), "color='black'"),
    (lambda: caption_for(CaptionSpec("one_object", (ObjectSpec("red", "star"),))), "shape='star'"),
    (lambda: caption_for(CaptionSpec("one_object", (ObjectSpec("red", "circle", "huge"),))), "size='huge'"),
    (lambda: caption_for(CaptionSpec("one_object", (ObjectSpec("red", "circle", cell=9),))), "cell=9"),
    (lambda: caption_for(CaptionSpec("counting", (ObjectSpec("red", "circle"),), count=4)), "count=4"),
    (lambda: caption_for(CaptionSpec("relation", (ObjectSpec("red", "circle"),) * 2, relation="near")),
     "relation='near'"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_export_rejects_bad_count(tmp_path):
    with pytest.raises(ValueError, match="num_images=-2"):
        export_imagefolder(tmp_path / "x", num_images=-2)
