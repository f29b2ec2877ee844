"""Mixed-adapter serving cost and torch.compile vs eager, on a SmolLM2-135M-shaped int8 model.

Run: python benchmarks/adapters_and_compile.py [--layers N] [--repeats N]

Prints, in one run on the same machine: the forward time of a batch served with one adapter,
with K different adapters mixed per sample (PEFT's adapter_names), and with the base alone;
then a LoRA training step (forward+backward) eager vs torch.compile. Only ratios within a run
mean anything on a shared machine. OMP_WAIT_POLICY=PASSIVE is set (before torch loads) to
avoid the ~8 ms OpenMP stalls seen on this CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from train_step import smollm2_config  # noqa: E402  (the one SmolLM2-135M shape all benchmarks use)
from transformers import LlamaForCausalLM  # noqa: E402

import eetq_lora  # noqa: E402


def smollm2_shaped(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(smollm2_config(layers))


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_mixed_adapters(layers: int, repeats: int, adapters: int, batch: int, length: int) -> None:
    model = eetq_lora.quantize_model(smollm2_shaped(layers))
    config = LoraConfig(r=16, target_modules="all-linear")
    peft_model = eetq_lora.get_peft_model(model, config, adapter_name="a0")
    for i in range(1, adapters):
        eetq_lora.add_adapter(peft_model, f"a{i}", config)
    peft_model.eval()
    ids = torch.randint(0, 49152, (batch, length))
    names = [f"a{i % adapters}" for i in range(batch)]

    def run(**kwargs):
        with torch.no_grad():
            peft_model(input_ids=ids, **kwargs)

    def base_only():
        with torch.no_grad(), peft_model.disable_adapter():
            peft_model(input_ids=ids)

    one = median_seconds(run, repeats)
    mixed = median_seconds(lambda: run(adapter_names=names), repeats)
    base = median_seconds(base_only, repeats)
    print(f"\nmixed-adapter serving, {layers} layers, batch {batch} x {length} tokens, r=16 all-linear")
    print(f"  base only               {base * 1e3:8.1f} ms   ratio 1.00")
    print(f"  one adapter             {one * 1e3:8.1f} ms   ratio {one / base:.2f}")
    label = f"{adapters} adapters mixed"
    print(f"  {label:24}{mixed * 1e3:8.1f} ms   ratio {mixed / base:.2f}  ({mixed / one:.2f}x one adapter)")


def bench_compile(layers: int, repeats: int, batch: int, length: int) -> None:
    ids = torch.randint(0, 49152, (batch, length))
    timings = {}
    for mode in ("eager", "compiled"):
        model = eetq_lora.quantize_model(smollm2_shaped(layers))
        peft_model = eetq_lora.get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
        peft_model.train()
        forward = peft_model.get_base_model()
        if mode == "compiled":
            forward = torch.compile(forward)

        def step(forward=forward):
            forward(input_ids=ids, labels=ids).loss.backward()

        step()  # compile (or warm up) outside the timing
        timings[mode] = median_seconds(step, repeats)
    print(f"\ntraining step (fwd+bwd), {layers} layers, batch {batch} x {length} tokens")
    print(f"  eager     {timings['eager'] * 1e3:8.1f} ms")
    print(
        f"  compiled  {timings['compiled'] * 1e3:8.1f} ms   compiled/eager {timings['compiled'] / timings['eager']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 135M shape (30 = full)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    bench_mixed_adapters(args.layers, args.repeats, args.adapters, batch=8, length=64)
    if not args.skip_compile:
        bench_compile(args.layers, args.repeats, batch=4, length=64)


if __name__ == "__main__":
    main()
