"""Sequence builders with loss masks: every training sequence of the LM stages is made here.

A sequence is a list of segments, each ``(ids, trained)``; ``build`` concatenates them and returns the ids and a
boolean mask of the positions whose *prediction* is trained (the loss at position t is on predicting ids[t]).
Templates (GLM-4-Voice §2.2 and Appendix E):
- TTS / text-to-token: ``text <|begin_of_audio|> speech <|end_of_audio|>``, loss on speech and the end marker.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_keomni.text.tokenizer import TextTokenizer

BEGIN_AUDIO = "<|begin_of_audio|>"
END_AUDIO = "<|end_of_audio|>"


def build(segments: Sequence[tuple[Sequence[int], bool]]) -> tuple[list[int], list[bool]]:
    """Concatenate ``(ids, trained)`` segments into ids and a per-position loss mask."""
    ids: list[int] = []
    mask: list[bool] = []
    for seg, trained in segments:
        ids.extend(int(i) for i in seg)
        mask.extend([trained] * len(seg))
    return ids, mask


def tts(tokenizer: TextTokenizer, text: str, codes: Sequence[int] | None) -> tuple[list[int], list[bool]]:
    """Text-to-token sequence; with ``codes=None`` only the prompt (text + begin-of-audio) for generation."""
    prompt = [*tokenizer.encode(text), tokenizer.token_to_id(BEGIN_AUDIO)]
    if codes is None:
        return build([(prompt, False)])
    return build([(prompt, False), ([*tokenizer.speech_to_ids(codes), tokenizer.token_to_id(END_AUDIO)], True)])


def pad_batch(rows: Sequence[tuple[list[int], list[bool]]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad sequences: (inputs (B, T-1), targets (B, T-1)) with untrained targets set to -100."""
    T = max(len(ids) for ids, _ in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        idx[i, : len(ids)] = torch.tensor(ids)
        tgt[i, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
    return idx[:, :-1], tgt[:, 1:]
