"""The compute dtype of the int8 matmuls: an automatic rule, a process-wide setting and a context manager.

Automatic rule (the default, ``None``): never compute in a dtype less precise than the input.
float32 runs in float32, bfloat16 in bfloat16, float16 in float16 on CUDA and in float32 on CPU
(CPU float16 GEMMs are orders of magnitude slower, and bfloat16 has fewer mantissa bits than
float16). Opting into ``torch.bfloat16`` runs float32 and float16 inputs through bfloat16 GEMMs:
faster where the CPU or GPU has fast bfloat16 GEMMs, for a little more error than the int8 weight
already adds (the README gives measured figures). Opting into ``torch.float32`` runs everything in
float32.
Results always come back in the input's dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_CHOICES = (None, torch.float32, torch.bfloat16)
_process_default: torch.dtype | None = None
# A context-manager override wins over the process default; ContextVar keeps threads independent.
_override: contextvars.ContextVar[tuple[torch.dtype | None] | None] = contextvars.ContextVar(
    "eetq_lora_compute_dtype", default=None
)


def _check(dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype not in _CHOICES:
        raise ValueError(f"compute dtype must be None (automatic), torch.float32 or torch.bfloat16, got {dtype!r}")
    return dtype


def set_compute_dtype(dtype: torch.dtype | None) -> None:
    """Set the process-wide compute dtype: ``None`` (automatic), ``torch.float32`` or ``torch.bfloat16``."""
    global _process_default
    _process_default = _check(dtype)


def get_compute_dtype() -> torch.dtype | None:
    """The compute dtype in force here: a ``compute_dtype(...)`` block's, else the process-wide one."""
    override = _override.get()
    return override[0] if override is not None else _process_default


@contextlib.contextmanager
def compute_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Use ``dtype`` (``None``, ``torch.float32`` or ``torch.bfloat16``) for int8 matmuls inside the block.

    The backward pass of a forward run inside the block uses the same dtype, wherever it runs.
    """
    token = _override.set((_check(dtype),))
    try:
        yield
    finally:
        _override.reset(token)


def resolve_compute_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the GEMM runs in for activations of ``dtype`` on ``device_type``."""
    chosen = get_compute_dtype()
    if chosen is not None:
        return chosen
    if dtype == torch.float16 and device_type == "cpu":
        return torch.float32
    return dtype
