"""Stage-1 data: utterance audio at 16 kHz and its transcript, for the supervised speech tokenizer (ASR).

The log-mel front end runs inside the model (``lit_keomni.nn.audio.LogMel``), batched and on the accelerator, so this
module only pads batches. Audio is resampled to 16 kHz once, by ``prepare``; chunks stored at another rate (prepared
with ``--sample-rate``) are resampled here, clip by clip.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset

from datamodules.streaming import StreamingDataModule, chunks_dir, is_remote, speech_chunks_dir, write_characters
from lit_keomni.audio import SAMPLE_RATE, resample

log = logging.getLogger(__name__)


def asr_example(item: dict[str, Any]) -> dict[str, Any]:
    """A raw utterance item -> {id, audio (float32, 16 kHz), text, language}."""
    audio = item["audio"].astype(np.float32) / 32768.0
    audio = resample(audio, item["sample_rate"], SAMPLE_RATE)
    return {"id": item["id"], "audio": torch.from_numpy(np.ascontiguousarray(audio)), "text": item["text"],
            "language": item["language"]}


class TokenizerDataModule(StreamingDataModule):
    """Utterances (any speaker, both languages) for ASR training of the speech tokenizer; a dialogue corpus is read
    from its 16 kHz copy (``streaming.SPEECH_CHUNKS``)."""

    transform = staticmethod(asr_example)

    def build_missing(self) -> None:
        super().build_missing()
        for root in [c["path"] for c in self.mixture_sources] or [self.data_dir]:
            if not is_remote(root) and (chunks_dir(root, "train") / "index.json").is_file():
                try:
                    write_characters(root)  # corpora prepared before characters/ existed
                except OSError as e:  # a read-only corpus: only a recipe naming characters/ needs it, and says so
                    log.warning("%s: cannot write the character tokenizer (%s)", root, e)

    def dataset(self, split: str, root: str | None = None) -> StreamingDataset:
        root = root or self.chunks_root()
        if is_remote(root):
            return super().dataset(split, root)
        path = speech_chunks_dir(root, split)
        if not (path / "index.json").is_file():
            return super().dataset(split, root)  # its error names the missing chunks
        return StreamingDataset(str(path), shuffle=split == "train", seed=self.seed, transform=self.transform)
