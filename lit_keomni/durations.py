"""Duration targets of the speech decoder (seed 000 §5.1): unit frames per LLM text token.

"We distribute the word-level duration evenly to individual characters, and subsequently merge them to obtain the
timestep of each token used in LLM." Word timestamps are the corpus ``words`` field ([word, start_s, end_s]; English
words, Chinese characters: ``datamodules.toy_world.split_words`` gives their character spans).

The rule, on the utterance's timeline [0, total) with total = number of unit frames / frame rate:
1. a word's span [start, end) is spread evenly over its characters;
2. the time between two consecutive words (and before the first, and from the last word's end to ``total``) goes,
   evenly, to the characters between them that belong to no word (spaces, punctuation); when there are none (Chinese
   characters side by side, a text that starts with a word), the gap goes to the preceding word's last character,
   the leading gap to the first word's first character;
3. a token's duration is the sum over its characters (the tokenizer's character offsets, in the context the answer
   has in the KE-Omni dialogue: after ``<|assistant|>\\n``); tokens with no character of the text (``<|eos|>``)
   get 0;
4. seconds -> frames: scaled so that the total is the utterance's number of unit frames, then rounded
   cumulatively (``nn.speech_decoder.cumulative_round``), so the targets sum exactly to ``len(codes)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from datamodules.toy_world import split_words
from lit_keomni.nn.speech_decoder import cumulative_round
from lit_keomni.text.templates import ASSISTANT
from lit_keomni.text.tokenizer import TextTokenizer

ANSWER_PREFIX = f"{ASSISTANT}\n"
"""What precedes an answer's text in ``text.templates.keomni_dialogue`` (its tokenization context)."""


def parse_words(words: Any, *, source: str = "utterance") -> list[tuple[str, float, float]]:
    """The ``words`` field (a JSON string or a list of [word, start_s, end_s]) -> list of tuples, checked."""
    try:
        raw = json.loads(words) if isinstance(words, str) else words
        out = [(str(w), float(s), float(e)) for w, s, e in raw]
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: field 'words' must be a list of [word, start_s, end_s] ({e})") from None
    for k, (w, s, e) in enumerate(out):
        if not 0 <= s <= e or (k and s < out[k - 1][2] - 1e-6):
            raise ValueError(f"{source}: field 'words[{k}]' ({w!r}, {s}, {e}) is not a time span after the "
                             f"previous word")
    return out


def char_seconds(text: str, words: Sequence[tuple[str, float, float]], language: str, total: float,
                 *, source: str = "utterance") -> list[float]:
    """Seconds per character of ``text`` by rules 1-2 of the module docstring; they sum to max(total, last end)."""
    if not text:
        raise ValueError(f"{source}: field 'text' is empty")
    spans = split_words(text, language)
    if not words:  # no timestamps: every character gets an equal share
        return [max(total, 0.0) / len(text)] * len(text)
    if [w for _, _, w in spans] != [w for w, _, _ in words]:
        raise ValueError(f"{source}: field 'words' ({[w for w, _, _ in words]}) does not time the words of field "
                         f"'text' ({[w for _, _, w in spans]})")
    secs = [0.0] * len(text)
    # word characters
    for (a, b, _), (_, start, end) in zip(spans, words):
        for c in range(a, b):
            secs[c] = (end - start) / (b - a)
    # gaps: (characters between, time between, character that takes it when there are none)
    ends = [0.0] + [e for _, _, e in words]
    starts = [s for _, s, _ in words] + [max(total, words[-1][2])]
    lefts = [0] + [b for _, b, _ in spans]
    rights = [a for a, _, _ in spans] + [len(text)]
    for k in range(len(spans) + 1):
        gap = max(0.0, starts[k] - ends[k])
        between = range(lefts[k], rights[k])
        if len(between):
            for c in between:
                secs[c] += gap / len(between)
        else:
            secs[spans[0][0] if k == 0 else spans[k - 1][1] - 1] += gap
    return secs


def token_frames(char_secs: Sequence[float], offsets: Sequence[tuple[int, int]], n_frames: int) -> list[int]:
    """Rules 3-4: per-character seconds and the tokens' character offsets (into the same text) -> frames per token,
    summing to ``n_frames``."""
    secs = torch.tensor([sum(char_secs[max(0, a) : max(0, b)]) for a, b in offsets], dtype=torch.float64)
    if not len(offsets):
        return []
    total = float(secs.sum())
    if total <= 0:  # nothing timed: spread evenly over the tokens
        secs = torch.ones_like(secs)
        total = float(secs.sum())
    return cumulative_round(secs * (n_frames / total)).tolist()


def answer_tokens(tokenizer: TextTokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """An answer's text tokens as ``keomni_dialogue`` writes them (without ``<|eos|>``) and their character offsets
    into ``text``."""
    enc = tokenizer.backend.encode(f"{ANSWER_PREFIX}{text}{tokenizer.eos_token}", add_special_tokens=False)
    n = len(ANSWER_PREFIX)
    ids, offsets = [], []
    for i, (a, b) in zip(enc.ids, enc.offsets):
        if n <= a < n + len(text):
            ids.append(int(i))
            offsets.append((a - n, min(b, n + len(text)) - n))
    return ids, offsets


def answer_durations(tokenizer: TextTokenizer, text: str, words: Any, language: str, n_frames: int,
                     frame_rate: float, *, source: str = "utterance") -> tuple[list[int], list[int]]:
    """(answer token ids, unit frames per token summing to ``n_frames``) for one agent utterance."""
    if n_frames < 1:
        raise ValueError(f"{source}: field 'codes' is empty (no unit frames)")
    secs = char_seconds(text, parse_words(words, source=source), language, n_frames / frame_rate, source=source)
    ids, offsets = answer_tokens(tokenizer, text)
    return ids, token_frames(secs, offsets, n_frames)
