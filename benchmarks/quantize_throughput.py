"""Quantization throughput (parameters per second) on a SmolLM2-135M-shaped llama with random weights.

Measures three things on this machine's CPU (or --device):
- checkpoint: ``quantize_checkpoint`` on a saved safetensors folder, end to end (read, quantize,
  pack to sm75, write), i.e. what ``eetq-lora quantize`` does, with --threads workers;
- quantize+pack: ``quantize_weight`` then ``pack_weight`` on every linear weight held in memory,
  one after the other with --threads torch intra-op threads;
- pack only: ``pack_weight`` alone, the cost EetqLinear's state dict pays per save.

Usage: python benchmarks/quantize_throughput.py [--dtype bfloat16] [--threads N] [--layers 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from train_step import smollm2_config  # the one SmolLM2-135M shape all benchmarks use
from transformers import LlamaForCausalLM

from eetq_lora.format.layout import pack_weight
from eetq_lora.format.quantize import quantize_weight
from eetq_lora.quant.convert import quantize_checkpoint

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="device for the in-memory measurements")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]

    model = LlamaForCausalLM(smollm2_config(args.layers)).to(dtype).eval()
    total = sum(p.numel() for p in model.parameters())
    linears = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    linear_params = sum(w.numel() for w in linears)
    print(
        f"model: {total / 1e6:.1f} M parameters ({linear_params / 1e6:.1f} M in {len(linears)} linear layers), "
        f"{args.dtype}, torch threads {torch.get_num_threads()}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "float", Path(tmp) / "int8"
        model.save_pretrained(src)
        del model
        report = quantize_checkpoint(src, out, threads=args.threads, progress=False)
        print(
            f"checkpoint:     {report.seconds:6.2f} s  {report.parameters / report.seconds / 1e6:7.1f} M params/s "
            f"({report.quantized_parameters / report.seconds / 1e6:.1f} M linear params/s), "
            f"{report.bytes_before / 2**20:.0f} MiB -> {report.bytes_after / 2**20:.0f} MiB"
        )

    weights = [w.to(args.device) for w in linears]
    quantized = []

    def quantize_all():
        quantized.clear()
        for w in weights:
            q, _ = quantize_weight(w)
            quantized.append(q)
            pack_weight(q, "sm75")

    def pack_all():
        for q in quantized:
            pack_weight(q, "sm75")

    quantize_all()  # warm-up
    seconds = timed(quantize_all)
    print(f"quantize+pack:  {seconds:6.2f} s  {linear_params / seconds / 1e6:7.1f} M params/s")
    seconds = timed(pack_all)
    print(f"pack only:      {seconds:6.2f} s  {linear_params / seconds / 1e6:7.1f} M params/s")


if __name__ == "__main__":
    main()
