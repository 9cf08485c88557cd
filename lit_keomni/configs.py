"""Typed model configs with a registry of named presets.

Every network in lit-keomni is described by one dataclass; presets are plain dicts indexed by name, so a recipe says
``model.config: tiny`` (CPU, seconds) or a paper size, and may override single fields. Derived fields are computed in
``__post_init__``. Docstrings under each field show up in ``--help``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="_Registered")


class _Registered:
    """Mixin: ``Config.from_name("tiny", n_layer=4)`` and ``Config.from_dict({...})`` with a clear error on unknown keys."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def from_name(cls: type[C], name: str, **overrides: Any) -> C:
        if name not in cls.presets:
            raise ValueError(f"{cls.__name__}: unknown preset {name!r}; known: {sorted(cls.presets)}")
        return cls.from_dict({**cls.presets[name], **overrides})

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any], *, source: str = "config") -> C:
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}  # type: ignore[arg-type]

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass
class SpeechTokenizerConfig(_Registered):
    """Whisper-style encoder with average pooling and a vector quantiser in the middle, plus an ASR decoder
    (GLM-4-Voice §2.1; CosyVoice's supervised semantic tokens)."""

    n_mels: int = 80
    """Log-mel bins of the front end (80 for Whisper up to large-v2, 128 for large-v3)."""
    d_model: int = 192
    """Width of encoder and decoder."""
    n_head: int = 4
    """Attention heads in every encoder/decoder layer."""
    ffn_dim: int = 768
    """Hidden size of the feed-forward layers."""
    encoder_layers: int = 4
    """Total encoder layers; pooling and VQ sit after ``vq_position`` of them."""
    vq_position: int = 2
    """Encoder layers (at 50 Hz) before the pooling + VQ bottleneck; the rest run at the token rate."""
    decoder_layers: int = 2
    """ASR decoder layers (cross-attending to the quantised encoder output)."""
    vocab_size: int = 0
    """Text vocabulary of the ASR decoder; 0 = taken from the tokenizer when the model is built."""
    max_source_positions: int = 1500
    """Encoder positions at 50 Hz (1500 = 30 s, as Whisper)."""
    max_target_positions: int = 448
    """Longest transcript in tokens, including start and end tokens."""
    pool: int = 4
    """Average-pooling window after ``vq_position`` layers: 1/2/4/8 give 50/25/12.5/6.25 Hz tokens."""
    causal_conv: bool = True
    """Left-padded (causal) convolutions in the stem, so a frame never sees the future."""
    block_seconds: float | None = 2.0
    """Block-causal attention block in seconds (paper: 2 s = 100 frames at 50 Hz); None = bidirectional."""
    codebook_size: int = 1024
    """VQ codebook entries (paper: 4,096 at 50/25 Hz, 16,384 at 12.5 Hz, 65,536 at 6.25 Hz)."""
    vq: bool = True
    """Quantise the bottleneck; False gives the plain ASR model (e.g. Whisper parity or ASR pre-training)."""
    commitment: float = 10.0
    """Commitment-loss coefficient (paper: 10.0)."""
    vq_decay: float = 0.99
    """EMA decay of the codebook (paper: 0.99)."""
    restart_threshold: float = 0.05
    """Codes whose EMA usage (assignments per step) falls below this restart from random current encoder frames;
    keep it well below frames-per-step / codebook_size."""
    ctc_upsample: int = 4
    """CTC head slots per token frame (12.5 Hz frames are too few for one CTC label each)."""
    dropout: float = 0.0
    """Dropout in attention outputs and feed-forward layers."""

    frame_rate_hz: float = dataclasses.field(init=False, default=0.0)
    """Speech tokens per second (50 / pool)."""
    block_frames: int | None = dataclasses.field(init=False, default=None)
    """Block size in 50 Hz frames (None = bidirectional)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(d_model=192, n_head=4, ffn_dim=768, encoder_layers=4, vq_position=2, decoder_layers=2, codebook_size=1024),
        # whisper-large-v3 fine-tuned with 12.5 Hz pooling and a 16,384-code VQ (seed 003 App. B.1; GLM-4-Voice tokenizer
        # puts pooling and VQ after layer 16 of 32).
        "whisper-large-v3-12.5hz": dict(
            n_mels=128, d_model=1280, n_head=20, ffn_dim=5120, encoder_layers=32, vq_position=16, decoder_layers=32,
            vocab_size=51866, pool=4, codebook_size=16384, commitment=10.0, vq_decay=0.99,
        ),
    }

    def __post_init__(self) -> None:
        if not 0 <= self.vq_position <= self.encoder_layers:
            raise ValueError(f"vq_position={self.vq_position} must lie in [0, encoder_layers={self.encoder_layers}]")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.pool < 1:
            raise ValueError(f"pool={self.pool} must be >= 1")
        self.frame_rate_hz = 50.0 / self.pool
        if self.block_seconds is None:
            self.block_frames = None
        else:
            frames = round(self.block_seconds * 50)
            if frames <= 0 or frames % self.pool:
                raise ValueError(
                    f"block_seconds={self.block_seconds} gives {frames} frames at 50 Hz, which must be a positive "
                    f"multiple of pool={self.pool} so that pooled frames never straddle two blocks"
                )
            self.block_frames = frames


def config_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config's init fields (for ``config.json`` and hyper-parameters)."""
    return config.to_dict() if isinstance(config, _Registered) else asdict(config)
