"""What the finetune, generate and eval subcommands share: flags, exit codes, error reporting."""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import warnings
from collections.abc import Callable

# Exit codes a script can rely on.
EXIT_OK = 0
EXIT_ERROR = 1  # bad input or a missing prerequisite; the message says what to do, nothing was lost
EXIT_USAGE = 2  # the command line itself is wrong (argparse's own code)
EXIT_INTERRUPTED = 130  # Ctrl-C; finetune saved a checkpoint to resume from
DEBUG_VARIABLE = "EETQ_LORA_DEBUG"

EXIT_CODES_HELP = (
    "exit codes: 0 success; 1 an error, reported in one line (bad input or a missing package: the message "
    "says how to fix it); 2 wrong command line; 130 interrupted (finetune saves a checkpoint first). "
    f"Set {DEBUG_VARIABLE}=1 to see the Python traceback of an unexpected error."
)

DTYPE_HELP = (
    "compute dtype of the non-quantized parts and activations: auto (bfloat16 where the hardware "
    "computes it natively, such as CPUs with AVX512-BF16 or AMX and most GPUs; float32 otherwise), "
    "float32, bfloat16 or float16"
)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {text}")
    return value


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS reports one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def thread_count(text: str) -> int:
    """argparse type for --threads: 1 up to the CPUs this process may use (more only wait on each other)."""
    value = positive_int(text)
    cpus = usable_cpus()
    if value > cpus:
        raise argparse.ArgumentTypeError(f"this machine gives the process {cpus} CPU(s); pass at most {cpus}")
    return value


def add_model_flags(parser: argparse.ArgumentParser, model_default: str, dtype_default: str) -> None:
    """--model, --dtype, --device and --threads, worded the same in every subcommand."""
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="base model: a Hugging Face model folder (with config.json) or a .gguf file, converted once "
        f"and cached. Default: {model_default}",
    )
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), help=f"{DTYPE_HELP}. Default: {dtype_default}"
    )
    parser.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="cpu, cuda or cuda:N. Default: the GPU if there is one, else the CPU",
    )
    parser.add_argument(
        "--threads",
        type=thread_count,
        metavar="N",
        help="CPU threads per process. Default: one per core, shared among torchrun processes",
    )


def add_adapter_flags(parser: argparse.ArgumentParser, verb: str) -> None:
    """--adapter (repeatable) and --base, shared by the commands that use trained adapters."""
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="adapter folder (a finetune --out); repeat to compare several",
    )
    parser.add_argument(
        "--base",
        action="store_true",
        help=f"also {verb} the quantized base model alone (the default when no --adapter is given)",
    )


def add_subcommand(subparsers, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=summary,
        description=description,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def fail(command: str, message: str) -> int:
    print(f"eetq-lora {command}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def handles_errors(
    command: str,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Turn a UserError into its message and exit code 1, and Ctrl-C outside training into code 130."""

    def decorate(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def wrapper(args: argparse.Namespace) -> int:
            from ..errors import UserError

            # transformers warns when PEFT reads a deprecated alias; it says nothing to our users.
            warnings.filterwarnings(
                "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            try:
                return run(args)
            except UserError as error:
                return fail(command, str(error))
            except KeyboardInterrupt:
                print(f"\neetq-lora {command}: interrupted; nothing was saved.", file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED
            except Exception as error:  # noqa: BLE001 - the last resort: one line, not a traceback
                if os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0"):
                    raise
                return fail(command, f"{describe_error(error)} (set {DEBUG_VARIABLE}=1 to see where it came from)")

        return wrapper

    return decorate


def describe_error(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"
