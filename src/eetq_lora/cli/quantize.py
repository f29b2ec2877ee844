"""``eetq-lora quantize SRC OUT``: write an EETQ int8 copy of a float safetensors model folder."""

from __future__ import annotations

import argparse

from ..format.layout import DEFAULT_LAYOUT, LAYOUTS
from ..quant.convert import quantize_checkpoint
from .common import EXIT_OK, add_subcommand, handles_errors, thread_count


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``quantize`` subcommand to the ``eetq-lora`` parser."""
    parser = add_subcommand(
        subparsers,
        "quantize",
        "quantize a float safetensors model folder to EETQ int8",
        "Quantize every nn.Linear weight of a transformers model folder to EETQ int8, one tensor at a "
        "time, and write a folder that from_pretrained loads (after `import eetq_lora`, on any device; "
        "with stock transformers + EETQ on a GPU for the sm75 layout).",
    )
    parser.add_argument(
        "src", metavar="SRC", help="float model folder: config.json and model.safetensors (or an index and shards)"
    )
    parser.add_argument("out", metavar="OUT", help="output folder; must not exist unless --overwrite")
    parser.add_argument(
        "--skip",
        metavar="MODULE",
        nargs="+",
        action="extend",
        default=None,
        help="modules to keep in float (repeatable; replaces the default: lm_head). Tied weights always stay float.",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=DEFAULT_LAYOUT,
        help="byte layout of the int8 weights: sm75 (T4/A10/A100/RTX 30/40/L4, default), sm70 (V100) or plain",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (only once the new folder is complete)"
    )
    parser.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        metavar="N",
        help="weights quantized at once, one core each (default: every core)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    parser.set_defaults(func=run)
    return parser


@handles_errors("quantize")
def run(args: argparse.Namespace) -> int:
    """Run the conversion and print a summary; returns the exit code (1 for unusable input, 130 for Ctrl-C)."""
    skips = args.skip if args.skip is not None else ["lm_head"]
    # An unusable SRC (CheckpointError, a UserError) or Ctrl-C leaves OUT as it was: the new folder is
    # built aside and moved into place only once complete.
    report = quantize_checkpoint(
        args.src,
        args.out,
        modules_to_not_convert=skips,
        layout=args.layout,
        overwrite=args.overwrite,
        threads=args.threads,
        progress=not args.no_progress,
    )
    mib = 2**20
    print(f"wrote {args.out}")
    print(
        f"parameters: {report.parameters:,} ({report.quantized_parameters:,} in {report.quantized_layers} "
        f"linear layers quantized to int8, layout {report.layout})"
    )
    print(f"kept in float: {', '.join(report.modules_to_not_convert) or 'nothing'}")
    print(
        f"bytes: {report.bytes_before:,} -> {report.bytes_after:,} "
        f"({report.bytes_before / mib:.1f} MiB -> {report.bytes_after / mib:.1f} MiB, "
        f"{report.bytes_after / max(report.bytes_before, 1):.0%})"
    )
    print(f"time: {report.seconds:.2f} s ({report.parameters_per_second / 1e6:.1f} M parameters/s)")
    if report.layout == "sm70":
        print(
            "note: stock EETQ reads sm70 checkpoints only on compute capability 7.0 GPUs (V100); "
            "eetq_lora reads them anywhere"
        )
    elif report.layout == "plain":
        print("note: stock EETQ cannot read plain-layout checkpoints; eetq_lora reads them anywhere")
    print(
        f"load it: import eetq_lora, then AutoModelForCausalLM.from_pretrained({str(args.out)!r}); without the "
        "import, transformers' own EETQ loader asks for a CUDA GPU and the 'kernels' package"
    )
    return EXIT_OK
