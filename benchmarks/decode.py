"""Greedy decoding speed of a SmolLM2-135M-shaped model with an all-linear LoRA adapter, against PEFT.

Run: python benchmarks/decode.py [--layers N] [--new-tokens N] [--repeats N]

Times ``generate`` (greedy, KV cache, batch 1) in one process, alternating the
configurations round by round: eetq-lora's int8 model with a LoRA adapter (r=16, all-linear)
in bfloat16 and in float16, and PEFT LoRA on the same model in float32 and in bfloat16. Prints tokens/s and the ratio of
each peer's time per token to ours. Weights are random (no download); the decoding cost does not
depend on them. OMP_WAIT_POLICY=PASSIVE is set before torch loads, as in the other benchmarks,
unless the variable is already set (``OMP_WAIT_POLICY= python benchmarks/decode.py`` times
OpenMP's default policy, under which small layers use both threads).
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_utils  # noqa: I001 - sets OMP_WAIT_POLICY before torch loads
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model
from train_step import smollm2_config
from transformers import LlamaForCausalLM

import eetq_lora

CONFIGS = ("eetq-bf16", "eetq-fp16", "peft-bf16", "peft-fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(name: str, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = smollm2_config(layers)
    config.use_cache = True
    model = LlamaForCausalLM(config).to(DTYPES[name.rsplit("-", 1)[1]])
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    if name.startswith("eetq"):
        return eetq_lora.get_peft_model(eetq_lora.quantize_model(model), lora).eval()
    return peft_get_peft_model(model, lora).eval()


def tokens_per_second(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    with torch.no_grad():
        begin = time.perf_counter()
        model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers of the 135M shape (30 = full)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prompt = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    models = {name: build(name, args.layers) for name in CONFIGS}
    for model in models.values():
        tokens_per_second(model, prompt, 4)  # warm-up: kernel build, first allocations
    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, model in models.items():
            rates[name].append(tokens_per_second(model, prompt, args.new_tokens))
    machine = bench_utils.machine_summary()
    print(f"greedy decoding, {args.layers} layers, batch 1, {args.new_tokens} new tokens, LoRA r=16 all-linear")
    print(f"machine: {machine}")
    ours = statistics.median(rates["eetq-bf16"])
    for name in CONFIGS:
        rate = statistics.median(rates[name])
        print(f"  {name:10} {rate:6.1f} tokens/s   time per token vs eetq-bf16: {ours / rate:.2f}x")


if __name__ == "__main__":
    main()
