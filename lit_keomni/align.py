"""``python -m lit_keomni align``: word timestamps from Whisper, the duration targets of KE-Omni's speech decoder.

KE-Omni trains its duration predictor "on the word-level timestamps extracted by Whisper" (seeds/000 §4.3, §5.1). This
command adds them as the ``words`` field to Ke-SpeechChat turns that have none, by forced alignment of each turn's own
text (so the words are the transcript's, not a new recognition): the text is teacher-forced through a local Hugging
Face Whisper folder, the cross-attention of its alignment heads over the turn's audio frames (50 per second) is
normalised per head, median-filtered and averaged, and dynamic time warping finds the monotone path of tokens through
time, as openai-whisper's ``timing.find_alignment`` does. Token times are spread evenly over the token's characters and
gathered per word of ``datamodules.toy_world.split_words`` (English words; one entry per Chinese character).

A real model needs ``alignment_heads`` in ``generation_config.json`` (the openai/whisper-* folders carry them); without
them all heads of the upper half of the decoder layers are averaged (openai-whisper's default, less sharp), so for a
fine-tuned model copy ``alignment_heads`` from its base model. The start-of-transcript sequence comes from the same file
(``decoder_start_token_id``, ``lang_to_id``, ``task_to_id``, ``no_timestamps_token_id``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.units import default_device, hf_folder_config, import_transformers

log = logging.getLogger(__name__)

FRAMES_PER_SECOND = 50
"""Whisper encoder frames per second (two 10 ms mel frames each)."""
MAX_SECONDS = 30.0
"""Whisper's window."""
MEDIAN_WIDTH = 7
"""Median filter width (frames) over the attention weights, as openai-whisper."""


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest monotone path through ``cost`` (rows, frames) from (0, 0) to the last cell with steps right, down and
    diagonal; returns the (row, frame) indices of the path."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    trace = np.zeros((n + 1, m + 1), dtype=np.int8)
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
            if c0 <= c1 and c0 <= c2:
                best, step = c0, 0
            elif c1 <= c2:
                best, step = c1, 1
            else:
                best, step = c2, 2
            acc[i, j] = cost[i - 1, j - 1] + best
            trace[i, j] = step
    i, j, rows, frames = n, m, [], []
    while i > 0 and j > 0:
        rows.append(i - 1)
        frames.append(j - 1)
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    while i > 0:  # the first frame: remaining rows stack on it
        i -= 1
        rows.append(i)
        frames.append(0)
    return np.array(rows[::-1]), np.array(frames[::-1])


def _median_filter(x: Tensor, width: int) -> Tensor:
    """Median over a sliding window of the last axis (reflect padding)."""
    if width <= 1 or x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = torch.nn.functional.pad(x.reshape(-1, 1, x.shape[-1]), (pad, pad), mode="reflect")
    return padded.unfold(-1, width, 1).median(-1).values.reshape(x.shape)


def row_times(weights: Tensor) -> np.ndarray:
    """Seconds at which the alignment path enters each row of ``weights`` (heads, rows, frames): cross-attention over
    the utterance's frames, renormalised per row, standardised over rows, median-filtered in time, averaged over heads,
    then aligned by DTW."""
    w = weights.float()
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
    w = _median_filter((w - mean) / std.clamp_min(1e-12), MEDIAN_WIDTH)
    rows, frames = dtw(-w.mean(0).double().cpu().numpy())
    first = np.ones(len(rows), dtype=bool)
    first[1:] = np.diff(rows) != 0
    return frames[first] / FRAMES_PER_SECOND


def word_times(text: str, language: str, offsets: list[tuple[int, int]], starts: np.ndarray, ends: np.ndarray,
               duration: float) -> list[tuple[str, float, float]]:
    """(word, start, end) for every word of ``text`` (``split_words``) from token times: token k covers characters
    ``offsets[k]`` during ``starts[k]..ends[k]``, spread evenly over them; a word spans its characters' times."""
    from datamodules.toy_world import split_words

    char_start = np.full(len(text), np.inf)
    char_end = np.full(len(text), -np.inf)
    for (a, b), t0, t1 in zip(offsets, starts, ends):
        a, b = max(a, 0), min(b, len(text))
        for c in range(a, b):
            lo = t0 + (t1 - t0) * (c - a) / (b - a)
            hi = t0 + (t1 - t0) * (c - a + 1) / (b - a)
            char_start[c], char_end[c] = min(char_start[c], lo), max(char_end[c], hi)
    words, last = [], 0.0
    for a, b, word in split_words(text, language):
        s, e = char_start[a:b].min(), char_end[a:b].max()
        s = last if not np.isfinite(s) else s  # a character no token covers: zero length at the previous end
        e = s if not np.isfinite(e) else e
        s = min(max(float(s), last), duration)
        e = min(max(float(e), s), duration)
        words.append((word, round(s, 4), round(e, 4)))
        last = e
    return words


class WhisperAligner:
    """Forced word alignment with a local Hugging Face Whisper folder."""

    def __init__(self, folder: str | Path, device: str | None = None) -> None:
        config = hf_folder_config(folder, "whisper", "Whisper")
        transformers = import_transformers()
        self.folder = Path(folder)
        gen_path = self.folder / "generation_config.json"
        if not gen_path.is_file():
            raise FileNotFoundError(f"{gen_path}: missing; it names Whisper's special tokens and alignment heads")
        gen = json.loads(gen_path.read_text(encoding="utf-8"))
        self.device = torch.device(device or default_device())
        try:
            self.processor = transformers.WhisperProcessor.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{self.folder}: no usable Whisper processor (tokenizer + feature extractor): {e}") from None
        model = transformers.WhisperForConditionalGeneration.from_pretrained(
            str(self.folder), local_files_only=True, attn_implementation="eager")
        self.model = model.to(self.device).eval()
        self.max_tokens = int(config.get("max_target_positions", 448))
        sot = gen.get("decoder_start_token_id", config.get("decoder_start_token_id"))
        eot = gen.get("eos_token_id", config.get("eos_token_id"))
        if isinstance(eot, list):
            eot = eot[0]
        if sot is None or eot is None:
            raise ValueError(f"{gen_path}: field 'decoder_start_token_id' or 'eos_token_id' missing")
        self.sot, self.eot = int(sot), int(eot)
        self.lang_to_id: dict[str, int] = gen.get("lang_to_id") or {}
        self.task = (gen.get("task_to_id") or {}).get("transcribe")
        self.no_timestamps = gen.get("no_timestamps_token_id")
        heads = gen.get("alignment_heads")
        if not heads:
            layers, n_heads = int(config["decoder_layers"]), int(config["decoder_attention_heads"])
            heads = [[layer, h] for layer in range(layers // 2, layers) for h in range(n_heads)]
            log.warning("%s: no 'alignment_heads'; averaging all heads of decoder layers %d..%d", gen_path,
                        layers // 2, layers - 1)
        self.heads = [(int(layer), int(h)) for layer, h in heads]

    def prefix(self, language: str, where: str) -> list[int]:
        """Start-of-transcript tokens for ``language``: <|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>."""
        tokens = [self.sot]
        if self.lang_to_id:
            lang = self.lang_to_id.get(f"<|{language}|>")
            if lang is None:
                raise ValueError(f"{where}: language {language!r} is not one Whisper {self.folder} knows "
                                 f"(generation_config.json field 'lang_to_id')")
            tokens.append(int(lang))
            if self.task is not None:
                tokens.append(int(self.task))
        if self.no_timestamps is not None:
            tokens.append(int(self.no_timestamps))
        return tokens

    def text_tokens(self, text: str, language: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` as Whisper writes it (a leading space except in Chinese) and each token's character
        span in ``text``."""
        lead = "" if language == "zh" else " "
        enc = self.processor.tokenizer(lead + text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [(a - len(lead), b - len(lead)) for a, b in enc["offset_mapping"]]
        return list(enc["input_ids"]), spans

    @torch.no_grad()
    def __call__(self, wavs: list[np.ndarray], texts: list[str], languages: list[str],
                 where: list[str]) -> list[list[tuple[str, float, float]]]:
        """Words with times (seconds from the clip's start) of each 16 kHz clip and its transcript."""
        seqs, spans, prefixes = [], [], []
        for text, language, w in zip(texts, languages, where):
            prefix = self.prefix(language, w)
            ids, sp = self.text_tokens(text, language)
            seq = prefix + ids + [self.eot]
            if len(seq) > self.max_tokens:
                raise ValueError(f"{w}: {len(seq)} Whisper tokens, more than its {self.max_tokens} positions")
            seqs.append(seq)
            spans.append(sp)
            prefixes.append(len(prefix))
        features = self.processor.feature_extractor(list(wavs), sampling_rate=SAMPLE_RATE, return_tensors="pt")
        dec = torch.full((len(seqs), max(map(len, seqs))), self.eot, dtype=torch.long)
        for i, s in enumerate(seqs):
            dec[i, : len(s)] = torch.tensor(s)
        out = self.model(input_features=features.input_features.to(self.device, self.model.dtype),
                         decoder_input_ids=dec.to(self.device), output_attentions=True)
        attn = torch.stack([out.cross_attentions[layer][:, h] for layer, h in self.heads], dim=1)  # (B, heads, L, 1500)
        results = []
        for b, (wav, text, language) in enumerate(zip(wavs, texts, languages)):
            n_text, p = len(spans[b]), prefixes[b]
            duration = len(wav) / SAMPLE_RATE
            frames = max(1, min(attn.shape[-1], math.ceil(duration * FRAMES_PER_SECOND)))
            # row p-1+k is the input position whose output predicts text token k (k = 0..n_text-1); row p-1+n_text
            # predicts the end: token k lasts from the path's entry into its row to the entry into the next one
            times = row_times(attn[b, :, p - 1 : p + n_text, :frames])
            results.append(word_times(text, language, spans[b], times[:-1], times[1:], duration))
        return results


def align(whisper: str | Path, data: str | Path, out: str | Path, *, batch_size: int = 8,
          device: str | None = None) -> dict[str, Any]:
    """Write every dialogue of ``data`` to ``out/<id>.json`` (audio paths relative to ``out``), adding Whisper word
    timestamps to turns without a ``words`` field; returns counts."""
    from datamodules.kespeechchat import Word, dialogue_to_dict, load_audio, read_dialogues, write_dialogue

    dialogues = list(read_dialogues(data))
    seen: dict[str, Path] = {}
    for d in dialogues:
        if d.id in seen or "/" in d.id or "\\" in d.id or d.id.startswith("."):
            why = f"also in {seen[d.id]}" if d.id in seen else "not usable as a file name"
            raise ValueError(f"{d.source}: dialogue {d.id!r} field 'id': {why} (output files are OUT/<id>.json)")
        seen[d.id] = d.source
    todo = [(di, ti) for di, d in enumerate(dialogues) for ti, t in enumerate(d.turns) if t.words is None]
    aligner = WhisperAligner(whisper, device) if todo else None
    words: dict[tuple[int, int], list[tuple[str, float, float]]] = {}
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        wavs, texts, langs, where = [], [], [], []
        for di, ti in batch:
            d, t = dialogues[di], dialogues[di].turns[ti]
            field = f"{d.source}: dialogue {d.id!r} dialog[{ti}]"
            wav = load_audio(d.source.parent / t.audio_path, SAMPLE_RATE, context=f"dialogue {d.id!r} dialog[{ti}].audio_path")
            if len(wav) > MAX_SECONDS * SAMPLE_RATE:
                raise ValueError(f"{field}.audio_path: {len(wav) / SAMPLE_RATE:.2f} s, longer than Whisper's "
                                 f"{MAX_SECONDS:.0f} s window")
            wavs.append(wav)
            texts.append(t.text)
            langs.append(next(ch["language"] for ch in d.channels if ch["channel_index"] == t.channel))
            where.append(f"{field}.text")
        assert aligner is not None
        for key, w in zip(batch, aligner(wavs, texts, langs, where)):
            words[key] = w
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for di, d in enumerate(dialogues):
        turns = []
        for ti, t in enumerate(d.turns):
            path = os.path.relpath((d.source.parent / t.audio_path).resolve(), out.resolve())
            new = [Word(*w) for w in words[(di, ti)]] if (di, ti) in words else t.words
            turns.append(replace(t, audio_path=path, words=new))
        write_dialogue(dialogue_to_dict(replace(d, turns=turns)), out / f"{d.id}.json")
    n_turns = sum(len(d.turns) for d in dialogues)
    return {"dialogues": len(dialogues), "turns": n_turns, "aligned_turns": len(todo), "kept_turns": n_turns - len(todo)}
