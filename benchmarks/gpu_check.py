"""Check and time the Triton w8a16 kernel on a CUDA GPU; prints a table and exits non-zero on a wrong result.

Run from the repository root on a machine with a CUDA GPU and Triton (a few minutes, mostly
compiling): python benchmarks/gpu_check.py [--quick]

For fp16 and bf16, LLM shapes and M in {1, 16, 128, 2048}, it compares the kernel's forward and
input gradient with the pure-torch reference path, then times (CUDA events, median of repeats)
the kernel against F.linear on the dense fp16/bf16 weight and torch's _weight_int8pack_mm, and
prints the M=1 fraction of memory bandwidth (weight bytes over time, against a measured device
copy and the card's nominal peak). A split-reduction sweep at M=1 shows whether the default
config leaves bandwidth unused.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import eetq_lora  # noqa: F401
except ImportError:  # a bare checkout: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from eetq_lora.kernels import reference, triton_kernels  # noqa: E402
from eetq_lora.kernels.triton_kernels import Config, choose_config, w8_matmul  # noqa: E402

# Nominal peak memory bandwidth (GB/s) of common cards, by a substring of the device name.
NOMINAL_GBPS = {
    "H100 SXM": 3350,
    "H100 PCIe": 2000,
    "H100": 3350,
    "H200": 4800,
    "A100": 2039,
    "L4": 300,
    "T4": 320,
    "A10": 600,
}
BUDGET = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def cuda_ms(fn, repeats: int = 50) -> float:
    """Median milliseconds of ``fn`` by CUDA events, after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gbps() -> float:
    """Device memory traffic of a 2 GiB copy (bytes read + written, per second)."""
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() / (cuda_ms(lambda: target.copy_(source), 20) / 1e3) / 1e9


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, fewer M values")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not triton_kernels.is_available():
        has_triton = triton_kernels.triton is not None
        print(f"needs a CUDA GPU and triton (cuda={torch.cuda.is_available()}, triton={has_triton})")
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    nominal = next((v for k, v in NOMINAL_GBPS.items() if k in name), float("nan"))
    measured = copy_gbps()
    capability = torch.cuda.get_device_capability()
    print(f"device {name}, capability {capability}, copy {measured:.0f} GB/s, nominal {nominal} GB/s")
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 11008), (11008, 4096)]
    rows_list = [1, 128] if args.quick else [1, 16, 128, 2048]
    failures = 0
    print("dtype shape M | err fwd, grad | ms: triton fwd, triton grad, F.linear, int8pack | M=1 weight GB/s")
    for dtype in (torch.float16, torch.bfloat16):
        for in_features, out_features in shapes:
            torch.manual_seed(0)
            qweight = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, device=device).t()
            scales = (torch.rand(out_features, device=device) / 64 + 1e-4).half()
            dense = reference._dequantized_t(qweight, scales, dtype).t().contiguous()  # [out, in]
            scales_x = scales.to(dtype)
            for rows in rows_list:
                x = torch.randn(rows, in_features, device=device, dtype=dtype)
                grad = torch.randn(rows, out_features, device=device, dtype=dtype)
                y = triton_kernels.forward(x, qweight, scales)
                dx = triton_kernels.grad_input(grad, qweight, scales)
                err_y = relative_error(y, reference.forward(x, qweight, scales, torch.float32))
                err_dx = relative_error(dx, reference.grad_input(grad, qweight, scales, torch.float32))
                ok = err_y < BUDGET[dtype] and err_dx < BUDGET[dtype]
                failures += not ok
                t_fwd = cuda_ms(functools.partial(triton_kernels.forward, x, qweight, scales))
                t_grad = cuda_ms(functools.partial(triton_kernels.grad_input, grad, qweight, scales))
                t_linear = cuda_ms(functools.partial(F.linear, x, dense))
                try:
                    packed = qweight.t().contiguous()
                    t_pack = cuda_ms(functools.partial(torch.ops.aten._weight_int8pack_mm, x, packed, scales_x))
                except RuntimeError:
                    t_pack = float("nan")
                verdict = "ok" if ok else "WRONG"
                line = (
                    f"{str(dtype)[6:]} {in_features}x{out_features} {rows} | {err_y:.1e} {err_dx:.1e} {verdict} | "
                    f"{t_fwd:.4f} {t_grad:.4f} {t_linear:.4f} {t_pack:.4f}"
                )
                if rows == 1:
                    gbps = in_features * out_features / (t_fwd / 1e3) / 1e9
                    line += f" | {gbps:.0f} GB/s = {gbps / measured:.0%} of copy, {gbps / nominal:.0%} of nominal"
                print(line, flush=True)
            if dtype == torch.float16:
                x = torch.randn(1, in_features, device=device, dtype=dtype)
                default = choose_config(1, out_features, in_features, device)
                sweep = []
                for split in (1, 2, 4, 8, 16, 32):
                    for block_p in (32, 64, 128):
                        config = Config(16, block_p, 128, split, 4, 4)
                        call = functools.partial(w8_matmul, x, qweight, scales, True, config)
                        sweep.append((cuda_ms(call, 30), split, block_p))
                best = min(sweep)
                print(f"  M=1 sweep {in_features}x{out_features}: default {default}")
                print(f"  best {best[0]:.4f} ms at split={best[1]} block_p={best[2]}")
    print("all results correct" if not failures else f"{failures} WRONG results")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
