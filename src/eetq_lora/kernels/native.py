"""Compile the CPU kernels on first use and call them through ctypes.

The C source (``_cpu_source.py``) is built once per machine with the system C compiler (``$CC``,
else ``cc``, ``gcc`` or ``clang``), tuned for the host CPU (``-march=native``) and parallel with
OpenMP, and cached in the ``kernels/`` folder of the package cache (``$EETQ_LORA_CACHE``, default
``~/.cache/eetq_lora``) keyed by the source, the compiler and the CPU. A library is only loaded
from a folder only this user can write (created 0700; an existing one is checked) and only if
this user owns it. Where no compiler works or no such folder exists the kernels report
unavailable, with one warning, and the dispatcher uses pure-torch paths. ``EETQ_LORA_NATIVE=0``
turns them off without a warning.

Every wrapper checks the tensors it hands to C (device, dtype, shape, strides) before the call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..cache import UnsafeFolderError, cache_dir, check_private_file, fallback_cache_dir, private_dir
from ._cpu_source import ABI_VERSION, SOURCE

# Tried in order until one compiles: the host-tuned OpenMP build first, then weaker ones.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-mcpu=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
_COMMON_FLAGS = ("-shared", "-fPIC", "-std=gnu11")

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_FLOAT = ctypes.c_float
_SIGNATURES = {
    "eetq_abi_version": ([], _INT),
    "eetq_has_openmp": ([], _INT),
    "eetq_rowdot": ([_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _P, _I64, _INT], _INT),
    "eetq_rowaxpy": ([_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _P, _I64, _INT], _INT),
    "eetq_dequant": ([_P, _I64, _I64, _I64, _P, _P, _P, _I64, _INT, _INT], None),
    "eetq_has_bf16_dot": ([], _INT),
    "eetq_stream": (
        # kernel, a, a_format, M, lda, q, R, C, ldq, scales, scale_on_rows, out, out_format, ldo,
        # lora_a, rank, lora_b, scaling, nthreads
        [_INT, _P, _INT, _I64, _I64, _P, _I64, _I64, _I64, _P, _INT, _P, _INT, _I64, _P, _I64, _P, _FLOAT, _INT],
        _INT,
    ),
}
# Present only in builds for CPUs with AVX512-BF16.
_BF16_SIGNATURES = {
    "eetq_rowdot_bf16": ([_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _I64, _INT], None),
    "eetq_rowaxpy_bf16": ([_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _I64, _INT], _INT),
}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def kernel_dir() -> Path:
    """Where compiled kernels are kept: ``kernels/`` in the package cache."""
    return cache_dir() / "kernels"


def _private_kernel_dir() -> Path:
    # The cache's kernels/ folder, else a per-user one in the temp directory; each must belong to
    # this user and be closed to others, since the library found there is loaded and run.
    problems = []
    for candidate in (kernel_dir(), fallback_cache_dir() / "kernels"):
        try:
            folder = private_dir(candidate)
            if os.access(folder, os.W_OK):
                return folder
            problems.append(f"{folder} is not writable")
        except OSError as error:
            problems.append(str(error))
    raise UnsafeFolderError("no private folder for the compiled kernels: " + "; ".join(problems))


def _build_digest(compiler: str) -> str:
    identity = "\0".join(
        (SOURCE, repr(_FLAG_SETS), compiler, _compiler_version(compiler), _cpu_identity(), platform.machine())
    )
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _build(compiler: str) -> tuple[Path, str]:
    """Compile (or reuse) the kernel library; returns its path and the build log of failed attempts."""
    digest = _build_digest(compiler)
    directory = _private_kernel_dir()
    target = directory / f"eetq_cpu_{digest}.so"
    if os.path.lexists(target):
        check_private_file(target)
        return target, ""
    source = directory / f"eetq_cpu_{digest}.c"
    source.write_text(SOURCE)
    log = []
    for flags in _FLAG_SETS:
        # A private output name, then an atomic rename: concurrent first uses never see half a file.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        command = [compiler, *flags, *_COMMON_FLAGS, str(source), "-o", partial]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as error:
            result = None
            log.append(f"{' '.join(command)}: {error}")
        if result is not None and result.returncode == 0:
            os.replace(partial, target)
            return target, "\n".join(log)
        if result is not None:
            log.append(f"{' '.join(command)}:\n{result.stderr.strip()}")
        os.unlink(partial)
    raise RuntimeError("\n".join(log))


def _load() -> ctypes.CDLL | None:
    if os.environ.get("EETQ_LORA_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _state["reason"] = "disabled by EETQ_LORA_NATIVE=0"
        return None
    compiler = _find_compiler()
    if compiler is None:
        _state["reason"] = "no C compiler found (set CC or install gcc)"
        _warn(_state["reason"])
        return None
    try:
        path, _ = _build(compiler)
        library = ctypes.CDLL(str(path))
        signatures = dict(_SIGNATURES)
        if library.eetq_has_bf16_dot():
            signatures.update(_BF16_SIGNATURES)
        for name, (argtypes, restype) in signatures.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = restype
        if library.eetq_abi_version() != ABI_VERSION:
            raise RuntimeError(f"kernel library {path} has ABI {library.eetq_abi_version()}, expected {ABI_VERSION}")
    except UnsafeFolderError as error:
        _state["reason"] = f"refusing to build or load compiled kernels ({error})"
        _warn(_state["reason"])
        return None
    except Exception as error:  # noqa: BLE001 - any build or load failure means "use the torch paths"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _state["reason"] = f"building the CPU kernels failed ({first_line})"
        _state["log"] = str(error)
        _warn(_state["reason"])
        return None
    _state["path"] = str(path)
    return library


def _warn(reason: str) -> None:
    warnings.warn(
        f"eetq_lora: {reason}; CPU int8 matmuls fall back to slower pure-torch paths", RuntimeWarning, stacklevel=3
    )


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on the first call; ``None`` where it cannot be had."""
    if "library" not in _state:
        with _lock:
            if "library" not in _state:
                _state["library"] = _load()
    return _state["library"]  # type: ignore[return-value]


def is_available() -> bool:
    """Whether the compiled CPU kernels can be used (builds them on first call)."""
    return library() is not None


def status() -> dict[str, object]:
    """What happened when loading: ``available``, and ``path`` or ``reason`` (plus the build ``log``)."""
    library()
    return {"available": _state.get("library") is not None, **{k: v for k, v in _state.items() if k != "library"}}


def _reset_for_tests() -> None:
    with _lock:
        _state.clear()


class KernelInputError(ValueError):
    """A tensor handed to a compiled kernel is not what the kernel reads (device, dtype, shape, strides)."""


def _unit_columns(t: torch.Tensor) -> bool:
    return t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1) and t.stride(0) >= 0


def check_operands(
    kernel: str,
    a: torch.Tensor,
    a_dtypes: tuple[torch.dtype, ...],
    a_width: str,
    q: torch.Tensor,
    scales: dict[str, tuple[torch.Tensor | None, torch.dtype]],
) -> None:
    """Raise KernelInputError unless every operand of ``kernel`` is a CPU tensor the C code can read.

    ``a`` [M, R or C] (``a_width`` names which) must have one of ``a_dtypes`` and adjacent columns;
    ``q`` [R, C] int8 with adjacent columns; each entry of ``scales`` maps ``"rows"`` (length R) or
    ``"columns"`` (length C) to a contiguous 1-D tensor of the given dtype, or None.
    """
    for name, tensor in (("activation", a), ("weight", q)):
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            where = tensor.device if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise KernelInputError(
                f"eetq_lora {kernel}: the {name} is on {where}, not the CPU; move the layer and its input to one "
                "device (model.to(device)), and load weights that are still on the meta device"
            )
    if q.dtype != torch.int8 or not _unit_columns(q):
        raise KernelInputError(f"eetq_lora {kernel}: the weight must be a 2-D int8 matrix with adjacent columns")
    if a.dtype not in a_dtypes or not _unit_columns(a):
        names = ", ".join(str(d).replace("torch.", "") for d in a_dtypes)
        raise KernelInputError(f"eetq_lora {kernel}: the activation must be 2-D {names} with adjacent columns")
    sizes = {"rows": q.shape[0], "columns": q.shape[1]}
    if a.shape[1] != sizes[a_width]:
        raise KernelInputError(
            f"eetq_lora {kernel}: the activation has {a.shape[1]} columns but the weight has {sizes[a_width]} {a_width}"
        )
    for side, (scale, dtype) in scales.items():
        if scale is None:
            continue
        if (
            scale.device.type != "cpu"
            or scale.dtype != dtype
            or scale.dim() != 1
            or not scale.is_contiguous()
            or scale.shape[0] != sizes[side]
        ):
            raise KernelInputError(
                f"eetq_lora {kernel}: the scales must be one contiguous CPU {str(dtype).replace('torch.', '')} value "
                f"per weight {side[:-1]} ({sizes[side]}), got {scale.dtype} of shape {list(scale.shape)} on "
                f"{scale.device}; weight_scales has one float16 value per output channel"
            )


# The wrappers below check their operands (check_operands) and allocate their own outputs.


# Below this much work (rows x int8 weight bytes) one thread beats two. Under
# OMP_WAIT_POLICY=PASSIVE the OpenMP workers sleep between calls and waking one costs 25-50 µs
# (2-core Zen 5), more than a small layer's whole matmul: SmolLM2-135M's layers (0.1-0.8 MiB)
# decoded 2-6x faster on one thread. With OpenMP's default policy the workers spin between
# calls, and two threads win from a few hundred KiB (SmolLM2 decoding 5-8% faster than at 4 MiB).
# torch has loaded OpenMP by now, so the environment read here is the one it started with.
def single_thread_work_bytes(wait_policy: str) -> int:
    """The one-thread limit for an ``OMP_WAIT_POLICY`` value ("" when unset)."""
    return 4 * 2**20 if wait_policy.strip().upper() == "PASSIVE" else 256 * 2**10


SINGLE_THREAD_WORK_BYTES = single_thread_work_bytes(os.environ.get("OMP_WAIT_POLICY", ""))


def threads_for(work_bytes: int) -> int:
    """Threads for a streaming call over ``work_bytes`` (rows x int8 weight bytes)."""
    return 1 if work_bytes < SINGLE_THREAD_WORK_BYTES else torch.get_num_threads()


def _threads(rows: int, q: torch.Tensor) -> int:
    return threads_for(rows * q.numel())


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _streamed(
    kernel: str,
    a: torch.Tensor,
    q: torch.Tensor,
    row_scale: torch.Tensor | None,
    col_scale: torch.Tensor | None,
    out_columns: int,
) -> torch.Tensor:
    # rowdot and rowaxpy share one C signature; only the output width differs.
    scales = {"rows": (row_scale, torch.float32), "columns": (col_scale, torch.float32)}
    check_operands(kernel, a, (torch.float32,), "columns" if kernel == "rowdot" else "rows", q, scales)
    lib = library()
    m, r, c = a.shape[0], q.shape[0], q.shape[1]
    out = torch.empty(m, out_columns, dtype=torch.float32)
    status_code = getattr(lib, f"eetq_{kernel}")(
        a.data_ptr(),
        m,
        a.stride(0),
        q.data_ptr(),
        r,
        c,
        q.stride(0),
        _ptr(row_scale),
        _ptr(col_scale),
        out.data_ptr(),
        out_columns,
        _threads(m, q),
    )
    if status_code != 0:
        raise MemoryError(f"eetq_lora: the CPU {kernel} kernel could not allocate its workspace")
    return out


def rowdot(
    a: torch.Tensor, q: torch.Tensor, row_scale: torch.Tensor | None, col_scale: torch.Tensor | None
) -> torch.Tensor:
    """``a [M, C] @ dequant(q [R, C])^T`` in float32.

    ``out[m, r] = row_scale[r] * sum_c a[m, c] * col_scale[c] * q[r, c]`` (a missing scale is 1).
    """
    return _streamed("rowdot", a, q, row_scale, col_scale, q.shape[0])


def rowaxpy(
    a: torch.Tensor, q: torch.Tensor, row_scale: torch.Tensor | None, col_scale: torch.Tensor | None
) -> torch.Tensor:
    """``a [M, R] @ dequant(q [R, C])`` in float32.

    ``out[m, c] = col_scale[c] * sum_r a[m, r] * row_scale[r] * q[r, c]`` (a missing scale is 1).
    """
    return _streamed("rowaxpy", a, q, row_scale, col_scale, q.shape[1])


def dequantize_into(
    out: torch.Tensor, q: torch.Tensor, row_scale: torch.Tensor | None, col_scale: torch.Tensor | None
) -> None:
    """``out[r, c] = q[r, c] * row_scale[r] * col_scale[c]``, rounded once into ``out`` (float32 or bfloat16)."""
    scales = {"rows": (row_scale, torch.float32), "columns": (col_scale, torch.float32)}
    check_operands("dequantize", out, (torch.float32, torch.bfloat16), "columns", q, scales)
    if out.shape[0] != q.shape[0]:
        raise KernelInputError(f"eetq_lora dequantize: the output has {out.shape[0]} rows, the weight {q.shape[0]}")
    lib = library()
    r, c = q.shape
    lib.eetq_dequant(
        q.data_ptr(),
        q.stride(0),
        r,
        c,
        _ptr(row_scale),
        _ptr(col_scale),
        out.data_ptr(),
        out.stride(0),
        int(out.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )


# eetq_stream's activation and result formats.
STREAM_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def stream(
    a: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    kernel: str,
    scale_on_rows: bool,
) -> torch.Tensor:
    """``rowaxpy`` or ``rowdot`` straight from a layer's tensors, result in ``a``'s dtype.

    ``a`` is float32, bfloat16 or float16 with unit column stride, ``scales`` float16 (contiguous):
    the kernel converts both exactly and rounds the result once; see ``eetq_stream`` in the C source.
    (``decode.py`` calls the same kernel with a fused LoRA adapter.)
    """
    side = "rows" if scale_on_rows else "columns"
    check_operands(
        kernel,
        a,
        tuple(STREAM_FORMATS),
        "columns" if kernel == "rowdot" else "rows",
        q,
        {side: (scales, torch.float16)},
    )
    lib = library()
    m, r, c = a.shape[0], q.shape[0], q.shape[1]
    out = torch.empty(m, c if kernel == "rowaxpy" else r, dtype=a.dtype)
    a_format = STREAM_FORMATS[a.dtype]
    status_code = lib.eetq_stream(
        int(kernel == "rowaxpy"),
        a.data_ptr(),
        a_format,
        m,
        a.stride(0),
        q.data_ptr(),
        r,
        c,
        q.stride(0),
        scales.data_ptr(),
        int(scale_on_rows),
        out.data_ptr(),
        a_format,
        out.stride(0),
        None,
        0,
        None,
        0.0,
        _threads(m, q),
    )
    if status_code != 0:
        raise MemoryError(f"eetq_lora: the CPU {kernel} kernel could not allocate its workspace")
    return out


def has_bf16_dot() -> bool:
    """Whether the build has the bfloat16 dot-product kernels (CPUs with AVX512-BF16)."""
    lib = library()
    return lib is not None and bool(lib.eetq_has_bf16_dot())


def rowdot_bf16(a: torch.Tensor, q: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
    """``rowdot`` with bfloat16 activations (no column scale): float32 ``out[m, r] = row_scale[r] * a[m] . q[r]``."""
    check_operands("rowdot_bf16", a, (torch.bfloat16,), "columns", q, {"rows": (row_scale, torch.float32)})
    lib = library()
    m, r, c = a.shape[0], q.shape[0], q.shape[1]
    out = torch.empty(m, r, dtype=torch.float32)
    lib.eetq_rowdot_bf16(
        a.data_ptr(),
        m,
        a.stride(0),
        q.data_ptr(),
        r,
        c,
        q.stride(0),
        _ptr(row_scale),
        out.data_ptr(),
        r,
        _threads(m, q),
    )
    return out


def rowaxpy_bf16(a: torch.Tensor, q: torch.Tensor, col_scale: torch.Tensor | None) -> torch.Tensor:
    """``rowaxpy`` with bfloat16 activations (no row scale): float32 ``out[m, c] = col_scale[c] * a[m] @ q[:, c]``."""
    check_operands("rowaxpy_bf16", a, (torch.bfloat16,), "rows", q, {"columns": (col_scale, torch.float32)})
    lib = library()
    m, r, c = a.shape[0], q.shape[0], q.shape[1]
    out = torch.empty(m, c, dtype=torch.float32)
    status_code = lib.eetq_rowaxpy_bf16(
        a.data_ptr(),
        m,
        a.stride(0),
        q.data_ptr(),
        r,
        c,
        q.stride(0),
        _ptr(col_scale),
        out.data_ptr(),
        c,
        _threads(m, q),
    )
    if status_code != 0:
        raise MemoryError("eetq_lora: the CPU rowaxpy_bf16 kernel could not allocate its workspace")
    return out
