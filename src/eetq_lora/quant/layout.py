"""EETQ's checkpoint byte layouts for the int8 weight (REFERENCE.md section 2).

An EETQ checkpoint stores the quantized matrix Q (int8, [K=in_features, N=out_features]) as an
int8 tensor of the same shape whose bytes are a permutation of ``uint8(Q + 128)``, arranged for
the CUTLASS kernel of the GPU generation that wrote it. Three layouts are known here:

- ``"sm75"``: compute capability 7.5-8.9 (T4, A10, A100, RTX 30/40, L4); the default.
- ``"sm70"``: compute capability 7.0-7.4 (V100): only the +128 bias and the byte swap.
- ``"plain"``: the row-major matrix itself, as this package keeps it in memory.

The EETQ layouts need both dimensions to be multiples of 64. ``pack_weight`` and
``unpack_weight`` convert exactly, with a handful of tensor-wide index operations, on any device.
"""

from __future__ import annotations

import torch

LAYOUTS = ("sm75", "sm70", "plain")
DEFAULT_LAYOUT = "sm75"
# safetensors metadata key under which this package records the layout of the int8 weights it writes.
METADATA_KEY = "eetq_layout"

_TILE = 64
# Step 1 of the sm75 layout: output row base+t of a 16-row block takes input row base+_ROW_PERM[t].
_ROW_PERM = (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15)
# Step 4: inside every 4-byte group the bytes at positions 1 and 2 trade places.
_BYTE_SWAP = (0, 2, 1, 3)
# Steps 1 and 4 both permute within aligned 16-element runs of k, so they fold into one table:
# stored byte t of a run holds input row _SM75_RUN[t] of that run.
_SM75_RUN = tuple(_ROW_PERM[4 * (t // 4) + _BYTE_SWAP[t % 4]] for t in range(16))
_SM75_RUN_INVERSE = tuple(sorted(range(16), key=_SM75_RUN.__getitem__))


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


def _flip_sign_bit(tensor: torch.Tensor) -> torch.Tensor:
    # uint8(q + 128) == q XOR 0x80 bytewise, and the int8 view of those bytes is q XOR -128.
    return torch.bitwise_xor(tensor, -128)


def _swap_middle_bytes(tensor: torch.Tensor) -> torch.Tensor:
    groups = tensor.reshape(-1, 4)
    swap = torch.tensor(_BYTE_SWAP, device=tensor.device)
    return groups.index_select(1, swap).reshape(tensor.shape)


def _run_index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


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
        return _swap_middle_bytes(_flip_sign_bit(q))
    k, n = q.shape
    # Input index (tile a, run b, t, super-column c, column-in-pair j) of Q[64a + 16b + t, 2c + j];
    # the stored flat offset is c*2K + a*128 + j*64 + 16b + t.
    runs = q.reshape(k // _TILE, _TILE // 16, 16, n // 2, 2)
    runs = runs.index_select(2, _run_index(_SM75_RUN, q.device))
    stored = runs.permute(3, 0, 4, 1, 2).contiguous()
    return _flip_sign_bit(stored).reshape(k, n)


def unpack_weight(stored: torch.Tensor, layout: str = DEFAULT_LAYOUT, name: str | None = None) -> torch.Tensor:
    """Recover the plain int8 matrix [in, out] from checkpoint bytes in ``layout`` (inverse of ``pack_weight``).

    ``"plain"`` returns ``stored`` itself. ``name`` only labels errors.
    """
    _check_matrix(stored, layout, name, "unpack_weight")
    if layout == "plain":
        return stored
    if layout == "sm70":
        return _flip_sign_bit(_swap_middle_bytes(stored))
    k, n = stored.shape
    tiles = _flip_sign_bit(stored).reshape(n // 2, k // _TILE, 2, _TILE // 16, 16)
    runs = tiles.permute(1, 3, 4, 0, 2).index_select(2, _run_index(_SM75_RUN_INVERSE, stored.device))
    return runs.reshape(k, n)
