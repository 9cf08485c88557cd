"""Token-by-token decoding shared by both chat pipelines: one sequence in an LLM's KV cache (``KVCache``) and the
next token sampled from its logits, optionally restricted to an allowed set (``next_token``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lit_keomni.generate import sample


class KVCache:
    """One sequence decoded with an LLM's KV cache; ``ids`` are the tokens it holds, in slot order."""

    def __init__(self, llm: Any, length: int) -> None:
        self.llm, self.length = llm, length
        self.ids: list[int] = []
        llm.set_kv_cache(1, length, device=llm.embed.weight.device)

    def feed(self, ids: Sequence[int], embeds: Tensor | None = None) -> Tensor:
        """Append ``ids`` (or their input ``embeds`` (1, T, d)); the last hidden states (1, T, d) at their positions."""
        start = len(self.ids)
        if start + len(ids) > self.length:
            raise ValueError(f"chat: {start + len(ids)} tokens exceed the KV cache of {self.length}")
        device = self.llm.embed.weight.device
        pos = torch.arange(start, start + len(ids), device=device)
        if embeds is None:
            embeds = self.llm.embed(torch.tensor([list(ids)], dtype=torch.long, device=device))
        self.ids.extend(int(i) for i in ids)
        return self.llm(inputs_embeds=embeds, input_pos=pos, return_hidden=True)

    def extend_to(self, ids: Sequence[int]) -> Tensor:
        """Make the cache hold ``ids``: keep the common prefix, feed the rest (at least the last token)."""
        keep = 0
        while keep < min(len(self.ids), len(ids) - 1) and self.ids[keep] == ids[keep]:
            keep += 1
        self.ids = self.ids[:keep]
        return self.feed(ids[keep:])

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits (V,) over the real vocabulary from the last hidden state."""
        return self.llm.lm_head(hidden[0, -1])[: self.llm.config.vocab_size].float()

    def close(self) -> None:
        self.llm.clear_kv_cache()


def next_token(logits: Tensor, allow: Tensor | None, temperature: float, top_k: int | None,
               generator: torch.Generator | None) -> int:
    """The next token sampled from ``logits`` (V,), only among the ``allow`` ones (a boolean mask) when given."""
    if allow is not None:
        logits = logits.masked_fill(~allow, float("-inf"))
    return int(sample(logits[None], temperature, top_k, generator=generator)[0])
