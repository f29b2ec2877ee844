"""The compute-dtype policy: automatic rule, process-wide setting, context manager."""

import threading

import pytest
import torch

from eetq_lora.kernels import compute_dtype, compute_dtype_for, get_compute_dtype, set_compute_dtype
from eetq_lora.kernels.policy import resolve_compute_dtype


@pytest.mark.parametrize(
    "dtype, device, expected",
    [
        (torch.float32, "cpu", torch.float32),
        (torch.bfloat16, "cpu", torch.bfloat16),
        (torch.float16, "cpu", torch.float32),
        (torch.float32, "cuda", torch.float32),
        (torch.bfloat16, "cuda", torch.bfloat16),
        (torch.float16, "cuda", torch.float16),
    ],
)
def test_automatic_rule_never_loses_input_precision(dtype, device, expected):
    assert resolve_compute_dtype(dtype, device) == expected


@pytest.mark.parametrize("chosen", [torch.float32, torch.bfloat16])
def test_process_setting_applies_to_every_input_dtype(chosen):
    set_compute_dtype(chosen)
    assert get_compute_dtype() == chosen
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_compute_dtype(dtype, "cpu") == chosen
        assert compute_dtype_for(torch.zeros(1, dtype=dtype)) == chosen


def test_context_manager_overrides_and_restores():
    set_compute_dtype(torch.float32)
    with compute_dtype(torch.bfloat16):
        assert compute_dtype_for(torch.zeros(1)) == torch.bfloat16
        with compute_dtype(None):
            assert compute_dtype_for(torch.zeros(1, dtype=torch.float16)) == torch.float32
            assert get_compute_dtype() is None
        assert get_compute_dtype() == torch.bfloat16
    assert get_compute_dtype() == torch.float32
    with pytest.raises(RuntimeError):
        with compute_dtype(torch.bfloat16):
            raise RuntimeError("boom")
    assert get_compute_dtype() == torch.float32


def test_context_manager_does_not_leak_into_other_threads():
    seen = []
    with compute_dtype(torch.bfloat16):
        thread = threading.Thread(target=lambda: seen.append(get_compute_dtype()))
        thread.start()
        thread.join()
    assert seen == [None]


@pytest.mark.parametrize("bad", [torch.float16, torch.int8, "bfloat16"])
def test_rejects_other_dtypes(bad):
    with pytest.raises(ValueError, match="compute dtype must be"):
        set_compute_dtype(bad)
    with pytest.raises(ValueError, match="compute dtype must be"):
        with compute_dtype(bad):
            pass
