"""GLM-4-Voice's flow-matching speech decoder (seed 003 §2.1; CosyVoice's ``MaskedDiffWithXvec``): tokens -> mel.

Notable features:
- ``FlowDecoder``: token embedding -> ``TokenEncoder`` (pre-norm blocks of relative-position self-attention and a
  SiLU feed-forward layer; attention is block-causal over ``block_size`` tokens, so a prefix of whole blocks encodes
  exactly as inside the whole utterance) -> a projection to mel width -> ``LengthRegulator`` (nearest-neighbour
  stretch to the mel frame count, then convolutions) = ``mu``, the condition of the flow.
- Conditional flow matching (Lipman et al. 2023, optimal-transport path): x_t = (1 - (1 - sigma_min) t) x0 + t x1
  from noise x0 to mel x1, target u = x1 - (1 - sigma_min) x0, t cosine-scheduled (t = 1 - cos(pi/2 · U)); the
  conditions (mu, speaker, prompt mel) are zeroed together with probability ``training_cfg_rate``; the MSE is taken
  over real frames. Training prompts: with probability 1/2 an utterance keeps a random prefix of up to 80 % of its
  mel as the ``cond`` input (which the loss still covers).
- ``Estimator``: the vector field v(x, mask, mu, t, spks, cond), Matcha-TTS's 1-D U-Net: per level a ResNet block
  with a sinusoidal time embedding and transformer blocks; inputs x, mu, speaker and cond stacked on the channels.
- Sampling: ``ode_solve`` from Gaussian noise over a cosine time grid (Euler as the reference's ``solve_euler``, or
  midpoint), with ``classifier_free_guidance`` (1 + w) v(c) - w v(∅); ``inference`` returns only the frames after
  the prompt's.
- ``mel_frames``: int(tokens / frame_rate · sample_rate / hop) frames for a token count (12.5 Hz, 22,050 Hz, hop 256:
  ≈ 6.89 per token), computed in float32 as the reference does.
Kept exactly as in the released model, since its weights were trained with them: the estimator's attention adds the
0/1 frame mask product m_i·m_j to its logits (diffusers' additive-mask convention) instead of excluding padded
frames; the length regulator stretches each batch row over the whole padded token axis, and its convolutions see the
encoder states of padded tokens. Neither matters for one utterance without padding (how the model is used).
Presets: "tiny" (CPU, 1.5 M parameters) and "glm-4-voice-decoder" (the released sizes, 111 M parameters;
``layouts/glm4voice_decoder`` reads the released weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_keomni.configs import _Registered
from lit_keomni.nn.attention import sdpa
from lit_keomni.nn.whisper import lengths_to_mask

PROMPT_PROBABILITY = 0.5
"""Training: the chance that an utterance keeps a prompt prefix as its ``cond`` (the reference's coin flip)."""
PROMPT_MAX_FRACTION = 0.8
"""Training: a prompt prefix has randint(0, int(0.8 · frames)) frames."""
INFERENCE_SEED = 42
"""``inference``/``sample`` without ``noise`` draw it from a generator seeded with this on every call, as the
reference does (``torch.manual_seed(42)`` before each sample), so the same tokens give the same mel."""
SOLVERS = ("euler", "midpoint")


@dataclass
class FlowConfig(_Registered):
    """Flow-matching speech decoder (``nn/flow.py``): speech tokens at ``frame_rate`` -> ``n_mels`` log-mel frames."""

    vocab_size: int = 512
    """Speech tokens (the stage-1 codebook; glm-4-voice-tokenizer: 16,384)."""
    token_dim: int = 64
    """Width of the token embedding fed to the encoder."""
    n_mels: int = 80
    """Mel bins of the output (and of the vocoder's input)."""
    speaker_dim: int = 192
    """Width of the speaker embedding (x-vector) input; GLM-4-Voice passes zeros."""
    frame_rate: float = 12.5
    """Speech tokens per second."""
    sample_rate: int = 22050
    """Sample rate of the mel's audio; with ``hop_length`` it gives the mel frames per token."""
    hop_length: int = 256
    """Audio samples per mel frame."""
    encoder_dim: int = 128
    """Width of the token encoder."""
    encoder_heads: int = 4
    """Attention heads of every encoder layer."""
    encoder_ffn_dim: int = 512
    """Hidden size of the encoder's feed-forward layers."""
    encoder_layers: int = 2
    """Encoder layers."""
    block_size: int = 10
    """Tokens per attention block: a token sees its own block and all earlier ones (released: 10 = 0.8 s)."""
    encoder_dropout: float = 0.1
    """Dropout after the input projection, the attention and the feed-forward layers of the encoder."""
    positional_dropout: float = 0.1
    """Dropout on the scaled encoder input and on the relative position table."""
    attention_dropout: float = 0.1
    """Dropout on the encoder's attention weights."""
    regulator_layers: int = 4
    """Convolution + GroupNorm + Mish layers of the length regulator (before its final 1×1 convolution)."""
    estimator_channels: tuple[int, ...] = (64, 64)
    """Channels of each U-Net level of the estimator (multiples of 8, for GroupNorm(8)); all but the last halve time."""
    estimator_blocks: int = 1
    """Transformer blocks per U-Net level."""
    estimator_mid_levels: int = 2
    """Middle levels (ResNet + transformer blocks at the coarsest resolution)."""
    estimator_heads: int = 2
    """Attention heads of the estimator's transformer blocks."""
    estimator_head_dim: int = 32
    """Width of one estimator attention head (heads · head_dim may differ from the level's channels)."""
    estimator_dropout: float = 0.0
    """Dropout in the estimator's transformer blocks."""
    sigma_min: float = 1e-6
    """Noise left at t = 1 on the optimal-transport path."""
    t_scheduler: str = "cosine"
    """Flow times: "cosine" (t = 1 - cos(pi/2 · u), denser near the noise) or "linear" (t = u)."""
    training_cfg_rate: float = 0.2
    """Training: the chance that all conditions of an utterance are dropped (classifier-free guidance)."""
    inference_cfg_rate: float = 0.7
    """Guidance weight w of ``inference`` by default: (1 + w) v(cond) - w v(no cond)."""
    inference_temperature: float = 1.0
    """Scale of the starting noise of ``inference`` by default (Grad-TTS / Matcha-TTS's temperature; 0 = no noise,
    a deterministic ODE, sensible only with ``inference_start`` > 0)."""
    inference_start: float = 0.0
    """Flow time the ODE starts from: 0 = from noise (the released model); t0 > 0 starts at the path's point
    (1 - (1 - sigma_min) t0) · noise + t0 · mu, taking the encoder's ``mu`` as the estimate of the mel, and integrates
    from t0 to 1 (DiffSinger's shallow diffusion): for an encoder trained with the encoder loss (``prior_weight``)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # 2 CPU cores: 512 stage-1 codes at 12.5 Hz into 80-bin mels at 22,050 Hz / hop 256.
        "tiny": {},
        # glm-4-voice-decoder's config.yaml (flow section): MaskedDiffWithXvec with a BlockConformerEncoder.
        "glm-4-voice-decoder": dict(
            vocab_size=16384, token_dim=512, n_mels=80, speaker_dim=192, frame_rate=12.5, encoder_dim=512,
            encoder_heads=8, encoder_ffn_dim=2048, encoder_layers=6, block_size=10, regulator_layers=4,
            estimator_channels=(256, 256), estimator_blocks=4, estimator_mid_levels=12, estimator_heads=8,
            estimator_head_dim=64, estimator_dropout=0.0, sigma_min=1e-6, t_scheduler="cosine",
            training_cfg_rate=0.2, inference_cfg_rate=0.7,
        ),
    }

    def __post_init__(self) -> None:
        name = type(self).__name__
        self.estimator_channels = tuple(int(c) for c in self.estimator_channels)
        for field in ("vocab_size", "token_dim", "n_mels", "speaker_dim", "sample_rate", "hop_length", "encoder_dim",
                      "encoder_heads", "encoder_ffn_dim", "encoder_layers", "block_size", "estimator_blocks",
                      "estimator_heads", "estimator_head_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{name}: field '{field}' is {getattr(self, field)}, must be >= 1")
        if self.frame_rate <= 0:
            raise ValueError(f"{name}: field 'frame_rate' is {self.frame_rate}, must be > 0")
        if self.encoder_dim % self.encoder_heads:
            raise ValueError(f"{name}: field 'encoder_dim' ({self.encoder_dim}) is not divisible by field "
                             f"'encoder_heads' ({self.encoder_heads})")
        if not self.estimator_channels or any(c < 8 or c % 8 for c in self.estimator_channels):
            raise ValueError(f"{name}: field 'estimator_channels' {list(self.estimator_channels)} must be non-empty "
                             f"multiples of 8 (GroupNorm with 8 groups)")
        if self.regulator_layers < 0 or self.estimator_mid_levels < 0:
            raise ValueError(f"{name}: fields 'regulator_layers' and 'estimator_mid_levels' must be >= 0")
        if self.inference_temperature < 0:
            raise ValueError(f"{name}: field 'inference_temperature' is {self.inference_temperature}, must be >= 0")
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"{name}: field 't_scheduler' is {self.t_scheduler!r}; must be 'cosine' or 'linear'")
        for field in ("training_cfg_rate", "encoder_dropout", "positional_dropout", "attention_dropout",
                      "estimator_dropout", "inference_start"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{name}: field '{field}' is {getattr(self, field)}, must lie in [0, 1)")


# ---------------------------------------------------------------------------------------------------------- encoder


def block_causal_mask(size: int, block_size: int, device: torch.device | None = None) -> Tensor:
    """(size, size) bool, True where query i may attend key j: j lies in i's block of ``block_size`` or before it."""
    pos = torch.arange(size, device=device)
    return pos[None, :] < (pos[:, None] // block_size + 1) * block_size


def relative_positions(size: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(1, 2·size - 1, dim) sinusoids of the relative positions size-1, ..., 0, ..., -(size-1) (ESPnet's
    ``RelPositionalEncoding``: sin on even, cos on odd channels)."""
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim))
    rel = torch.arange(size - 1, -size, -1, dtype=torch.float32, device=device)
    angles = rel[:, None] * div[None, :]
    pe = torch.zeros(2 * size - 1, dim, device=device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angles), torch.cos(angles)
    return pe[None]


def relative_shift(scores: Tensor) -> Tensor:
    """(..., T, 2T - 1) scores against ``relative_positions`` -> (..., T, T): entry (i, j) is the score of query i
    against relative position i - j."""
    T = scores.shape[-2]
    pos = torch.arange(T, device=scores.device)
    index = (T - 1) - pos[:, None] + pos[None, :]
    return scores.gather(-1, index.expand(*scores.shape[:-1], T))


class RelPositionAttention(nn.Module):
    """Transformer-XL self-attention (Dai et al. 2019): content score (q + u)·k_j plus position score (q + v)·p_{i-j}
    (ESPnet's ``RelPositionMultiHeadedAttention``)."""

    def __init__(self, dim: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.dropout = n_head, dim // n_head, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_head, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(n_head, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, x: Tensor, pos_emb: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, dim), pos_emb (1, 2T - 1, dim), mask (B, T, T) bool (True = attend) -> (B, T, dim)."""
        B, T, _ = x.shape
        H, D = self.n_head, self.head_dim
        q = self.q(x).view(B, T, H, D)
        k, v = (proj(x).view(B, T, H, D).transpose(1, 2) for proj in (self.k, self.v))
        p = self.pos(pos_emb).view(1, -1, H, D).transpose(1, 2)
        content_q = (q + self.pos_bias_u).transpose(1, 2)
        position = relative_shift((q + self.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1))
        bias = (position / math.sqrt(D)).masked_fill(~mask[:, None], float("-inf"))
        y = sdpa(content_q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))


class EncoderLayer(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + FFN(LN(x)) with a SiLU feed-forward layer."""

    def __init__(self, c: FlowConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(c.encoder_dim, eps=1e-5)
        self.attn = RelPositionAttention(c.encoder_dim, c.encoder_heads, c.attention_dropout)
        self.ffn_norm = nn.LayerNorm(c.encoder_dim, eps=1e-5)
        self.ffn = nn.Sequential(nn.Linear(c.encoder_dim, c.encoder_ffn_dim), nn.SiLU(), nn.Dropout(c.encoder_dropout),
                                 nn.Linear(c.encoder_ffn_dim, c.encoder_dim))
        self.dropout = nn.Dropout(c.encoder_dropout)

    def forward(self, x: Tensor, pos_emb: Tensor, mask: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), pos_emb, mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class TokenEncoder(nn.Module):
    """Embedded tokens (B, T, token_dim) -> states (B, T, encoder_dim) under a block-causal, key-padding mask."""

    def __init__(self, c: FlowConfig) -> None:
        super().__init__()
        self.dim, self.block_size = c.encoder_dim, c.block_size
        self.input_proj = nn.Linear(c.token_dim, c.encoder_dim)
        self.input_norm = nn.LayerNorm(c.encoder_dim, eps=1e-5)
        self.input_dropout = nn.Dropout(c.encoder_dropout)
        self.pos_dropout = nn.Dropout(c.positional_dropout)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.norm = nn.LayerNorm(c.encoder_dim, eps=1e-5)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        T = x.shape[1]
        mask = lengths_to_mask(lengths, T)[:, None, :] & block_causal_mask(T, self.block_size, x.device)[None]
        x = self.input_dropout(self.input_norm(self.input_proj(x)))
        x = self.pos_dropout(x * math.sqrt(self.dim))
        pos_emb = self.pos_dropout(relative_positions(T, self.dim, x.device).to(x.dtype))
        for layer in self.layers:
            x = layer(x, pos_emb, mask)
        return self.norm(x)


class LengthRegulator(nn.Module):
    """Token-rate states (B, T, C) -> (B, F, C) at the mel rate: nearest-neighbour stretch of the padded token axis
    to F = max(frames), then (Conv1d(3) + GroupNorm(1) + Mish) × layers and a 1×1 convolution; frames past a row's
    count are zero."""

    def __init__(self, channels: int, layers: int) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        for _ in range(layers):
            mods += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(1, channels), nn.Mish()]
        self.net = nn.Sequential(*mods, nn.Conv1d(channels, channels, 1))

    def forward(self, h: Tensor, frames: Tensor) -> Tensor:
        n = int(frames.max())
        x = F.interpolate(h.transpose(1, 2), size=n, mode="nearest")
        return self.net(x).transpose(1, 2) * lengths_to_mask(frames, n)[..., None].to(h.dtype)


# -------------------------------------------------------------------------------------------------------- estimator


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Flow times (B,) or () -> (B or 1, dim) sinusoids of 1000·t (sin half, then cos half)."""
    t = t.reshape(-1).float()
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angles = scale * t[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ConvBlock(nn.Module):
    """Conv1d(3) -> GroupNorm(8) -> Mish, masked before and after."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(8, dim_out)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return F.mish(self.norm(self.conv(x * mask))) * mask


class ResnetBlock(nn.Module):
    """Two ``ConvBlock``s with the (Mish-activated, projected) time embedding added between them, plus a 1×1 skip."""

    def __init__(self, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.time_proj = nn.Linear(time_dim, dim_out)
        self.block1, self.block2 = ConvBlock(dim, dim_out), ConvBlock(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, t_emb: Tensor) -> Tensor:
        h = self.block1(x, mask) + self.time_proj(F.mish(t_emb))[..., None]
        return self.block2(h, mask) + self.res_conv(x * mask)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention (no q/k/v biases) and a GELU feed-forward layer ×4, over (B, T, dim)."""

    def __init__(self, dim: int, n_head: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        inner = n_head * head_dim
        self.n_head, self.head_dim = n_head, head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.out = nn.Linear(inner, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff_in, self.ff_out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_bias: Tensor) -> Tensor:
        """``attn_bias`` (B, 1, T, T) is added to the attention logits."""
        B, T, _ = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(B, T, self.n_head, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = sdpa(q, k, v, attn_mask=attn_bias)
        x = x + self.dropout(self.out(y.transpose(1, 2).reshape(B, T, -1)))
        return x + self.ff_out(self.dropout(F.gelu(self.ff_in(self.norm2(x)))))


class Level(nn.Module):
    """One U-Net level: a ResNet block, transformer blocks, then a resampling convolution (or none)."""

    def __init__(self, dim: int, dim_out: int, c: FlowConfig, time_dim: int, resample: nn.Module | None) -> None:
        super().__init__()
        self.resnet = ResnetBlock(dim, dim_out, time_dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim_out, c.estimator_heads, c.estimator_head_dim,
                                                     c.estimator_dropout) for _ in range(c.estimator_blocks))
        self.resample = resample

    def forward(self, x: Tensor, mask: Tensor, t_emb: Tensor) -> Tensor:
        x = self.resnet(x, mask, t_emb).transpose(1, 2)
        bias = (mask.transpose(1, 2) @ mask)[:, None]  # the released model's additive 0/1 mask
        for block in self.blocks:
            x = block(x, bias)
        return x.transpose(1, 2)


class Estimator(nn.Module):
    """The vector field v(x, mask, mu, t, spks, cond) -> (B, n_mels, T): a 1-D U-Net over [x; mu; spks; cond]."""

    def __init__(self, c: FlowConfig) -> None:
        super().__init__()
        chans, n_mels = c.estimator_channels, c.n_mels
        self.in_channels = 4 * n_mels
        time_dim = 4 * chans[0]
        self.time_in, self.time_out = nn.Linear(self.in_channels, time_dim), nn.Linear(time_dim, time_dim)
        self.down = nn.ModuleList()
        prev = self.in_channels
        for i, ch in enumerate(chans):
            last = i == len(chans) - 1
            down = nn.Conv1d(ch, ch, 3, padding=1) if last else nn.Conv1d(ch, ch, 3, 2, 1)
            self.down.append(Level(prev, ch, c, time_dim, down))
            prev = ch
        self.mid = nn.ModuleList(Level(chans[-1], chans[-1], c, time_dim, None) for _ in range(c.estimator_mid_levels))
        rev = chans[::-1] + (chans[0],)
        self.up = nn.ModuleList()
        for i in range(len(chans)):
            last = i == len(chans) - 1
            ch = rev[i + 1]
            up = nn.Conv1d(ch, ch, 3, padding=1) if last else nn.ConvTranspose1d(ch, ch, 4, 2, 1)
            self.up.append(Level(2 * rev[i], ch, c, time_dim, up))
        self.final_block = ConvBlock(chans[0], chans[0])
        self.final_proj = nn.Conv1d(chans[0], n_mels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (ReLU gain) weights and zero biases for every Conv1d and Linear, as the reference."""
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        """x, mu, cond (B, n_mels, T); mask (B, 1, T) float; t (B,) or (); spks (B, n_mels)."""
        t_emb = self.time_out(F.silu(self.time_in(timestep_embedding(t, self.in_channels).to(x.dtype))))
        x = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)
        skips, masks = [], [mask]
        for level in self.down:
            m = masks[-1]
            x = level(x, m, t_emb)
            skips.append(x)
            x = level.resample(x * m)
            masks.append(m[:, :, ::2])
        masks.pop()
        for level in self.mid:
            x = level(x, masks[-1], t_emb)
        for level in self.up:
            m, skip = masks.pop(), skips.pop()
            x = level(torch.cat([x[:, :, :skip.shape[-1]], skip], dim=1), m, t_emb)
            x = level.resample(x * m)
        x = self.final_block(x, m)
        return self.final_proj(x * m) * mask


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error of (B, C, F) tensors over the frames where the (B, 1, F) ``mask`` is 1 and every channel."""
    return ((pred - target) * mask).pow(2).sum() / (mask.sum() * pred.shape[1])


# --------------------------------------------------------------------------------------------------------- sampling


def time_grid(n_timesteps: int, scheduler: str = "cosine", device: torch.device | None = None) -> Tensor:
    """(n_timesteps + 1,) flow times from 0 to 1: evenly spaced, or 1 - cos(pi/2 · u) for "cosine"."""
    t = torch.linspace(0, 1, n_timesteps + 1, device=device)
    return 1 - torch.cos(t * 0.5 * torch.pi) if scheduler == "cosine" else t


def ode_solve(vector_field: Callable[[Tensor, Tensor], Tensor], x0: Tensor, t_span: Tensor,
              solver: str = "euler") -> Tensor:
    """Integrate dx/dt = vector_field(x, t) from x0 at t_span[0] over the grid ``t_span``; t is a 0-d tensor.

    "euler": x += dt · v(x, t), with t advanced by the step taken and the next step reaching the next grid time
    (the reference's ``solve_euler``); "midpoint": x += dt · v(x + dt/2 · v(x, t), t + dt/2) (second order).
    """
    if solver not in SOLVERS:
        raise ValueError(f"ode_solve: solver must be one of {SOLVERS}, got {solver!r}")
    if t_span.numel() < 2:
        raise ValueError(f"ode_solve: t_span needs at least 2 times, got {t_span.numel()}")
    x = x0
    if solver == "euler":
        t, dt = t_span[0], t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            x = x + dt * vector_field(x, t)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x
    for k in range(len(t_span) - 1):
        t, dt = t_span[k], t_span[k + 1] - t_span[k]
        x_mid = x + 0.5 * dt * vector_field(x, t)
        x = x + dt * vector_field(x_mid, t + 0.5 * dt)
    return x


def classifier_free_guidance(conditional: Tensor, unconditional: Tensor, rate: float) -> Tensor:
    """(1 + rate) · conditional - rate · unconditional (Voicebox's guidance, as the reference's ``solve_euler``)."""
    return (1.0 + rate) * conditional - rate * unconditional


# ------------------------------------------------------------------------------------------------------------ model


class FlowDecoder(nn.Module):
    """Speech tokens (B, T) -> mel (B, n_mels, F): encoder + length regulator give mu, flow matching the mel."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        c = self.config = config
        self.token_embed = nn.Embedding(c.vocab_size, c.token_dim)
        self.speaker_proj = nn.Linear(c.speaker_dim, c.n_mels)
        self.encoder = TokenEncoder(c)
        self.encoder_proj = nn.Linear(c.encoder_dim, c.n_mels)
        self.regulator = LengthRegulator(c.n_mels, c.regulator_layers)
        self.estimator = Estimator(c)

    @property
    def block_size(self) -> int:
        """Tokens per encoder attention block (streaming feeds whole blocks)."""
        return self.config.block_size

    @property
    def input_frame_rate(self) -> float:
        """Speech tokens per second."""
        return self.config.frame_rate

    def mel_frames(self, token_lengths: Tensor) -> Tensor:
        """Mel frames (int32) of token counts: int(n / frame_rate · sample_rate / hop) in float32, as the reference."""
        c = self.config
        return (token_lengths.to(torch.int32) / c.frame_rate * c.sample_rate / c.hop_length).int()

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"FlowDecoder: tokens must be (B, T), got shape {tuple(tokens.shape)}")
        if tokens.numel() and int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"FlowDecoder: token id {int(tokens.max())} is outside the vocabulary of "
                             f"{self.config.vocab_size} (FlowConfig field 'vocab_size')")

    def encode(self, tokens: Tensor, token_lengths: Tensor) -> Tensor:
        """Tokens (B, T) (padding may be negative) -> encoder states (B, T, encoder_dim)."""
        self._check_tokens(tokens)
        token_lengths = token_lengths.to(tokens.device)
        valid = lengths_to_mask(token_lengths, tokens.shape[1])
        x = self.token_embed(tokens.clamp(min=0)) * valid[..., None].to(self.token_embed.weight.dtype)
        return self.encoder(x, token_lengths)

    def condition(self, tokens: Tensor, token_lengths: Tensor, frames: Tensor) -> Tensor:
        """mu (B, n_mels, max(frames)): encoder states projected to mel width and stretched to ``frames``."""
        h = self.encoder_proj(self.encode(tokens, token_lengths))
        return self.regulator(h, frames.to(h.device)).transpose(1, 2)

    def speaker_condition(self, speaker: Tensor | None, batch: int) -> Tensor:
        """(B, n_mels): the projected unit-norm speaker embedding; None = zeros (GLM-4-Voice), i.e. the bias."""
        w = self.speaker_proj.weight
        if speaker is None:
            speaker = w.new_zeros(batch, self.config.speaker_dim)
        if speaker.shape != (batch, self.config.speaker_dim):
            raise ValueError(f"FlowDecoder: speaker must be (B={batch}, speaker_dim={self.config.speaker_dim}), "
                             f"got shape {tuple(speaker.shape)}")
        return self.speaker_proj(F.normalize(speaker.to(w), dim=1))

    def loss(self, tokens: Tensor, token_lengths: Tensor, mel: Tensor, mel_lengths: Tensor,
             speaker: Tensor | None = None, generator: torch.Generator | None = None, *, t: Tensor | None = None,
             noise: Tensor | None = None, prompt_frames: Tensor | None = None,
             keep: Tensor | None = None) -> dict[str, Tensor]:
        """Conditional flow-matching loss of mel (B, n_mels, ≥ max(mel_lengths)) given tokens (B, T).

        Random draws come from ``generator`` unless given: ``t`` (B,) flow times (after the scheduler), ``noise``
        x0 (B, n_mels, F), ``prompt_frames`` (B,) mel frames kept as the prompt condition, ``keep`` (B,) bool, False
        where all conditions are dropped. Returns "loss" (MSE per real frame and bin), "prior" (MSE of the encoder's
        ``mu`` against the mel, Grad-TTS / Matcha-TTS's encoder loss; not part of "loss", GLM-4-Voice trains without
        it), "t", "prompt_frames", "keep".
        """
        c = self.config
        B, device = tokens.shape[0], mel.device
        x1, mask, mel_lengths = self._target(mel, mel_lengths, "loss")
        n = x1.shape[-1]
        mu = self.condition(tokens, token_lengths, mel_lengths)
        spks = self.speaker_condition(speaker, B)

        def uniform() -> Tensor:
            return torch.rand(B, generator=generator, device=device)

        if prompt_frames is None:
            limit = (mel_lengths.double() * PROMPT_MAX_FRACTION).long()
            use = uniform() >= PROMPT_PROBABILITY
            prompt_frames = torch.where(use, (uniform() * (limit + 1)).long().clamp(max=limit), 0)
        prompt_frames = prompt_frames.to(device)
        cond = x1 * lengths_to_mask(prompt_frames, n)[:, None].to(x1.dtype)
        if t is None:
            t = uniform()
            if c.t_scheduler == "cosine":
                t = 1 - torch.cos(t * 0.5 * torch.pi)
        t = t.to(x1)
        if noise is None:
            noise = torch.randn(x1.shape, generator=generator, device=device, dtype=x1.dtype)
        if keep is None:
            keep = (uniform() > c.training_cfg_rate if c.training_cfg_rate > 0
                    else torch.ones(B, dtype=torch.bool, device=device))
        tt = t[:, None, None]
        y = (1 - (1 - c.sigma_min) * tt) * noise + tt * x1
        u = x1 - (1 - c.sigma_min) * noise
        k = keep.to(x1)
        pred = self.estimator(y, mask, mu * k[:, None, None], t, spks * k[:, None], cond * k[:, None, None])
        loss, prior = masked_mse(pred, u, mask), masked_mse(mu, x1, mask)
        return {"loss": loss, "prior": prior, "t": t, "prompt_frames": prompt_frames, "keep": keep}

    def prior_loss(self, tokens: Tensor, token_lengths: Tensor, mel: Tensor, mel_lengths: Tensor) -> Tensor:
        """The encoder loss alone ("prior" of ``loss``: MSE of ``mu`` against the mel over real frames and bins),
        without running the estimator: a warm start for the encoder and length regulator."""
        x1, mask, mel_lengths = self._target(mel, mel_lengths, "prior_loss")
        mu = self.condition(tokens, token_lengths, mel_lengths)
        return masked_mse(mu, x1, mask)

    def _target(self, mel: Tensor, mel_lengths: Tensor, caller: str) -> tuple[Tensor, Tensor, Tensor]:
        """The checked target mel cut to max(mel_lengths), its (B, 1, F) frame mask and the lengths on its device."""
        c = self.config
        if mel.dim() != 3 or mel.shape[1] != c.n_mels:
            raise ValueError(f"FlowDecoder.{caller}: mel must be (B, n_mels={c.n_mels}, F), got {tuple(mel.shape)}")
        mel_lengths = mel_lengths.to(mel.device)
        n = int(mel_lengths.max())
        if mel.shape[-1] < n:
            raise ValueError(f"FlowDecoder.{caller}: mel has {mel.shape[-1]} frames, mel_lengths asks for {n}")
        x1 = mel[..., :n]
        return x1, lengths_to_mask(mel_lengths, n)[:, None].to(x1.dtype), mel_lengths

    @torch.no_grad()
    def sample(self, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, n_timesteps: int = 10,
               cfg_rate: float | None = None, solver: str = "euler", temperature: float | None = None,
               noise: Tensor | None = None, start: float | None = None) -> Tensor:
        """Mel (B, n_mels, F) from noise by the flow ODE over ``n_timesteps`` steps of the time grid; ``noise`` x0 is
        scaled by ``temperature`` (None = the config's ``inference_temperature``; ``noise`` None: drawn with seed
        ``INFERENCE_SEED``); ``cfg_rate`` None = the config's;
        ``start`` (None = the config's ``inference_start``) > 0 starts at that flow time from noise and ``mu``, the
        grid rescaled to [start, 1]."""
        c = self.config
        rate = c.inference_cfg_rate if cfg_rate is None else cfg_rate
        t0 = c.inference_start if start is None else float(start)
        if not 0.0 <= t0 < 1.0:
            raise ValueError(f"FlowDecoder: start must lie in [0, 1), got {t0}")
        temperature = c.inference_temperature if temperature is None else temperature
        if noise is None:
            g = torch.Generator(device=mu.device).manual_seed(INFERENCE_SEED)
            noise = torch.randn(mu.shape, generator=g, device=mu.device, dtype=mu.dtype)
        if noise.shape != mu.shape:
            raise ValueError(f"FlowDecoder: noise must have mu's shape {tuple(mu.shape)}, got {tuple(noise.shape)}")
        x0 = noise.to(mu) * temperature
        x0 = (1 - (1 - c.sigma_min) * t0) * x0 + t0 * mu  # t0 = 0: the noise itself

        def field(x: Tensor, t: Tensor) -> Tensor:
            if rate <= 0:
                return self.estimator(x, mask, mu, t, spks, cond)
            def doubled(c: Tensor) -> Tensor:  # the conditional rows, then the same rows with the condition zeroed
                return torch.cat([c, torch.zeros_like(c)])

            both = self.estimator(torch.cat([x, x]), torch.cat([mask, mask]), doubled(mu), t, doubled(spks),
                                  doubled(cond))
            return classifier_free_guidance(*both.chunk(2), rate)

        return ode_solve(field, x0, t0 + (1 - t0) * time_grid(n_timesteps, c.t_scheduler, mu.device), solver)

    @torch.no_grad()
    def inference(self, tokens: Tensor, token_lengths: Tensor | None = None, prompt_tokens: Tensor | None = None,
                  prompt_mel: Tensor | None = None, speaker: Tensor | None = None, n_timesteps: int = 10,
                  cfg_rate: float | None = None, solver: str = "euler", temperature: float | None = None,
                  noise: Tensor | None = None, start: float | None = None) -> Tensor:
        """Mel (B, n_mels, F) of ``tokens`` (B, T), F = mel_frames(prompt + tokens) - prompt frames.

        ``prompt_tokens`` (B, P) and ``prompt_mel`` (B, n_mels, F_p) are the already spoken context (a previous
        chunk, or a voice prompt): the tokens are encoded after them, the prompt mel conditions the first F_p frames
        and those frames are dropped from the output. Frames past a row's count are zero. ``noise`` (B, n_mels,
        mel_frames(P + T)) replaces the seeded draw; ``cfg_rate`` None = the config's ``inference_cfg_rate``; ``start``
        None = its ``inference_start`` (``sample``).
        """
        B, device = tokens.shape[0], tokens.device
        if token_lengths is None:
            token_lengths = torch.full((B,), tokens.shape[1], dtype=torch.long, device=device)
        token_lengths = token_lengths.to(device)
        if prompt_tokens is not None and prompt_tokens.shape[1] > 0:
            if prompt_tokens.shape[0] != B:
                raise ValueError(f"FlowDecoder.inference: prompt_tokens has batch {prompt_tokens.shape[0]}, tokens {B}")
            tokens = torch.cat([prompt_tokens.to(tokens), tokens], dim=1)
            token_lengths = token_lengths + prompt_tokens.shape[1]
        frames = self.mel_frames(token_lengths)
        mu = self.condition(tokens, token_lengths, frames)
        n = mu.shape[-1]
        mask = lengths_to_mask(frames.to(device), n)[:, None].to(mu.dtype)
        cond = torch.zeros_like(mu)
        skip = 0
        if prompt_mel is not None and prompt_mel.shape[-1] > 0:
            skip = prompt_mel.shape[-1]
            if prompt_mel.shape[:2] != (B, self.config.n_mels) or skip > n:
                raise ValueError(f"FlowDecoder.inference: prompt_mel must be (B={B}, n_mels={self.config.n_mels}, "
                                 f"F_p <= {n}), got {tuple(prompt_mel.shape)}")
            cond[..., :skip] = prompt_mel.to(mu)
        mel = self.sample(mu, mask, self.speaker_condition(speaker, B), cond, n_timesteps, cfg_rate, solver,
                          temperature, noise, start)
        return (mel * mask)[..., skip:]
