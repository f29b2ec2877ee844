"""Offline fixtures for the finetune/generate/eval tests: a tiny Llama and tokenizer made in memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli.helpers import CtrlCBeforeStep
from tests.helpers import CHAT_TEMPLATE, make_model_dir, qa_pairs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A saved tiny Llama (2 layers, width 64) with a word-level tokenizer and no chat template."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """The same tiny Llama whose tokenizer has a chat template."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-chat-model"), chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in qa_pairs()))
    return path


@pytest.fixture(scope="session")
def _built_kernels(tmp_path_factory) -> Path | None:
    """The compiled CPU kernels, built once for the session into a folder of their own."""
    from eetq_lora.kernels import cpu_library

    compiler = cpu_library._find_compiler()
    if compiler is None:
        return None
    cache = tmp_path_factory.mktemp("kernel-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EETQ_LORA_CACHE", str(cache))
        try:
            cpu_library._build(compiler)
        except Exception:  # noqa: BLE001 - without kernels the tests run the pure-torch paths
            return None
    return cache / "kernels"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch, _built_kernels):
    """Keep model conversions of a test out of the user's cache. The session's compiled kernels are
    copied in, so that each child process does not compile them again."""
    cache = tmp_path_factory.mktemp("cache")
    if _built_kernels is not None:
        shutil.copytree(_built_kernels, cache / "kernels", dirs_exist_ok=True)
        os.chmod(cache / "kernels", 0o700)
    monkeypatch.setenv("EETQ_LORA_CACHE", str(cache))


def tiny_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A finetune command line for the tiny model: float32 and one thread, so runs are reproducible."""
    return [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--max-seq-len",
        "32",
        "--lr",
        "0.01",
        "--dtype",
        "float32",
        "--threads",
        "1",
        "--eval-examples",
        "8",
        *extra,
    ]


def run_cli(*argv: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m eetq_lora ARGV`` in a child process (a real exit code and real signals)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "eetq_lora", *argv], capture_output=True, text=True, env=full_env, timeout=timeout
    )


@pytest.fixture
def terminal_bars(monkeypatch):
    """Progress bars drawn as on a terminal (into a buffer): the bars made, and whether each was shown."""
    import io

    from eetq_lora.training import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bars, shown, real_bar = [], [], progress.progress_bar

    def on_terminal(*args, **kwargs):
        bars.append(real_bar(*args, **{**kwargs, "stream": Terminal()}))
        shown.append(not bars[-1].disable)  # closing a tqdm bar disables it
        return bars[-1]

    monkeypatch.setattr(progress, "progress_bar", on_terminal)
    return bars, shown


@pytest.fixture
def ctrl_c(monkeypatch) -> Callable[[int | None], None]:
    """``ctrl_c(n)``: the finetune runs of this process that follow get a Ctrl-C during step n;
    ``ctrl_c(None)``: no more Ctrl-C."""
    from eetq_lora.training import finetune

    real = finetune.StopRequest

    def during_step(step: int | None) -> None:
        monkeypatch.setattr(finetune, "StopRequest", real if step is None else (lambda: CtrlCBeforeStep(step)))

    return during_step


REPO_ROOT = Path(__file__).resolve().parents[2]


def ctrl_c_script(path: Path, step: int) -> Path:
    """Write to ``path`` a script that runs the CLI like ``python -m eetq_lora``, with a Ctrl-C during step
    ``step`` (``CtrlCBeforeStep``), for child processes such as torchrun's; returns ``path``."""
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from eetq_lora.cli.main import main\n"
        "from eetq_lora.training import finetune\n"
        "from tests.cli.helpers import CtrlCBeforeStep\n"
        f"finetune.StopRequest = lambda: CtrlCBeforeStep({step})\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return path
