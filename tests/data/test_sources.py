"""Naming the data: ``builtin``, recorded paths, a separate --eval-data, and one held-out set for every adapter."""

from __future__ import annotations

import os

import pytest

from eetq_lora.data import (
    BUILTIN,
    DataChoice,
    Dataset,
    Example,
    choose_eval_data,
    data_argument,
    eval_data_argument,
    held_out_set,
    is_builtin,
    load_dataset,
    load_eval_dataset,
    sources,
    split_dataset,
)
from eetq_lora.errors import DataError
from tests.data.helpers import write_jsonl
from tests.helpers import qa_pairs

CORPUS = Dataset((Example("built", "in"), Example("other", "pair")), "built-in corpus")


@pytest.fixture
def fake_corpus(monkeypatch):
    monkeypatch.setattr(sources, "load_corpus", lambda: CORPUS)


def test_builtin_and_none_name_the_built_in_corpus_and_anything_else_a_file(tmp_path, fake_corpus, monkeypatch):
    assert load_dataset(None) is CORPUS and load_dataset(BUILTIN) is CORPUS
    assert is_builtin(None) and is_builtin("builtin") and not is_builtin("./builtin")
    path = write_jsonl(tmp_path / "builtin", [])  # a file of that name is reached through a path
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="unknown extension"):
        load_dataset("./builtin")
    assert path.exists()


def test_recorded_arguments_are_builtin_or_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data_argument(None) == data_argument("builtin") == BUILTIN
    assert data_argument("d.jsonl") == os.path.join(str(tmp_path), "d.jsonl")
    assert data_argument("~/d.jsonl") == os.path.join(os.path.expanduser("~"), "d.jsonl")
    assert eval_data_argument(None) is None
    assert eval_data_argument("e.csv") == os.path.join(str(tmp_path), "e.csv")


def test_eval_data_is_a_file_and_errors_name_its_flag(tmp_path):
    with pytest.raises(DataError, match="--eval-data takes a data file or folder, not the built-in data"):
        load_eval_dataset(BUILTIN)
    with pytest.raises(DataError, match="pass an existing file to --eval-data"):
        load_eval_dataset(tmp_path / "missing.jsonl")


def test_an_adapter_trained_on_the_builtin_data_is_not_scored_on_the_next_adapters_file():
    recorded = [("runs/a", {"data": None, "steps": 3}), ("runs/b", {"data": "/d/b.jsonl"})]
    choice, notes = choose_eval_data(None, None, recorded)
    assert choice == DataChoice(BUILTIN, None)
    assert notes == [
        "runs/b was scored in training on the held-out split of /d/b.jsonl; every model here is scored on the "
        "held-out split of the built-in data (pass --data or --eval-data to choose)"
    ]
    same, notes = choose_eval_data(None, None, [("a", {"data": "builtin"}), ("b", {"data": None})])
    assert same == DataChoice() and notes == []


def test_the_first_adapter_with_a_record_decides_data_and_held_out_set_together():
    recorded = [
        ("old", None),
        ("a", {"data": "/d/a.jsonl", "eval_data": "/d/a-eval.csv"}),
        ("b", {"data": "/d/a.jsonl"}),
        ("c", {"data": "/d/c.jsonl", "eval_data": "/d/a-eval.csv"}),  # the same held-out set: no note
    ]
    choice, notes = choose_eval_data(None, None, recorded)
    assert choice == DataChoice("/d/a.jsonl", "/d/a-eval.csv")
    assert len(notes) == 1
    assert notes[0].startswith("b was scored in training on the held-out split of /d/a.jsonl; every model here is ")
    assert choose_eval_data(None, None, [("old", None)]) == (DataChoice(), [])


def test_flags_override_every_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorded = [("a", {"data": "/d/a.jsonl", "eval_data": "/d/a-eval.csv"})]
    assert choose_eval_data("x.jsonl", None, recorded) == (DataChoice(str(tmp_path / "x.jsonl"), None), [])
    assert choose_eval_data(None, "e.csv", recorded) == (DataChoice(BUILTIN, str(tmp_path / "e.csv")), [])


def test_held_out_set_is_the_eval_file_whole_or_the_fixed_split_of_the_data(tmp_path, fake_corpus):
    pairs = qa_pairs()
    data = write_jsonl(tmp_path / "d.jsonl", pairs)
    eval_file = write_jsonl(tmp_path / "e.jsonl", pairs[:3])
    split = held_out_set(DataChoice(str(data)))
    assert split == Dataset(split_dataset(load_dataset(data)).held_out, str(data))
    assert held_out_set(DataChoice(str(data), str(eval_file))) == load_eval_dataset(eval_file)
    assert held_out_set(DataChoice()) == Dataset(split_dataset(CORPUS).held_out, CORPUS.source)
