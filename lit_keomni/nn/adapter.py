"""KE-Omni speech adapter (seed 000 §4.1): 50 Hz encoder states -> 10 Hz features in the LLM's embedding space.

Every ``stack`` consecutive encoder frames are concatenated (frame order kept: ``[f0 | f1 | ... | f4]``) and mapped by
a two-layer MLP, Linear -> ReLU -> Linear, as LLaMA-Omni's speech adapter does; with ``stack=5`` one second of Whisper
output (50 frames) becomes 10 LLM positions. An incomplete group at the end of an utterance is dropped (LLaMA-Omni
discards ``T % stack`` frames too), so an utterance of ``T`` valid frames yields exactly ``T // stack`` features.

``speech_frames`` gives that count from the number of 16 kHz samples alone, through the same steps the model takes
(log-mel hop, the stride-2 convolution stem, the stacking), so data can be laid out before any model runs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

MEL_HOP = 160
"""Log-mel frame shift at 16 kHz (``nn.audio.LogMel``: 10 ms, 100 frames/s)."""


def speech_frames(num_samples: int, stack: int = 5, hop_length: int = MEL_HOP) -> int:
    """Adapter frames of an utterance of ``num_samples`` 16 kHz samples: mel frames ``n // hop``, 50 Hz encoder
    frames ``(mel + 1) // 2`` (stride-2 stem), adapter frames ``encoder // stack`` (incomplete tail dropped)."""
    mel = int(num_samples) // hop_length
    return ((mel + 1) // 2) // stack


class SpeechAdapter(nn.Module):
    """Frame stacking x ``stack`` + MLP: (B, T, d_in) encoder states -> (B, T // stack, d_out) LLM inputs."""

    def __init__(self, d_in: int, d_out: int, stack: int = 5, hidden: int | None = None) -> None:
        """
        Args:
            d_in: Width of the speech encoder's states (1280 for Whisper-large-v3).
            d_out: The LLM's embedding width.
            stack: Consecutive frames concatenated into one feature (KE-Omni: 5, 50 Hz -> 10 Hz).
            hidden: Width of the MLP's hidden layer; None = ``d_out``.
        """
        super().__init__()
        if stack < 1:
            raise ValueError(f"SpeechAdapter: stack={stack} must be >= 1")
        self.d_in, self.d_out, self.stack = d_in, d_out, stack
        self.hidden = hidden or d_out
        self.linear1 = nn.Linear(d_in * stack, self.hidden)
        self.linear2 = nn.Linear(self.hidden, d_out)

    def config(self) -> dict[str, int]:
        """The constructor's arguments (for the export's ``config.json``)."""
        return {"d_in": self.d_in, "d_out": self.d_out, "stack": self.stack, "hidden": self.hidden}

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` (B, T, d_in) with ``lengths`` (B,) valid frames -> (B, T // stack, d_out) and ``lengths // stack``."""
        B, T, D = x.shape
        if D != self.d_in:
            raise ValueError(f"SpeechAdapter: input width {D}, expected d_in={self.d_in}")
        k = self.stack
        n = T // k
        stacked = x[:, : n * k].reshape(B, n, k * D)
        return self.linear2(F.relu(self.linear1(stacked))), lengths // k
