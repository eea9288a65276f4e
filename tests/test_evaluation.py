"""ShapesEval: detector accuracy and robustness, the shipped prompt set, scoring rules, the evaluators, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dalle_hf.data import (
    HELD_OUT_PAIRS,
    CaptionSpec,
    ObjectSpec,
    ShapeObject,
    ShapesWorld,
    parse_caption,
    render,
    scene_from_spec,
)
from dalle_hf.evaluation import (
    CATEGORIES,
    DetectedObject,
    build_prompts,
    detect,
    detector_accuracy,
    evaluate_images,
    evaluate_pipeline,
    evaluate_reconstruction,
    format_table,
    load_prompts,
    matches,
    render_prompts,
    select_prompts,
)


@pytest.fixture(scope="module")
def scenes():
    world = ShapesWorld(seed=123, held_out="include")
    return [world.scene(i) for i in range(1000)]


@pytest.fixture(scope="module")
def renders(scenes):
    return np.stack([render(s) for s in scenes])


def _box_blur(images: np.ndarray, k: int = 3) -> np.ndarray:
    pad = k // 2
    f = np.pad(images.astype(np.float32), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    out = sum(f[:, dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)) / (k * k)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _gaussian_blur(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    r = np.arange(-3, 4)
    kernel = np.exp(-r**2 / (2 * sigma**2))
    kernel /= kernel.sum()
    f = np.pad(images.astype(np.float32), ((0, 0), (3, 3), (3, 3), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    f = sum(kernel[i] * f[:, i:i + h] for i in range(7))
    f = sum(kernel[i] * f[:, :, i:i + w] for i in range(7))
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def _noise(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)


def test_detector_reads_1000_renders(scenes, renders):
    report = detector_accuracy(scenes, renders)
    assert report["num_objects"] > 1500
    for attribute, accuracy in report["accuracy"].items():
        assert accuracy >= 0.995, (attribute, accuracy)
    assert report["count"] >= 0.995 and report["exact_scene"] >= 0.995


@pytest.mark.parametrize("perturb", [
    lambda x: _box_blur(x),
    lambda x: _gaussian_blur(x, 1.0),
    lambda x: _noise(x, 12),
    lambda x: _noise(_gaussian_blur(x, 0.8), 8),
    lambda x: np.clip(_box_blur(x).astype(np.int16) + np.array([12, -10, 8]), 0, 255).astype(np.uint8),
], ids=["box3", "gauss1", "noise12", "gauss+noise", "blur+colour-shift"])
def test_detector_is_robust_to_blur_noise_and_colour_shift(scenes, renders, perturb):
    report = detector_accuracy(scenes[:200], perturb(renders[:200]))
    for attribute, accuracy in report["accuracy"].items():
        assert accuracy >= 0.99, (attribute, accuracy)
    assert report["exact_scene"] >= 0.98


def test_detector_ignores_specks_and_reads_other_resolutions():
    image = render([ShapeObject("diamond", "blue", "large", 4, 32, 32)])
    image[2:4, 2:4] = (30, 70, 220)  # a 4 px speck
    found = detect(image)
    assert [(d.shape, d.color, d.size, d.cell) for d in found] == [("diamond", "blue", "large", 4)]
    assert detect(np.full((64, 64, 3), 255, np.uint8)) == []
    big = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(),
                                                     scale_factor=2, mode="nearest")[0].permute(1, 2, 0).byte())
    assert [(d.shape, d.cell) for d in detect(big)] == [("diamond", 4)]


def test_detector_separates_touching_objects_of_different_colours():
    objects = [ShapeObject("square", "blue", "small", 6, 12, 52), ShapeObject("square", "orange", "large", 7, 33, 51)]
    found = detect(_gaussian_blur(render(objects)[None], 1.0)[0])
    assert sorted((d.color, d.size) for d in found) == [("blue", "small"), ("orange", "large")]


def test_shipped_prompts_are_the_generated_set():
    prompts = load_prompts()
    assert prompts == build_prompts()  # prompts.json is build_prompts() at the fixed seed
    assert len(prompts) >= 400
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    assert [p["id"] for p in prompts] == list(range(len(prompts)))
    counts = Counter(p["category"] for p in prompts)
    assert set(counts) == set(CATEGORIES) and min(counts.values()) >= 28
    for p in prompts:
        spec = CaptionSpec.from_dict(p["spec"])
        assert parse_caption(p["prompt"]) == spec
        held = any((o.color, o.shape) in HELD_OUT_PAIRS for o in spec.objects)
        assert held == (p["category"] == "held_out"), p
    kinds = {p["category"]: p["spec"]["kind"] for p in prompts if p["category"] != "held_out"}
    assert kinds == {"single_object": "one_object", "color_shape_size": "one_object", "position": "one_object",
                     "two_objects": "two_objects", "relation": "relation", "counting": "counting"}
    assert {p["spec"]["kind"] for p in prompts if p["category"] == "held_out"} == {"one_object", "two_objects"}


def test_ground_truth_renders_score_near_100_percent():
    prompts = load_prompts()
    report = evaluate_images(prompts, render_prompts(prompts))
    assert report["overall"] >= 0.99
    assert all(c["accuracy"] >= 0.97 for c in report["categories"].values())
    assert report["num_prompts"] == len(prompts) and len(report["results"]) == len(prompts)
    table = format_table(report)
    assert all(c in table for c in CATEGORIES) and "overall" in table


def _obj(shape, color, cell, size="small"):
    return DetectedObject(shape=shape, color=color, size=size, cell=cell, cx=0.0, cy=0.0, area=100)


def test_scoring_rules():
    one = CaptionSpec("one_object", (ObjectSpec("red", "circle", "large"),))
    assert matches(one, [_obj("circle", "red", 4, "large")])
    assert not matches(one, [_obj("circle", "red", 4, "small")])  # wrong size
    assert not matches(one, [_obj("circle", "red", 4, "large"), _obj("square", "blue", 0)])  # an extra object
    assert not matches(one, [])
    where = CaptionSpec("one_object", (ObjectSpec("red", "circle", cell=2),))
    assert matches(where, [_obj("circle", "red", 2, "large")]) and not matches(where, [_obj("circle", "red", 1)])
    left = CaptionSpec("relation", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), relation="left_of")
    assert matches(left, [_obj("square", "blue", 2), _obj("circle", "red", 0)])  # any detection order
    assert not matches(left, [_obj("square", "blue", 3), _obj("circle", "red", 0)])  # same column: not left of
    above = CaptionSpec("relation", left.objects, relation="above")
    assert matches(above, [_obj("circle", "red", 2), _obj("square", "blue", 3)])
    assert not matches(above, [_obj("circle", "red", 3), _obj("square", "blue", 5)])  # same row
    three = CaptionSpec("counting", (ObjectSpec("green", "triangle"),), count=3)
    assert matches(three, [_obj("triangle", "green", c) for c in (0, 4, 8)])
    assert not matches(three, [_obj("triangle", "green", c) for c in (0, 4)])
    assert not matches(three, [_obj("triangle", "green", 0), _obj("triangle", "green", 4), _obj("circle", "green", 8)])
    two = CaptionSpec("two_objects", (ObjectSpec("red", "circle", cell=0), ObjectSpec("red", "square", cell=8)))
    assert matches(two, [_obj("square", "red", 8), _obj("circle", "red", 0)])
    assert not matches(two, [_obj("square", "red", 0), _obj("circle", "red", 8)])  # swapped places


class FakePipeline:
    """Draws the ground truth of each prompt (or a blank page), recording how it was called."""

    def __init__(self, blank: bool = False):
        self.blank, self.calls = blank, []

    def __call__(self, prompt, generator, output_type, num_candidates=None, **kwargs):
        assert output_type == "np" and len(prompt) == len(generator)
        self.calls.append({"prompt": list(prompt), "num_candidates": num_candidates, **kwargs,
                           "seeds": [g.initial_seed() for g in generator]})
        images = []
        for text, g in zip(prompt, generator):
            if self.blank:
                images.append(np.full((32, 32, 3), 255, np.uint8))
            else:
                world = ShapesWorld(seed=0, held_out="include")
                images.append(render(scene_from_spec(parse_caption(text), world.rng(g.initial_seed()))))
        return SimpleNamespace(images=np.stack(images).astype(np.float32) / 255.0)


def test_evaluate_pipeline_batches_seeds_and_scores():
    pipe = FakePipeline()
    report = evaluate_pipeline(pipe, max_prompts=21, batch_size=8, seed=100, progress=False, num_candidates=4,
                               guidance_scale=3.0)
    assert report["num_prompts"] == 21 and report["overall"] >= 0.95
    assert set(report["categories"]) == set(CATEGORIES)  # the subset covers every category
    assert [len(c["prompt"]) for c in pipe.calls] == [8, 8, 5]
    assert all(c["num_candidates"] == 4 and c["guidance_scale"] == 3.0 for c in pipe.calls)
    ids = [r["id"] for r in report["results"]]
    assert [s for c in pipe.calls for s in c["seeds"]] == [100 + i for i in ids]  # seed + prompt id
    assert report["settings"]["guidance_scale"] == 3.0
    blank = evaluate_pipeline(FakePipeline(blank=True), prompts=["a red circle", "two blue squares"], progress=False)
    assert blank["overall"] == 0.0 and set(blank["categories"]) == {"one_object", "counting"}


class IdentityAlignment(torch.nn.Module):
    """A lossless 'tokenizer': codes are ids; decode returns the images that were encoded."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(codebook_size=128)
        self._last = None

    def encode(self, pixel_values):
        assert pixel_values.min() >= -1 and pixel_values.max() <= 1
        self._last = pixel_values
        return torch.arange(pixel_values.shape[0] * 64).reshape(-1, 64) % 100

    def decode(self, codes):
        return self._last


def test_evaluate_reconstruction_on_a_lossless_tokenizer():
    report = evaluate_reconstruction(IdentityAlignment(), num_images=40, seed=1, batch_size=16)
    assert report["num_images"] == 40
    assert all(a == 1.0 for a in report["accuracy"].values()) and report["exact_scene"] == 1.0
    assert report["psnr"] >= 60 and report["codebook_usage"] == 100 / 128
    assert "PSNR" in format_table({"reconstruction": report})


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="dtype"):
        detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        detect(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="min_area=0"):
        detect(np.zeros((64, 64, 3), np.uint8), min_area=0)
    with pytest.raises(ValueError, match="one image per prompt"):
        evaluate_images(["a red circle"], np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="not a ShapesWorld caption"):
        evaluate_images(["a cat on a mat"], np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="max_prompts=0"):
        select_prompts(load_prompts(), 0)
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate_pipeline(FakePipeline(), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="num_images_per_prompt=2"):
        evaluate_pipeline(FakePipeline(), num_images_per_prompt=2, progress=False)
    with pytest.raises(ValueError, match="num_images=0"):
        evaluate_reconstruction(IdentityAlignment(), num_images=0)


def test_eval_command_end_to_end_on_a_tiny_pipeline(tmp_path, capsys):
    pytest.importorskip("dalle_hf.testing")
    from dalle_hf.cli import main
    from dalle_hf.testing import save_tiny_pipeline

    model = save_tiny_pipeline(str(tmp_path / "tiny"))
    out = tmp_path / "reports" / "report.json"
    code = main(["eval", "--model", model, "--max-prompts", "7", "--batch-size", "4", "--output", str(out),
                 "--reconstruction-images", "8", "--no-progress", "--device", "cpu"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["num_prompts"] == 7 and set(report["categories"]) == set(CATEGORIES)
    assert report["overall"] <= 0.3  # random weights draw noise, not the prompt
    assert 0 <= report["reconstruction"]["codebook_usage"] <= 1
    printed = capsys.readouterr().out
    assert "| **overall** | 7 |" in printed and "codebook usage" in printed
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]  # no temp file left behind
