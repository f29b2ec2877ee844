"""CPU paths of the int8 weight-only matmul (the dispatcher in ``__init__`` picks one).

- ``stream_*``: few rows (decoding, small batches). One pass over the int8 weight with the
  compiled kernels, accumulating in float32 from exact inputs (bfloat16 dot products for bfloat16
  compute from ``BF16_DOT_MIN_ROWS`` rows, on CPUs that have them).
- ``tiled_*``: many rows. A tile of the weight at a time is dequantized into a reused buffer of
  the compute dtype and fed to that dtype's GEMM; no full dequantized weight is ever built or kept.
- ``int8pack_forward``: torch's ``_weight_int8pack_mm``, used for bfloat16 with few rows only
  where the compiled kernels are unavailable.

Every function takes the int8 weight as ``EetqLinear`` holds it: ``qweight`` [in, out] (any
strides) with float16 ``scales`` [out], and 2-D activations.
"""

from __future__ import annotations

import threading

import torch

from . import cpu_library, native

# Largest dequantized tile; a few MiB keeps the tile cache-resident between dequantize and GEMM.
TILE_BYTES = 8 << 20
# From this many rows the bfloat16 dot-product kernels beat float32 multiply-adds (below it the
# extra int8 -> bfloat16 conversion work dominates).
BF16_DOT_MIN_ROWS = 4
_TILE_ALIGN = 64

_workspaces = threading.local()


def _is_row_major(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 or t.shape[1] <= 1


def weight_rows(qweight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A view of the int8 weight whose columns are adjacent in memory, and whether its rows are outputs.

    Returns ``(W, True)`` with ``W = qweight.t()`` [out, in] when that is row-major (a weight
    stored nn.Linear-style), else ``(qweight, False)`` when ``qweight`` [in, out] itself is (how
    ``EetqLinear`` stores it), else a row-major copy of ``W`` (only for exotic strides). Either
    layout streams: each op has a kernel for both orientations (``rowdot`` and ``rowaxpy``).
    """
    w = qweight.t()
    if _is_row_major(w):
        return w, True
    if _is_row_major(qweight):
        return qweight, False
    return w.contiguous(), True


def _float32_rows(a: torch.Tensor) -> torch.Tensor:
    a = a.to(torch.float32)
    return a if _is_row_major(a) else a.contiguous()


def _direct(a: torch.Tensor, scales: torch.Tensor) -> bool:
    # The one-call kernel entry takes float32/bfloat16/float16 rows and float16 scales as they are.
    return (
        a.dtype in native.STREAM_FORMATS
        and scales.dtype == torch.float16
        and scales.is_contiguous()
        and _is_row_major(a)
    )


def _bf16_dot(rows: int, compute: torch.dtype) -> bool:
    return compute == torch.bfloat16 and rows >= BF16_DOT_MIN_ROWS and cpu_library.has_bf16_dot()


def stream_forward(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, compute: torch.dtype = torch.float32
) -> torch.Tensor:
    """``x [M, in] @ Wt`` with the compiled streaming kernels.

    Activations stay exact (float32 multiply-adds) unless ``compute`` is bfloat16 and M is at least
    ``BF16_DOT_MIN_ROWS``: then they are rounded to bfloat16 for the CPU's bfloat16 dot products.
    The result is float32, or ``x``'s own dtype (rounded once) for row-major bfloat16 or float16
    ``x`` with float16 scales, which the one-call entry takes as they are.
    """
    q, rows_are_outputs = weight_rows(qweight)
    if _direct(x, scales) and not _bf16_dot(x.shape[0], compute):
        return native.stream(x, q, scales, "rowdot" if rows_are_outputs else "rowaxpy", rows_are_outputs)
    s = scales.to(torch.float32).contiguous()
    if _bf16_dot(x.shape[0], compute):
        a = x.to(torch.bfloat16).contiguous()
        return native.rowdot_bf16(a, q, s) if rows_are_outputs else native.rowaxpy_bf16(a, q, s)
    a = _float32_rows(x)
    return native.rowdot(a, q, s, None) if rows_are_outputs else native.rowaxpy(a, q, None, s)


def stream_grad_input(
    grad: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, compute: torch.dtype = torch.float32
) -> torch.Tensor:
    """``grad [M, out] @ W`` with the compiled streaming kernels (dtypes as in ``stream_forward``)."""
    q, rows_are_outputs = weight_rows(qweight)
    if _direct(grad, scales) and not _bf16_dot(grad.shape[0], compute):
        return native.stream(grad, q, scales, "rowaxpy" if rows_are_outputs else "rowdot", rows_are_outputs)
    s = scales.to(torch.float32).contiguous()
    if _bf16_dot(grad.shape[0], compute):
        # The scale sits on the summed index here, so it goes into the activations before rounding.
        a = (grad.to(torch.float32) * s).to(torch.bfloat16).contiguous()
        return native.rowaxpy_bf16(a, q, None) if rows_are_outputs else native.rowdot_bf16(a, q, None)
    g = _float32_rows(grad)
    return native.rowaxpy(g, q, s, None) if rows_are_outputs else native.rowdot(g, q, None, s)


def _workspace(dtype: torch.dtype, numel: int, slot: str = "tile") -> torch.Tensor:
    # Reused across calls (fresh multi-MiB allocations cost page faults every time), one per thread.
    cache = getattr(_workspaces, "buffers", None)
    if cache is None:
        cache = _workspaces.buffers = {}
    buffer = cache.get((slot, dtype))
    if buffer is None or buffer.numel() < numel:
        cache[(slot, dtype)] = buffer = None  # let the smaller buffer go before the bigger one is allocated
        buffer = cache[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def release_workspaces() -> None:
    """Free this thread's reusable dequantization buffers."""
    _workspaces.buffers = {}


def _dequantize_tile(
    q: torch.Tensor, row_scale: torch.Tensor | None, col_scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``q * row_scale[:, None] * col_scale[None, :]`` rounded once to ``dtype``, in the reused buffer."""
    out = _workspace(dtype, q.numel()).view(q.shape)
    if cpu_library.is_available():
        native.dequantize_into(out, q, row_scale, col_scale)
        return out
    # An int8 times an fp16 scale is exact in float32, so staging there keeps the single rounding.
    staging = out if dtype == torch.float32 else _workspace(torch.float32, q.numel(), "staging").view(q.shape)
    staging.copy_(q)
    if row_scale is not None:
        staging.mul_(row_scale[:, None])
    if col_scale is not None:
        staging.mul_(col_scale)
    if staging is not out:
        out.copy_(staging)
    return out


def _tile_size(total: int, other: int, dtype: torch.dtype) -> int:
    rows = TILE_BYTES // max(1, other * dtype.itemsize)
    rows = max(_TILE_ALIGN, rows - rows % _TILE_ALIGN)
    return min(total, rows)


def _tiled(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, forward: bool):
    # The output's columns are output channels (forward) or input channels (grad_input); each tile
    # dequantizes the slice of the weight those columns need, scaled along the output-channel axis.
    q, rows_are_outputs = weight_rows(qweight)
    in_features, out_features = qweight.shape
    width, depth = (out_features, in_features) if forward else (in_features, out_features)
    s = scales.to(torch.float32).contiguous()
    slice_rows = rows_are_outputs == forward  # the output's columns are q's rows
    with torch.no_grad():
        a = a.to(dtype)
        out = torch.empty(a.shape[0], width, dtype=dtype)
        step = _tile_size(width, depth, dtype)
        for n0 in range(0, width, step):
            n1 = min(width, n0 + step)
            part = q[n0:n1] if slice_rows else q[:, n0:n1]
            row_scale = (s[n0:n1] if slice_rows else s) if rows_are_outputs else None
            col_scale = None if rows_are_outputs else (s[n0:n1] if not slice_rows else s)
            tile = _dequantize_tile(part, row_scale, col_scale, dtype)
            torch.mm(a, tile.t() if slice_rows else tile, out=out[:, n0:n1])
    return out


def tiled_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x [M, in] @ Wt`` as ``dtype`` GEMMs on dequantized tiles of output channels."""
    return _tiled(x, qweight, scales, dtype, forward=True)


def tiled_grad_input(
    grad: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``grad [M, out] @ W`` as ``dtype`` GEMMs on dequantized tiles of input channels."""
    return _tiled(grad, qweight, scales, dtype, forward=False)


def int8pack_supported(qweight: torch.Tensor) -> bool:
    """Whether ``int8pack_forward`` takes this weight: torch has the op and W [out, in] is contiguous."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm") and qweight.t().is_contiguous()


def int8pack_forward(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, compute: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``x [M, in] @ Wt`` in bfloat16 with ``torch.ops.aten._weight_int8pack_mm`` (scales rounded to bfloat16).

    ``compute`` is accepted for the dispatcher's common call; this path only ever computes in bfloat16.
    """
    a = x.to(torch.bfloat16).contiguous()
    return torch.ops.aten._weight_int8pack_mm(a, qweight.t(), scales.to(torch.bfloat16))
