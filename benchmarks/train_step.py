"""One LoRA training configuration of a SmolLM2-135M-shaped llama; prints one JSON line.

Run by int8_suite.py in a fresh process per configuration, so peak RSS belongs to that
configuration alone: python benchmarks/train_step.py --config eetq-bf16 [--batch B --seq T --steps N]

Configurations: ``peft-fp32`` and ``peft-bf16`` (PEFT LoRA on the float model), ``eetq-bf16``
and ``eetq-fp32`` (EETQ int8 base, LoRA, activations in that dtype) and ``eetq-fp32/bf16c``
(float32 activations with bfloat16 compute). The model is built from config with random
weights: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152.

Every token is labelled. The PEFT configurations take transformers' loss (``model(...,
labels=...).loss``), as a PEFT training loop does; the eetq ones take eetq-lora's training
step (``eetq_lora.training.loss.answer_token_stats``: the same mean next-token loss, with the
vocabulary projection and cross-entropy in chunks) on a model prepared as eetq-lora's
fine-tuning prepares it (``recompute_cheap_ops``: RMSNorm and the MLP activation recomputed in
backward). ``eetq-bf16/hf-loss`` is eetq-bf16 with transformers' loss and model forward as they
are, to show what those two save.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import bench_utils  # noqa: I001 - sets OMP_WAIT_POLICY before torch loads
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import eetq_lora
from eetq_lora.kernels import compute_dtype
from eetq_lora.training.loss import answer_token_stats
from eetq_lora.training.recompute import recompute_cheap_ops

CONFIGS = ("peft-fp32", "peft-bf16", "eetq-bf16", "eetq-bf16/hf-loss", "eetq-fp32", "eetq-fp32/bf16c")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_config(layers: int = 30) -> LlamaConfig:
    """SmolLM2-135M's shape."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        use_cache=False,
    )


def build(config_name: str, layers: int) -> tuple[torch.nn.Module, torch.dtype | None]:
    """The LoRA model of one configuration, and the compute dtype it trains under."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config(layers))
    activation = torch.float32 if "fp32" in config_name else torch.bfloat16
    model.to(activation)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    if config_name.startswith("eetq"):
        eetq_lora.quantize_model(model)
        model = eetq_lora.get_peft_model(model, lora)
        if not config_name.endswith("hf-loss"):
            recompute_cheap_ops(model)
    else:
        model = peft_get_peft_model(model, lora)
    return model, (torch.bfloat16 if config_name.endswith("bf16c") else None)


def run(config_name: str, batch: int, seq: int, steps: int, layers: int) -> dict[str, object]:
    bench_utils.release_free_memory()
    baseline = bench_utils.rss_bytes()
    model, compute = build(config_name, layers)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49152, (batch, seq), generator=generator)
    weights_bytes = bench_utils.module_bytes(model)
    bench_utils.release_free_memory()
    model_rss = bench_utils.rss_bytes()
    bench_utils.reset_peak_rss()

    labelled = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
    library_loss = config_name.startswith("eetq") and not config_name.endswith("hf-loss")

    def step() -> float:
        with compute_dtype(compute):
            if library_loss:
                stats = answer_token_stats(model, labelled)
                loss = stats.nll / stats.tokens
            else:
                loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    durations = []
    losses = []
    for index in range(steps + 1):
        begin = time.perf_counter()
        losses.append(step())
        if index:  # the first step warms up (allocations, kernel build, optimizer state)
            durations.append(time.perf_counter() - begin)
    peak = bench_utils.peak_rss_bytes()
    seconds = statistics.median(durations)
    return {
        "config": config_name,
        "batch": batch,
        "seq": seq,
        "layers": layers,
        "step_s": seconds,
        "tokens_per_s": batch * seq / seconds,
        "peak_rss_mib": peak / bench_utils.MiB,
        "peak_over_baseline_mib": (peak - baseline) / bench_utils.MiB,
        "model_rss_over_baseline_mib": (model_rss - baseline) / bench_utils.MiB,
        "weights_mib": weights_bytes / bench_utils.MiB,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps(run(args.config, args.batch, args.seq, args.steps, args.layers)))


if __name__ == "__main__":
    main()
