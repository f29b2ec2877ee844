"""Greedy decoding speed of a SmolLM2-135M-shaped model with an all-linear LoRA adapter, against PEFT and the bound.

Run: python benchmarks/decode.py [--layers N] [--new-tokens N] [--repeats N] [--configs a,b,...]
                                 [--omp-wait-policy both|default|passive]

Times ``generate`` (greedy, KV cache, batch 1) in one process, alternating the configurations
round by round: eetq-lora's int8 model with a LoRA adapter (r=16, all-linear) with float32,
bfloat16 and float16 activations, and PEFT LoRA on the float model in float32 and bfloat16.
Prints tokens/s, each configuration's time per token against PEFT's, and the bandwidth bound:
every weight byte is read once per token (the tied embedding as the head), so the read bandwidth
measured in the same run over the model's bytes bounds tokens/s. A second table splits each
configuration's time per token into the LoRA layers (base matmul and adapter; for eetq-lora also
the part spent in its one-call kernels, the ctypes call included), the head, and everything else
(attention, norms, the framework's Python), timed with wrappers that add about a microsecond per
call. Weights are random (no download); the decoding cost does not depend on them.

OpenMP's wait policy moves decoding speed as much as most code changes do: under PASSIVE every
torch operator that runs on several threads (attention, the head) first wakes the sleeping
workers, while under libgomp's default they spin a while between operators. The whole measurement
runs once per policy (``both``, the default), each in a fresh process, since OpenMP reads
OMP_WAIT_POLICY once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import bench_utils  # noqa: I001 - sets OMP_WAIT_POLICY before torch loads
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model
from peft.tuners.lora import LoraLayer
from train_step import smollm2_config
from transformers import LlamaForCausalLM

import eetq_lora
from eetq_lora.kernels import stream
from eetq_lora.quant.model import tensor_bytes

CONFIGS = ("eetq-fp32", "eetq-bf16", "eetq-fp16", "peft-fp32", "peft-bf16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
POLICIES = ("default", "passive")
CHILD_FLAG = "--measure-in-this-process"


def build(name: str, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = smollm2_config(layers)
    config.use_cache = True
    model = LlamaForCausalLM(config).to(DTYPES[name.rsplit("-", 1)[1]])
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    if name.startswith("eetq"):
        return eetq_lora.get_peft_model(eetq_lora.quantize_model(model), lora).eval()
    return peft_get_peft_model(model, lora).eval()


def generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy tokens after the prompt."""
    with torch.no_grad():
        begin = time.perf_counter()
        model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - begin


@contextmanager
def timed_parts(model: torch.nn.Module) -> Iterator[dict[str, float]]:
    """Seconds spent in the LoRA layers, in eetq-lora's one-call kernels and in the head while the block runs."""
    spent = {"lora layers": 0.0, "kernels": 0.0, "head": 0.0}
    restore = []

    def wrap(owner, attribute: str, part: str) -> None:
        function = getattr(owner, attribute)

        def timed(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - begin

        restore.append((owner, attribute, owner.__dict__.get(attribute)))
        setattr(owner, attribute, timed)

    for module in model.modules():
        if isinstance(module, LoraLayer):
            wrap(module, "forward", "lora layers")
    wrap(model.get_output_embeddings(), "forward", "head")
    wrap(stream, "launch_stream", "kernels")  # the one Python call into the compiled decode kernel
    try:
        yield spent
    finally:
        for owner, attribute, previous in reversed(restore):
            if previous is None:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, previous)


def measure(args: argparse.Namespace) -> None:
    names = [name for name in args.configs.split(",") if name]
    prompt = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    models = {name: build(name, args.layers) for name in names}
    for model in models.values():
        generate(model, prompt, 4)  # warm-up: kernel build, first allocations
    prefill = {name: statistics.median(generate(m, prompt, 1) for _ in range(3)) for name, m in models.items()}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, model in models.items():
            seconds[name].append(generate(model, prompt, args.new_tokens))
    bandwidth = bench_utils.dram_read_gbps()
    # Time per generated token, the prompt's forward pass (measured alone) taken out.
    per_token = {name: (statistics.median(seconds[name]) - prefill[name]) / (args.new_tokens - 1) for name in names}

    policy = os.environ.get("OMP_WAIT_POLICY") or "libgomp's default (unset)"
    print(f"\n## OMP_WAIT_POLICY: {policy}\n")
    print(f"greedy decoding, {args.layers} layers, batch 1, {args.new_tokens} new tokens, LoRA r=16 all-linear")
    print(f"machine: {bench_utils.machine_summary()}; read bandwidth {bandwidth:.1f} GB/s")
    peers = [name for name in ("peft-bf16", "peft-fp32") if name in names]
    header = "| config | tokens/s | ms/token | " + " | ".join(f"time vs {p}" for p in peers)
    print(header + " | weights MB | bound tokens/s | % of bound |")
    print("|" + "---|" * (6 + len(peers)))
    for name in names:
        rate = 1 / per_token[name]
        size = tensor_bytes(models[name])  # every weight byte, the tied embedding once
        bound = bandwidth * 1e9 / size
        ratios = " | ".join(f"{per_token[name] / per_token[p]:.2f}x" for p in peers)
        print(
            f"| {name} | {rate:.1f} | {per_token[name] * 1e3:.1f} | {ratios} | {size / 1e6:.0f} | {bound:.0f} | "
            f"{100 * rate / bound:.0f}% |"
        )

    print("\nWhere a token's time goes (ms/token; one more timed generate per configuration):")
    print("| config | LoRA layers | of which one-call kernels | head | everything else |")
    print("|---|---|---|---|---|")
    for name, model in models.items():
        with timed_parts(model) as spent:
            total = generate(model, prompt, args.new_tokens)
        tokens = args.new_tokens
        rest = total - spent["lora layers"] - spent["head"]
        kernels = f"{spent['kernels'] / tokens * 1e3:.2f}" if name.startswith("eetq") else "-"
        print(
            f"| {name} | {spent['lora layers'] / tokens * 1e3:.2f} | {kernels} | {spent['head'] / tokens * 1e3:.2f} | "
            f"{rest / tokens * 1e3:.2f} |"
        )


def run_per_policy(policies: list[str]) -> None:
    """Run this script once per OpenMP wait policy, each in a fresh process with that environment."""
    for policy in policies:
        environment = dict(os.environ)
        if policy == "passive":
            environment["OMP_WAIT_POLICY"] = "PASSIVE"
            environment.pop(bench_utils.KEEP_OPENMP_DEFAULT, None)
        else:
            environment.pop("OMP_WAIT_POLICY", None)
            environment[bench_utils.KEEP_OPENMP_DEFAULT] = "1"
        sys.stdout.flush()
        subprocess.run([sys.executable, __file__, *sys.argv[1:], CHILD_FLAG], env=environment, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers of the 135M shape (30 = full)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument(
        "--omp-wait-policy", choices=("both", *POLICIES), default="both", help="OpenMP wait policies to measure under"
    )
    parser.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_in_this_process:
        measure(args)
    else:
        run_per_policy(list(POLICIES) if args.omp_wait_policy == "both" else [args.omp_wait_policy])


if __name__ == "__main__":
    main()
