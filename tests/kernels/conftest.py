import pytest

from eetq_lora.kernels import set_compute_dtype


@pytest.fixture(autouse=True)
def _automatic_compute_dtype():
    set_compute_dtype(None)
    yield
    set_compute_dtype(None)
