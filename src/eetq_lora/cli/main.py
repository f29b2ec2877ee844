"""The ``eetq-lora`` command line: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes register(subparsers) -> argparse.ArgumentParser, whose defaults set
# func(args) -> int (the exit code). A module that is missing is simply not offered.
SUBCOMMAND_MODULES = ("finetune", "generate", "eval", "quantize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eetq-lora",
        description="LoRA fine-tuning of EETQ int8 weight-only quantized models, on CPU or GPU.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"eetq_lora.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"eetq_lora.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
