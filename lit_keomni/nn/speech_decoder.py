"""KE-Omni's non-autoregressive speech decoder (seed 000 §4.3, §5.1): duration predictor and unit generator.

- ``DurationPredictor``: the LLM's last hidden states of the answer's text tokens -> input projection ->
  bidirectional ``nn.transformer.Transformer`` blocks (``causal=False``) -> a scalar head: the token's duration in
  unit frames. Predicted in the linear domain (the paper trains it with MSE on durations; the linear domain keeps the
  expected total length right, which the log domain biases low); ``forward`` clamps at 0.
- ``length_regulate``: each token's hidden state repeated for its number of frames (FastSpeech's length regulator).
- ``UnitGenerator``: hidden states -> input projection -> upsampled by the durations -> plus an embedding of each
  frame's index inside its token -> bidirectional transformer (rotary positions over the frame sequence) -> logits
  over the discrete units (the HiFi-GAN vocoder's input).
- ``decode_units``: duration predictor + unit generator, the inference path (``chat``, stage-6 validation).
The transformer is ours with ``vocab_size=1`` and ``padded_vocab_multiple=1``: its one-row embedding is unused (the
inputs are projections) and its ``lm_head`` is the duration predictor's scalar head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_keomni.configs import TransformerConfig
from lit_keomni.nn.transformer import Transformer

MAX_FRAME_INDEX = 32
"""Frames inside one token that get their own index embedding; later frames share the last one."""


def _bidirectional(config: TransformerConfig) -> Transformer:
    return Transformer(config.replace(causal=False, vocab_size=1, padded_vocab_multiple=1, tie_embeddings=False))


def cumulative_round(values: Tensor) -> Tensor:
    """Non-negative real frame counts (..., T) -> integers (long) whose running sums are the rounded running sums
    of ``values``: rounding errors never accumulate, and the total is ``round(values.sum(-1))``."""
    ends = torch.round(values.clamp(min=0).double().cumsum(-1)).long()
    return torch.diff(ends, dim=-1, prepend=torch.zeros_like(ends[..., :1]))


def frame_token_index(durations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Durations (B, T) long -> for each output frame (B, F), F = the longest total: the token it repeats, its index
    inside that token (0, 1, ...), and the frame mask (True on real frames)."""
    if durations.dim() != 2:
        raise ValueError(f"durations must be (B, T), got shape {tuple(durations.shape)}")
    if bool((durations < 0).any()):
        raise ValueError("durations must be >= 0")
    durations = durations.long()
    ends = durations.cumsum(-1)  # (B, T)
    totals = ends[:, -1] if durations.shape[1] else torch.zeros(durations.shape[0], dtype=torch.long)
    F = int(totals.max()) if durations.numel() else 0
    frames = torch.arange(F, device=durations.device).expand(durations.shape[0], F)
    token = torch.searchsorted(ends, frames.contiguous(), right=True).clamp(max=max(0, durations.shape[1] - 1))
    starts = ends - durations
    inside = frames - starts.gather(1, token)
    return token, inside, frames < totals[:, None]


def length_regulate(hidden: Tensor, durations: Tensor) -> tuple[Tensor, Tensor]:
    """Hidden states (B, T, d) and integer durations (B, T) -> (upsampled (B, F, d), frame_mask (B, F)): token t's
    state repeated ``durations[b, t]`` times (zero: left out); F is the longest total, shorter rows are zero-padded."""
    token, _, mask = frame_token_index(durations)
    up = hidden.gather(1, token[..., None].expand(-1, -1, hidden.shape[-1]))
    return up * mask[..., None].to(up.dtype), mask


class DurationPredictor(nn.Module):
    """LLM hidden states (B, T, d_in) of text tokens -> their durations in unit frames (B, T)."""

    def __init__(self, d_in: int, config: TransformerConfig) -> None:
        super().__init__()
        self.d_in = d_in
        self.proj = nn.Linear(d_in, config.n_embd)
        self.net = _bidirectional(config)
        self.config = self.net.config

    def raw(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Unclamped durations (B, T), the quantity the MSE loss trains; padding positions are 0."""
        x = self.net(inputs_embeds=self.proj(hidden.to(self.proj.weight.dtype)), attention_mask=mask,
                     return_hidden=True)
        return self.net.lm_head(x)[..., 0] * mask

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Durations in unit frames (B, T), float, >= 0 (0 on padding)."""
        return self.raw(hidden, mask).clamp(min=0)


class UnitGenerator(nn.Module):
    """LLM hidden states (B, T, d_in) upsampled by integer durations -> unit logits (B, F, num_units)."""

    def __init__(self, d_in: int, num_units: int, config: TransformerConfig) -> None:
        super().__init__()
        self.d_in, self.num_units = d_in, num_units
        self.proj = nn.Linear(d_in, config.n_embd)
        self.frame_index = nn.Embedding(MAX_FRAME_INDEX, config.n_embd)
        self.net = _bidirectional(config)
        self.head = nn.Linear(config.n_embd, num_units)
        self.config = self.net.config
        nn.init.normal_(self.frame_index.weight, std=0.02)

    def forward(self, hidden: Tensor, durations: Tensor, mask: Tensor) -> Tensor:
        """Logits (B, F, num_units), F = the longest ``durations`` total; masked tokens get no frames."""
        durations = durations.long() * mask.long()
        token, inside, frame_mask = frame_token_index(durations)
        x = self.proj(hidden.to(self.proj.weight.dtype))
        x = x.gather(1, token[..., None].expand(-1, -1, x.shape[-1]))
        x = x + self.frame_index(inside.clamp(max=MAX_FRAME_INDEX - 1))
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], 0, self.num_units)
        return self.head(self.net(inputs_embeds=x, attention_mask=frame_mask, return_hidden=True))


@torch.no_grad()
def decode_units(durations: DurationPredictor, generator: UnitGenerator, hidden: Tensor, mask: Tensor,
                 min_frames: int = 1) -> list[Tensor]:
    """Hidden states (B, T, d) of answers' text tokens -> each answer's units (F_b,) long: predicted durations,
    rounded cumulatively (at least ``min_frames`` in all), then the most likely unit per frame."""
    frames = cumulative_round(durations(hidden, mask)) * mask.long()
    short = frames.sum(-1) < min_frames
    if bool(short.any()):  # an answer needs some sound: give its last real token the missing frames
        last = (mask.long().cumsum(-1).argmax(-1))
        frames[short, last[short]] += min_frames - frames[short].sum(-1)
    logits = generator(hidden, frames, mask)
    units = logits.argmax(-1)
    return [u[: int(n)] for u, n in zip(units, frames.sum(-1))]
