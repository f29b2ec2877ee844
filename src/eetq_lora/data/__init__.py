"""Training data: the built-in corpus or a user file, a fixed held-out split, tokenization and batching."""

from __future__ import annotations

import os

from .corpus import load_corpus
from .encode import IGNORE_INDEX, Encoded, EncodedSet, PromptFormat, collate, encode_examples, supervised_tokens
from .examples import Dataset, Example
from .files import load_file
from .split import Split, split_dataset


def load_dataset(path: str | os.PathLike | None) -> Dataset:
    """The examples of ``path`` (.jsonl or .txt), or the built-in chatterbot corpus when ``path`` is None."""
    return load_corpus() if path is None else load_file(path)


__all__ = [
    "IGNORE_INDEX",
    "Dataset",
    "Encoded",
    "EncodedSet",
    "Example",
    "PromptFormat",
    "Split",
    "collate",
    "encode_examples",
    "load_corpus",
    "load_dataset",
    "load_file",
    "split_dataset",
    "supervised_tokens",
]
