"""EETQ int8 weight-only matmuls: ``dispatch`` chooses a path, the other modules run one.

- ``policy``: the compute dtype (automatic rule, process-wide setting, context manager).
- ``dispatch``: the only place that chooses a path; ``int8_linear`` is EetqLinear's matmul.
- ``stream``: the one-call path for few rows (decoding), with the fused LoRA adapter.
- ``cpu``: streaming, tiled and int8pack CPU paths; ``native`` calls the C kernels that
  ``cpu_library`` compiles from ``csrc/``.
- ``triton_kernels``: the CUDA kernels; ``reference``: the pure-torch path every other is tested against.
"""

from .dispatch import compute_dtype_for, int8_linear, matmul_forward, matmul_grad_input, select_path
from .policy import compute_dtype, get_compute_dtype, set_compute_dtype

__all__ = [
    "compute_dtype",
    "compute_dtype_for",
    "get_compute_dtype",
    "int8_linear",
    "matmul_forward",
    "matmul_grad_input",
    "select_path",
    "set_compute_dtype",
]
