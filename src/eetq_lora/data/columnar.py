"""Columnar data: Parquet files and folders saved with ``datasets``' ``save_to_disk``.

pyarrow and datasets are optional: they are imported only when such data is loaded.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..errors import DataError, MissingPackageError
from .examples import Example
from .rows import example_from_record

# What a malformed file or folder raises inside pyarrow/datasets (ArrowInvalid is a ValueError,
# ArrowIOError an OSError); anything else is a bug and is not hidden.
READ_ERRORS = (OSError, ValueError, KeyError, TypeError)


def _optional(module: str, package: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise MissingPackageError(package, purpose, package) from None


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _examples(rows: list, source: Path) -> list[Example]:
    return [example_from_record(row, f"{source}, row {number}") for number, row in enumerate(rows, start=1)]


def load_parquet(path: Path) -> list[Example]:
    """Every row of a Parquet file (rows count from 1 in error messages)."""
    parquet = _optional("pyarrow.parquet", "pyarrow", "Reading .parquet data")
    try:
        rows = parquet.read_table(path).to_pylist()
    except READ_ERRORS as error:
        raise DataError(f"{path} is not a readable Parquet file ({_one_line(error)}); write it again") from None
    return _examples(rows, path)


def load_saved_dataset(folder: Path, format_help: str) -> list[Example]:
    """Every row of a ``datasets.Dataset`` saved with ``save_to_disk`` into ``folder``."""
    splits_file = folder / "dataset_dict.json"
    if splits_file.is_file():
        try:
            splits = [str(name) for name in json.loads(splits_file.read_text(encoding="utf-8"))["splits"]]
        except (ValueError, KeyError, TypeError):
            splits = []
        if splits:
            raise DataError(
                f"{folder} holds a dataset with the splits {', '.join(splits)}; pass the folder of one of them, "
                f"e.g. {folder / splits[0]}"
            )
    if not (folder / "state.json").is_file():
        raise DataError(f"data path {folder} is a folder but not a dataset saved with save_to_disk; {format_help}")
    datasets = _optional("datasets", "datasets", "Reading a saved datasets folder")
    try:
        loaded = datasets.load_from_disk(str(folder))
        if not isinstance(loaded, datasets.Dataset):
            raise ValueError(f"it holds a {type(loaded).__name__}, not one Dataset")
        rows = loaded.to_list()
    except READ_ERRORS as error:
        raise DataError(
            f"{folder} could not be read as a saved dataset ({_one_line(error)}); save it again with save_to_disk"
        ) from None
    return _examples(rows, folder)
