"""Stage-1 data: utterance audio at 16 kHz and its transcript, for the supervised speech tokenizer (ASR).

The log-mel front end runs inside the model (``lit_keomni.nn.audio.LogMel``), batched and on the accelerator, so this
module only resamples each clip from the chunks' rate to 16 kHz and pads batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import soxr
import torch

from datamodules.streaming import StreamingDataModule

ASR_SAMPLE_RATE = 16_000
"""Whisper's input rate."""


def asr_example(item: dict[str, Any]) -> dict[str, Any]:
    """A raw utterance item -> {id, audio (float32, 16 kHz), text, language}."""
    audio = item["audio"].astype(np.float32) / 32768.0
    if item["sample_rate"] != ASR_SAMPLE_RATE:
        audio = soxr.resample(audio, item["sample_rate"], ASR_SAMPLE_RATE)
    return {"id": item["id"], "audio": torch.from_numpy(np.ascontiguousarray(audio)), "text": item["text"],
            "language": item["language"]}


class TokenizerDataModule(StreamingDataModule):
    """Utterances (any speaker, both languages) for ASR training of the speech tokenizer."""

    transform = staticmethod(asr_example)
