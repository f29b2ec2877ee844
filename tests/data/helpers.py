"""Writers of data files in each supported format, shared by the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` as UTF-8; returns ``path``."""
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    """Write ``records`` to ``path`` as JSON lines; returns ``path``."""
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


COLUMNS = ["prompt", "response", "completion", "messages"]


def table_rows(records: list) -> list[dict]:
    """Records as rows of one table: a column a record does not use holds None."""
    return [{column: record.get(column) for column in COLUMNS} for record in records]


def write_parquet(path: Path, records: list) -> Path:
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    parquet.write_table(pa.Table.from_pylist(table_rows(records)), path)
    return path


def write_saved_dataset(path: Path, records: list) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(table_rows(records)).save_to_disk(str(path))
    return path
