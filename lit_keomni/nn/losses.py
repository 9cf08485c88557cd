"""Next-token cross-entropy through the output layer without materialising the (tokens, vocabulary) logits.

A 9B speech LM has 151,552 + 16,384 output rows: the float32 logits of one 8,192-token row are 5.5 GB, and their
gradient as much again. ``chunked_cross_entropy`` computes the output layer and the loss for ``chunk`` tokens at a
time, keeps only each token's loss and prediction, and recomputes the chunk's logits in the backward pass to form the
gradients of the hidden states and of the output weight (softmax minus one-hot, chunk by chunk). The result equals
``F.cross_entropy(hidden @ weight.T, target, reduction="none")`` and its gradients up to float rounding; the peak
memory of the loss is one chunk's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        losses = hidden.new_empty(n, dtype=torch.float32)
        predicted = torch.empty(n, dtype=torch.long, device=hidden.device)
        w = weight
        for s in range(0, n, chunk):
            logits = (hidden[s : s + chunk] @ w.T).float()
            t = target[s : s + chunk]
            keep = t != IGNORE
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.clamp(min=0)[:, None])[:, 0]
            losses[s : s + chunk] = torch.where(keep, lse - picked, 0.0)
            predicted[s : s + chunk] = logits.argmax(-1)
        ctx.save_for_backward(hidden, weight, target)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(predicted)
        return losses, predicted

    @staticmethod
    def backward(ctx, grad_losses: Tensor, _grad_predicted: Tensor | None):
        hidden, weight, target = ctx.saved_tensors
        chunk, w = ctx.chunk, weight
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            t = target[s : s + chunk]
            keep = t != IGNORE
            g = torch.softmax((h @ w.T).float(), dim=-1)
            g[torch.arange(len(t), device=t.device)[keep], t[keep]] -= 1.0
            g = g * (grad_losses[s : s + chunk] * keep)[:, None]  # (chunk, rows): d loss / d logits
            if grad_hidden is not None:
                grad_hidden[s : s + chunk] = (g.to(w.dtype) @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += g.T @ h.float()
        return grad_hidden, None if grad_w is None else grad_w.to(weight.dtype), None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``target`` and the argmax predictions, ``chunk``
    tokens at a time.

    Args:
        hidden: (..., D) final hidden states.
        weight: (V, D) output layer weight.
        target: (...) next-token ids; ``-100`` positions get loss 0 and no gradient.
        chunk: tokens per chunk (>= 1).

    Returns:
        (losses (...) float32, predicted ids (...) long).
    """
    if chunk < 1:
        raise ValueError(f"chunked_cross_entropy: chunk must be >= 1, got {chunk}")
    shape = target.shape
    losses, predicted = _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                   target.reshape(-1), chunk)
    return losses.view(shape), predicted.view(shape)


def token_cross_entropy(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The same outputs from full logits: per-token float32 cross-entropy (0 at ``-100``) and argmax predictions."""
    losses = F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), ignore_index=IGNORE, reduction="none")
    return losses.view(target.shape), logits.detach().argmax(-1)
