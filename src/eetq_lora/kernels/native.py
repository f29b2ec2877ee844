"""Checked ctypes calls into the compiled CPU kernels (``cpu_library`` builds and loads them).

Every wrapper checks the tensors it hands to C (device, dtype, shape, strides) before the call
and allocates its own output.
"""

from __future__ import annotations

import ctypes
import os

import torch

from .cpu_library import library


class KernelInputError(ValueError):
    """A tensor handed to a compiled kernel is not what the kernel reads (device, dtype, shape, strides)."""


def _unit_columns(t: torch.Tensor) -> bool:
    return t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1) and t.stride(0) >= 0


def storage_covers(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory holds every element it addresses.

    A storage can be freed or shrunk under a live tensor (FSDP2 frees a gathered weight with
    ``untyped_storage().resize_(0)``); torch refuses such a tensor, and so must a C call.
    """
    if t.numel() == 0:
        return True
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    storage = t.untyped_storage()
    return storage.data_ptr() != 0 and storage.nbytes() >= (t.storage_offset() + extent) * t.element_size()


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
    # Last: a meta or wrong-device tensor gets the message above, not this one.
    for name, tensor in (("activation", a), ("weight", q), *(("scales", t) for t, _ in scales.values())):
        if tensor is not None and not storage_covers(tensor):
            raise KernelInputError(
                f"eetq_lora {kernel}: the memory of the {name} has been freed or shrunk under it; gather the weights "
                "again (the sharding engine's unshard) before calling the layer"
            )


# The wrappers below check their operands (check_operands) and allocate their own outputs.


# Below this much work (rows x int8 weight bytes) one thread beats several. Under
# OMP_WAIT_POLICY=PASSIVE the OpenMP workers sleep between calls, and waking them costs more than a
# small layer's whole matmul; under OpenMP's default policy they spin, and more threads pay off much
# sooner (docs/architecture.md has the measurements behind both limits). torch has loaded OpenMP by
# now, so the environment read here is the one it started with.
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


class StreamOperands(ctypes.Structure):
    """``eetq_stream_operands`` in the C source: the operands of a streaming call that stay the same
    across a layer's calls, as plain addresses and sizes (``lora_a`` is None without an adapter)."""

    # In the C declaration's order: four pointers, six int64_t, two int32_t, one float.
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("q", "scales", "lora_a", "lora_b")),
        *((name, ctypes.c_int64) for name in ("rows", "columns", "ldq", "lda", "ldo", "rank")),
        *((name, ctypes.c_int32) for name in ("kernel", "scale_on_rows")),
        ("scaling", ctypes.c_float),
    ]


class StreamWeight:
    """The weight side of a streaming call: int8 ``q`` [rows, columns] with row pitch ``ldq`` and
    its float16 scales, one per row (``scale_on_rows``) or per column; plain addresses, valid only while
    the tensors they were read from live unchanged (``kernels.stream.StreamPlan`` checks that)."""

    __slots__ = ("function", "q_ptr", "rows", "columns", "ldq", "scales_ptr", "scale_on_rows")

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, scale_on_rows: bool) -> None:
        self.function = library().eetq_stream_call
        self.q_ptr, self.scales_ptr = q.data_ptr(), scales.data_ptr()
        self.rows, self.columns = q.shape
        self.ldq = q.stride(0)
        self.scale_on_rows = int(scale_on_rows)

    def operands(
        self, rowaxpy: bool, lda: int, ldo: int, lora: tuple[torch.Tensor, torch.Tensor, float] | None = None
    ) -> StreamOperands:
        """The fixed operands of ``out = a @ dequant(q)`` (``rowaxpy``) or ``a @ dequant(q)^T`` for
        activations of row pitch ``lda`` and results of pitch ``ldo``; ``lora=(A [rank, K], B [N, rank],
        scaling)``, float32 and contiguous, adds an adapter as PEFT's layer does."""
        lora_a, lora_b, scaling = lora if lora is not None else (None, None, 0.0)
        return StreamOperands(
            self.q_ptr,
            self.scales_ptr,
            _ptr(lora_a),
            _ptr(lora_b),
            self.rows,
            self.columns,
            self.ldq,
            lda,
            ldo,
            0 if lora_a is None else lora_a.shape[0],
            int(rowaxpy),
            self.scale_on_rows,
            scaling,
        )


def launch_stream(
    weight: StreamWeight, operands: StreamOperands, a: torch.Tensor, rows: int, out: torch.Tensor
) -> None:
    """The one place that calls the streaming kernel (``eetq_stream`` in the C source): ``out`` from ``rows``
    rows of ``a`` as ``operands`` (built by ``weight.operands``) describe.

    ``a`` and ``out`` are float32, bfloat16 or float16 (converted exactly, the result rounded once).
    Callers have checked every operand, and every address in ``operands`` is a live tensor's.
    """
    status_code = weight.function(
        ctypes.addressof(operands),
        a.data_ptr(),
        STREAM_FORMATS[a.dtype],
        rows,
        out.data_ptr(),
        STREAM_FORMATS[out.dtype],
        threads_for(rows * weight.rows * weight.columns),
    )
    if status_code != 0:
        raise MemoryError("eetq_lora: the CPU streaming kernel could not allocate its workspace")


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
    """
    side = "rows" if scale_on_rows else "columns"
    rowaxpy = kernel == "rowaxpy"
    check_operands(
        kernel, a, tuple(STREAM_FORMATS), "rows" if rowaxpy else "columns", q, {side: (scales, torch.float16)}
    )
    m = a.shape[0]
    out = torch.empty(m, q.shape[1] if rowaxpy else q.shape[0], dtype=a.dtype)
    weight = StreamWeight(q, scales, scale_on_rows)
    launch_stream(weight, weight.operands(rowaxpy, a.stride(0), out.stride(0)), a, m, out)
    return out


def _streamed_bf16(kernel: str, a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    # rowdot_bf16 and rowaxpy_bf16 share one C signature; rowdot scales q's rows, rowaxpy its columns.
    rowaxpy = kernel == "rowaxpy_bf16"
    side = "columns" if rowaxpy else "rows"
    check_operands(kernel, a, (torch.bfloat16,), "rows" if rowaxpy else "columns", q, {side: (scale, torch.float32)})
    m, r, c = a.shape[0], q.shape[0], q.shape[1]
    width = c if rowaxpy else r
    out = torch.empty(m, width, dtype=torch.float32)
    status_code = getattr(library(), f"eetq_{kernel}")(
        a.data_ptr(),
        m,
        a.stride(0),
        q.data_ptr(),
        r,
        c,
        q.stride(0),
        _ptr(scale),
        out.data_ptr(),
        width,
        _threads(m, q),
    )
    if status_code:  # rowdot_bf16 returns nothing; rowaxpy_bf16 returns -1 when out of memory
        raise MemoryError(f"eetq_lora: the CPU {kernel} kernel could not allocate its workspace")
    return out


def rowdot_bf16(a: torch.Tensor, q: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
    """``rowdot`` with bfloat16 activations (no column scale): float32 ``out[m, r] = row_scale[r] * a[m] . q[r]``."""
    return _streamed_bf16("rowdot_bf16", a, q, row_scale)


def rowaxpy_bf16(a: torch.Tensor, q: torch.Tensor, col_scale: torch.Tensor | None) -> torch.Tensor:
    """``rowaxpy`` with bfloat16 activations (no row scale): float32 ``out[m, c] = col_scale[c] * a[m] @ q[:, c]``."""
    return _streamed_bf16("rowaxpy_bf16", a, q, col_scale)
