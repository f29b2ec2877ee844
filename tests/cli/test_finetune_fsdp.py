"""``torchrun ... eetq_lora finetune --fsdp`` on a tiny offline model: the same run as one process, sharded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eetq_lora.cli.main import main

from .conftest import ctrl_c_script, tiny_args

ADAPTER = "adapter_model.safetensors"


def torchrun(*argv: str, script: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2`` of the CLI (or of ``script``)."""
    target = [str(script)] if script else ["-m", "eetq_lora"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(autouse=True, scope="module")
def _module_cache(tmp_path_factory):
    # The module-scoped runs convert the tiny model into a cache of their own (conftest's is per test).
    previous = os.environ.get("EETQ_LORA_CACHE")
    os.environ["EETQ_LORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        del os.environ["EETQ_LORA_CACHE"]
    else:
        os.environ["EETQ_LORA_CACHE"] = previous


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, qa_file):
    """One process, DDP, and FSDP interrupted after step 2 of 4 then resumed: the same global batch of 4."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    single = root / "single"
    assert main(tiny_args(tiny_model, qa_file, single, "--batch-size", "4")) == 0
    ddp = torchrun(*tiny_args(tiny_model, qa_file, root / "ddp", "--batch-size", "2"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    # Ctrl-C during the second optimizer step: the run saves a checkpoint after it and stops.
    script = ctrl_c_script(root / "interrupt.py", step=2)
    fsdp = root / "fsdp"
    interrupted = torchrun(*tiny_args(tiny_model, qa_file, fsdp, "--batch-size", "2", "--fsdp"), script=script)
    assert "Interrupted at step 2/4" in interrupted.stderr, interrupted.stderr[-3000:]
    staged = root / ".fsdp.partial" / "checkpoint"  # OUT itself appears only once the run has finished
    checkpoint = {
        "state": json.loads((staged / "state.json").read_text()),
        "files": sorted(path.name for path in staged.iterdir()),
        "shards": sorted(path.name for path in (staged / "training_state").iterdir()),
        "metrics_written": fsdp.exists(),
    }
    resumed = torchrun("finetune", "--out", str(fsdp), "--resume")  # --fsdp comes from the saved run
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {
        "single": single,
        "ddp": root / "ddp",
        "fsdp": fsdp,
        "interrupted": interrupted,
        "checkpoint": checkpoint,
        "resumed": resumed,
    }


def test_two_sharded_processes_match_one_process_and_ddp(runs):
    one, fsdp, ddp = (metrics_of(runs[name]) for name in ("single", "fsdp", "ddp"))
    assert fsdp["runtime"]["processes"] == 2 and fsdp["runtime"]["parallel"] == "fsdp"
    assert fsdp["training"]["global_batch"] == one["training"]["global_batch"] == 4
    assert len(fsdp["training"]["losses"]) == 4
    for other in (one, ddp):
        assert fsdp["training"]["losses"] == pytest.approx(other["training"]["losses"], rel=1e-5)
        for when in ("before", "after"):
            got, expected = fsdp["held_out"][when], other["held_out"][when]
            assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
            assert (got["accuracy"], got["tokens"]) == (expected["accuracy"], expected["tokens"])
    assert fsdp["held_out"]["after"]["loss"] < fsdp["held_out"]["before"]["loss"]
    assert fsdp["lora"] == one["lora"]  # trainable and total counts of the whole model, not of one shard


def test_sharded_adapter_files_equal_ddp_and_one_process(runs):
    fsdp, ddp, single = (load_file(runs[name] / ADAPTER) for name in ("fsdp", "ddp", "single"))
    assert fsdp.keys() == ddp.keys() == single.keys() and len(fsdp) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    for key in fsdp:
        # DDP averages the same per-process gradients: equal up to float32 rounding.
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-5, atol=1e-7, msg=key)
        # One process sums the gradients in another order, and AdamW's division by the root of the
        # squared gradient magnifies that rounding where a gradient nearly cancels: FSDP must be as
        # close to one process as DDP is, and well within one step's largest update (lr = 0.01).
        fsdp_gap = (fsdp[key] - single[key]).abs().max()
        ddp_gap = (ddp[key] - single[key]).abs().max()
        assert fsdp_gap <= ddp_gap + 1e-7 and fsdp_gap < 1e-4, key
    configs = [json.loads((runs[n] / "adapter_config.json").read_text()) for n in ("fsdp", "ddp", "single")]
    for config in configs:
        config["target_modules"] = sorted(config["target_modules"])  # PEFT writes a set, in any order
    assert configs[0] == configs[1] == configs[2]


def test_each_process_holds_half_of_the_int8_base_and_rank_0_reports_it(runs):
    shares = metrics_of(runs["fsdp"])["runtime"]["int8_base_bytes_per_process"]
    assert metrics_of(runs["single"])["runtime"]["int8_base_bytes_per_process"] is None
    # 2 layers x (q, k, v, o: 64x64, 64x32, 64x32, 64x64; gate, up, down: 64x128 each) int8 bytes.
    total = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    assert shares == [total // 2, total // 2]
    for run in (runs["interrupted"], runs["resumed"]):
        assert run.stderr.count("Sharded with FSDP2 over 2 processes") == 1  # rank 0 only
    assert runs["resumed"].stdout.count("int8 base per process") == 1
    assert runs["resumed"].stdout.count("held-out loss") == 1


def test_interrupted_sharded_run_checkpoints_shards_and_resumes(runs):
    checkpoint = runs["checkpoint"]
    assert checkpoint["state"]["step"] == 2 and len(checkpoint["state"]["train_losses"]) == 2
    assert checkpoint["files"] == ["adapter_config.json", "adapter_model.safetensors", "state.json", "training_state"]
    assert checkpoint["shards"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per process
    assert not checkpoint["metrics_written"]
    assert metrics_of(runs["fsdp"])["runtime"]["resumed"] is True
    assert not (runs["fsdp"].parent / ".fsdp.partial").exists()  # moved onto OUT when the resumed run finished
    assert "Resuming at step 2/4" in runs["resumed"].stderr
    # The resumed run's results are the ones compared with DDP and one process above: had the
    # optimizer state or the adapter not come back, steps 3-4 would not match.


def test_fsdp_needs_two_or_more_torchrun_processes(tiny_model, qa_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model, qa_file, out, "--fsdp")) == 1
    error = capsys.readouterr().err.strip()
    assert "no torchrun" in error and "torchrun --nproc-per-node N" in error and "--fsdp" in error
    assert len(error.splitlines()) == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(tiny_args(tiny_model, qa_file, out, "--fsdp")) == 1
    assert "one torchrun process" in capsys.readouterr().err
    assert not out.exists()


def test_resuming_an_unsharded_run_with_fsdp_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "single"
    shutil.copytree(runs["single"], out)
    assert main(["finetune", "--out", str(out), "--resume", "--fsdp"]) == 1
    assert "--fsdp differ" in capsys.readouterr().err


def test_help_explains_fsdp(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--fsdp" in text and "FSDP2" in text and "1/N of the weights" in text
