"""Peak memory (RSS) of generating images with the embedded model, in a fresh process.

    .venv/bin/python benchmarks/bench_memory.py [--images 4] [--model PATH]

The child process imports dalle_hf, loads the pipeline, generates the images with default settings and exits; the
parent reads the child's peak resident set size from `resource.getrusage(RUSAGE_CHILDREN)`. The import-and-load
baseline (no generation) is measured the same way, so the generation's own share is visible.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

CHILD = """
import sys, torch
import dalle_hf
pipe = dalle_hf.DallePipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
n = int(sys.argv[2])
if n:
    pipe("a red circle to the left of a blue square", num_images_per_prompt=n,
         generator=[torch.Generator().manual_seed(i) for i in range(n)])
"""


def peak_rss_mb(model: str, images: int) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-c", CHILD, model, str(images)], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("the child's peak RSS did not exceed an earlier child's; run one measurement per process")
    return after / 1024  # ru_maxrss is in KiB on Linux


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--model", default=None, help="Pipeline folder (default: the embedded model).")
    parser.add_argument("--baseline", action="store_true", help="Measure import + load only (no generation).")
    args = parser.parse_args(argv)
    import dalle_hf

    model = args.model or dalle_hf.DEFAULT_MODEL
    n = 0 if args.baseline else args.images
    print(f"peak RSS, {'load only' if n == 0 else f'{n} images'}: {peak_rss_mb(model, n):.0f} MB")


if __name__ == "__main__":
    main()
