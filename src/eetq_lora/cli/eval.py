"""``eetq-lora eval``: score adapters (and the base model) on the held-out split."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

from .common import EXIT_OK, add_adapter_flags, add_model_flags, add_subcommand, handles_errors, positive_int

DESCRIPTION = """\
Load the base model, quantize it to EETQ int8, attach the adapter(s) and score each on held-out
data: mean loss per answer token and answer-token accuracy (the share of answer tokens the model
ranks first, teacher-forced). The data, held-out split, sequence length and dtype default to the
ones the (first) adapter was trained with, so the numbers match its metrics.json.

examples:
  eetq-lora eval --adapter runs/finetune
  eetq-lora eval --base --adapter runs/a --adapter runs/b --json
"""


def register(subparsers) -> argparse.ArgumentParser:
    parser = add_subcommand(
        subparsers, "eval", "score EETQ int8 models with LoRA adapter(s) on held-out data", DESCRIPTION
    )
    add_adapter_flags(parser, "score")
    add_model_flags(
        parser,
        "the adapter's base model, else SmolLM2-135M-Instruct (built-in)",
        "the adapter's training dtype, else auto",
    )
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="data whose fixed held-out split is scored (the formats of finetune --data, or builtin). "
        "Default: the held-out set the first adapter was scored on in training",
    )
    parser.add_argument(
        "--eval-data",
        metavar="FILE",
        help="score on all of this held-out set instead (the formats of --data). Default: the first adapter's",
    )
    parser.add_argument(
        "--max-seq-len", type=positive_int, metavar="N", help="tokens per example. Default: the adapter's, else 96"
    )
    parser.add_argument(
        "--eval-examples",
        type=positive_int,
        metavar="N",
        help="held-out examples to score (at most). Default: the adapter's, else 128",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, metavar="N", help="examples per forward pass. Default: the adapter's, else 8"
    )
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document instead of a table")
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show the progress bar (it shows only on a terminal)"
    )
    parser.set_defaults(func=run)
    return parser


def format_table(rows: list[dict]) -> str:
    width = max(len("model"), *(len(row["model"]) for row in rows))
    lines = [f"{'model':<{width}}  {'held-out loss':>13}  {'accuracy':>8}  {'perplexity':>10}  {'tokens':>7}"]
    for row in rows:
        lines.append(
            f"{row['model']:<{width}}  {row['loss']:>13.4f}  {row['accuracy']:>8.1%}  "
            f"{row['perplexity']:>10.2f}  {row['tokens']:>7,}"
        )
    return "\n".join(lines)


@contextmanager
def counting_batches(model, bar):
    """Advance ``bar`` by one for each batch ``model`` scores (each runs its input embeddings once)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = base.get_input_embeddings().register_forward_hook(lambda *_: bar.update(1))
    try:
        yield
    finally:
        handle.remove()


@handles_errors("eval")
def run(args: argparse.Namespace) -> int:
    from ..data.encode import PromptFormat, encode_examples
    from ..data.sources import choose_eval_data, held_out_set
    from ..errors import DataError
    from ..models.adapters import load_for_inference, read_adapter, setting, using
    from ..training.evaluate import evaluate
    from ..training.progress import progress_bar

    # Read the data (and fail on it) before loading any model.
    recorded = [read_adapter(path, index) for index, path in enumerate(args.adapter)]
    choice, notes = choose_eval_data(args.data, args.eval_data, [(a.label, a.settings) for a in recorded])
    max_seq_len = args.max_seq_len or setting(recorded, "max_seq_len", 96)
    eval_examples = args.eval_examples or setting(recorded, "eval_examples", 128)
    batch_size = args.batch_size or setting(recorded, "batch_size", 8)
    dataset = held_out_set(choice)
    held_out = dataset.examples[:eval_examples]
    for note in notes:
        print(f"Note: {note}", file=sys.stderr)

    inference = load_for_inference(args.adapter, args.model, args.dtype, args.device, args.threads)
    tokenizer = inference.loaded.tokenizer
    encoded = encode_examples(PromptFormat(tokenizer), held_out, max_seq_len)
    if not encoded.items:
        raise DataError(f"no held-out example of {dataset.source} fits in --max-seq-len {max_seq_len}; raise it")
    device = next(inference.model.parameters()).device
    sources = ([None] if args.base or not inference.adapters else []) + list(inference.adapters)
    rows = []
    batches = -(-len(encoded.items) // batch_size)
    for source in sources:
        label = "base" if source is None else source.label
        bar = progress_bar(batches, f"scoring {label}", "batch", enabled=not args.no_progress, leave=False)
        with bar, using(inference.model, source) as model, counting_batches(model, bar):
            result = evaluate(model, encoded.items, batch_size, tokenizer.pad_token_id, device)
        rows.append({"model": label, **result.to_dict()})
    if args.json:
        print(json.dumps({"data": dataset.source, "max_seq_len": max_seq_len, "results": rows}, indent=2))
    else:
        print(f"{len(encoded)} held-out examples of {dataset.source}, max {max_seq_len} tokens each")
        print(format_table(rows))
    return EXIT_OK
