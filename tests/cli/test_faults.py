"""SIGKILL ``finetune`` and ``quantize --overwrite`` at several points: OUT is always old-complete,
new-complete or absent, and the next run (or ``--resume``) succeeds.

The runs are real CLI processes killed by the OS. To keep the test short they are forked from one
helper process that has already imported the package (importing torch takes most of a run's
start-up). Kill points are fixed: after a delay, or as soon as a given file appears, found by
polling the folder; nothing in the library knows it is being tested.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tiny_llama

from .conftest import tiny_args

KILLED = -signal.SIGKILL
STEPS = 60  # one periodic checkpoint (step 50) before the final one

# Forks a child per request that runs ``eetq-lora ARGV`` with its output in a log file; reports exit codes.
FORK_SERVER = r"""
import json
import os
import sys

from eetq_lora.cli.main import main


def child(argv, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    code = 1
    try:
        code = main(argv)
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "run":
        pid = os.fork()
        if pid == 0:
            child(request["argv"], request["log"])
        reply = {"pid": pid}
    else:
        done, status = os.waitpid(request["pid"], 0 if request["block"] else os.WNOHANG)
        reply = {"code": os.waitstatus_to_exitcode(status) if done else None}
    print(json.dumps(reply), flush=True)
"""


class ForkServer:
    """Starts CLI runs as children of a process that imported eetq_lora once; kills and reaps them."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.runs = 0
        self.process = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(log_dir / "fork-server.log", "w"),  # noqa: SIM115 - closed with the process
            text=True,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout.readline().strip() == "ready", (log_dir / "fork-server.log").read_text()

    def _ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def start(self, argv: list[str]) -> tuple[int, Path]:
        self.runs += 1
        log = self.log_dir / f"run-{self.runs}.log"
        return self._ask(op="run", argv=[str(a) for a in argv], log=str(log))["pid"], log

    def exit_code(self, pid: int, block: bool) -> int | None:
        return self._ask(op="wait", pid=pid, block=block)["code"]

    def run(self, argv: list[str], kill_when: Callable[[], bool] | float | None = None) -> tuple[int, str]:
        """Run ``eetq-lora ARGV``; SIGKILL it once ``kill_when()`` is true or ``kill_when`` seconds have passed.

        Returns the exit code (-9 when it was killed) and what it printed.
        """
        pid, log = self.start(argv)
        started = time.monotonic()
        while kill_when is not None and time.monotonic() - started < 120:
            code = self.exit_code(pid, block=False)
            if code is not None:  # finished before the kill point
                return code, log.read_text()
            due = kill_when() if callable(kill_when) else time.monotonic() - started >= kill_when
            if due:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.001)
        else:
            if kill_when is not None:
                os.kill(pid, signal.SIGKILL)
        return self.exit_code(pid, block=True), log.read_text()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, _built_kernels):
    """One fork server for the module, with a model cache of its own (holding the session's compiled kernels)."""
    root = tmp_path_factory.mktemp("fork-server")
    cache = root / "cache"
    if _built_kernels is not None:
        shutil.copytree(_built_kernels, cache / "kernels")
        os.chmod(cache / "kernels", 0o700)
    server = ForkServer(root, {"EETQ_LORA_CACHE": str(cache)})
    yield server
    server.close()


def appears(folder: Path, pattern: str) -> Callable[[], bool]:
    """A kill trigger: true once ``folder`` holds an entry matching ``pattern`` that it did not hold when made."""
    before = set(folder.glob(pattern)) if folder.is_dir() else set()
    return lambda: folder.is_dir() and any(path not in before for path in folder.glob(pattern))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- finetune ------------------------------------------------------------------------------------


def finetune_state(out: Path, old: dict[str, bytes] | None) -> str:
    """ "absent", "old" (byte for byte the snapshot ``old``) or "new:SEED" (a complete finished run); else fail."""
    if not out.exists():
        return "absent"
    files = snapshot(out)
    if old is not None and files == old:
        return "old"
    required = {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "run_config.json"}
    assert required <= files.keys() and "checkpoint/state.json" in files, f"OUT is incomplete: {sorted(files)}"
    metrics = json.loads(files["metrics.json"])
    assert metrics["status"] == "finished" and metrics["training"]["steps"] == STEPS
    assert json.loads(files["checkpoint/state.json"])["step"] == STEPS
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())
    return f"new:{metrics['settings']['seed']}"


def test_killed_finetune_runs_leave_old_or_new_results_and_the_next_run_succeeds(server, tiny_model, qa_file, tmp_path):
    parent = tmp_path / "runs"
    parent.mkdir()
    out, staging = parent / "run", parent / ".run.partial"

    def args(seed: int, *extra: str) -> list[str]:
        return tiny_args(tiny_model, qa_file, out, "--steps", str(STEPS), "--seed", str(seed), *extra)

    resume = ["finetune", "--out", out, "--resume"]
    # A fresh run killed as its first checkpoint creates the staging folder, then while it writes
    # the final outputs there: OUT does not exist until the run is complete.
    code, log = server.run(args(0), kill_when=appears(parent, ".run.partial"))
    assert code in (KILLED, 0), log
    assert finetune_state(out, None) in ("absent", "new:0")
    code, log = server.run(resume, kill_when=appears(staging, "adapter_model.safetensors"))
    assert code in (KILLED, 0), log
    assert finetune_state(out, None) in ("absent", "new:0")
    if staging.exists():
        code, log = server.run(resume)
        assert code == 0, log
    assert finetune_state(out, None) == "new:0" and not staging.exists()
    first = snapshot(out)

    # --overwrite killed during start-up, then while a checkpoint is half written: the old results stay.
    code, log = server.run(args(1, "--overwrite"), kill_when=0.5)
    assert code == KILLED, log
    assert finetune_state(out, first) == "old"
    code, log = server.run(args(1, "--overwrite"), kill_when=appears(staging, ".checkpoint.*.tmp"))
    assert code in (KILLED, 0), log
    assert finetune_state(out, first) == ("old" if code == KILLED else "new:1")
    if code == KILLED:  # the checkpoint of step 50 is there to resume
        assert json.loads((staging / "checkpoint" / "state.json").read_text())["step"] == 50

    # Killed while the finished run replaces OUT: old or new results, never a mix.
    code, log = server.run(resume, kill_when=appears(parent, ".run.*.old"))
    assert code in (KILLED, 0), log
    assert finetune_state(out, first) in ("old", "new:1")
    if staging.exists():
        code, log = server.run(resume)
        assert code == 0, log
    assert finetune_state(out, first) == "new:1"
    second = snapshot(out)

    # A second run on the same OUT is refused while the first holds the lock; once the first is
    # killed, its stale lock file blocks nothing.
    holder, holder_log = server.start(args(2, "--overwrite"))
    lock, deadline = parent / ".run.lock", time.monotonic() + 120
    while time.monotonic() < deadline and not (lock.exists() and lock.read_text().strip() == str(holder)):
        time.sleep(0.002)
    code, log = server.run(args(3, "--overwrite"))
    assert code == 1, log
    assert log.strip() == (
        f"eetq-lora finetune: error: {out} is in use by another eetq-lora run (pid {holder}); wait for it to "
        f"finish, or pass a different --out (the lock {parent / '.run.lock'} is released when that process exits)"
    )
    os.kill(holder, signal.SIGKILL)
    assert server.exit_code(holder, block=True) == KILLED, holder_log.read_text()
    assert finetune_state(out, second) == "old"

    code, log = server.run(args(3, "--overwrite"))
    assert code == 0, log
    assert finetune_state(out, second) == "new:3"
    assert hidden_entries(parent) == [], log  # leftovers were removed (and said so), the lock released
    assert sorted(p.name for p in parent.iterdir()) == ["run"]


# --- quantize --------------------------------------------------------------------------------------


def test_killed_quantize_overwrite_leaves_old_or_new_output_and_the_next_run_succeeds(server, tmp_path):
    # Big enough (about 5 M parameters) that quantizing and writing take a noticeable time.
    src = tmp_path / "float"
    tiny_llama(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=2048).save_pretrained(src)
    out = tmp_path / "out"
    old_args = ["quantize", src, out, "--layout", "plain", "--no-progress", "--threads", "1", "--overwrite"]
    new_args = ["quantize", src, out, "--layout", "sm75", "--no-progress", "--threads", "1", "--overwrite"]
    references = {}
    for name, argv in (("old", old_args), ("new", new_args)):
        code, log = server.run(argv)
        assert code == 0, log
        references[name] = snapshot(out)
    assert references["old"] != references["new"]

    def state() -> str:
        if not out.exists():
            return "absent"
        files = snapshot(out)
        matches = [name for name, files_of in references.items() if files == files_of]
        assert matches, f"OUT is neither the old nor the new output: {sorted(files)}"
        return matches[0]

    kill_points = [
        lambda: 0.1,  # start-up: reading the source
        lambda: appears(tmp_path, ".out.*.tmp"),  # the new folder is being built
        lambda: appears(tmp_path, ".out.*.old"),  # the old folder is being swapped out
    ]
    for kill_point in kill_points:
        code, log = server.run(old_args)
        assert code == 0, log
        assert state() == "old"
        code, log = server.run(new_args, kill_when=kill_point())
        assert code in (KILLED, 0), log
        assert state() in ("old", "new", "absent")
        code, log = server.run(new_args)
        assert code == 0, log
        assert state() == "new"
