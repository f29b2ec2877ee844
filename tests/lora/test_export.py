"""export_merged's destination: an existing file is never replaced, and the folder is complete or absent."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import eetq_lora
from eetq_lora import export_merged
from tests.helpers import tiny_llama, token_batch


@pytest.fixture(scope="module")
def peft_model():
    model = eetq_lora.get_peft_model(eetq_lora.quantize_model(tiny_llama()), LoraConfig(r=4, target_modules=["q_proj"]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def folder_bytes(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_existing_file_is_refused_and_untouched(peft_model, tmp_path, overwrite):
    target = tmp_path / "merged"
    target.write_text("a file the user owns")
    with pytest.raises(FileExistsError, match="is an existing file, not a folder"):
        export_merged(peft_model, target, overwrite=overwrite)
    assert target.is_file() and target.read_text() == "a file the user owns"
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_a_symlink_to_a_file_is_refused(peft_model, tmp_path):
    (tmp_path / "real.txt").write_text("keep")
    (tmp_path / "merged").symlink_to(tmp_path / "real.txt")
    with pytest.raises(FileExistsError, match="is an existing file"):
        export_merged(peft_model, tmp_path / "merged", overwrite=True)
    assert (tmp_path / "merged").is_symlink() and (tmp_path / "real.txt").read_text() == "keep"


def test_a_file_that_appears_during_the_merge_is_refused(peft_model, tmp_path, monkeypatch):
    target = tmp_path / "merged"
    real_quantize = eetq_lora.lora.export.quantize_model

    def quantize_then_create(*args, **kwargs):
        target.write_text("appeared meanwhile")
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(eetq_lora.lora.export, "quantize_model", quantize_then_create)
    with pytest.raises(FileExistsError, match="is an existing file"):
        export_merged(peft_model, target, requantize=True, overwrite=True)
    assert target.read_text() == "appeared meanwhile"


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "ctrl-c"])
def test_a_failed_save_leaves_the_previous_export_whole(peft_model, tmp_path, monkeypatch, failure):
    target = tmp_path / "merged"
    export_merged(peft_model, target, dtype=torch.float32)
    before = folder_bytes(target)
    model_class = type(peft_model.get_base_model())
    real_save = model_class.save_pretrained

    def save_half_then_fail(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        os.remove(os.path.join(folder, "model.safetensors"))  # as if the weights never made it
        raise failure

    monkeypatch.setattr(model_class, "save_pretrained", save_half_then_fail)
    with pytest.raises(type(failure)):
        export_merged(peft_model, target, dtype=torch.bfloat16, overwrite=True)
    with pytest.raises(type(failure)):
        export_merged(peft_model, tmp_path / "new", dtype=torch.bfloat16)
    assert folder_bytes(target) == before and sorted(os.listdir(tmp_path)) == ["merged"]


def test_overwrite_publishes_a_complete_folder(peft_model, tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    export_merged(peft_model, target, dtype=torch.float32, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    assert sorted(os.listdir(target)) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(token_batch()).logits, peft_model(input_ids=token_batch()).logits, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.bool])
def test_a_dtype_that_is_not_a_checkpoint_float_is_refused(peft_model, tmp_path, dtype):
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        export_merged(peft_model, tmp_path / "merged", dtype=dtype)
    assert not (tmp_path / "merged").exists()
