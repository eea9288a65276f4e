"""Subcommands of the `dalle-hf` command line; each module has `register(subparsers)`."""
