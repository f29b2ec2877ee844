"""Data files: the same records load the same way from every format, and a bad record is named by file and place."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from eetq_lora.data import Example, load_file
from eetq_lora.data.rows import example_from_record
from eetq_lora.errors import DataError
from tests.data.helpers import COLUMNS, write, write_jsonl, write_parquet, write_saved_dataset

from .conftest import RECORDS


def write_json(path: Path, records: list) -> Path:
    return write(path, json.dumps(records, indent=2))


def write_csv(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow({k: json.dumps(v) if k == "messages" else v for k, v in record.items()})
    return path


WRITERS = {
    "jsonl": (write_jsonl, "d.jsonl"),
    "json": (write_json, "d.json"),
    "csv": (write_csv, "d.csv"),
    "parquet": (write_parquet, "d.parquet"),
    "datasets": (write_saved_dataset, "saved"),
}


def expected_examples(records: list) -> tuple[Example, ...]:
    return tuple(example_from_record(r, "reference") for r in records)


@pytest.mark.parametrize("kind", WRITERS)
def test_every_format_loads_pairs_completions_and_chats_alike(tmp_path, kind):
    writer, name = WRITERS[kind]
    path = writer(tmp_path / name, RECORDS)
    dataset = load_file(path)
    assert dataset.examples == expected_examples(RECORDS)
    assert dataset.source == str(path)
    assert dataset.examples[2].is_chat and len(dataset.examples[2].messages) == 5


# Where each format names the third record, which is the bad one in the test below.
THIRD_RECORD = {"jsonl": "line 4", "json": "item 3", "csv": "line 6", "parquet": "row 3", "datasets": "row 3"}


@pytest.mark.parametrize("kind", WRITERS)
def test_a_bad_record_is_named_by_file_and_line_or_row_and_nothing_is_written(tmp_path, kind):
    writer, name = WRITERS[kind]
    good = {"prompt": "a\nmultiline prompt", "response": "r"}  # two lines in CSV
    records = [good, good, {"prompt": "q", "response": " "}, good]
    if kind == "jsonl":
        path = write(tmp_path / name, "\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]))
    else:
        path = writer(tmp_path / name, records)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(DataError) as error:
        load_file(path)
    assert str(error.value).startswith(f"{path}, {THIRD_RECORD[kind]}: ")
    assert '"response" is empty' in str(error.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_loading_a_saved_dataset_writes_no_cache_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = write_saved_dataset(tmp_path / "saved", RECORDS)
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    watched = [tmp_path, cache]

    def snapshot():
        return sorted((str(p), p.stat().st_mtime_ns) for root in watched if root.exists() for p in root.rglob("*"))

    before = snapshot()
    assert len(load_file(folder)) == len(RECORDS)
    assert snapshot() == before


def test_jsonl_blank_lines_and_a_byte_order_mark_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "hi", "response": "hello"}\r\n\r\n{"prompt": "a", "response": "b"}\r\n')
    assert load_file(path).examples == (Example("hi", "hello"), Example("a", "b"))


def test_a_line_separator_inside_a_jsonl_string_is_not_a_new_line(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps({"prompt": "a\u2028b", "response": "c"}, ensure_ascii=False) + "\n")
    assert load_file(path).examples == (Example("a\u2028b", "c"),)


def test_jsonl_that_is_not_json_names_the_line_and_column(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "q", "response": "r"}\n{"prompt": "a", "response": }\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: not valid JSON \(Expecting value at column 29\)"):
        load_file(path)


def test_json_must_be_a_list_and_one_object_per_line_is_pointed_to_jsonl(tmp_path):
    with pytest.raises(DataError, match="holds a JSON dict, not a list of records"):
        load_file(write(tmp_path / "d.json", json.dumps({"data": RECORDS})))
    with pytest.raises(DataError, match="Extra data at line 2, column 1.*name it .jsonl"):
        load_file(write_jsonl(tmp_path / "lines.json", RECORDS))


def test_csv_rows_with_too_many_cells_or_broken_quotes_are_named(tmp_path):
    with pytest.raises(DataError, match=r"d.csv, line 3: 3 cells but the header has 2; quote cells"):
        load_file(write(tmp_path / "d.csv", "prompt,response\nq,r\nq,r,extra\n"))
    with pytest.raises(DataError, match=r"e.csv, line 3: not valid CSV"):
        load_file(write(tmp_path / "e.csv", 'prompt,response\nq,r\n"q,"r"x\n'))


def test_csv_cells_can_hold_long_chats(tmp_path):
    long_answer = "the cat says meow . " * 20000  # over the csv module's default cell limit
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_answer}]}
    assert load_file(write_csv(tmp_path / "d.csv", [record])).examples[0].response == long_answer.strip()


def test_text_files_give_one_whole_text_example_per_line(tmp_path):
    dataset = load_file(write(tmp_path / "t.txt", "first line\n\n  second line  \n"))
    assert dataset.examples == (Example("", "first line"), Example("", "second line"))
    assert all(e.is_text for e in dataset.examples)


def test_a_text_line_holding_other_line_breaks_stays_one_example(tmp_path):
    # U+2028, NEL and form feed end a line for str.splitlines(), not for a text file.
    dataset = load_file(write(tmp_path / "t.txt", "one\u2028still one\r\ntwo\x85still two\x0cand two\n"))
    assert dataset.examples == (Example("", "one\u2028still one"), Example("", "two\x85still two\x0cand two"))


def test_missing_unknown_empty_and_undecodable_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl does not exist; pass an existing file to --data"):
        load_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="pass an existing file to --eval-data"):
        load_file(tmp_path / "nope.jsonl", "--eval-data")
    with pytest.raises(DataError, match="unknown extension '.tsv'; use a .jsonl, .json"):
        load_file(write(tmp_path / "d.tsv", "a\tb\n"))
    for name in ("empty.jsonl", "empty.json", "empty.csv", "empty.txt"):
        text = "[]" if name.endswith(".json") else ("prompt,response\n" if name.endswith(".csv") else "\n \n")
        with pytest.raises(DataError, match="holds no examples"):
            load_file(write(tmp_path / name, text))
    with pytest.raises(DataError, match="is a folder but not a dataset saved with save_to_disk"):
        load_file(tmp_path)
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_file(tmp_path / "latin.txt")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_path_that_is_neither_file_nor_folder_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(DataError, match="is not a file"):
        load_file(tmp_path / "pipe.jsonl")
