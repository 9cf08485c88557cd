"""Whisper-style speech encoder with a pooling + VQ bottleneck, and the ASR decoder that supervises it.

Notable features (GLM-4-Voice §2.1, CosyVoice's supervised semantic tokens):
- parameter names follow Hugging Face's ``WhisperModel``, so a local Whisper folder loads through a plain prefix map;
- causal convolution stem (left padding only) and block-causal self-attention, so tokens can be produced while
  audio streams in: a frame attends to its own block and earlier blocks, never to later ones;
- average pooling (sum/count over valid frames only) and a vector quantiser in the middle of the encoder: the codes
  after layer ``vq_position`` are the speech tokens; ``encode_tokens`` stops there;
- an attention decoder (Whisper's) and a CTC head (``ctc_upsample`` labels per token frame) over the quantised output.
Attention runs on ``scaled_dot_product_attention`` so flash/efficient kernels are used on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_keomni.configs import SpeechTokenizerConfig
from lit_keomni.nn.attention import sdpa
from lit_keomni.nn.quantizer import VectorQuantizer, VQOutput


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's fixed sinusoidal position table (sin half, then cos half)."""
    log_inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-log_inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, T) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def attention_mask(valid: Tensor, block: int | None) -> Tensor:
    """(B, T) valid frames -> (B, 1, T, T) bool mask for SDPA (True = may attend).

    Keys must be valid; with ``block`` set, a query in block b sees keys in blocks <= b only (block-causal).
    Position 0 is always a valid key of block 0, so no row is fully masked.
    """
    mask = valid[:, None, None, :]
    if block is not None:
        pos = torch.arange(valid.shape[1], device=valid.device) // block
        mask = mask & (pos[None, :] <= pos[:, None])[None, None]
    return mask


class Attention(nn.Module):
    """Multi-head attention with Whisper's projection names (``k_proj`` has no bias)."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``x`` as (B, heads, T, head_dim) each."""
        B, T, _ = x.shape
        return (self.k_proj(x).view(B, T, self.n_head, -1).transpose(1, 2),
                self.v_proj(x).view(B, T, self.n_head, -1).transpose(1, 2))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None, causal: bool = False,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Self-attention (``context`` None) or cross-attention; ``kv`` gives the keys and values ready-made (a decoding
        cache: then ``causal`` is not applied, the cache holds only what the queries may see)."""
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)
        k, v = kv if kv is not None else self.heads(x if context is None else context)
        p = self.dropout if self.training else 0.0
        causal = causal and mask is None and kv is None
        y = sdpa(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_head: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = Attention(d_model, n_head, dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), mask=mask))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.final_layer_norm(x)))))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, n_head: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = Attention(d_model, n_head, dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = Attention(d_model, n_head, dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), causal=True))
        x = x + self.dropout(self.encoder_attn(self.encoder_attn_layer_norm(x), context=memory, mask=memory_mask))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.final_layer_norm(x)))))

    def step(self, x: Tensor, cache: dict[str, Tensor], memory_mask: Tensor) -> Tensor:
        """One new position ``x`` (B, 1, D) given ``cache``: the self-attention keys/values so far (extended here) and
        the cross-attention keys/values of the memory."""
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.heads(h)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        x = x + self.self_attn(h, kv=(k, v))
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), mask=memory_mask, kv=(cache["mk"], cache["mv"]))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class _Table(nn.Module):
    """A fixed position table stored under ``weight`` (Whisper's name), not trained."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", table)


@dataclass
class EncoderOutput:
    hidden: Tensor
    """(B, T', D) final encoder states at the token rate."""
    lengths: Tensor
    """(B,) valid token frames."""
    codes: Tensor | None
    """(B, T') speech tokens (None without VQ)."""
    vq: VQOutput | None
    pre_vq: Tensor
    """(B, T', D) pooled features before quantisation (k-means initialisation reads these)."""


class SpeechEncoder(nn.Module):
    """Whisper encoder + average pooling + VQ after ``vq_position`` layers."""

    def __init__(self, config: SpeechTokenizerConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.conv1 = nn.Conv1d(c.n_mels, c.d_model, kernel_size=3)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=2)
        self.embed_positions = _Table(sinusoids(c.max_source_positions, c.d_model))
        self.layers = nn.ModuleList(EncoderLayer(c.d_model, c.n_head, c.ffn_dim, c.dropout) for _ in range(c.encoder_layers))
        self.layer_norm = nn.LayerNorm(c.d_model)
        self.quantizer = (
            VectorQuantizer(c.d_model, c.codebook_size, decay=c.vq_decay, commitment=c.commitment,
                            restart_threshold=c.restart_threshold)
            if c.vq else None
        )
        self.use_vq = c.vq
        """Training may run without the bottleneck first (ASR warm-up) and switch it on later."""
        if c.post_vq_positions:  # GLM-4-Voice's embed_positions2: a copy of the encoder's table, then trained
            rows = -(-c.max_source_positions // c.pool)
            self.post_vq_positions = nn.Embedding(rows, c.d_model)
            with torch.no_grad():
                self.post_vq_positions.weight.copy_(self.embed_positions.weight[:rows])
        else:
            self.post_vq_positions = None

    def _stem(self, mel: Tensor, mel_lengths: Tensor) -> tuple[Tensor, Tensor]:
        # Causal: pad 2 frames on the left only, so output t depends on inputs <= its own position.
        pad = (2, 0) if self.config.causal_conv else (1, 1)
        x = F.gelu(self.conv1(F.pad(mel, pad)))
        x = F.gelu(self.conv2(F.pad(x, pad)))
        x = x.transpose(1, 2)
        T = x.shape[1]
        if T > self.config.max_source_positions:
            raise ValueError(
                f"audio of {T / 50:.1f} s exceeds the encoder's {self.config.max_source_positions / 50:.0f} s "
                f"(max_source_positions={self.config.max_source_positions})"
            )
        return x + self.embed_positions.weight[:T].to(x.dtype), (mel_lengths + 1) // 2

    def _pool(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        k = self.config.pool
        if k == 1:
            return x, valid
        B, T, D = x.shape
        pad = (-T) % k
        v = F.pad(valid.to(x.dtype), (0, pad))
        count = v.view(B, -1, k).sum(2)
        if self.config.pool_mode == "window":  # every frame of the window, padding too (GLM-4-Voice's AvgPool1d)
            return F.pad(x, (0, 0, 0, pad)).view(B, -1, k, D).mean(2), count > 0
        total = F.pad(x * valid[..., None], (0, 0, 0, pad)).view(B, -1, k, D).sum(2)
        return total / count.clamp(min=1)[..., None], count > 0

    def forward(self, mel: Tensor, mel_lengths: Tensor, *, stop_at_tokens: bool = False) -> EncoderOutput:
        c = self.config
        x, lengths = self._stem(mel, mel_lengths)
        valid = lengths_to_mask(lengths, x.shape[1])
        mask = attention_mask(valid, c.block_frames)
        for layer in self.layers[: c.vq_position]:
            x = layer(x, mask)
        x, valid = self._pool(x, valid)
        lengths = valid.sum(1)
        pre_vq = x
        vq_out = None
        if self.quantizer is not None and self.use_vq:
            vq_out = self.quantizer(x, valid)
            x = vq_out.quantized
        codes = vq_out.codes if vq_out is not None else None
        if stop_at_tokens:
            return EncoderOutput(x, lengths, codes, vq_out, pre_vq)
        return EncoderOutput(self._above(x, valid), lengths, codes, vq_out, pre_vq)

    def _above(self, x: Tensor, valid: Tensor) -> Tensor:
        """Layers above the bottleneck, at the token rate, then the final norm."""
        c = self.config
        if self.post_vq_positions is not None:
            if x.shape[1] > self.post_vq_positions.num_embeddings:
                raise ValueError(f"{x.shape[1]} token frames exceed the {self.post_vq_positions.num_embeddings} "
                                 f"post-VQ positions (max_source_positions={c.max_source_positions})")
            x = x + self.post_vq_positions.weight[: x.shape[1]].to(x.dtype)
        mask = attention_mask(valid, None if c.block_frames is None else c.block_frames // c.pool)
        for layer in self.layers[c.vq_position :]:
            x = layer(x, mask)
        return self.layer_norm(x)

    def from_codes(self, codes: Tensor, lengths: Tensor) -> Tensor:
        """Encoder states from speech tokens (B, T'): codebook lookup, then the layers above the bottleneck."""
        if self.quantizer is None:
            raise ValueError("this speech tokenizer has no VQ: speech tokens cannot be decoded")
        valid = lengths_to_mask(lengths, codes.shape[1])
        return self._above(self.quantizer.decode(codes.clamp(0, self.config.codebook_size - 1)), valid)

    def frames_50hz(self, mel: Tensor, mel_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Continuous encoder states at 50 Hz (B, T, D) and their lengths, for a speech adapter (KE-Omni).

        With ``pool == 1`` (a plain Whisper encoder) the whole encoder runs, final norm included, as Whisper's output;
        otherwise the stem and the layers below the pooling (``layers[:vq_position]``), the last states at 50 Hz.
        """
        c = self.config
        x, lengths = self._stem(mel, mel_lengths)
        valid = lengths_to_mask(lengths, x.shape[1])
        mask = attention_mask(valid, c.block_frames)
        if c.pool == 1:
            for layer in self.layers:
                x = layer(x, mask)
            return self.layer_norm(x), lengths
        for layer in self.layers[: c.vq_position]:
            x = layer(x, mask)
        return x, lengths


class ASRDecoder(nn.Module):
    """Whisper's decoder: learned positions, causal self-attention, cross-attention; output tied to the embedding."""

    def __init__(self, config: SpeechTokenizerConfig) -> None:
        super().__init__()
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.embed_positions = nn.Embedding(c.max_target_positions, c.d_model)
        self.layers = nn.ModuleList(DecoderLayer(c.d_model, c.n_head, c.ffn_dim, c.dropout) for _ in range(c.decoder_layers))
        self.layer_norm = nn.LayerNorm(c.d_model)
        # Whisper's init: the tied output layer reads these rows, so unit-variance rows would start with huge logits.
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        nn.init.normal_(self.embed_positions.weight, std=0.02)

    def forward(self, tokens: Tensor, memory: Tensor, memory_lengths: Tensor) -> Tensor:
        L = tokens.shape[1]
        if L > self.embed_positions.num_embeddings:
            raise ValueError(f"transcript of {L} tokens exceeds max_target_positions={self.embed_positions.num_embeddings}")
        x = self.embed_tokens(tokens) + self.embed_positions.weight[:L]
        memory_mask = lengths_to_mask(memory_lengths, memory.shape[1])[:, None, None, :]
        for layer in self.layers:
            x = layer(x, memory, memory_mask)
        return self.layer_norm(x) @ self.embed_tokens.weight.T

    def start(self, memory: Tensor) -> list[dict[str, Tensor]]:
        """An empty decoding cache per layer, holding the cross-attention keys/values of ``memory``."""
        caches = []
        for layer in self.layers:
            mk, mv = layer.encoder_attn.heads(memory)
            caches.append({"mk": mk, "mv": mv})
        return caches

    def step(self, tokens: Tensor, position: int, caches: list[dict[str, Tensor]], memory_lengths: Tensor,
             memory_len: int) -> Tensor:
        """Logits (B, V) of the position after ``tokens`` (B, 1) at ``position``, extending ``caches``; equals the
        last row of ``forward`` on the whole prefix."""
        if position >= self.embed_positions.num_embeddings:
            raise ValueError(f"transcript of {position + 1} tokens exceeds max_target_positions={self.embed_positions.num_embeddings}")
        x = self.embed_tokens(tokens) + self.embed_positions.weight[position: position + 1]
        memory_mask = lengths_to_mask(memory_lengths, memory_len)[:, None, None, :]
        for layer, cache in zip(self.layers, caches):
            x = layer.step(x, cache, memory_mask)
        return (self.layer_norm(x) @ self.embed_tokens.weight.T)[:, -1]


class SpeechTokenizerModel(nn.Module):
    """Encoder (+ pooling, VQ) and ASR decoder + CTC head: the stage-1 network, free of any training code."""

    def __init__(self, config: SpeechTokenizerConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("SpeechTokenizerConfig.vocab_size must be set (from the text tokenizer) before building")
        self.config = config
        self.encoder = SpeechEncoder(config)
        self.decoder = ASRDecoder(config)
        self.ctc_head = nn.Linear(config.d_model, config.vocab_size * config.ctc_upsample)

    def forward(self, mel: Tensor, mel_lengths: Tensor, tokens: Tensor) -> tuple[Tensor, EncoderOutput]:
        enc = self.encoder(mel, mel_lengths)
        return self.decoder(tokens, enc.hidden, enc.lengths), enc

    def ctc_logits(self, enc: EncoderOutput) -> tuple[Tensor, Tensor]:
        """(B, T'·u, V) CTC logits and their lengths."""
        B, T, _ = enc.hidden.shape
        u = self.config.ctc_upsample
        return self.ctc_head(enc.hidden).view(B, T * u, -1), enc.lengths * u

    @torch.no_grad()
    def encode_tokens(self, mel: Tensor, mel_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Speech tokens (B, T') and their lengths; runs only the layers below the bottleneck."""
        if self.encoder.quantizer is None:
            raise ValueError("this speech tokenizer was built without a VQ (vq: false): it has no speech tokens")
        enc = self.encoder(mel, mel_lengths, stop_at_tokens=True)
        return enc.codes, enc.lengths

    @torch.no_grad()
    def transcribe(self, mel: Tensor, mel_lengths: Tensor, prefix: list[int], eos_id: int, max_tokens: int = 200) -> list[list[int]]:
        """Greedy attention decoding of audio; returns the token ids after ``prefix`` up to (excluding) ``eos_id``."""
        enc = self.encoder(mel, mel_lengths)
        return self.greedy_decode(enc.hidden, enc.lengths, prefix, eos_id, max_tokens)

    @torch.no_grad()
    def transcribe_codes(self, codes: Tensor, lengths: Tensor, prefix: list[int], eos_id: int, max_tokens: int = 200) -> list[list[int]]:
        """ASR of speech tokens (e.g. generated by the text-to-token model): the content-preservation check."""
        return self.greedy_decode(self.encoder.from_codes(codes, lengths), lengths, prefix, eos_id, max_tokens)

    @torch.no_grad()
    def greedy_decode(self, memory: Tensor, memory_lengths: Tensor, prefix: list[int], eos_id: int, max_tokens: int = 200) -> list[list[int]]:
        B = memory.shape[0]
        tokens = torch.tensor(prefix, device=memory.device).repeat(B, 1)
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        limit = min(max_tokens, self.config.max_target_positions - len(prefix))
        caches = self.decoder.start(memory)
        for pos in range(len(prefix) - 1):  # the prefix but its last token enters the cache
            self.decoder.step(tokens[:, pos: pos + 1], pos, caches, memory_lengths, memory.shape[1])
        for _ in range(limit):
            pos = tokens.shape[1] - 1
            nxt = self.decoder.step(tokens[:, -1:], pos, caches, memory_lengths, memory.shape[1]).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if done.all():
                break
        out = []
        for row in tokens[:, len(prefix) :].tolist():
            out.append(row[: row.index(eos_id)] if eos_id in row else row)
        return out

    @torch.no_grad()
    def ctc_greedy(self, enc: EncoderOutput, blank: int) -> list[list[int]]:
        logits, lengths = self.ctc_logits(enc)
        best = logits.argmax(-1)
        out = []
        for row, n in zip(best.tolist(), lengths.tolist()):
            ids, prev = [], None
            for t in row[:n]:
                if t != prev and t != blank:
                    ids.append(t)
                prev = t
            out.append(ids)
        return out
