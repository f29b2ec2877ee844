"""EETQ checkpoint layouts: checked against per-element references written from EETQ's layout rules."""

from __future__ import annotations

import pytest
import torch

from eetq_lora.format.layout import (
    LAYOUTS,
    fits_eetq_layout,
    pack_weight,
    resolve_layout,
    unpack_weight,
)
from tests.format.helpers import sm70_by_steps, sm75_by_gather, sm75_by_steps, stored_bytes


def random_q(k: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int16).to(torch.int8)
    # Make sure both extremes are present: the +128 bias must wrap neither.
    q[0, 0], q[-1, -1] = -128, 127
    return q


REFERENCE_SHAPES = [(64, 64), (128, 192), (256, 64), (64, 256)]


@pytest.mark.parametrize("shape", REFERENCE_SHAPES)
def test_sm75_matches_gather_formula(shape):
    q = random_q(*shape, seed=shape[0] + shape[1])
    assert stored_bytes(pack_weight(q, "sm75")) == sm75_by_gather(q)


@pytest.mark.parametrize("shape", [(64, 64), (128, 192)])
def test_sm75_matches_literal_steps(shape):
    q = random_q(*shape, seed=7)
    assert stored_bytes(pack_weight(q, "sm75")) == sm75_by_steps(q)


@pytest.mark.parametrize("shape", REFERENCE_SHAPES)
def test_sm70_matches_literal_steps(shape):
    q = random_q(*shape, seed=3)
    assert stored_bytes(pack_weight(q, "sm70")) == sm70_by_steps(q)


# Hand-derived from the gather formula: (K, N, k', n, flat byte).
#   k'=2, n=0, K=64:  k = INV[2] = 4,  f = 4*(4//4) + SWAP[0] = 4
#   k'=8, n=0, K=64:  k = INV[8] = 2,  f = 4*0 + SWAP[2] = 1
#   k'=0, n=1, K=64:  k = 0,           f = (n%2)*64 = 64
#   k'=3, n=2, K=64:  k = INV[3] = 5,  f = (n//2)*2K + 4*1 + SWAP[1] = 128 + 6 = 134
#   k'=64, n=0, K=128: k = 64,         f = (k//64)*128 = 128
#   k'=17, n=3, K=128: k = 16 + INV[1] = 17, f = 1*256 + 64 + 4*4 + SWAP[1] = 338
HAND_CASES = [
    (64, 64, 2, 0, 4),
    (64, 64, 8, 0, 1),
    (64, 64, 0, 1, 64),
    (64, 64, 3, 2, 134),
    (128, 64, 64, 0, 128),
    (128, 64, 17, 3, 338),
]


@pytest.mark.parametrize("k_size,n_size,k,n,flat", HAND_CASES)
def test_sm75_single_value_lands_at_predicted_byte(k_size, n_size, k, n, flat):
    q = torch.zeros(k_size, n_size, dtype=torch.int8)
    q[k, n] = 5
    data = stored_bytes(pack_weight(q, "sm75"))
    assert data[flat] == 133
    assert sum(1 for v in data if v != 128) == 1


def test_sm70_single_value_lands_at_swapped_byte():
    q = torch.zeros(64, 64, dtype=torch.int8)
    q[0, 1] = -1  # flat 1 -> position 2 of its group; byte 127
    q[1, 2] = 3  # flat 66 -> 65; byte 131
    data = stored_bytes(pack_weight(q, "sm70"))
    assert data[2] == 127 and data[65] == 131
    assert sum(1 for v in data if v != 128) == 2


def test_zero_matrix_stores_bias_bytes():
    for layout in ("sm75", "sm70"):
        data = pack_weight(torch.zeros(64, 128, dtype=torch.int8), layout)
        assert data.dtype == torch.int8 and data.shape == (64, 128)
        assert torch.equal(data, torch.full((64, 128), -128, dtype=torch.int8))  # byte 0x80 as int8


ROUND_TRIP_SHAPES = [(64, 64), (128, 192), (256, 64), (64, 256), (4096, 128), (192, 4096)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", ROUND_TRIP_SHAPES)
def test_round_trip_is_bit_exact(layout, shape):
    q = random_q(*shape, seed=shape[1])
    stored = pack_weight(q, layout)
    assert stored.dtype == torch.int8 and stored.shape == q.shape
    assert torch.equal(unpack_weight(stored, layout), q)
    # Every stored byte is one of q's bytes plus 128: a permutation, never a new value.
    bias = 0 if layout == "plain" else 128
    expected = sorted(v + bias for v in q.reshape(-1).tolist())
    assert sorted(stored_bytes(stored) if layout != "plain" else stored.reshape(-1).tolist()) == expected


@pytest.mark.parametrize("layout", ["sm75", "sm70"])
def test_unpack_of_arbitrary_bytes_round_trips(layout):
    stored = random_q(128, 128, seed=11)
    assert torch.equal(pack_weight(unpack_weight(stored, layout), layout), stored)


def test_layouts_differ_from_each_other():
    q = random_q(128, 128, seed=5)
    packed = {layout: pack_weight(q, layout) for layout in LAYOUTS}
    assert not torch.equal(packed["sm75"], packed["sm70"])
    assert not torch.equal(packed["sm70"], packed["plain"])


def test_plain_is_identity_without_copy_and_accepts_any_shape():
    q = random_q(100, 30)
    assert pack_weight(q, "plain") is q
    assert unpack_weight(q, "plain") is q


def test_non_contiguous_input():
    q = random_q(192, 128, seed=2)
    q_t = q.t().contiguous().t()  # same values, column-major strides
    assert not q_t.is_contiguous()
    assert torch.equal(pack_weight(q_t, "sm75"), pack_weight(q, "sm75"))


def test_input_is_not_modified():
    q = random_q(128, 64, seed=4)
    before = q.clone()
    for layout in ("sm75", "sm70"):
        unpack_weight(pack_weight(q, layout), layout)
        assert torch.equal(q, before)


def test_meta_tensors_keep_shape():
    q = torch.empty(128, 256, dtype=torch.int8, device="meta")
    for layout in LAYOUTS:
        packed = pack_weight(q, layout)
        assert packed.device.type == "meta" and packed.shape == (128, 256) and packed.dtype == torch.int8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    q = random_q(256, 192, seed=9)
    for layout in LAYOUTS:
        on_gpu = pack_weight(q.cuda(), layout)
        assert on_gpu.is_cuda
        assert torch.equal(on_gpu.cpu(), pack_weight(q, layout))
        assert torch.equal(unpack_weight(on_gpu, layout).cpu(), q)


@pytest.mark.parametrize("layout", ["sm75", "sm70"])
@pytest.mark.parametrize("shape", [(100, 64), (64, 100), (32, 32), (128, 65)])
def test_shape_not_multiple_of_64_names_layer_and_rule(layout, shape):
    q = torch.zeros(shape, dtype=torch.int8)
    for convert in (pack_weight, unpack_weight):
        with pytest.raises(ValueError) as info:
            convert(q, layout, name="model.layers.0.mlp.up_proj")
        message = str(info.value)
        assert "model.layers.0.mlp.up_proj" in message
        assert "multiples of 64" in message
        assert f"in={shape[0]}" in message and f"out={shape[1]}" in message
        assert "plain" in message


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown EETQ checkpoint layout 'sm90'.*sm75, sm70, plain"):
        pack_weight(torch.zeros(64, 64, dtype=torch.int8), "sm90")
    with pytest.raises(ValueError, match="unknown EETQ checkpoint layout"):
        resolve_layout("SM75", 64, 64)


@pytest.mark.parametrize(
    "bad, expected",
    [
        (torch.zeros(64, 64, dtype=torch.float16), "dtype torch.float16"),
        (torch.zeros(64, 64, dtype=torch.uint8), "dtype torch.uint8"),
        (torch.zeros(64 * 64, dtype=torch.int8), r"2-D int8 weight .* got \(4096,\)"),
        (torch.zeros(2, 64, 64, dtype=torch.int8), "2-D"),
    ],
)
def test_bad_tensors(bad, expected):
    for convert in (pack_weight, unpack_weight):
        for layout in LAYOUTS:
            with pytest.raises(ValueError, match=expected):
                convert(bad, layout, name="lin")


def test_fits_and_resolve():
    assert fits_eetq_layout(4096, 11008)  # Llama-2-7B's MLP: 11008 = 172 * 64
    assert fits_eetq_layout(64, 128)
    assert not fits_eetq_layout(576, 100)
    assert not fits_eetq_layout(96, 64)
    assert resolve_layout("sm75", 128, 64) == "sm75"
    assert resolve_layout("sm70", 128, 64) == "sm70"
    assert resolve_layout("sm75", 128, 96) == "plain"
    assert resolve_layout("plain", 128, 64) == "plain"
