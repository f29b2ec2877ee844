"""User data files: JSONL, JSON, CSV or Parquet records, saved ``datasets`` folders, or plain text lines."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..errors import DataError
from .columnar import load_parquet, load_saved_dataset
from .examples import Dataset, Example
from .rows import RECORD_HELP, example_from_record

FORMAT_HELP = (
    "use a .jsonl, .json (a list of objects), .csv or .parquet file of records with "
    '"messages", "prompt"/"completion" or "prompt"/"response", a folder saved with datasets\' save_to_disk, '
    "or a .txt file with one training text per line"
)
# Quoted CSV cells may hold whole chats as JSON, far over the csv module's default cell limit.
CSV_FIELD_LIMIT = 2**31 - 1


def _read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def load_jsonl(path: Path) -> list[Example]:
    """One record per line; blank lines are skipped and a bad line is named by its number."""
    examples = []
    # Split on newlines only: JSON strings may hold other line separators (U+2028) as they are.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno}); {RECORD_HELP}") from None
        examples.append(example_from_record(record, where))
    return examples


def load_json(path: Path) -> list[Example]:
    """A JSON list of records; a bad record is named by its position in the list (from 1)."""
    try:
        document = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        hint = "; if it holds one object per line, name it .jsonl" if error.msg == "Extra data" else ""
        raise DataError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}){hint}"
        ) from None
    if not isinstance(document, list):
        raise DataError(
            f"{path} holds a JSON {type(document).__name__}, not a list of records; "
            "write the records as one JSON list, or one object per line in a .jsonl file"
        )
    return [example_from_record(record, f"{path}, item {number}") for number, record in enumerate(document, start=1)]


def load_csv(path: Path) -> list[Example]:
    """A header row naming the columns, then one record per row (a ``messages`` cell holds JSON)."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    header: list[str] | None = None
    examples = []
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise DataError(f"{path}, line {start}: not valid CSV ({error}); check its quotes") from None
        where, start = f"{path}, line {start}", reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            continue
        if len(row) > len(header):
            raise DataError(f"{where}: {len(row)} cells but the header has {len(header)}; quote cells that hold commas")
        examples.append(example_from_record(dict(zip(header, row, strict=False)), where))
    return examples


def load_text(path: Path) -> list[Example]:
    """Every non-blank line of a text file is one training text (the loss covers all of it)."""
    # Split at line feeds only (a \r\n ending is stripped with the line): str.splitlines() would also
    # cut inside a line at U+2028, NEL or a form feed.
    return [Example("", line.strip()) for line in _read_text(path).split("\n") if line.strip()]


READERS = {
    ".jsonl": load_jsonl,
    ".json": load_json,
    ".csv": load_csv,
    ".parquet": load_parquet,
    ".txt": load_text,
}


def load_file(path: str | os.PathLike, flag: str = "--data") -> Dataset:
    """Load a data file or saved ``datasets`` folder; DataError if it is missing, malformed or empty.

    ``flag`` is the command-line option the path came from, named in the error messages.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; pass an existing file to {flag}")
    if path.is_dir():
        examples = load_saved_dataset(path, FORMAT_HELP)
    elif not path.is_file():
        raise DataError(f"data path {path} is not a file; {FORMAT_HELP}")
    elif path.suffix.lower() in READERS:
        examples = READERS[path.suffix.lower()](path)
    else:
        raise DataError(f"data file {path} has an unknown extension {path.suffix or '(none)'!r}; {FORMAT_HELP}")
    if not examples:
        raise DataError(f"data file {path} holds no examples (it is empty or blank); {FORMAT_HELP}")
    return Dataset(tuple(examples), str(path))
