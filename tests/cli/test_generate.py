"""``eetq-lora generate``: answers from the quantized base and adapters, compared side by side."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from eetq_lora import load_adapter, quantize_model
from eetq_lora.cli.main import main
from eetq_lora.data import PromptFormat
from eetq_lora.models import load_tokenizer

from .conftest import tiny_args

PROMPT = "what does the cat say ?"


@pytest.fixture(scope="module")
def adapters(tiny_model, qa_file, tmp_path_factory):
    """Two adapters of the tiny model trained with different seeds and rates."""
    root = tmp_path_factory.mktemp("adapters")
    assert main(tiny_args(tiny_model, qa_file, root / "a", "--steps", "20", "--lr", "0.05")) == 0
    assert main(tiny_args(tiny_model, qa_file, root / "b", "--steps", "20", "--lr", "0.02", "--seed", "1")) == 0
    return root / "a", root / "b"


def reference_answer(model_dir, adapter_dir, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding written out by hand with the library API, to check the CLI against."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    model = quantize_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir)
    model.eval()
    ids = PromptFormat(tokenizer).prompt_ids(prompt)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_one_adapter_prints_its_greedy_answer(tiny_model, adapters, capsys):
    assert main(["generate", "--adapter", str(adapters[0]), "--max-new-tokens", "6", PROMPT]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == reference_answer(tiny_model, adapters[0], PROMPT, 6)


def test_no_adapter_answers_with_the_quantized_base(tiny_model, adapters, capsys):
    assert main(["generate", "--model", str(tiny_model), "--dtype", "float32", "--max-new-tokens", "6", PROMPT]) == 0
    assert capsys.readouterr().out.strip() == reference_answer(tiny_model, None, PROMPT, 6)


def test_several_adapters_each_answer_as_they_would_alone(tiny_model, adapters, capsys):
    a, b = adapters
    assert (
        main(
            ["generate", "--base", "--adapter", str(a), "--adapter", str(b), "--max-new-tokens", "6", "--json", PROMPT]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["model"] for row in rows] == ["base", str(a), str(b)]
    assert all(row["prompt"] == PROMPT for row in rows)
    expected = [reference_answer(tiny_model, d, PROMPT, 6) for d in (None, a, b)]
    assert [row["answer"] for row in rows] == expected


def test_several_sources_print_headings(adapters, capsys):
    a, b = adapters
    assert main(["generate", "--adapter", str(a), "--adapter", str(b), "--max-new-tokens", "3", PROMPT]) == 0
    out = capsys.readouterr().out
    assert f"## {a}\n" in out and f"## {b}\n" in out


def test_missing_or_wrong_adapter_folders_are_clear_errors(tmp_path, capsys):
    assert main(["generate", "--adapter", str(tmp_path / "nope"), PROMPT]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--adapter", str(tmp_path / "empty"), PROMPT]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err


def test_adapters_of_different_base_models_are_refused(tiny_model, adapters, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(adapters[1], other)
    record = json.loads((other / "run_config.json").read_text())
    record["settings"]["model"] = str(tmp_path / "another-model")
    (other / "run_config.json").write_text(json.dumps(record))
    assert main(["generate", "--adapter", str(adapters[0]), "--adapter", str(other), PROMPT]) == 1
    assert "different base models" in capsys.readouterr().err


def test_negative_temperature_is_refused(adapters, capsys):
    assert main(["generate", "--adapter", str(adapters[0]), "--temperature", "-1", PROMPT]) == 1
    assert "--temperature" in capsys.readouterr().err


def test_a_progress_bar_counts_generated_tokens_on_a_terminal(tiny_model, adapters, terminal_bars, capsys):
    bars, shown = terminal_bars
    assert main(["generate", "--adapter", str(adapters[0]), "--max-new-tokens", "6", PROMPT]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == reference_answer(tiny_model, adapters[0], PROMPT, 6)
    from transformers import AutoTokenizer

    words = len(AutoTokenizer.from_pretrained(tiny_model)(answer, add_special_tokens=False)["input_ids"])
    # Every new token is counted once: the answer's, plus an end-of-text token if it stopped early.
    assert len(bars) == 1 and bars[0].total == 6 and shown == [True]
    assert bars[0].n == 6 or bars[0].n == words + 1

    bars.clear()
    assert main(["generate", "--adapter", str(adapters[0]), "--max-new-tokens", "6", "--no-progress", PROMPT]) == 0
    assert shown[-1] is False and "generating" not in capsys.readouterr().err
