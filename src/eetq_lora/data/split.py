"""A fixed train / held-out split that does not depend on the seed or on the order of the data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..errors import DataError
from .examples import Dataset, Example

HELD_OUT_FRACTION = 0.1


@dataclass(frozen=True)
class Split:
    train: tuple[Example, ...]
    held_out: tuple[Example, ...]


def group_key(example: Example) -> str:
    """Examples with the same prompt (or, for plain text, the same text) always land on the same side."""
    text = example.prompt or example.response
    return " ".join(text.casefold().split())


def _position(key: str) -> float:
    # A stable pseudo-random position in [0, 1): Python's hash() is salted per process.
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_dataset(dataset: Dataset, fraction: float = HELD_OUT_FRACTION) -> Split:
    """Hold out about ``fraction`` of the prompt groups; the held-out part is ordered by position.

    An example's side depends only on its own prompt, so adding data never moves an existing
    example across. At least one group is held out and at least one is trained on.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be between 0 and 1, got {fraction}")
    positions = {key: _position(key) for key in dict.fromkeys(group_key(e) for e in dataset.examples)}
    if len(positions) < 2:
        raise DataError(
            f"{dataset.source} has {len(dataset)} example(s) but only one distinct prompt; "
            "at least two are needed to hold one out for evaluation"
        )
    held_keys = {key for key, position in positions.items() if position < fraction}
    if not held_keys:
        held_keys = {min(positions, key=positions.get)}
    if len(held_keys) == len(positions):
        held_keys.discard(max(held_keys, key=positions.get))
    train = tuple(e for e in dataset.examples if group_key(e) not in held_keys)
    held_out = tuple(
        sorted((e for e in dataset.examples if group_key(e) in held_keys), key=lambda e: positions[group_key(e)])
    )
    return Split(train, held_out)
