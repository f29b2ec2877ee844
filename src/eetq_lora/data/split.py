"""The train / held-out split: a fixed one that does not depend on the seed or the data's order, or a separate
held-out set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..errors import DataError
from .examples import Dataset, Example

HELD_OUT_FRACTION = 0.1


@dataclass(frozen=True)
class Split:
    """``held_out_source`` names a separate held-out set (None for a split of the training data);
    ``overlap`` counts the training examples left out because that set has their prompt."""

    train: tuple[Example, ...]
    held_out: tuple[Example, ...]
    overlap: int = 0
    held_out_source: str | None = None


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


def group_key(example: Example) -> str:
    """Examples with the same prompt (for a chat: the same user turns; for plain text: the same text)
    always land on the same side."""
    if example.is_chat:
        users = [_normal(m.content) for m in example.messages if m.role == "user"]
        if users:
            return "\x00".join(users)
    return _normal(example.prompt or example.response)


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


def training_split(dataset: Dataset, held_out: Dataset | None = None, fraction: float = HELD_OUT_FRACTION) -> Split:
    """Train on ``dataset`` and score on ``held_out`` when it is given, else the fixed split of ``dataset``.

    With a separate held-out set, training examples that share a prompt with it are left out (and
    counted), so that held-out scores measure prompts the model has not trained on.
    """
    if held_out is None:
        return split_dataset(dataset, fraction)
    held_keys = {group_key(e) for e in held_out.examples}
    train = tuple(e for e in dataset.examples if group_key(e) not in held_keys)
    if not train:
        raise DataError(
            f"every example of {dataset.source} has a prompt that is also in the held-out data {held_out.source}; "
            "pass training data with other prompts, or leave --eval-data out to hold out part of the training data"
        )
    return Split(train, held_out.examples, overlap=len(dataset) - len(train), held_out_source=held_out.source)
