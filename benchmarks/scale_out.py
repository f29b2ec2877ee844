"""Scale-out on CPU: per-rank memory and step time of 1 process, DDP and FSDP2 (2 gloo ranks); a 70B estimate.

Run: python benchmarks/scale_out.py [--sizes llama-h2048-l12,smollm2-135m] [--seq 136] [--steps 3]

For each model size (a Llama shape with random float32 weights built in code, every linear layer
but the head quantized with ``eetq_lora.quantize_model``, saved once as an EETQ checkpoint by a
process of its own) this launches, in fresh processes so each peak RSS is its own, three
configurations that each load the checkpoint with ``from_pretrained`` (read into memory, not
memory-mapped, so RSS counts each weight once) and add LoRA r=16 on all-linear with
``eetq_lora.get_peft_model`` (same seed, so the same adapters everywhere):

- ``1 process``: the whole batch in one process;
- ``DDP x2``: DistributedDataParallel on 2 gloo ranks, half the batch each;
- ``FSDP2 x2``: ``eetq_lora.parallel.shard_model`` (reshard_after_forward=True) on 2 gloo ranks.

The global batch is fixed (2 sequences of ``--seq`` tokens) and every process runs 1 thread, so on
2 cores 2 ranks can at best halve the step time. A step is forward, transformers' loss, backward
and AdamW; its time is the median of ``--steps`` steps after one warm-up step, on the slowest rank.
Per rank: the int8 base bytes held (``eetq_lora.parallel.local_int8_bytes``), the peak RSS of the
set-up (``resource.getrusage``: loading the whole checkpoint, adding LoRA, wrapping or sharding)
and the peak RSS over the training steps alone (the peak is reset between the two).

``--seq`` should give each rank more than 128 tokens: from 128 rows down the CPU int8 kernels switch
to their streaming path, so 1 process and a rank would run different kernels (the run says which).

Then the per-GPU memory of LoRA on a Llama-3-70B-shaped EETQ model on 8 GPUs, computed from its
config by ``estimate_memory``, replicated (DDP) against sharded (FSDP2 / ZeRO-3). The same function
is checked against the bytes the run measured. Exits with 1 if an FSDP2 rank holds more than its
1/N of the int8 base (rounded up per tensor) or the estimate misses a measured value.

On the 2-core development machine, shared with other jobs, the default run took about 13 minutes
(one-off build about 2, each configuration 3 to 4); ``--steps 1`` or ``--sizes smollm2-135m`` is quicker.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bench_utils  # noqa: I001 - sets OMP_WAIT_POLICY before torch loads
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from peft import LoraConfig
from train_step import smollm2_config
from transformers import LlamaConfig, LlamaForCausalLM

import eetq_lora
from eetq_lora.kernels import select_path
from eetq_lora.parallel import local_int8_bytes, shard_model

GiB = 2**30
MiB = bench_utils.MiB
MODES = {"1 process": 1, "DDP x2": 2, "FSDP2 x2": 2}
LORA_RANK = 16
SEQUENCES = 2  # the global batch: 1 process takes both sequences, each of 2 ranks one
# Tensors that are neither the base model nor LoRA: the rotary frequencies, recomputed from the config.
NOT_WEIGHTS = ("lora_", "inv_freq")


def llama_h2048_l12() -> LlamaConfig:
    """A 1B-class Llama shape (TinyLlama's widths and vocabulary) cut to 12 layers, to train on a small CPU."""
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=12,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        use_cache=False,
    )


def llama3_70b() -> LlamaConfig:
    """Llama-3-70B's shape."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        use_cache=False,
    )


SIZES: dict[str, Callable[[], LlamaConfig]] = {"llama-h2048-l12": llama_h2048_l12, "smollm2-135m": smollm2_config}


# ---------------------------------------------------------------------------------------------
# The estimate: bytes per rank from a config alone.


def linear_shapes(config: LlamaConfig) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear layer eetq-lora quantizes: 7 per decoder layer, not the head."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inner = config.hidden_size, config.intermediate_size
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = [
        (hidden, q_width),  # q_proj
        (hidden, kv_width),  # k_proj
        (hidden, kv_width),  # v_proj
        (q_width, hidden),  # o_proj
        (hidden, inner),  # gate_proj
        (hidden, inner),  # up_proj
        (inner, hidden),  # down_proj
    ]
    return per_layer * config.num_hidden_layers


def _share(rows: int, columns: int, world_size: int) -> int:
    # FSDP2 splits dim 0 as torch.chunk does: the first rank holds ceil(rows / N) rows, the most any rank holds.
    return math.ceil(rows / world_size) * columns


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds for LoRA training on an EETQ model, before activations and transient all-gathers."""

    int8_base: int  # EETQ int8 weights of the linear layers
    scales: int  # their float16 per-output-channel scales (buffers: whole on every rank, also under FSDP2)
    embeddings: int  # input embeddings and untied output head
    norms: int  # RMSNorm weights
    lora_parameters: int  # how many LoRA parameters this rank holds
    lora_state: int  # their float32 value, gradient and two AdamW moments: 16 bytes a parameter
    largest_unit: tuple[str, int]  # the biggest FSDP2 unit, gathered whole while it runs ("", 0 when replicated)

    @property
    def base(self) -> int:
        """The frozen model: int8 weights, scales, embeddings, head and norms."""
        return self.int8_base + self.scales + self.embeddings + self.norms

    @property
    def total(self) -> int:
        return self.base + self.lora_state


def estimate_memory(
    config: LlamaConfig, world_size: int = 1, lora_rank: int = LORA_RANK, float_bytes: int = 2
) -> MemoryEstimate:
    """Per-rank bytes of an EETQ Llama with LoRA on all linear layers, sharded over ``world_size`` (1: replicated).

    Sharding follows FSDP2 (every parameter split on dim 0, rounded up, so this is the most any
    rank holds; buffers whole) and ZeRO-3 alike. The int8 weight is [in, out], LoRA A [r, in] and
    B [out, r]. ``float_bytes`` is the element size of the embeddings, head and norms (2: bfloat16).
    """
    shapes = linear_shapes(config)
    int8_base = sum(_share(rows, columns, world_size) for rows, columns in shapes)
    scales = sum(2 * columns for _, columns in shapes)
    lora_parameters = sum(
        _share(lora_rank, rows, world_size) + _share(columns, lora_rank, world_size) for rows, columns in shapes
    )
    vocab, hidden = config.vocab_size, config.hidden_size
    tables = 1 if config.tie_word_embeddings else 2
    embeddings = tables * float_bytes * _share(vocab, hidden, world_size)
    norms = (2 * config.num_hidden_layers + 1) * float_bytes * _share(hidden, 1, world_size)
    largest_unit = ("", 0)
    if world_size > 1:
        per_layer = shapes[: len(shapes) // config.num_hidden_layers]
        layer = sum(rows * columns + 4 * lora_rank * (rows + columns) for rows, columns in per_layer)
        largest_unit = max(
            ("a decoder layer", layer),
            ("the embeddings or head", float_bytes * vocab * hidden),
            key=lambda unit: unit[1],
        )
    return MemoryEstimate(
        int8_base=int8_base,
        scales=scales,
        embeddings=embeddings,
        norms=norms,
        lora_parameters=lora_parameters,
        lora_state=16 * lora_parameters,
        largest_unit=largest_unit,
    )


# ---------------------------------------------------------------------------------------------
# One measured configuration, on each of its ranks.


def save_checkpoint(size: str, folder: str) -> None:
    """The size's Llama with random float32 weights, EETQ-quantized, saved as an EETQ checkpoint in ``folder``."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(SIZES[size]())
    eetq_lora.quantize_model(model)
    model.save_pretrained(folder)


def _build_entry(_index: int, size: str, folder: str) -> None:
    # A process of its own: a child inherits its parent's peak RSS as its own starting ru_maxrss,
    # so the parent must never hold a model.
    torch.set_num_threads(os.cpu_count() or 1)
    _quiet()
    save_checkpoint(size, folder)


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes this rank holds of the frozen model (every parameter and buffer but LoRA and the rotary frequencies)."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    unique = {id(t): t for name, t in named if not any(part in name for part in NOT_WEIGHTS)}
    return sum(bench_utils.tensor_bytes(t) for t in unique.values())


def lora_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds for the trainable parameters: values, gradients and optimizer moments."""
    total = 0
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        tensors = [parameter, parameter.grad] + list(optimizer.state.get(parameter, {}).values())
        # AdamW's step counter is a 0-d tensor; it is not part of the per-parameter state that scales.
        total += sum(bench_utils.tensor_bytes(t) for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0)
    return total


def measure(rank: int, world_size: int, mode: str, size: str, folder: str, seq: int, steps: int) -> dict:
    """Load, wrap as ``mode`` says, train ``steps + 1`` steps on this rank's part of the batch; what it measured."""
    model = LlamaForCausalLM.from_pretrained(folder, disable_mmap=True)
    torch.manual_seed(0)  # the same LoRA initialisation in every process
    lora = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear", lora_dropout=0.0)
    model = eetq_lora.get_peft_model(model, lora)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if mode.startswith("DDP"):
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif mode.startswith("FSDP2"):
        shard_model(model, reshard_after_forward=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, SIZES[size]().vocab_size, (SEQUENCES, seq), generator=torch.Generator().manual_seed(0))
    ids = batch.chunk(world_size)[rank]

    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bench_utils.release_free_memory()
    held = bench_utils.rss_bytes()
    bench_utils.reset_peak_rss()
    durations, losses, state = [], [], 0
    for index in range(steps + 1):
        begin = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if index == steps:  # gradients and moments all exist now
            state = lora_state_bytes(model, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if index:  # the first step warms up: allocations, optimizer state, gloo buffers
            durations.append(time.perf_counter() - begin)
    return {
        "int8_local": local_int8_bytes(model),
        "base_bytes": frozen_bytes(model),
        "trainable": trainable,
        "lora_state": state,
        "setup_peak_rss": setup_peak,
        "held_rss": held,
        "steps_peak_rss": bench_utils.peak_rss_bytes(),
        "step_s": statistics.median(durations),
        "losses": losses,
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _quiet() -> None:
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _rank_entry(rank: int, world_size: int, port: int, out_dir: str, job: tuple) -> None:
    torch.set_num_threads(1)
    _quiet()
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(measure(rank, world_size, *job), Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_mode(mode: str, size: str, folder: Path, seq: int, steps: int) -> list[dict]:
    """``measure`` on each rank of ``mode``, each rank a fresh 1-thread process; their results in rank order."""
    world_size = MODES[mode]
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            job = (mode, size, str(folder), seq, steps)
            mp.spawn(_rank_entry, args=(world_size, _free_port(), out_dir, job), nprocs=world_size, join=True)
        except Exception as error:
            detail = "\n".join(path.read_text() for path in sorted(Path(out_dir).glob("*.error")))
            raise SystemExit(f"{mode} on {size} failed:\n{detail or error}") from error
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


# ---------------------------------------------------------------------------------------------
# Reporting.


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / MiB:,.0f}"


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GiB:,.2f}"


def kernel_paths(seq: int) -> str:
    """Which CPU int8 kernel path a process of each mode runs, forward and input gradient."""
    probe = torch.zeros(1, 1, dtype=torch.int8)
    parts = []
    for label, rows in (("1 process", SEQUENCES * seq), ("each of 2 ranks", seq)):
        paths = {select_path("cpu", torch.float32, rows, probe, op).name for op in ("forward", "grad_input")}
        parts.append(f"{label}: {rows} rows, {'/'.join(sorted(paths))}")
    return "; ".join(parts)


def measured_table(size: str, seq: int, results: dict[str, list[dict]]) -> list[str]:
    """The markdown table of one size, each ratio against its 1-process row."""
    base = results["1 process"][0]
    lines = [
        f"#### {size}: global batch {SEQUENCES} x {seq} tokens, float32, 1 thread per process",
        "",
        "| mode | int8 base per rank MiB | x 1p | set-up peak RSS MiB | held RSS MiB | steps peak RSS MiB | x 1p "
        "| step s | x 1p | tokens/s | x 1p | mean loss, step 1 -> last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode, ranks in results.items():
        # Per-rank values are the largest over ranks; the step is synchronous, so the slowest rank sets its time.
        int8, steps_peak, step = (max(r[key] for r in ranks) for key in ("int8_local", "steps_peak_rss", "step_s"))
        setup_peak, held = (max(r[key] for r in ranks) for key in ("setup_peak_rss", "held_rss"))
        first = statistics.mean(r["losses"][0] for r in ranks)
        last = statistics.mean(r["losses"][-1] for r in ranks)
        lines.append(
            f"| {mode} | {_mib(int8)} | {int8 / base['int8_local']:.2f} | {_mib(setup_peak)} | {_mib(held)} "
            f"| {_mib(steps_peak)} | {steps_peak / base['steps_peak_rss']:.2f} | {step:.2f} "
            f"| {step / base['step_s']:.2f} | {SEQUENCES * seq / step:,.1f} | {base['step_s'] / step:.2f} "
            f"| {first:.5f} -> {last:.5f} |"
        )
    return lines


def estimate_checks(size: str, results: dict[str, list[dict]]) -> tuple[list[str], list[str]]:
    """Lines comparing ``estimate_memory`` with what the run measured, and the failures among them."""
    config = SIZES[size]()
    whole, halves = estimate_memory(config, 1, float_bytes=4), estimate_memory(config, 2, float_bytes=4)
    one, ddp, fsdp = results["1 process"][0], results["DDP x2"], results["FSDP2 x2"]
    fsdp_int8 = [r["int8_local"] for r in fsdp]

    def listed(key: str, ranks: list[dict]) -> str:
        return ", ".join(f"{r[key]:,}" for r in ranks)

    lines = [
        f"- {size}, int8 base: estimate {whole.int8_base:,} B; measured 1 process {one['int8_local']:,} B, "
        f"DDP ranks {listed('int8_local', ddp)} B",
        f"- {size}, int8 base per FSDP2 rank: estimate at most {halves.int8_base:,} B (1/2, rounded up per tensor); "
        f"measured {listed('int8_local', fsdp)} B",
        f"- {size}, whole frozen model (int8, scales, float32 embeddings/head/norms): estimate {whole.base:,} B, "
        f"measured {one['base_bytes']:,} B; per FSDP2 rank estimate at most {halves.base:,} B, "
        f"measured {listed('base_bytes', fsdp)} B",
        f"- {size}, LoRA: estimate {whole.lora_parameters:,} parameters, {whole.lora_state:,} B with gradients and "
        f"AdamW; measured {one['trainable']:,}, {one['lora_state']:,} B; per FSDP2 rank estimate at most "
        f"{halves.lora_state:,} B, measured {listed('lora_state', fsdp)} B",
    ]
    failures = []
    exact = {
        "int8 base": (whole.int8_base, [one["int8_local"]] + [r["int8_local"] for r in ddp]),
        "frozen model bytes": (whole.base, [one["base_bytes"]]),
        "LoRA parameters": (whole.lora_parameters, [one["trainable"]]),
        "LoRA state bytes": (whole.lora_state, [one["lora_state"]]),
    }
    for name, (expected, measured) in exact.items():
        if any(value != expected for value in measured):
            failures.append(f"{size}: {name} estimate {expected:,} misses the measured {measured}")
    if max(fsdp_int8) > halves.int8_base or sum(fsdp_int8) != whole.int8_base:
        failures.append(f"{size}: an FSDP2 rank holds more than 1/2 of the int8 base: {fsdp_int8} B")
    for name, key, bound in (
        ("frozen model", "base_bytes", halves.base),
        ("LoRA state", "lora_state", halves.lora_state),
    ):
        if max(r[key] for r in fsdp) > bound:
            failures.append(f"{size}: an FSDP2 rank holds more {name} bytes than the estimate {bound:,}")
    return lines, failures


def estimate_table(config: LlamaConfig, world_size: int) -> list[str]:
    """Replicated against sharded, per GPU, by component."""
    replicated, sharded = estimate_memory(config, 1), estimate_memory(config, world_size)
    rows = [
        ("int8 base (linear layers)", replicated.int8_base, sharded.int8_base),
        ("float16 scales (buffers, never sharded)", replicated.scales, sharded.scales),
        ("bfloat16 embeddings + head", replicated.embeddings, sharded.embeddings),
        ("bfloat16 norms", replicated.norms, sharded.norms),
        (
            f"LoRA r={LORA_RANK}, {replicated.lora_parameters:,} params: fp32 value + grad + AdamW moments",
            replicated.lora_state,
            sharded.lora_state,
        ),
        ("total before activations", replicated.total, sharded.total),
    ]
    unit_name, unit_bytes = sharded.largest_unit
    lines = [f"| per GPU, GiB | DDP (replicated) | FSDP2 / ZeRO-3 over {world_size} |", "|---|---:|---:|"]
    lines += [f"| {name} | {_gib(full)} | {_gib(part)} |" for name, full, part in rows]
    lines += [
        "",
        f"Not included: activations, and under FSDP2 the unit gathered whole while it runs: the largest is "
        f"{unit_name}, {_gib(unit_bytes)} GiB (with prefetch, two units can be gathered at once).",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="llama-h2048-l12", help=f"comma-separated, of: {', '.join(SIZES)}")
    parser.add_argument("--seq", type=int, default=136, help="tokens per sequence; 2 sequences a step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    args = parser.parse_args()
    sizes = [name.strip() for name in args.sizes.split(",") if name.strip()]
    unknown = [name for name in sizes if name not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    if args.seq < 1 or args.steps < 1:
        parser.error("--seq and --steps must be at least 1")
    _quiet()

    started = time.perf_counter()
    machine = bench_utils.machine_summary()
    print(f"$ python benchmarks/scale_out.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"{datetime.date.today()}, {os.cpu_count()} CPU cores ({machine['cpu']}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, gloo; load average at start "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        "Every process runs 1 thread (torch.set_num_threads(1)): 1 process uses 1 core, 2 ranks use 2, the fair "
        "comparison on 2 cores. Ratios (x 1p) are against the 1-process row of the same run; for tokens/s, "
        "2.00 is perfect scaling."
    )
    print(f"int8 kernel path: {kernel_paths(args.seq)}")
    failures: list[str] = []
    checks: list[str] = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_build_entry, args=(size, folder), nprocs=1, join=True)
            results = {mode: run_mode(mode, size, Path(folder), args.seq, args.steps) for mode in MODES}
        print()
        print("\n".join(measured_table(size, args.seq, results)))
        lines, failed = estimate_checks(size, results)
        checks += lines
        failures += failed
    print()
    print("#### estimate_memory against this run")
    print()
    print("\n".join(checks))
    print()
    print(
        "#### Estimate: Llama-3-70B shape (hidden 8192, intermediate 28672, 80 layers, 64 heads, 8 KV heads, "
        f"vocab 128256), EETQ int8, LoRA r={LORA_RANK} all-linear, 8 GPUs"
    )
    print()
    print("\n".join(estimate_table(llama3_70b(), 8)))
    print()
    print(
        f"Total time {time.perf_counter() - started:.0f} s; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (other jobs on a shared machine slow the rows unevenly)."
    )
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
