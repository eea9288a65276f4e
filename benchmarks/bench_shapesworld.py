"""Speed of the ShapesWorld generator and the ShapesEval detector on one CPU core.

    .venv/bin/python benchmarks/bench_shapesworld.py            # measure, print a table
    .venv/bin/python benchmarks/bench_shapesworld.py --samples docs/images/shapesworld_samples.png

Measures, each for about `--seconds` CPU-seconds of this single-threaded process (so the numbers are per core and
hold on a busy machine too):
  scenes      ShapesWorld.scene(i): draw a caption and place its objects
  render      scene + render to a (64, 64, 3) uint8 image
  dataset     ShapesWorldDataset items (scene + render + float tensor in [-1, 1])
  detect      the rule-based detector on rendered scenes
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from dalle_hf.data import ShapesWorld, ShapesWorldDataset, render  # noqa: E402
from dalle_hf.evaluation import detect  # noqa: E402


def rate(fn, seconds: float) -> float:
    """Calls of fn(i) per CPU-second of this (single-threaded) process, i = 0, 1, 2, ..., over about `seconds`
    CPU-seconds after a short warm-up. CPU time, not wall time, so that a busy machine does not skew the number."""
    for i in range(20):
        fn(i)
    n, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for _ in range(50):
            fn(n)
            n += 1
    return n / (time.process_time() - start)


def measure(seconds: float) -> dict[str, float]:
    torch.set_num_threads(1)
    world = ShapesWorld(seed=0)
    items = iter(ShapesWorldDataset(seed=0))
    images = [render(world.scene(i)) for i in range(500)]
    return {
        "scenes": rate(world.scene, seconds),
        "render": rate(lambda i: render(world.scene(i)), seconds),
        "dataset": rate(lambda i: next(items), seconds),
        "detect": rate(lambda i: detect(images[i % len(images)]), seconds),
    }


def sample_grid(path: str, rows: int = 4, cols: int = 5, scale: int = 3, seed: int = 0) -> None:
    """A grid of sample scenes with their captions underneath, for the docs."""
    from PIL import Image, ImageDraw, ImageFont

    world = ShapesWorld(seed=seed)
    tile, text_h, pad = 64 * scale, 54, 10
    font = ImageFont.load_default(size=13)
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + text_h + pad) + pad), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    # one scene of each caption kind per row, in a fixed order, then whatever comes next
    kinds = ["one_object", "two_objects", "relation", "counting", "one_object"]
    used: set[int] = set()
    for r in range(rows):
        for c in range(cols):
            index = next(i for i in range(10_000) if i not in used and world.spec(i).kind == kinds[c])
            used.add(index)
            scene = world.scene(index)
            x, y = pad + c * (tile + pad), pad + r * (tile + text_h + pad)
            image = Image.fromarray(render(scene)).resize((tile, tile), Image.NEAREST)
            sheet.paste(image, (x, y))
            draw.rectangle((x - 1, y - 1, x + tile, y + tile), outline=(190, 190, 190))
            draw.multiline_text((x + 2, y + tile + 4), _wrap(scene.caption, draw, font, tile - 4), fill=(20, 20, 20),
                                font=font, spacing=2)
    sheet.save(path, optimize=True)


def _wrap(text: str, draw, font, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width:
            line = trial
        else:
            lines.append(line)
            line = word
    return "\n".join(lines + [line])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="CPU time per measurement.")
    parser.add_argument("--samples", default=None, help="Also write the docs' sample grid PNG here.")
    args = parser.parse_args()
    if args.samples:
        sample_grid(args.samples)
        print(f"wrote {args.samples}")
    results = measure(args.seconds)
    print("| what | per CPU-second (one core) |\n| --- | ---: |")
    for name, value in results.items():
        print(f"| {name} | {value:,.0f} |")


if __name__ == "__main__":
    main()
