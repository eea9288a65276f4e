"""`dalle-hf generate "PROMPT" -n 4 -o out/`: write PNGs whose text metadata says how to make them again."""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="Generate images from a prompt and write them as PNG files.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", help='The prompt, e.g. "a red circle to the left of a blue square".')
    p.add_argument("-n", "--num-images", type=int, default=4, help="How many images.")
    p.add_argument("-o", "--output-dir", default="out", help="Folder for the PNG files (created if missing).")
    p.add_argument("--model", default=None, help="Pipeline folder or Hub repo id (default: the embedded model).")
    p.add_argument("--seed", type=int, default=0, help="Image i is drawn with seed + i.")
    p.add_argument("--num-candidates", type=int, default=None, help="Rerank: best of this many per image.")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.set_defaults(func=main)


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def save_png(image, path: str, metadata: dict) -> None:
    """Write a PNG with text chunks, atomically (temp file, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(args) -> int:
    import torch

    from .. import DEFAULT_MODEL, DallePipeline

    model = args.model or DEFAULT_MODEL
    pipe = DallePipeline.from_pretrained(model)
    settings = {k: v for k, v in dict(guidance_scale=args.guidance_scale, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p).items() if v is not None}
    if not isinstance(args.num_images, int) or args.num_images < 1:
        raise SystemExit(f"error: --num-images must be a positive integer, got {args.num_images}")
    unknown = pipe.unknown_words(args.prompt)
    if unknown:
        print(f"Note: the model has never seen {', '.join(map(repr, unknown))}; it will mostly ignore them.")
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    try:
        out = pipe(args.prompt, num_images_per_prompt=args.num_images, num_candidates=args.num_candidates,
                   generator=generators, **settings)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None
    os.makedirs(args.output_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model
    for i, (image, score) in enumerate(zip(out.images, out.scores)):
        path = os.path.join(args.output_dir, f"{slug(args.prompt)}_seed{args.seed + i}.png")
        save_png(image, path, {"prompt": args.prompt, "seed": str(args.seed + i), "model": name,
                               "settings": {**settings, "num_candidates": args.num_candidates},
                               "score": f"{float(score):.4f}"})
        print(f"{path}  (alignment score {float(score):.2f})")
    return 0
