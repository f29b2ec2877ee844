"""Parquet files and saved ``datasets`` folders: optional packages, several splits, unreadable files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from eetq_lora.data import load_file
from eetq_lora.errors import DataError, MissingPackageError
from tests.data.helpers import table_rows, write, write_jsonl, write_parquet, write_saved_dataset

from .conftest import RECORDS


def test_the_optional_packages_are_not_imported_with_the_library():
    code = "import sys, eetq_lora, eetq_lora.data; print(sorted({'datasets', 'pyarrow'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "blocked, kind, pip",
    [("pyarrow.parquet", "parquet", "pip install pyarrow"), ("datasets", "datasets", "pip install datasets")],
)
def test_a_missing_optional_package_names_its_pip_command(tmp_path, monkeypatch, blocked, kind, pip):
    if kind == "parquet":
        path = write_parquet(tmp_path / "d.parquet", RECORDS)
    else:
        path = write_saved_dataset(tmp_path / "saved", RECORDS)
    monkeypatch.setitem(sys.modules, blocked, None)  # what a missing package looks like to import
    with pytest.raises(MissingPackageError) as error:
        load_file(path)
    assert str(error.value).endswith(f"Install it with: {pip}")
    assert "\n" not in str(error.value)
    # The formats that need no optional package still load.
    assert len(load_file(write_jsonl(tmp_path / "d.jsonl", RECORDS))) == len(RECORDS)


def test_a_folder_of_several_splits_asks_for_one_of_them(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    single = datasets.Dataset.from_list(table_rows(RECORDS[:2]))
    datasets.DatasetDict(train=single, test=single).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"holds a dataset with the splits train, test; pass the folder of one"):
        load_file(tmp_path / "dict")
    assert len(load_file(tmp_path / "dict" / "test")) == 2


def test_unreadable_parquet_and_dataset_folders_are_data_errors(tmp_path):
    pytest.importorskip("pyarrow.parquet")
    with pytest.raises(DataError, match="is not a readable Parquet file"):
        load_file(write(tmp_path / "d.parquet", "not parquet"))
    folder = write_saved_dataset(tmp_path / "saved", RECORDS)
    for arrow in folder.glob("*.arrow"):
        arrow.write_bytes(b"garbage")
    with pytest.raises(DataError, match="could not be read as a saved dataset.*save it again with save_to_disk"):
        load_file(folder)
