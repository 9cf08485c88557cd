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
    pool_mode: str = "valid"
    """"valid": each pooled frame averages the valid 50 Hz frames of its window; "window": it averages all ``pool``
    frames, padding included (GLM-4-Voice's ``AvgPool1d``; the released tokenizer's codes depend on it)."""
    post_vq_positions: bool = False
    """A learned position table added to the quantised states before the layers above the bottleneck (GLM-4-Voice's
    ``embed_positions2``, initialised from the encoder's table)."""
    feature_pad_multiple: int = 0
    """Tokenizing (``tokenize``, ``chat``), each utterance's audio is zero-padded to a multiple of this many samples
    and all of it enters the log-mel, as GLM-4-Voice's ``extract_speech_token`` pads for ``WhisperFeatureExtractor``
    (1,280 = one 12.5 Hz token); 0 = every utterance is followed by silence (our ``LogMel``)."""

    frame_rate_hz: float = dataclasses.field(init=False, default=0.0)
    """Speech tokens per second (50 / pool)."""
    block_frames: int | None = dataclasses.field(init=False, default=None)
    """Block size in 50 Hz frames (None = bidirectional)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # CPU size; commitment 0.25 (van den Oord et al.): the paper's 10 is for a trained Whisper, and with a young
        # encoder it collapsed the codebook to a few dozen codes in our runs.
        "tiny": dict(d_model=192, n_head=4, ffn_dim=768, encoder_layers=4, vq_position=2, decoder_layers=2, codebook_size=1024,
                     commitment=0.25),
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
        if self.pool_mode not in ("valid", "window"):
            raise ValueError(f"pool_mode={self.pool_mode!r} must be 'valid' or 'window'")
        if self.feature_pad_multiple < 0 or self.feature_pad_multiple % 160:
            raise ValueError(f"feature_pad_multiple={self.feature_pad_multiple} must be 0 or a multiple of the "
                             f"160-sample hop")
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


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
"""Keys of a ``rope_scaling`` dict with ``rope_type: llama3`` (Llama-3.1's frequency-dependent RoPE stretch)."""


@dataclass
class TransformerConfig(_Registered):
    """Decoder-only LM of the Llama/GLM family (``nn/transformer.py``): RMSNorm, RoPE, grouped-query attention, SwiGLU.

    The same network serves the text-to-token model, the speech LM and, with ``causal=False``, the non-autoregressive
    stages (duration predictor, unit generator)."""

    vocab_size: int = 512
    """Real vocabulary (text tokens; speech tokens are added later with ``resize_token_embeddings``)."""
    n_layer: int = 2
    """Number of decoder blocks."""
    n_embd: int = 64
    """Hidden size (width of the residual stream)."""
    n_head: int = 4
    """Query heads per attention layer; head_dim = n_embd // n_head."""
    n_kv_head: int = 2
    """Key/value heads; n_head // n_kv_head query heads share one (GQA; GLM calls this the attention group count)."""
    intermediate_size: int = 172
    """Hidden size of the SwiGLU feed-forward layer (gate and up projections)."""
    rope_base: float = 10000.0
    """RoPE base θ (Llama-2 and GLM-4: 10,000; Llama-3: 500,000)."""
    rotary_dim_fraction: float = 1.0
    """Fraction of each head's dimensions that is rotated (GLM-4: 0.5, the first half; the rest passes unrotated)."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE frequency scaling; only ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` (Llama-3.1) is supported; None = plain RoPE."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    bias: bool = False
    """Bias on the query/key/value projections (GLM-4's add_qkv_bias; no bias on the output projection or MLP)."""
    sandwich_norm: bool = False
    """An extra RMSNorm on the attention and on the MLP output before each residual add (GLM-4-0414's
    ``post_self_attn_layernorm`` / ``post_mlp_layernorm``, transformers' ``Glm4ForCausalLM``)."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output head."""
    block_size: int = 256
    """Longest sequence (prompt + generation) the model is used with; caps the KV cache."""
    causal: bool = True
    """Causal self-attention; False = bidirectional (non-autoregressive stages; key padding via attention_mask)."""
    padded_vocab_multiple: int = 64
    """Embedding and head rows are padded to a multiple of this (faster matmuls); padded logits are never sampled."""

    padded_vocab_size: int = dataclasses.field(init=False, default=0)
    """vocab_size rounded up to a multiple of padded_vocab_multiple."""
    head_dim: int = dataclasses.field(init=False, default=0)
    """Width of one attention head (n_embd // n_head)."""
    rotary_dim: int = dataclasses.field(init=False, default=0)
    """Rotated dimensions per head (head_dim * rotary_dim_fraction, even)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(vocab_size=512, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=172, block_size=256),
        # Seed 003 Table 12 (text-to-token) = Table 13 "1.5B" column: head size 128, attention group size 4, vocab 59,264
        # without speech tokens. Same GLM architecture as the 9B model, so qkv bias and half-rotary as GLM-4.
        "text-to-token-1.5b": dict(
            vocab_size=59264, n_layer=28, n_embd=2048, n_head=16, n_kv_head=4, intermediate_size=6144,
            rope_base=10000.0, rotary_dim_fraction=0.5, bias=True, block_size=8192,
        ),
        # Seed 003 Table 13 "9B" column = GLM-4-9B-Base (multi_query_group_num 2, add_qkv_bias, rotary on half of each
        # head, layernorm_epsilon 1.5625e-7, untied output layer).
        "glm-4-voice-9b": dict(
            vocab_size=151552, n_layer=40, n_embd=4096, n_head=32, n_kv_head=2, intermediate_size=13696,
            rope_base=10000.0, rotary_dim_fraction=0.5, norm_eps=1.5625e-7, bias=True, block_size=8192,
        ),
        "llama-3.1-8b": dict(
            vocab_size=128256, n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, intermediate_size=14336,
            rope_base=500000.0, norm_eps=1e-5, block_size=131072,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192),
        ),
        # Qwen2.5 (Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen2.5-0.5B-Instruct): q/k/v biases, full rotary, vocab_size = the
        # released embedding rows; the 0.5B ties its head to the embedding.
        "qwen2.5-7b": dict(
            vocab_size=152064, n_layer=28, n_embd=3584, n_head=28, n_kv_head=4, intermediate_size=18944,
            rope_base=1000000.0, norm_eps=1e-6, bias=True, block_size=32768,
        ),
        "qwen2.5-0.5b": dict(
            vocab_size=151936, n_layer=24, n_embd=896, n_head=14, n_kv_head=2, intermediate_size=4864,
            rope_base=1000000.0, norm_eps=1e-6, bias=True, tie_embeddings=True, block_size=32768,
        ),
    }
    # GLM-4-9B-Base (THUDM/glm-4-9b) is the network of the "glm-4-voice-9b" entry: that entry holds the text
    # vocabulary (151,552 rows); glm-4-voice-9b's released checkpoint has 168,960 rows = 151,552 + 16,384 audio tokens
    # + padding, which the speech stage adds (its vocab_size is the speech-extended tokenizer's).
    presets["glm-4-9b"] = dict(presets["glm-4-voice-9b"])

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size", "block_size",
                      "padded_vocab_multiple"):
            if getattr(self, field) < 1:
                raise ValueError(f"{name}: field '{field}' is {getattr(self, field)}, must be >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"{name}: field 'n_embd' ({self.n_embd}) is not divisible by field 'n_head' ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"{name}: field 'n_head' ({self.n_head}) is not divisible by field 'n_kv_head' "
                             f"({self.n_kv_head}); grouped-query attention needs whole groups")
        self.head_dim = self.n_embd // self.n_head
        if not 0.0 < self.rotary_dim_fraction <= 1.0:
            raise ValueError(f"{name}: field 'rotary_dim_fraction' is {self.rotary_dim_fraction}, must lie in (0, 1]")
        self.rotary_dim = int(self.head_dim * self.rotary_dim_fraction)
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"{name}: field 'rotary_dim_fraction' ({self.rotary_dim_fraction}) of head_dim "
                             f"{self.head_dim} gives {self.rotary_dim} rotated dims; must be even and >= 2")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind != "llama3":
                raise ValueError(f"{name}: field 'rope_scaling.rope_type' is {kind!r}; only 'llama3' is supported")
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"{name}: field 'rope_scaling' lacks {missing} (llama3 needs {list(LLAMA3_ROPE_KEYS)})")
            self.rope_scaling = {"rope_type": "llama3", **{k: self.rope_scaling[k] for k in LLAMA3_ROPE_KEYS}}
        m = self.padded_vocab_multiple
        self.padded_vocab_size = -(-self.vocab_size // m) * m
