"""Vocabulary projection and cross-entropy in row chunks, so the full logits never exist at once.

A 49k-token vocabulary makes the logits of a few hundred tokens the largest tensors of a LoRA
step: the projection's output, its float32 copy, the saved log-softmax and the gradients of
each. Here each chunk of rows is projected, scored, and differentiated right away; only the
gradient for the hidden states (rows x hidden) is kept for the backward pass. The arithmetic
is the standard path's: logits in the weight's dtype, then float32 for the loss, and the
float32 gradient cast back before the projection's backward matmul.
"""

from __future__ import annotations

import torch

# Rows per chunk: about this many float32 logits at a time (8 MiB), but never fewer than
# MIN_CHUNK_ROWS rows, since every chunk reads the whole vocabulary weight again (a 128k-token
# head is 1 GiB in bfloat16).
CHUNK_ELEMENTS = 2**21
MIN_CHUNK_ROWS = 32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start : start + chunk_rows]
            wanted = targets[start : start + chunk_rows]
            logits = (rows @ weight.t()).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, wanted[:, None]).squeeze(1)
            nll += (log_norm - picked).sum()
            correct += (logits.argmax(dim=-1) == wanted).sum()
            if needs_hidden or needs_weight:
                # d(sum of nll)/d(logits) = softmax - one_hot, computed in place over the logits.
                grad_logits = logits.sub_(log_norm[:, None]).exp_()
                grad_logits[torch.arange(len(wanted), device=wanted.device), wanted] -= 1.0
                grad_logits = grad_logits.to(hidden.dtype)
                if needs_hidden:
                    grad_hidden[start : start + chunk_rows] = grad_logits @ weight
                if needs_weight:
                    grad_weight += (grad_logits.t() @ rows).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return nll, correct

    @staticmethod
    def backward(ctx, grad_nll, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_nll.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_nll).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``hidden [N, H] @ weight[V, H].T`` against ``targets [N]``, and the top-1 hit count.

    Equal to ``F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")`` and
    ``(logits.argmax(-1) == targets).sum()``, with at most ``chunk_rows`` rows of logits alive.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy needs hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape [N] = {tuple(hidden.shape[:1])}, got {tuple(targets.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows or default_chunk_rows(weight.shape[0]))


def default_chunk_rows(vocab_size: int) -> int:
    """Rows of logits computed at a time for a vocabulary of ``vocab_size`` tokens."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, vocab_size))
