"""``eetq-lora finetune`` on the data formats beyond JSONL pairs: chats from a saved dataset, and bad CSV rows.

The data functions themselves are tested in tests/data.
"""

from __future__ import annotations

import json

import pytest

from eetq_lora.cli.main import main
from eetq_lora.data import PromptFormat, encode_examples, load_file, split_dataset
from eetq_lora.models import load_tokenizer
from tests.helpers import ANIMALS, SOUNDS, qa_pairs

from .conftest import tiny_args


def chats() -> list[dict]:
    """Two-turn chats with a system prompt: every animal is asked about with the next one."""
    rows = []
    for index, (animal, sound) in enumerate(zip(ANIMALS, SOUNDS, strict=True)):
        other, other_sound = ANIMALS[index - 1], SOUNDS[index - 1]
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "a plain line of text"},
                    {"role": "user", "content": f"what does the {animal} say ?"},
                    {"role": "assistant", "content": f"the {animal} says {sound} ."},
                    {"role": "user", "content": f"what does the {other} say ?"},
                    {"role": "assistant", "content": f"the {other} says {other_sound} ."},
                ]
            }
        )
    return rows


def test_finetune_trains_on_multi_turn_chats_from_a_saved_dataset_folder(tiny_chat_model, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    folder = tmp_path / "chats"
    datasets.Dataset.from_list(chats()).save_to_disk(str(folder))
    out = tmp_path / "run"
    assert main(tiny_args(tiny_chat_model, folder, out, "--steps", "2", "--max-seq-len", "64")) == 0
    data = json.loads((out / "metrics.json").read_text())["data"]

    split = split_dataset(load_file(folder))
    fmt = PromptFormat(load_tokenizer(tiny_chat_model))
    assert data["source"] == str(folder) and data["chat_template"] is True
    assert data["train_examples"] == len(encode_examples(fmt, split.train, 64)) == len(split.train)
    assert data["held_out_examples"] == len(split.held_out)
    assert data["dropped_too_long"] == data["truncated"] == 0
    assert data["example_prompt"] == split.held_out[0].messages[1].content


def test_a_bad_csv_row_stops_finetune_naming_its_line_before_anything_is_written(tiny_model, tmp_path, capsys):
    data = tmp_path / "bad.csv"
    good = qa_pairs()[0]
    data.write_text(f'prompt,completion\n"{good["prompt"]}","{good["response"]}"\n"{good["prompt"]}",\n')
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model, data, out)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("eetq-lora finetune: error:")
    assert f"{data}, line 3: " in last and '"completion" is empty' in last
    assert not out.exists()


def test_eval_data_builtin_and_eval_scoring_adapters_on_the_same_data(tiny_model, qa_file, tmp_path, capsys):
    from eetq_lora.training.config import FinetuneConfig

    assert FinetuneConfig.from_dict({"data": None}).data == "builtin"  # runs recorded before the flag
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(p) + "\n" for p in qa_pairs()[:6]))
    a, b = tmp_path / "a", tmp_path / "b"
    # --eval-data: a separate held-out set; training rows sharing its prompts are left out.
    assert main(tiny_args(tiny_model, qa_file, b, "--steps", "1", "--eval-data", str(eval_file))) == 0
    data = json.loads((b / "metrics.json").read_text())["data"]
    assert data["held_out_source"] == str(eval_file) and data["held_out_examples"] == 6
    assert data["left_out_for_held_out"] == 6
    # --data builtin names the built-in corpus, and the run records it by that name.
    args = tiny_args(tiny_model, qa_file, a, "--steps", "1")
    args[args.index("--data") + 1] = "builtin"
    assert main(args) == 0
    assert json.loads((a / "run_config.json").read_text())["settings"]["data"] == "builtin"
    capsys.readouterr()
    # eval scores every adapter on the first one's data (here the built-in corpus), with a note.
    common = ["--json", "--eval-examples", "4", "--threads", "1"]
    assert main(["eval", "--adapter", str(a), "--adapter", str(b), *common]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["data"].startswith("chatterbot-corpus")
    assert "Note: " in out.err and str(eval_file) in out.err
    assert main(["eval", "--adapter", str(b), "--adapter", str(a), *common]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == str(eval_file)
