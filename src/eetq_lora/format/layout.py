"""EETQ's checkpoint byte layouts for the int8 weight.

An EETQ checkpoint stores the quantized matrix Q (int8, [K=in_features, N=out_features]) as an
int8 tensor of the same shape whose bytes are a permutation of ``uint8(Q + 128)``, arranged for
the CUTLASS kernel of the GPU generation that wrote it. Three layouts are known here:

- ``"sm75"``: compute capability 7.5-8.9 (T4, A10, A100, RTX 30/40, L4); the default.
- ``"sm70"``: compute capability 7.0-7.4 (V100): only the +128 bias and the byte swap.
- ``"plain"``: the row-major matrix itself, as this package keeps it in memory.

The EETQ layouts need both dimensions to be multiples of 64. ``pack_weight`` and
``unpack_weight`` convert exactly, with one permuted copy of the tensor, on any device.
"""

from __future__ import annotations

import torch

LAYOUTS = ("sm75", "sm70", "plain")
DEFAULT_LAYOUT = "sm75"
# safetensors metadata key under which this package records the layout of the int8 weights it writes.
METADATA_KEY = "eetq_layout"

_TILE = 64
# Both layouts are a reordering of axes of Q followed by the +128 byte bias, so each is one
# reshape, one permute and one copy. Axis names: k = 64a + 16b + 8h + i, n = 2c + j.
# - sm75 steps 1 and 4 together interleave rows i and 8 + i of every 16-row run (byte 2i + h of a
#   run holds row 8h + i); steps 2 and 3 put (c, a, j) outermost: stored order (c, a, j, b, i, h).
# - sm70 step 4 alone swaps bytes 1 and 2 of every 4, i.e. transposes each group viewed as 2 x 2.
_SM75_AXES = (4, 0, 5, 1, 3, 2)  # (a, b, h, i, c, j) -> (c, a, j, b, i, h)
_SM75_INVERSE_AXES = (1, 3, 5, 4, 0, 2)  # (c, a, j, b, i, h) -> (a, b, h, i, c, j)


def check_layout(layout: str) -> str:
    """Return ``layout`` if it names a known layout, else raise a ValueError listing them."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown EETQ checkpoint layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return layout


def fits_eetq_layout(in_features: int, out_features: int) -> bool:
    """Whether a weight of this size can be stored in EETQ's sm75/sm70 layouts (both sizes multiples of 64)."""
    return in_features % _TILE == 0 and out_features % _TILE == 0


def resolve_layout(layout: str, in_features: int, out_features: int) -> str:
    """The layout a weight of this size is actually stored in: ``layout``, or ``"plain"`` if it cannot fit."""
    check_layout(layout)
    return layout if fits_eetq_layout(in_features, out_features) else "plain"


def _check_matrix(tensor: torch.Tensor, layout: str, name: str | None, what: str) -> None:
    check_layout(layout)
    where = f"layer {name!r}: " if name else ""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{where}{what} expects a 2-D int8 weight [in_features, out_features], got {got}")
    if tensor.dtype != torch.int8:
        raise ValueError(f"{where}{what} expects an int8 weight [in_features, out_features], got dtype {tensor.dtype}")
    in_features, out_features = tensor.shape
    if layout != "plain" and not fits_eetq_layout(in_features, out_features):
        raise ValueError(
            f"{where}EETQ's {layout} layout needs in_features and out_features to be multiples of {_TILE}, "
            f"got [in={in_features}, out={out_features}]; store this layer with layout='plain'"
        )


def _biased_copy(view: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # uint8(q + 128) == q XOR 0x80 bytewise, and the int8 view of those bytes is q XOR -128.
    # clone (not contiguous()) so the in-place XOR can never reach the caller's tensor.
    return view.clone(memory_format=torch.contiguous_format).bitwise_xor_(-128).reshape(shape)


def pack_weight(q: torch.Tensor, layout: str = DEFAULT_LAYOUT, name: str | None = None) -> torch.Tensor:
    """Arrange a plain int8 matrix [in, out] in ``layout``'s checkpoint bytes.

    Returns an int8 tensor of the same shape and device holding the stored bytes (the uint8
    bytes of EETQ's buffer, reinterpreted as int8). ``"plain"`` returns ``q`` itself. ``name``
    only labels errors.
    """
    _check_matrix(q, layout, name, "pack_weight")
    if layout == "plain":
        return q
    if layout == "sm70":
        return _biased_copy(q.reshape(-1, 2, 2).transpose(1, 2), q.shape)
    k, n = q.shape
    axes = q.reshape(k // _TILE, 4, 2, 8, n // 2, 2)
    return _biased_copy(axes.permute(_SM75_AXES), q.shape)


def unpack_weight(stored: torch.Tensor, layout: str = DEFAULT_LAYOUT, name: str | None = None) -> torch.Tensor:
    """Recover the plain int8 matrix [in, out] from checkpoint bytes in ``layout`` (inverse of ``pack_weight``).

    ``"plain"`` returns ``stored`` itself. ``name`` only labels errors.
    """
    _check_matrix(stored, layout, name, "unpack_weight")
    if layout == "plain":
        return stored
    if layout == "sm70":
        return _biased_copy(stored.reshape(-1, 2, 2).transpose(1, 2), stored.shape)
    k, n = stored.shape
    axes = stored.reshape(n // 2, k // _TILE, 2, 4, 8, 2)
    return _biased_copy(axes.permute(_SM75_INVERSE_AXES), stored.shape)
