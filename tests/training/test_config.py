"""FinetuneConfig.validate: every setting is checked for type, finiteness and a stated range."""

from __future__ import annotations

import pytest

from eetq_lora.errors import ConfigError, UserError
from eetq_lora.training.config import FinetuneConfig

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("lr", INF, "--lr must be a number in (0, 1]"),
        ("lr", 1e30, "--lr must be a number in (0, 1]"),
        ("lr", NAN, "--lr must be a number in (0, 1]"),
        ("lr", 0.0, "--lr must be a number in (0, 1]"),
        ("lr", -1e-3, "--lr must be a number in (0, 1]"),
        ("lr", "0.001", "--lr must be a number in (0, 1]"),
        ("alpha", INF, "--alpha must be a number in (0, 10000]"),
        ("alpha", 0, "--alpha must be a number in (0, 10000]"),
        ("alpha", 10_000.5, "--alpha must be a number in (0, 10000]"),
        ("dropout", -0.5, "--dropout must be a number in [0, 1)"),
        ("dropout", 1.0, "--dropout must be a number in [0, 1)"),
        ("dropout", NAN, "--dropout must be a number in [0, 1)"),
        ("seed", 1e30, "--seed must be a whole number from 0 to 4,294,967,295"),
        ("seed", 10**30, "--seed must be a whole number from 0 to 4,294,967,295"),
        ("seed", -1, "--seed must be a whole number from 0 to 4,294,967,295"),
        ("seed", True, "--seed must be a whole number"),
        ("steps", 0, "--steps must be a whole number from 1 to 10,000,000"),
        ("steps", 2.0, "--steps must be a whole number"),
        ("r", 0, "--r must be a whole number from 1 to 65,536"),
        ("max_seq_len", 4, "--max-seq-len must be a whole number from 8"),
        ("batch_size", 10**9, "--batch-size must be a whole number from 1 to 1,000,000"),
        ("grad_accum", 0, "--grad-accum must be a whole number from 1"),
        ("eval_examples", 0, "--eval-examples must be a whole number from 1"),
        ("threads", 0, "--threads must be a whole number from 1 to 4,096"),
        ("target_modules", " , ", "--target-modules must name at least one module"),
    ],
)
def test_out_of_range_settings_are_refused_with_their_range(setting, value, message):
    config = FinetuneConfig(**{setting: value})
    with pytest.raises(ConfigError) as refused:
        config.validate()
    text = str(refused.value)
    assert text.startswith(message) and "\n" not in text
    assert isinstance(refused.value, UserError) and isinstance(refused.value, ValueError)
    if setting != "target_modules":
        assert text.endswith(f"got {value!r}")  # the rejected value is named


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"lr": 1.0, "alpha": 10_000.0, "dropout": 0.0, "seed": 2**32 - 1, "threads": None},
        {"lr": 1, "alpha": 16, "dropout": 0.99, "seed": 0, "threads": 4096, "steps": 10_000_000},
        {"target_modules": "q_proj, v_proj", "max_seq_len": 8, "r": 65_536},
    ],
)
def test_settings_at_their_bounds_are_accepted(values):
    FinetuneConfig(**values).validate()


def test_a_saved_run_config_round_trips_and_reports_differences():
    config = FinetuneConfig(lr=0.01, seed=3, threads=2)
    again = FinetuneConfig.from_dict({**config.to_dict(), "unknown_future_setting": 1})
    assert again == config and again.differences(config) == []
    changed = FinetuneConfig.from_dict({**config.to_dict(), "lr": 0.02, "threads": 1, "device": "cpu"})
    assert changed.differences(config) == ["lr"]  # device and threads may change on resume
