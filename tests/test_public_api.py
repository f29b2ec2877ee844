"""The public API: every exported name exists, public callables say what they do."""

import inspect

import eetq_lora
from eetq_lora import kernels


def test_every_exported_name_exists_and_public_callables_have_docstrings():
    for name in eetq_lora.__all__:
        value = getattr(eetq_lora, name)
        if callable(value):
            assert inspect.getdoc(value), f"eetq_lora.{name} has no docstring"


def test_compute_dtype_controls_are_the_kernels_ones():
    assert eetq_lora.set_compute_dtype is kernels.set_compute_dtype
    assert eetq_lora.compute_dtype is kernels.compute_dtype
