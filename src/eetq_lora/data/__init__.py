"""Training data: the built-in corpus or user files (pairs, chats, plain text), the held-out set, tokenization
and batching."""

from __future__ import annotations

from .corpus import load_corpus
from .encode import IGNORE_INDEX, Encoded, EncodedSet, PromptFormat, collate, encode_examples, supervised_tokens
from .examples import Dataset, Example, Message
from .files import FORMAT_HELP, load_file
from .sources import (
    BUILTIN,
    DataChoice,
    choose_eval_data,
    data_argument,
    eval_data_argument,
    held_out_set,
    is_builtin,
    load_dataset,
    load_eval_dataset,
)
from .split import Split, split_dataset, training_split

__all__ = [
    "BUILTIN",
    "FORMAT_HELP",
    "IGNORE_INDEX",
    "DataChoice",
    "Dataset",
    "Encoded",
    "EncodedSet",
    "Example",
    "Message",
    "PromptFormat",
    "Split",
    "choose_eval_data",
    "collate",
    "data_argument",
    "encode_examples",
    "eval_data_argument",
    "held_out_set",
    "is_builtin",
    "load_corpus",
    "load_dataset",
    "load_eval_dataset",
    "load_file",
    "split_dataset",
    "supervised_tokens",
    "training_split",
]
