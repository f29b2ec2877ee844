"""Check and time eetq-lora's CUDA paths on one GPU; prints tables and exits non-zero on a wrong result.

Run from the repository root on a machine with a CUDA GPU and Triton (a few minutes, mostly
compiling): python benchmarks/gpu_check.py [--quick]. ``--dry-run`` runs every section on the
CPU through Triton's interpreter with tiny shapes, to check the script itself without a GPU.

1. Kernel: for float16 and bfloat16, LLM shapes and several M, the Triton kernel's forward and
   input gradient against the pure-torch reference, then timed against F.linear on the dense
   weight and torch's ``_weight_int8pack_mm``. Times are CUDA-graph replays (no Python launch
   cost) over enough distinct weights to overflow L2, so M=1 reads come from HBM; the M=1 row
   prints the fraction of the measured copy bandwidth and of the card's nominal peak.
2. M=1 sweep of the split-reduction config, to show whether the default leaves bandwidth unused.
3. Layer: EetqLoraLinear (r=16) forward and forward+backward against PEFT LoRA on a dense
   float16/bfloat16 nn.Linear, eager (as a training loop sees it), medians of CUDA events.
4. Model: a tiny Llama quantized on the GPU, LoRA-trained in bfloat16 for a few steps (the
   loss must fall), its logits against PEFT on the dequantized float twin, and an adapter
   save/load round trip that must give identical logits.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter switch is read when Triton kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

try:
    import eetq_lora
except ImportError:  # a bare checkout: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import eetq_lora

from int8_layers import SingleLayer, float_linear, lora_config  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft import get_peft_model as peft_get_peft_model  # noqa: E402

from eetq_lora.kernels import compute_dtype_for, reference, select_path, triton_kernels  # noqa: E402
from eetq_lora.kernels.triton_kernels import Config, choose_config, w8_matmul  # noqa: E402

# Nominal peak memory bandwidth (GB/s) of common cards, by a substring of the device name.
NOMINAL_GBPS = {
    "H100 SXM": 3350,
    "H100 PCIe": 2000,
    "H100 NVL": 3900,
    "H100": 3350,
    "H200": 4800,
    "A100": 2039,
    "L4": 300,
    "T4": 320,
    "A10": 600,
}
BUDGET = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}
RANK, ALPHA = 16, 32


class Clock:
    """Milliseconds per call: CUDA graphs and events on a GPU, perf_counter in a dry run."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device = device
        self.repeats = repeats

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def eager_ms(self, fn: Callable[[], object]) -> float:
        """Median ms of one eager call (launch overhead included), after warm-up."""
        for _ in range(3):
            fn()
        self._sync()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)

    def graph_ms(self, calls: list[Callable[[], object]]) -> float:
        """Median ms per call of ``calls`` run back to back, captured once as a CUDA graph."""
        if self.device.type != "cuda":
            return self.eager_ms(lambda: [fn() for fn in calls]) / len(calls)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in calls:  # compile and autotune outside the capture
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in calls:
                fn()
        return self.eager_ms(graph.replay) / len(calls)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()


def copy_gbps(clock: Clock, device: torch.device) -> float:
    """Device memory traffic of a large copy (bytes read + written, per second)."""
    size = 2**30 if device.type == "cuda" else 2**24
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * size / (clock.eager_ms(lambda: target.copy_(source)) / 1e3) / 1e9


def cold_copies(weight_bytes: int, device: torch.device) -> int:
    """How many distinct weights to cycle through so that each call reads its weight from memory, not L2."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20)
    return max(2, math.ceil(4 * l2 / weight_bytes))


def random_weight(in_features: int, out_features: int, device: torch.device, seed: int):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    qweight = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, generator=generator).t()
    scales = (torch.rand(out_features, generator=generator) / 64 + 1e-4).half()
    return qweight.to(device), scales.to(device)


def kernel_section(clock: Clock, device, shapes, rows_list, bandwidth: float, nominal: float) -> int:
    print("\n## 1. Kernel (graph-replayed, cold weights)")
    print(
        "dtype shape M | err fwd, grad | ms: triton fwd, triton grad, dequantize+matmul, F.linear, int8pack "
        "| M=1 weight read rate"
    )
    failures = 0
    for dtype in (torch.float16, torch.bfloat16):
        for in_features, out_features in shapes:
            copies = cold_copies(in_features * out_features, device)
            weights = [random_weight(in_features, out_features, device, seed) for seed in range(copies)]
            dense = [reference._dequantized_t(q, s, dtype).t().contiguous() for q, s in weights]
            packed = [(q.t().contiguous(), s.to(dtype)) for q, s in weights]
            for rows in rows_list:
                x = torch.randn(rows, in_features, device=device, dtype=dtype)
                grad = torch.randn(rows, out_features, device=device, dtype=dtype)
                qweight, scales = weights[0]
                y = triton_kernels.forward(x, qweight, scales)
                dx = triton_kernels.grad_input(grad, qweight, scales)
                err_y = relative_error(y, reference.forward(x, qweight, scales, torch.float32))
                err_dx = relative_error(dx, reference.grad_input(grad, qweight, scales, torch.float32))
                ok = err_y < BUDGET[dtype] and err_dx < BUDGET[dtype]
                failures += not ok
                t_fwd = clock.graph_ms([lambda q=q, s=s, x=x: triton_kernels.forward(x, q, s) for q, s in weights])
                grads = [lambda q=q, s=s, g=grad: triton_kernels.grad_input(g, q, s) for q, s in weights]
                t_grad = clock.graph_ms(grads)
                t_linear = clock.graph_ms([lambda w=w, x=x: F.linear(x, w) for w in dense])
                dequant_calls = [
                    lambda q=q, s=s, x=x, d=dtype: x @ triton_kernels.dequantize(q, s, d) for q, s in weights
                ]
                t_dequant = clock.graph_ms(dequant_calls)
                try:
                    pack_calls = [lambda w=w, s=s, x=x: torch.ops.aten._weight_int8pack_mm(x, w, s) for w, s in packed]
                    t_pack = clock.graph_ms(pack_calls)
                except RuntimeError:
                    t_pack = float("nan")
                line = (
                    f"{str(dtype)[6:]} {in_features}x{out_features} {rows} | {err_y:.1e} {err_dx:.1e} "
                    f"{'ok' if ok else 'WRONG'} | {t_fwd:.4f} {t_grad:.4f} {t_dequant:.4f} {t_linear:.4f} {t_pack:.4f}"
                )
                if rows == 1:
                    gbps = in_features * out_features / (t_fwd / 1e3) / 1e9
                    grad_gbps = in_features * out_features / (t_grad / 1e3) / 1e9
                    line += (
                        f" | fwd {gbps:.0f} GB/s = {gbps / bandwidth:.0%} of copy, {gbps / nominal:.0%} of nominal;"
                        f" grad {grad_gbps:.0f} GB/s = {grad_gbps / bandwidth:.0%} of copy"
                    )
                print(line, flush=True)
    return failures


def sweep_section(clock: Clock, device, shapes, split_values, block_values) -> None:
    print("\n## 2. M=1 split-reduction sweep (float16, cold weights)")
    for in_features, out_features in shapes:
        weights = [
            random_weight(in_features, out_features, device, seed)
            for seed in range(cold_copies(in_features * out_features, device))
        ]
        x = torch.randn(1, in_features, device=device, dtype=torch.float16)
        default = choose_config(1, out_features, in_features, device)
        default_ms = clock.graph_ms([lambda q=q, s=s, x=x: triton_kernels.forward(x, q, s) for q, s in weights])
        sweep = []
        for split in split_values:
            for block_p in block_values:
                config = Config(16, block_p, 128, split, 4, 4)
                calls = [lambda q=q, s=s, c=config, x=x: w8_matmul(x, q, s, True, c) for q, s in weights]
                sweep.append((clock.graph_ms(calls), split, block_p))
        best = min(sweep)
        print(f"{in_features}x{out_features}: default {default} {default_ms:.4f} ms")
        print(
            f"  best {best[0]:.4f} ms at split={best[1]} block_p={best[2]}; all: "
            + ", ".join(f"s{s}/p{p} {ms:.4f}" for ms, s, p in sorted(sweep)[:6])
        )


def layer_section(clock: Clock, device, shapes, rows_list) -> int:
    print("\n## 3. Layer: EetqLoraLinear r=16 vs PEFT LoRA on a dense layer (eager ms)")
    print("dtype shape M | path | eetq fwd, peft fwd, ratio | eetq fwd+bwd, peft fwd+bwd, ratio | err vs dense")
    failures = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for in_features, out_features in shapes:
            linear = float_linear(in_features, out_features)
            ours = eetq_lora.get_peft_model(SingleLayer(eetq_lora.EetqLinear.from_linear(linear)), lora_config())
            ours = ours.to(device)
            dense = SingleLayer(nn.Linear(in_features, out_features, bias=False))
            dense.proj.weight.data = ours.base_model.model.proj.base_layer.dequantize(dtype).cpu()
            peer = peft_get_peft_model(dense, lora_config()).to(device=device)
            peer.base_model.model.proj.base_layer.to(dtype)
            for rows in rows_list:
                x = torch.randn(rows, in_features, device=device, dtype=dtype, requires_grad=True)
                grad = torch.randn(rows, out_features, device=device, dtype=dtype)
                timings = []
                for model in (ours, peer):

                    def forward(model=model, x=x) -> None:
                        with torch.no_grad():
                            model(x)

                    def forward_backward(model=model, x=x, grad=grad) -> None:
                        x.grad = None
                        model(x).backward(grad)

                    timings.append((clock.eager_ms(forward), clock.eager_ms(forward_backward)))
                with torch.no_grad():
                    err = relative_error(ours(x), peer(x))
                ok = err < BUDGET[dtype]
                failures += not ok
                (ours_f, ours_fb), (peer_f, peer_fb) = timings
                qweight = ours.base_model.model.proj.base_layer.weight
                path = select_path(device.type, compute_dtype_for(x), rows, qweight)
                print(
                    f"{str(dtype)[6:]} {in_features}x{out_features} {rows} | {path} | {ours_f:.4f} {peer_f:.4f} "
                    f"{ours_f / peer_f:.2f}x | {ours_fb:.4f} {peer_fb:.4f} {ours_fb / peer_fb:.2f}x | "
                    f"{err:.1e} {'ok' if ok else 'WRONG'}",
                    flush=True,
                )
    return failures


def model_section(device: torch.device) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    print("\n## 4. Tiny Llama on the device: quantize, LoRA-train in bfloat16, save/load")
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    source = LlamaForCausalLM(config).to(torch.bfloat16)
    model = eetq_lora.quantize_model(source).to(device)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    peft_model = eetq_lora.get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (4, 64), generator=generator).to(device)
    failures = 0
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    peft_model.train()
    for _ in range(30):
        loss = peft_model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    ok = losses[-1] < 0.8 * losses[0]
    failures += not ok
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in 30 steps {'ok' if ok else 'WRONG (did not fall)'}")
    peft_model.eval()
    # The float twin: every quantized layer replaced by its dequantized weight, under PEFT itself.
    torch.manual_seed(0)
    twin = LlamaForCausalLM(config).to(torch.bfloat16)
    for name, module in model.named_modules():
        if isinstance(module, eetq_lora.EetqLinear):
            float_name = name.removesuffix(".base_layer")
            twin.get_submodule(float_name).weight.data = module.dequantize(torch.bfloat16).cpu()
    twin_peft = peft_get_peft_model(twin, lora).to(device)
    adapters = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert adapters and not twin_peft.load_state_dict(adapters, strict=False).unexpected_keys
    with torch.no_grad():
        err = relative_error(peft_model(tokens).logits, twin_peft(tokens).logits)
    ok = err < 3e-2
    failures += not ok
    print(f"logits vs PEFT on the dequantized twin: {err:.1e} {'ok' if ok else 'WRONG'}")
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        before = peft_model(tokens).logits
        peft_model.save_pretrained(folder)
        torch.manual_seed(0)
        fresh = eetq_lora.quantize_model(LlamaForCausalLM(config).to(torch.bfloat16)).to(device)
        reloaded = eetq_lora.load_adapter(fresh, folder)
        same = torch.equal(reloaded(tokens).logits, before)
    failures += not same
    print(f"adapter save/load gives identical logits: {'ok' if same else 'WRONG'}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, fewer M values")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    args = parser.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        name, nominal, capability = "CPU (Triton interpreter, dry run)", float("nan"), None
    else:
        if not torch.cuda.is_available() or not triton_kernels.is_available():
            has_triton = triton_kernels.triton is not None
            print(f"needs a CUDA GPU and triton (cuda={torch.cuda.is_available()}, triton={has_triton})")
            return 2
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
        nominal = next((v for k, v in NOMINAL_GBPS.items() if k in name), float("nan"))
        capability = torch.cuda.get_device_capability()
    clock = Clock(device, repeats=2 if args.dry_run else 30)
    bandwidth = copy_gbps(clock, device)
    versions = f"torch {torch.__version__}, triton {getattr(triton_kernels.triton, '__version__', None)}"
    print(f"device {name}, capability {capability}, copy {bandwidth:.0f} GB/s, nominal {nominal} GB/s; {versions}")
    if args.dry_run:
        shapes, rows_list, layer_rows = [(128, 192)], [1, 17], [1, 17]
        sweep = ([1, 2], [32, 64])
    elif args.quick:
        shapes, rows_list, layer_rows = [(4096, 4096)], [1, 16, 128, 2048], [1, 128, 2048]
        sweep = ([1, 2, 4, 8, 16, 32], [32, 64, 128])
    else:
        shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]
        rows_list, layer_rows = [1, 16, 128, 2048], [1, 128, 2048]
        sweep = ([1, 2, 4, 8, 16, 32], [32, 64, 128])
    failures = kernel_section(clock, device, shapes, rows_list, bandwidth, nominal)
    sweep_section(clock, device, shapes[:2], *sweep)
    failures += layer_section(clock, device, shapes[:2], layer_rows)
    failures += model_section(device)
    print("\nall results correct" if not failures else f"\n{failures} WRONG results")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
