"""Chunked vocabulary projection + cross-entropy against the plain full-logits computation."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

import eetq_lora
from eetq_lora.training import linear_cross_entropy as lce_module
from eetq_lora.training import loss as loss_module
from eetq_lora.training.linear_cross_entropy import default_chunk_rows, linear_cross_entropy
from tests.helpers import VOCAB, tiny_llama, token_batch


def operands(dtype, rows=37, hidden=16, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=generator).to(dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return h, w, targets


def full_logits(h, w, targets):
    logits = (h @ w.t()).float()
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 8, 37, None])
def test_loss_hits_and_gradients_match_full_logits(dtype, chunk_rows):
    h, w, targets = operands(dtype)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    nll, correct = linear_cross_entropy(h, w, targets, chunk_rows)
    expected_nll, expected_correct = full_logits(h2, w2, targets)
    assert nll.dtype == torch.float32 and int(correct) == int(expected_correct)
    torch.testing.assert_close(nll, expected_nll, rtol=1e-5, atol=1e-4)
    (nll * 0.3).backward()
    (expected_nll * 0.3).backward()
    assert h.grad.dtype == w.grad.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(h.grad, h2.grad, **tolerance)
    torch.testing.assert_close(w.grad, w2.grad, **tolerance)


def test_frozen_head_only_gives_hidden_gradient():
    h, w, targets = operands(torch.float32)
    w.requires_grad_(False)
    nll, _ = linear_cross_entropy(h, w, targets, 5)
    nll.backward()
    assert h.grad is not None and w.grad is None


def test_never_keeps_logits_for_backward():
    h, w, targets = operands(torch.float32, rows=64, vocab=512)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        linear_cross_entropy(h, w, targets, 16)
    assert saved and max(t.numel() for t in saved) < 64 * 512


def test_bad_shapes_are_named():
    h, w, targets = operands(torch.float32)
    with pytest.raises(ValueError, match="hidden \\[N, H\\] and weight \\[V, H\\]"):
        linear_cross_entropy(h, w.t(), targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(h, w, targets[:-1])


def labelled_batch():
    tokens = token_batch(batch=2, length=24)
    labels = tokens.clone()
    labels[:, :10] = -100  # prompt positions carry no label
    return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": labels}


def lora_model(seed=0):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = eetq_lora.get_peft_model(eetq_lora.quantize_model(tiny_llama(seed=seed)), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model


def test_answer_token_stats_chunked_path_matches_the_model_forward(monkeypatch):
    chunked, generic = lora_model(), lora_model()
    generic.load_state_dict(chunked.state_dict())
    batch = labelled_batch()
    assert loss_module._decoder_and_plain_head(chunked) is not None
    ours = loss_module.answer_token_stats(chunked, batch)
    monkeypatch.setattr(loss_module, "PLAIN_HEAD_MODELS", frozenset())
    assert loss_module._decoder_and_plain_head(generic) is None
    reference = loss_module.answer_token_stats(generic, batch)
    assert (ours.tokens, ours.correct) == (reference.tokens, reference.correct) and ours.tokens == 2 * 14
    torch.testing.assert_close(ours.nll, reference.nll, rtol=1e-5, atol=1e-4)
    ours.nll.backward()
    reference.nll.backward()
    for (name, a), (_, b) in zip(chunked.named_parameters(), generic.named_parameters(), strict=True):
        if a.requires_grad:
            assert a.grad is not None and a.grad.abs().sum() > 0, name
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_models_with_a_quantized_head_or_unknown_class_take_their_own_forward():
    quantized_head = eetq_lora.quantize_model(tiny_llama(), modules_to_not_convert=())
    assert loss_module._decoder_and_plain_head(quantized_head) is None
    assert loss_module._decoder_and_plain_head(torch.nn.Linear(4, VOCAB)) is None


def test_default_chunks_bound_the_logits_but_keep_enough_rows(monkeypatch):
    assert default_chunk_rows(49152) * 49152 <= lce_module.CHUNK_ELEMENTS
    assert default_chunk_rows(49152) >= lce_module.MIN_CHUNK_ROWS
    # A huge vocabulary still gets MIN_CHUNK_ROWS rows: every chunk rereads the whole head weight.
    assert default_chunk_rows(10**7) == lce_module.MIN_CHUNK_ROWS
    # And the default sizing computes the same loss when it splits the rows.
    monkeypatch.setattr(lce_module, "MIN_CHUNK_ROWS", 4)
    monkeypatch.setattr(lce_module, "CHUNK_ELEMENTS", 50 * 10)
    h, w, targets = operands(torch.float32)
    assert default_chunk_rows(50) == 10
    nll, correct = linear_cross_entropy(h, w, targets)
    expected_nll, expected_correct = full_logits(h, w, targets)
    torch.testing.assert_close(nll, expected_nll, rtol=1e-5, atol=1e-4)
    assert int(correct) == int(expected_correct)
