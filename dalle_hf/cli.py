"""The `dalle-hf` command line: generate, train, finetune, eval (one module per subcommand in `commands/`)."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("generate", "train", "finetune", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle-hf", description="DALL-E-style text-to-image with Hugging Face.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"dalle_hf.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"dalle_hf.commands.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
