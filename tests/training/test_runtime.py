"""The process a run trains in: the versions metrics.json records and the threads it uses."""

from __future__ import annotations

import importlib.metadata

import peft
import torch
import transformers

import eetq_lora
from eetq_lora.training.distributed import DistContext
from eetq_lora.training.runtime import configure_threads, versions


def test_versions_record_the_installed_packages():
    assert importlib.metadata.version("eetq-lora") == eetq_lora.__version__  # pyproject reads _version.py
    assert versions() == {
        "eetq_lora": eetq_lora.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def test_processes_on_one_machine_share_its_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads(1, DistContext()) == 1
        torch.set_num_threads(4)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure_threads(None, DistContext(world_size=2, local_world_size=2)) == 2
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice is left alone
        assert configure_threads(None, DistContext(world_size=2, local_world_size=2)) == 4
    finally:
        torch.set_num_threads(before)
