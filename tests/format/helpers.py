"""Per-element references for the EETQ checkpoint layouts, written independently of eetq_lora.format.layout."""

from __future__ import annotations

import torch

INV = [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]
PERM = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
SWAP = [0, 2, 1, 3]


def stored_bytes(stored: torch.Tensor) -> list[int]:
    """The bytes of a stored weight as unsigned values, in memory order."""
    return stored.contiguous().view(torch.uint8).reshape(-1).tolist()


def sm75_by_gather(q: torch.Tensor) -> list[int]:
    """The stored buffer, element by element, from the gather formula."""
    k_size, n_size = q.shape
    values = q.tolist()
    out = [None] * (k_size * n_size)
    for k_in in range(k_size):
        k = 16 * (k_in // 16) + INV[k_in % 16]
        for n in range(n_size):
            f = (n // 2) * 2 * k_size + (k // 64) * 128 + (n % 2) * 64 + 4 * ((k % 64) // 4) + SWAP[k % 4]
            assert out[f] is None
            out[f] = values[k_in][n] + 128
    return out


def sm75_by_steps(q: torch.Tensor) -> list[int]:
    """The stored buffer from the four numbered steps, each applied literally to Python lists."""
    k_size, n_size = q.shape
    rows = q.tolist()
    # 1. Row permutation inside each block of 16 rows.
    rows = [rows[16 * (r // 16) + PERM[r % 16]] for r in range(k_size)]
    # 2. Transpose to [N, K].
    cols = [[rows[k][n] for k in range(k_size)] for n in range(n_size)]
    # 3. Pairs of columns interleaved 64 rows at a time.
    buffer = []
    for c in range(n_size // 2):
        for tile in range(k_size // 64):
            buffer += cols[2 * c][64 * tile : 64 * tile + 64]
            buffer += cols[2 * c + 1][64 * tile : 64 * tile + 64]
    # 4. Bias to uint8, then swap the middle bytes of every group of 4.
    buffer = [v + 128 for v in buffer]
    for g in range(0, len(buffer), 4):
        buffer[g + 1], buffer[g + 2] = buffer[g + 2], buffer[g + 1]
    return buffer


def sm70_by_steps(q: torch.Tensor) -> list[int]:
    """The sm70 stored buffer: biased to uint8 row-major, with the middle bytes of every group of 4 swapped."""
    buffer = [v + 128 for row in q.tolist() for v in row]
    for g in range(0, len(buffer), 4):
        buffer[g + 1], buffer[g + 2] = buffer[g + 2], buffer[g + 1]
    return buffer
