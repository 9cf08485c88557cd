"""Question audio for ``chat``: a file or a folder of wavs, read as mono 16 kHz float32 with one error naming the
file when it cannot be used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.nn.audio import load_wav


def input_files(path: str | Path) -> list[Path]:
    """``path`` itself (a file) or the ``.wav`` files of a folder, sorted."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".wav" and f.is_file())
        if not files:
            raise FileNotFoundError(f"{p}: no .wav files in this folder")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such audio file or folder")
    return [p]


def read_input(path: Path, max_samples: int) -> Tensor:
    """A question file as mono 16 kHz float32, with one error naming the file when it cannot be used."""
    try:
        wav, _ = load_wav(path, SAMPLE_RATE)
    except (RuntimeError, ValueError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise ValueError(f"{path}: not a readable audio file ({str(e).strip() or type(e).__name__})") from None
    if not wav.size or not np.isfinite(wav).all():
        raise ValueError(f"{path}: no audio samples" if not wav.size else f"{path}: audio holds NaN or inf samples")
    if len(wav) > max_samples:
        raise ValueError(f"{path}: lasts {len(wav) / SAMPLE_RATE:.1f} s, longer than the speech encoder's "
                         f"{max_samples / SAMPLE_RATE:.0f} s")
    return torch.from_numpy(wav)
