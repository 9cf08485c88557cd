"""Decoder-only LM of the Llama/GLM family, written once for every stage.

Notable features:
- RMSNorm, SwiGLU, grouped-query attention on ``scaled_dot_product_attention``: ``is_causal`` whenever no explicit
  mask is needed (plain causal training, prefill from position 0), so flash kernels run on CUDA;
- rotary embeddings in Hugging Face Llama's ``rotate_half`` convention (two halves of each head), so HF Llama weights
  load without a permutation; configurable base, rotated fraction (GLM-4 rotates the first half of each head) and
  Llama-3.1 "llama3" frequency scaling. Frequencies are computed from the config on first use per device, never stored
  in the state dict, so meta-device construction + ``to_empty`` + ``load_state_dict`` is enough;
- masks: causal, bidirectional (``causal=False``), key padding (``attention_mask``; left-padded rows get positions that
  start at 0 at their first real token), and document masking for packed sequences (``document_ids``: attention stays
  inside a document and positions restart at each document);
- a KV cache for generation (``set_kv_cache``; ``input_pos`` are the cache slots written), ``inputs_embeds`` so later
  stages can feed speech-adapter features, ``return_hidden`` for heads on the last hidden states, and
  ``resize_token_embeddings`` to add speech tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_keomni.configs import TransformerConfig
from lit_keomni.nn.attention import sdpa
from lit_keomni.nn.losses import chunked_cross_entropy, token_cross_entropy

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5 on.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back (as HF Llama), with a learnt scale."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(config: TransformerConfig, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies (rotary_dim // 2,) in float32, with Llama-3.1 scaling when ``config.rope_scaling`` is set."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is not None:  # "llama3": long wavelengths stretched by `factor`, short kept, a smooth ramp in between
        factor, low, high, old_len = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                                      s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.to(device)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, H, D); cos/sin (B or 1, T, 1, rotary_dim): rotate the first rotary_dim dims, pass the rest through."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def document_positions(document_ids: Tensor) -> Tensor:
    """(B, T) document ids of packed sequences -> positions restarting at 0 where the id changes."""
    T = document_ids.shape[1]
    idx = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    start = torch.ones_like(document_ids, dtype=torch.bool)
    start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.cummax(torch.where(start, idx, 0), dim=1).values


class KVCache(nn.Module):
    """Per-layer key/value buffers (B, n_kv_head, max_seq_length, head_dim); ``update`` writes at the given slots."""

    def __init__(self, batch_size: int, n_kv_head: int, max_seq_length: int, head_dim: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, slots: Tensor, k: Tensor, v: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, D) at ``slots`` ((T,) or (B, T)); return the first ``length`` slots of the cache."""
        B = k.shape[0]
        ck, cv = self.k[:B], self.v[:B]
        if slots.dim() == 1:
            ck.index_copy_(2, slots, k.to(ck.dtype))
            cv.index_copy_(2, slots, v.to(cv.dtype))
        else:
            idx = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            ck.scatter_(2, idx, k.to(ck.dtype))
            cv.scatter_(2, idx, v.to(cv.dtype))
        return ck[:, :, :length], cv[:, :, :length]


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, is_causal: bool,
                slots: Tensor | None = None, kv_length: int = 0) -> Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_head, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if slots is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos with a KV cache requested, but set_kv_cache() was not called")
            k, v = self.kv_cache.update(slots, k, v, kv_length)
        gqa = self.n_kv_head != self.n_head  # each kv head serves n_head // n_kv_head query heads
        if gqa and _SDPA_GQA and (mask is None or q.device.type == "cpu"):
            # SDPA reads the shared kv heads in place: no copy of k, v (the whole cache when decoding). CUDA's flash
            # kernel takes enable_gqa but no mask, its masked kernels fall back to math with it: copy there instead.
            y = sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        else:
            if gqa:
                k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            y = sdpa(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer block (attention + MLP): the unit of FSDP sharding and activation checkpointing."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        # GLM-4-0414 normalises each branch's output too ("sandwich"); Identity keeps the other models' state dicts.
        self.attn_post_norm = RMSNorm(config.n_embd, config.norm_eps) if config.sandwich_norm else nn.Identity()
        self.mlp_post_norm = RMSNorm(config.n_embd, config.norm_eps) if config.sandwich_norm else nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, is_causal: bool,
                slots: Tensor | None = None, kv_length: int = 0) -> Tensor:
        x = x + self.attn_post_norm(self.attn(self.attn_norm(x), cos, sin, mask, is_causal, slots, kv_length))
        return x + self.mlp_post_norm(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._inv_freq: dict[torch.device, Tensor] = {}
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------ init

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, residual projections (o_proj, down_proj) scaled by 1/sqrt(2 n_layer), zero biases,
        unit norms. Works after meta-device construction: ``model.to_empty(device=d); model.reset_parameters()``."""
        if self.config.tie_embeddings:  # ``to_empty`` may have replaced the shared parameter
            self.lm_head.weight = self.embed.weight
        if self.embed.weight.is_meta:
            return
        std = 0.02
        nn.init.normal_(self.embed.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            for name, lin in (*block.attn.named_children(), *block.mlp.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                scaled = name in ("o_proj", "down_proj")
                nn.init.normal_(lin.weight, std=std / math.sqrt(2 * self.config.n_layer) if scaled else std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            for norm in (block.attn_norm, block.mlp_norm, block.attn_post_norm, block.mlp_post_norm):
                if isinstance(norm, RMSNorm):
                    norm.reset_parameters()
        self.norm.reset_parameters()

    init_weights = reset_parameters

    # ------------------------------------------------------------------------------------------------ KV cache

    def set_kv_cache(self, batch_size: int, max_seq_length: int, device: torch.device | None = None,
                     dtype: torch.dtype | None = None) -> None:
        """Allocate a KV cache in every block (default: the embedding's device and dtype)."""
        c = self.config
        if not c.causal:
            raise ValueError("TransformerConfig: field 'causal' is False; a KV cache serves causal decoding only")
        if max_seq_length > c.block_size:
            raise ValueError(f"set_kv_cache: max_seq_length={max_seq_length} exceeds TransformerConfig field "
                             f"'block_size' ({c.block_size})")
        device = device if device is not None else self.embed.weight.device
        dtype = dtype if dtype is not None else self.embed.weight.dtype
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, c.n_kv_head, max_seq_length, c.head_dim, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    # ------------------------------------------------------------------------------------------------ vocabulary

    @torch.no_grad()
    def resize_token_embeddings(self, new_vocab: int) -> None:
        """Grow the vocabulary to ``new_vocab`` real tokens (e.g. adding speech tokens): every existing row of the
        embedding and the head is kept; new rows start as the mean of the existing real rows; padding rows are zero."""
        old = self.config.vocab_size
        if new_vocab < old:
            raise ValueError(f"resize_token_embeddings: new_vocab={new_vocab} is smaller than TransformerConfig field "
                             f"'vocab_size' ({old}); shrinking would drop trained rows")
        self.config = self.config.replace(vocab_size=new_vocab)
        padded = self.config.padded_vocab_size

        def grown(w: Tensor) -> Tensor:
            out = w.new_zeros(padded, w.shape[1])
            out[:old] = w[:old]
            out[old:new_vocab] = w[:old].float().mean(0).to(w.dtype)
            return out

        embed = nn.Embedding(padded, self.config.n_embd, device=self.embed.weight.device, dtype=self.embed.weight.dtype)
        embed.weight.copy_(grown(self.embed.weight))
        head_w = self.lm_head.weight
        self.embed = embed
        if self.config.tie_embeddings:
            self.lm_head = nn.Linear(self.config.n_embd, padded, bias=False, device=head_w.device, dtype=head_w.dtype)
            self.lm_head.weight = self.embed.weight
        else:
            self.lm_head = nn.Linear(self.config.n_embd, padded, bias=False, device=head_w.device, dtype=head_w.dtype)
            self.lm_head.weight.copy_(grown(head_w))

    # ------------------------------------------------------------------------------------------------ forward

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (T,) or (B, T) -> cos, sin (B or 1, T, 1, rotary_dim) in ``dtype`` (computed in float32)."""
        device = positions.device
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.config, device)
        pos = positions if positions.dim() == 2 else positions[None]
        freqs = pos[..., None].float() * self._inv_freq[device]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, idx: Tensor | None = None, *, inputs_embeds: Tensor | None = None, input_pos: Tensor | None = None,
                attention_mask: Tensor | None = None, document_ids: Tensor | None = None,
                return_hidden: bool = False, targets: Tensor | None = None, loss_chunk: int = 0) -> Any:
        """Logits (B, T, padded_vocab_size), or the last hidden states after the final norm with ``return_hidden``,
        or with ``targets`` (B, T) the per-token cross-entropy (float32, 0 at ``-100``) and the argmax predictions,
        computed ``loss_chunk`` tokens at a time without the full logits (0 = from the full logits; see
        ``nn.losses``). The loss is part of ``forward`` so that a sharded model gathers its output layer for it.

        Args:
            idx: Token ids (B, T); or give ``inputs_embeds`` (B, T, n_embd) instead (e.g. speech-adapter features).
            input_pos: Positions (T,) or (B, T) of the inputs. With a KV cache (``set_kv_cache``) these are the cache
                slots written and the causal rule (a query at slot p sees slots <= p); without a cache, or with one but
                no ``input_pos``, the call is uncached and ``input_pos`` are only the rotary positions.
            attention_mask: (B, S) 1 = real token, 0 = padding; S = T, or with a KV cache the slots so far (at least
                max(input_pos) + 1). Padding keys are masked; rotary positions count real tokens only, so each row's
                first real token has position 0 (left padding for generation).
            document_ids: (B, T) ids of packed documents (no KV cache): attention stays inside a document and
                positions restart at each document.
        """
        c = self.config
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("Transformer.forward: give exactly one of idx and inputs_embeds")
        x = self.embed(idx) if idx is not None else inputs_embeds
        B, T = x.shape[:2]
        device = x.device
        cached = self.blocks[0].attn.kv_cache is not None and input_pos is not None
        if document_ids is not None and cached:
            raise ValueError("Transformer.forward: document_ids are for packed training sequences, not KV-cache decoding")
        if not cached and T > c.block_size:
            raise ValueError(f"Transformer.forward: sequence of {T} tokens exceeds TransformerConfig field "
                             f"'block_size' ({c.block_size})")

        # Query slots (cache) or indices (no cache), and the number of keys attended to.
        if cached:
            slots = input_pos.to(device=device, dtype=torch.long)
            kv_length = int(slots.max()) + 1
            if kv_length > self.blocks[0].attn.kv_cache.k.shape[2]:
                raise ValueError(f"Transformer.forward: input_pos up to {kv_length - 1} exceeds the KV cache length "
                                 f"{self.blocks[0].attn.kv_cache.k.shape[2]} (set_kv_cache max_seq_length)")
            q_idx = slots
        else:
            slots, kv_length = None, T
            q_idx = torch.arange(T, device=device)

        # Rotary positions.
        if attention_mask is not None:
            valid = attention_mask.to(device=device).bool()
            if valid.shape[1] < kv_length:
                raise ValueError(f"Transformer.forward: attention_mask covers {valid.shape[1]} positions, "
                                 f"keys need {kv_length}")
            valid = valid[:, :kv_length]
            counted = (valid.long().cumsum(-1) - 1).clamp(min=0)
            positions = counted.gather(1, q_idx.expand(B, -1) if q_idx.dim() == 1 else q_idx)
        elif document_ids is not None:
            positions = document_positions(document_ids.to(device))
        elif input_pos is not None:
            positions = input_pos.to(device)
        else:
            positions = q_idx
        cos, sin = self.rope(positions, x.dtype)

        # Attention mask: None (+ is_causal) when SDPA's own rule suffices, else a bool (B or 1, 1, T, kv_length).
        mask, is_causal = None, False
        if cached:
            q_full = q_idx if q_idx.dim() == 2 else q_idx[None]
            if attention_mask is None and document_ids is None:
                if T == kv_length and q_idx.dim() == 1:
                    is_causal = True  # prefill from slot 0: SDPA's top-left causal rule is exact
                elif T > 1 or q_idx.dim() == 2:
                    mask = (torch.arange(kv_length, device=device) <= q_full[..., None])[:, None]
            else:
                mask = (torch.arange(kv_length, device=device) <= q_full[..., None])[:, None]
        elif c.causal and attention_mask is None and document_ids is None:
            is_causal = True
        elif c.causal:
            mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
        if document_ids is not None:
            doc = document_ids.to(device)
            same = (doc[:, :, None] == doc[:, None, :])[:, None]
            mask = same if mask is None else mask & same
        if attention_mask is not None:
            keys = valid[:, None, None, :]
            mask = keys if mask is None else mask & keys
            # A query on a padding position may have no valid key; let it see itself so SDPA yields no NaN.
            diag = torch.arange(kv_length, device=device) == (q_idx if q_idx.dim() == 2 else q_idx[None])[..., None]
            mask = mask | diag[:, None]

        for block in self.blocks:
            x = block(x, cos, sin, mask, is_causal, slots, kv_length)
        x = self.norm(x)
        if targets is not None:
            if loss_chunk:
                return chunked_cross_entropy(x, self.lm_head.weight, targets, loss_chunk)
            return token_cross_entropy(self.lm_head(x), targets)
        return x if return_hidden else self.lm_head(x)
