"""Shared measurement helpers for the int8 benchmarks: interleaved timing, memory, machine limits.

Import this before torch in a benchmark script: it sets OMP_WAIT_POLICY=PASSIVE, which removes
the ~8 ms stalls that spinning OpenMP threads cause on a shared CPU without slowing big GEMMs.
A script that measures OpenMP's own default sets KEEP_OPENMP_DEFAULT=1 in its environment instead
(libgomp warns about any value of OMP_WAIT_POLICY but ACTIVE and PASSIVE).
"""

from __future__ import annotations

import os

KEEP_OPENMP_DEFAULT = "EETQ_LORA_BENCH_KEEP_OPENMP_DEFAULT"
if os.environ.get(KEEP_OPENMP_DEFAULT) != "1":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import ctypes  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

MiB = 2**20


def interleaved_medians(
    candidates: dict[str, Callable[[], object]],
    min_rounds: int = 3,
    max_rounds: int = 15,
    budget_s: float = 4.0,
    before_each: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed round-robin so load changes hit all alike.

    Each candidate runs once untimed first; then rounds continue until ``max_rounds`` or until
    ``budget_s`` is spent (never fewer than ``min_rounds``). ``before_each`` runs, untimed, before
    every timed call.
    """
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    started = time.perf_counter()
    for round_index in range(max_rounds):
        for name, fn in candidates.items():
            if before_each is not None:
                before_each()
            begin = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - begin)
        if round_index + 1 >= min_rounds and time.perf_counter() - started > budget_s:
            break
    return {name: statistics.median(values) for name, values in times.items()}


def _proc_status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_bytes() -> int:
    """Resident set size now."""
    return _proc_status("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or since ``reset_peak_rss``."""
    return _proc_status("VmHWM")


def reset_peak_rss() -> bool:
    """Make the peak RSS restart from the current RSS (Linux clear_refs); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS reflects live data."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CacheScrubber:
    """Reads a buffer twice the size of a large last-level cache, leaving caches cold and clean.

    Run before each timed call, it gives every implementation the same start: its weight in DRAM
    and no dirty lines left by the previous one to write back.
    """

    def __init__(self, mebibytes: int = 64) -> None:
        self.buffer = torch.ones(mebibytes * MiB // 4)

    def __call__(self) -> None:
        self.buffer.sum()


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """How far RSS rises above its starting point while ``fn`` runs (its transient memory)."""
    release_free_memory()
    before = rss_bytes()
    reset_peak_rss()
    fn()
    return max(0, peak_rss_bytes() - before)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor, looking inside quantized tensor subclasses and bitsandbytes' SCB.

    A DTensor (FSDP2) counts its local shard: the bytes this process holds.
    """
    to_local = getattr(tensor, "to_local", None)
    if callable(to_local):
        return tensor_bytes(to_local())
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    total = tensor.numel() * tensor.element_size()
    extra = getattr(tensor, "SCB", None)
    if isinstance(extra, torch.Tensor):
        total += extra.numel() * extra.element_size()
    return total


def module_bytes(module: torch.nn.Module, skip: tuple[str, ...] = ("lora_",)) -> int:
    """Bytes of a module's parameters and buffers, leaving out names containing ``skip`` parts."""
    seen: set[int] = set()
    total = 0
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if any(part in name for part in skip) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor_bytes(tensor)
    return total


def read_of(num_bytes: int) -> Callable[[], object]:
    """A parallel float32 sum over a buffer of ``num_bytes``: the streaming read of that many bytes."""
    buffer = torch.ones(max(1, num_bytes // 4))
    return buffer.sum


def dram_read_gbps(mebibytes: int = 512, repeats: int = 7) -> float:
    """Sustained read bandwidth: a parallel float32 sum over a buffer far larger than the caches."""
    seconds = interleaved_medians({"sum": read_of(mebibytes * MiB)}, min_rounds=repeats, max_rounds=repeats, budget_s=0)
    return mebibytes * MiB / seconds["sum"] / 1e9


def gemm_peaks(n: int = 2048, m: int = 512) -> dict[str, float]:
    """GFLOP/s (int8: GOP/s) of [m, n] @ [n, n] in float32, bfloat16 and int8 (``torch._int_mm``)."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, n).to(dtype), torch.randn(n, n).to(dtype)
        seconds = interleaved_medians(
            {"mm": functools.partial(torch.mm, a, b)}, min_rounds=5, max_rounds=5, budget_s=0
        )["mm"]
        results[str(dtype).replace("torch.", "")] = 2 * m * n * n / seconds / 1e9
    a8 = torch.randint(-128, 128, (m, n), dtype=torch.int8)
    b8 = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    try:
        seconds = interleaved_medians({"mm": lambda: torch._int_mm(a8, b8)}, min_rounds=5, max_rounds=5, budget_s=0)[
            "mm"
        ]
        results["int8"] = 2 * m * n * n / seconds / 1e9
    except RuntimeError:
        results["int8"] = float("nan")
    return results


def machine_summary() -> dict[str, object]:
    """Threads, CPU model, and the OpenMP wait policy in force."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return {
        "cpu": model,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
