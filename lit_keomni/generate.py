"""Sampling from a ``Transformer`` with its KV cache.

``generate`` decodes a batch of prompts of different lengths at once: prompts are left-padded, the attention mask hides
the padding and gives each row positions from 0 at its first real token, and every row stops at its own stop token or
its own length limit (e.g. speech tokens in proportion to the text, as the text-to-token stage needs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_keomni.nn.transformer import Transformer


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Next tokens (B,) from logits (B, V): greedy at temperature 0, else softmax(logits / temperature) restricted to
    the ``top_k`` most likely tokens and then to the smallest set whose probability reaches ``top_p``."""
    if temperature < 0:
        raise ValueError(f"sample: temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"sample: top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p={top_p} must lie in (0, 1]")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        values, indices = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the more likely ones already reach top_p (the most likely token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int | list[int], temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, stop_ids: Sequence[int] = (), pad_id: int = 0,
             generator: torch.Generator | None = None, allowed_ids: tuple[int, int] | None = None) -> list[list[int]]:
    """Sample continuations of ``prompts`` in one left-padded batch with the KV cache.

    Args:
        max_new_tokens: Limit for all rows, or one per row.
        stop_ids: A row ends at the first of these; it is not included in the output.
        pad_id: Token placed in the left padding (masked, so its value does not matter).
        allowed_ids: ``(lo, hi)``: sample only ids with lo <= id < hi, plus ``stop_ids`` (e.g. speech tokens and the
            end-of-audio token).

    Returns:
        The new tokens of every row, without the stop token.
    """
    c = model.config
    B = len(prompts)
    if B == 0:
        return []
    limits = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != B:
        raise ValueError(f"generate: {len(limits)} max_new_tokens for {B} prompts")
    if any(n < 0 for n in limits):
        raise ValueError(f"generate: max_new_tokens {limits} must be >= 0")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    bad = [t for p in prompts for t in p if not 0 <= t < c.vocab_size]
    if bad:
        raise ValueError(f"generate: prompt token {bad[0]} outside the vocabulary [0, {c.vocab_size})")
    steps = max(limits)
    if steps == 0:
        return [[] for _ in prompts]
    L = max(len(p) for p in prompts)
    total = L + steps
    device = model.embed.weight.device

    # Ids that may be sampled: the real vocabulary (never padding rows), optionally a range plus the stop ids.
    allow = torch.zeros(c.padded_vocab_size, dtype=torch.bool, device=device)
    if allowed_ids is None:
        allow[: c.vocab_size] = True
    else:
        lo, hi = allowed_ids
        if not 0 <= lo < hi <= c.vocab_size:
            raise ValueError(f"generate: allowed_ids={allowed_ids} must satisfy 0 <= lo < hi <= vocab_size={c.vocab_size}")
        allow[lo:hi] = True
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    if stops.numel() and not (0 <= int(stops.min()) and int(stops.max()) < c.vocab_size):
        raise ValueError(f"generate: stop_ids {list(stop_ids)} outside the vocabulary [0, {c.vocab_size})")
    allow[stops] = True

    tokens = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, L - len(p):L] = True
    mask[:, L:] = True  # generated slots are real tokens for every row (finished rows are simply ignored)

    # Prompts of one length need no mask: positions are the slots and causality is SDPA's own (is_causal for the
    # prefill, every cached key for a decode step), so SDPA runs without a mask (faster kernels, no mask building).
    padded = any(len(p) != L for p in prompts)

    limit = torch.tensor(limits, device=device)
    out = torch.zeros(B, steps, dtype=torch.long, device=device)
    done = limit == 0
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    model.set_kv_cache(B, total, device=device)
    try:
        logits = model(tokens, input_pos=torch.arange(L, device=device),
                       attention_mask=mask[:, :L] if padded else None)[:, -1]
        for step in range(steps):
            nxt = sample(logits.masked_fill(~allow, float("-inf")), temperature, top_k, top_p, generator)
            is_stop = torch.isin(nxt, stops) if stops.numel() else torch.zeros_like(done)
            keep = ~done & ~is_stop
            out[:, step] = torch.where(keep, nxt, pad_id)
            lengths += keep.long()
            done = done | is_stop | (lengths >= limit)
            if bool(done.all()):
                break
            pos = torch.tensor([L + step], device=device)
            step_mask = mask[:, : L + step + 1] if padded else None
            logits = model(nxt[:, None], input_pos=pos, attention_mask=step_mask)[:, -1]
    finally:
        model.clear_kv_cache()
    return [out[i, : int(lengths[i])].tolist() for i in range(B)]
