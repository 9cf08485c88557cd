"""The speech rate and the one resampler of the package, without torch.

``SAMPLE_RATE`` is the 16 kHz every speech encoder reads (Whisper-style stage 1, HuBERT, UTMOS, the aligner) and the
default rate of ASR/speech corpora and of the unit vocoder. ``resample`` is soxr at its default "HQ" quality. Both live
here rather than in ``nn.audio`` (features and wav I/O, which import torch) so that data preparation (the built-in
corpus's spawned workers) and the light eval modules use them without importing torch.
"""

from __future__ import annotations

import numpy as np
import soxr

SAMPLE_RATE = 16_000
"""Input rate of the speech encoders (Whisper's), in Hz."""


def resample(wav: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """``wav`` (S,) or (S, C) from ``from_rate`` to ``to_rate`` with soxr (quality "HQ"), as float32; at equal rates the
    float32 input itself."""
    wav = np.asarray(wav, dtype=np.float32)
    if from_rate == to_rate:
        return wav
    return soxr.resample(wav, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)
