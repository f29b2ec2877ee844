"""User data files: JSONL prompt/response pairs, or plain text with one example per line."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataError
from .examples import Dataset, Example

JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt",)
FORMAT_HELP = (
    'use a .jsonl file with one {"prompt": "...", "response": "..."} object per line, '
    "or a .txt file with one training text per line"
)


def _read_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def load_jsonl(path: Path) -> list[Example]:
    """Parse a JSONL file; any malformed line raises a DataError that names its line number."""
    examples = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataError(
                f'{where}: expected a JSON object like {{"prompt": "...", "response": "..."}}, '
                f"got {type(record).__name__}"
            )
        for key in ("prompt", "response"):
            if key not in record:
                raise DataError(f'{where}: the object has no "{key}" field (it needs "prompt" and "response")')
            if not isinstance(record[key], str):
                raise DataError(f'{where}: "{key}" must be a string, got {type(record[key]).__name__}')
        prompt, response = record["prompt"].strip(), record["response"].strip()
        if not prompt or not response:
            empty = "prompt" if not prompt else "response"
            raise DataError(f'{where}: "{empty}" is empty')
        examples.append(Example(prompt, response))
    return examples


def load_text(path: Path) -> list[Example]:
    """Every non-blank line of a text file is one training text (the loss covers all of it)."""
    return [Example("", line.strip()) for line in _read_lines(path) if line.strip()]


def load_file(path: str | os.PathLike) -> Dataset:
    """Load a .jsonl or .txt data file; raises DataError if it is missing, malformed or empty."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data file {path} does not exist; "
            "pass an existing file to --data, or leave --data out for the built-in data"
        )
    if not path.is_file():
        raise DataError(f"data path {path} is not a file; {FORMAT_HELP}")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        examples = load_jsonl(path)
    elif suffix in TEXT_SUFFIXES:
        examples = load_text(path)
    else:
        raise DataError(f"data file {path} has an unknown extension {suffix or '(none)'!r}; {FORMAT_HELP}")
    if not examples:
        raise DataError(f"data file {path} holds no examples (it is empty or blank); {FORMAT_HELP}")
    return Dataset(tuple(examples), str(path))
