"""``eetq-lora eval``: held-out scores of adapters and the base, matching what finetune measured."""

from __future__ import annotations

import json

import pytest

from eetq_lora.cli.main import main
from tests.helpers import qa_pairs

from .conftest import tiny_args


@pytest.fixture(scope="module")
def trained(tiny_model, qa_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    assert main(tiny_args(tiny_model, qa_file, root / "a", "--steps", "10", "--eval-examples", "16")) == 0
    assert (
        main(tiny_args(tiny_model, qa_file, root / "b", "--steps", "10", "--lr", "0.03", "--eval-examples", "16")) == 0
    )
    return root / "a", root / "b"


def scores(capsys) -> dict:
    document = json.loads(capsys.readouterr().out)
    return {row["model"]: row for row in document["results"]}


def test_eval_reproduces_the_numbers_finetune_measured(trained, capsys):
    a, _ = trained
    assert main(["eval", "--base", "--adapter", str(a), "--json"]) == 0
    rows = scores(capsys)
    metrics = json.loads((a / "metrics.json").read_text())["held_out"]
    assert rows["base"]["loss"] == pytest.approx(metrics["before"]["loss"], rel=1e-6)
    assert rows["base"]["accuracy"] == pytest.approx(metrics["before"]["accuracy"], rel=1e-6)
    assert rows[str(a)]["loss"] == pytest.approx(metrics["after"]["loss"], rel=1e-6)
    assert rows[str(a)]["accuracy"] == pytest.approx(metrics["after"]["accuracy"], rel=1e-6)
    assert rows[str(a)]["tokens"] == metrics["after"]["tokens"]


def test_several_adapters_are_scored_separately(trained, capsys):
    a, b = trained
    assert main(["eval", "--adapter", str(a), "--adapter", str(b), "--json"]) == 0
    rows = scores(capsys)
    assert list(rows) == [str(a), str(b)]
    for folder in (a, b):
        after = json.loads((folder / "metrics.json").read_text())["held_out"]["after"]
        assert rows[str(folder)]["loss"] == pytest.approx(after["loss"], rel=1e-6)


def test_table_output_names_each_model(trained, capsys):
    a, _ = trained
    assert main(["eval", "--adapter", str(a)]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and str(a) in out and "\nbase" not in out


def test_other_data_can_be_scored(trained, tmp_path, capsys):
    a, _ = trained
    data = tmp_path / "other.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in qa_pairs()[:12]))
    assert main(["eval", "--adapter", str(a), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == str(data)


def test_bad_data_fails_before_any_model_is_loaded(trained, tmp_path, capsys):
    a, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\n{"prompt": 1, "response": "y"}\n')
    assert main(["eval", "--adapter", str(a), "--data", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "line 2" in err and "Loading" not in err


def test_a_progress_bar_counts_each_models_batches_on_a_terminal(trained, terminal_bars, capsys):
    bars, shown = terminal_bars
    a, b = trained
    assert main(["eval", "--base", "--adapter", str(a), "--adapter", str(b), "--json"]) == 0
    rows = list(scores(capsys).values())
    batch_size = json.loads((a / "run_config.json").read_text())["settings"]["batch_size"]
    assert [bar.desc for bar in bars] == [f"scoring {name}" for name in ("base", a, b)]
    for bar, row in zip(bars, rows, strict=True):
        assert bar.n == bar.total == -(-row["examples"] // batch_size)
    assert shown == [True, True, True]

    bars.clear()
    assert main(["eval", "--adapter", str(a), "--json", "--no-progress"]) == 0
    assert shown[-1] is False
    assert "scoring" not in capsys.readouterr().err  # not a terminal: quiet
