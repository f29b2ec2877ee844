"""``eetq-lora generate``: answer prompts with the EETQ int8 base model and one or more adapters."""

from __future__ import annotations

import argparse
import json
import math

from .common import EXIT_OK, add_adapter_flags, add_model_flags, add_subcommand, handles_errors, positive_int

SEED_MAX = 2**64 - 1  # the largest seed torch.manual_seed takes
# Below this, dividing the scores by the temperature overflows float32 and sampling fails.
MIN_SAMPLING_TEMPERATURE = 1e-4

DESCRIPTION = """\
Load the base model, quantize it to EETQ int8, attach the adapter(s) and answer each PROMPT.
The base model, dtype and prompt format are the ones the adapter was trained with.

One adapter (or none) prints just the answer. Several --adapter flags, or --base next to an
adapter, print each answer under a '## name' heading, to compare them on the same prompt.

examples:
  eetq-lora generate --adapter runs/finetune "How do I reset my password?"
  eetq-lora generate --base --adapter runs/a --adapter runs/b "Who wrote Hamlet?"
"""


def register(subparsers) -> argparse.ArgumentParser:
    parser = add_subcommand(
        subparsers, "generate", "answer prompts with an EETQ int8 model and LoRA adapter(s)", DESCRIPTION
    )
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="the prompt(s) to answer")
    add_adapter_flags(parser, "answer with")
    add_model_flags(
        parser,
        "the adapter's base model, else SmolLM2-135M-Instruct (built-in)",
        "the adapter's training dtype, else auto",
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=64, metavar="N", help="most tokens per answer. Default: 64"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help=f"0 answers greedily (deterministic); {MIN_SAMPLING_TEMPERATURE:g} or more samples. Default: 0",
    )
    parser.add_argument("--seed", default="0", help="seed for sampling, a whole number from 0 to 2**64-1. Default: 0")
    parser.add_argument("--json", action="store_true", help="print one JSON object per answer: prompt, model, answer")
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show the progress bar (it shows only on a terminal)"
    )
    parser.set_defaults(func=run)
    return parser


class TokenCounter:
    """A generate() streamer that advances a progress bar by each new token (the first call is the prompt)."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.seen_prompt = False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.bar.update(int(value.numel()))
        self.seen_prompt = True

    def end(self) -> None:
        self.bar.refresh()


def generate_answer(model, fmt, tokenizer, prompt: str, max_new_tokens: int, temperature: float, streamer=None) -> str:
    """The decoded continuation of ``prompt`` in the training prompt format, special tokens removed.

    ``streamer`` (optional) receives the tokens as generate() makes them.
    """
    import torch

    device = next(model.parameters()).device
    prompt_ids = torch.tensor([fmt.prompt_ids(prompt)], dtype=torch.long, device=device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
            **sampling,
        )
    return tokenizer.decode(output[0, prompt_ids.shape[1] :], skip_special_tokens=True).strip()


def check_temperature(temperature: float) -> None:
    """Raise ConfigError unless ``temperature`` is 0 (greedy) or a finite value sampling can use."""
    from ..errors import ConfigError

    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(
            f"--temperature must be a finite number, 0 or more, got {temperature}; "
            "pass 0 for greedy answers, or a value such as 0.7 to sample"
        )
    if 0 < temperature < MIN_SAMPLING_TEMPERATURE:
        raise ConfigError(
            f"--temperature {temperature:g} is too small to sample with (the minimum is {MIN_SAMPLING_TEMPERATURE:g}); "
            "pass 0 for greedy answers"
        )


def parse_seed(text: str) -> int:
    """The --seed value as an int from 0 to 2**64-1, or a ConfigError saying what is accepted."""
    from ..errors import ConfigError

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"--seed must be a whole number from 0 to 2**64-1 ({SEED_MAX}), got {text!r}")
    return value


@handles_errors("generate")
def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.encode import PromptFormat
    from ..models.adapters import load_for_inference, using
    from ..training.progress import progress_bar

    check_temperature(args.temperature)
    seed = parse_seed(args.seed)
    inference = load_for_inference(args.adapter, args.model, args.dtype, args.device, args.threads)
    tokenizer = inference.loaded.tokenizer
    fmt = PromptFormat(tokenizer)
    sources = ([None] if args.base or not inference.adapters else []) + list(inference.adapters)
    headed = len(sources) > 1
    for prompt in args.prompts:
        if headed and not args.json and len(args.prompts) > 1:
            print(f"# {prompt}")
        for source in sources:
            torch.manual_seed(seed)
            label = "base" if source is None else source.label
            bar = progress_bar(
                args.max_new_tokens, f"generating ({label})", "token", enabled=not args.no_progress, leave=False
            )
            with bar, using(inference.model, source) as model:
                answer = generate_answer(
                    model, fmt, tokenizer, prompt, args.max_new_tokens, args.temperature, TokenCounter(bar)
                )
            if args.json:
                print(json.dumps({"prompt": prompt, "model": label, "answer": answer}), flush=True)
            elif headed:
                print(f"## {label}\n{answer}\n", flush=True)
            else:
                print(answer, flush=True)
    return EXIT_OK
