"""THUDM's ChatGLM remote-code layout (``model_type: chatglm``) of GLM-4-9B and glm-4-voice-9b <-> our Transformer.

The reference is ``modeling_chatglm.py`` / ``configuration_chatglm.py`` shipped with glm-4-voice-9b (golden files in
tests/golden/chatglm/, made by it with tests/golden/make_chatglm.py). Its network is ours with other names and fusions:

- ``self_attention.query_key_value`` holds q, k, v rows stacked (heads * kv_channels, then 2 x groups * kv_channels),
  with a bias when ``add_qkv_bias``; ``multi_query_group_num`` KV groups when ``multi_query_attention``;
- ``mlp.dense_h_to_4h`` holds the SwiGLU gate rows then the up rows, ``dense_4h_to_h`` is the down projection;
- RoPE on the first half of each head in interleaved pairs (as transformers' Glm: the same q/k row permutation,
  ``hf_lm.rope_pairs_to_halves``), base 10,000 x ``rope_ratio``;
- RMSNorm with ``layernorm_epsilon``, a final norm (``post_layer_norm``), an untied ``output_layer``, all
  ``padded_vocab_size`` rows real (glm-4-voice-9b's 168,960 hold the 16,384 audio tokens too).
The persistent buffer ``transformer.rotary_pos_emb.inv_freq`` (base 10,000, unused by the forward) is dropped on load
and written back on save so the reference loads our folders without a missing-key warning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lit_keomni.configs import TransformerConfig
from lit_keomni.layouts.hf_lm import check_shapes, expected_shapes, rename, rope_halves_to_pairs, rope_pairs_to_halves

ARCHITECTURES = ("ChatGLMForConditionalGeneration", "ChatGLMModel")
AUTO_MAP = {  # as THUDM's released GLM-4 config.json files name the remote code
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}
_LAYER = "transformer.encoder.layers.{}."
WEIGHT_MAP = (
    ("embed.weight", "transformer.embedding.word_embeddings.weight"),
    ("blocks.{}.attn_norm.weight", _LAYER + "input_layernorm.weight"),
    ("blocks.{}.attn.o_proj.weight", _LAYER + "self_attention.dense.weight"),
    ("blocks.{}.mlp_norm.weight", _LAYER + "post_attention_layernorm.weight"),
    ("blocks.{}.mlp.down_proj.weight", _LAYER + "mlp.dense_4h_to_h.weight"),
    ("norm.weight", "transformer.encoder.final_layernorm.weight"),
    ("lm_head.weight", "transformer.output_layer.weight"),
)
"""Our name <-> ChatGLM's for the unfused weights; q/k/v and gate/up are (un)fused by ``to_chatglm``/``from_chatglm``."""
_INV_FREQ = "transformer.rotary_pos_emb.inv_freq"

_FIXED = {  # ChatGLM options our network has one value of (their released value)
    "rmsnorm": True, "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
    "add_bias_linear": False, "tie_word_embeddings": False,
}
_DEFAULTS = {  # the remaining ChatGLMConfig fields, written as the reference's save_pretrained writes them
    "hidden_dropout": 0.0, "classifier_dropout": None, "attention_dropout": 0.0, "bias_dropout_fusion": True,
    "apply_query_key_layer_scaling": True, "attention_softmax_in_fp32": True, "fp32_residual_connection": False,
    "original_rope": True, "use_cache": True,
}


def config_from_chatglm(cfg: Mapping[str, Any], *, source: str = "config.json") -> TransformerConfig:
    """A ChatGLM ``config.json`` -> ``TransformerConfig`` (all ``padded_vocab_size`` rows are vocabulary); an option
    the reference has but our network not raises naming the field."""
    if cfg.get("model_type") != "chatglm":
        raise ValueError(f"{source}: field 'model_type' is {cfg.get('model_type')!r}, expected 'chatglm'")
    for field in ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
                  "num_attention_heads", "seq_length", "layernorm_epsilon"):
        if field not in cfg:
            raise ValueError(f"{source}: field '{field}' missing")
    for field, want in _FIXED.items():
        if cfg.get(field, want) != want:
            raise ValueError(f"{source}: field '{field}' is {cfg[field]!r}; only {want!r} is supported")
    n_head, hd = cfg["num_attention_heads"], cfg["kv_channels"]
    if n_head * hd != cfg["hidden_size"]:
        raise ValueError(f"{source}: field 'kv_channels' is {hd}, but hidden_size / num_attention_heads = "
                         f"{cfg['hidden_size'] / n_head}; a separate head width is not supported")
    rows = cfg["padded_vocab_size"]
    return TransformerConfig(
        vocab_size=rows, padded_vocab_multiple=math.gcd(rows, 64), n_layer=cfg["num_layers"],
        n_embd=cfg["hidden_size"], n_head=n_head,
        n_kv_head=cfg.get("multi_query_group_num", 1) if cfg.get("multi_query_attention") else n_head,
        intermediate_size=cfg["ffn_hidden_size"], rope_base=10000.0 * cfg.get("rope_ratio", 1),
        rotary_dim_fraction=0.5, norm_eps=cfg["layernorm_epsilon"], bias=bool(cfg.get("add_qkv_bias", False)),
        tie_embeddings=False, block_size=cfg["seq_length"],
    )


def chatglm_config_json(config: TransformerConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` the remote code reads for ``config`` (``auto_map`` as released; the remote code itself is
    not ours to ship: ``release`` copies it from the folder the weights came from)."""
    _check_expressible(config, "chatglm_config_json")
    mqa = config.n_kv_head != config.n_head
    return {
        "architectures": ["ChatGLMForConditionalGeneration"], "auto_map": dict(AUTO_MAP), "model_type": "chatglm",
        "num_layers": config.n_layer, "padded_vocab_size": config.padded_vocab_size,
        "vocab_size": config.padded_vocab_size, "hidden_size": config.n_embd,
        "ffn_hidden_size": config.intermediate_size, "kv_channels": config.head_dim,
        "num_attention_heads": config.n_head, "seq_length": config.block_size,
        "layernorm_epsilon": config.norm_eps, "add_qkv_bias": config.bias, "multi_query_attention": mqa,
        "multi_query_group_num": config.n_kv_head if mqa else 1,
        "rope_ratio": _rope_ratio(config.rope_base), **_FIXED, **_DEFAULTS,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _rope_ratio(base: float) -> float | int:
    ratio = base / 10000.0
    return int(ratio) if ratio == int(ratio) else ratio


def _check_expressible(config: TransformerConfig, source: str) -> None:
    rd = config.head_dim // 2
    for field, ok, want in (("rotary_dim_fraction", config.rotary_dim == rd, 0.5), ("tie_embeddings",
                            not config.tie_embeddings, False), ("sandwich_norm", not config.sandwich_norm, False),
                            ("rope_scaling", config.rope_scaling is None, None), ("causal", config.causal, True)):
        if not ok:
            raise ValueError(f"{source}: TransformerConfig field '{field}' is {getattr(config, field)}; the ChatGLM "
                             f"layout needs {want}")


def to_chatglm(state: Mapping[str, Tensor], config: TransformerConfig, *,
               source: str = "Transformer state dict") -> dict[str, Tensor]:
    """Our ``Transformer`` weights -> ChatGLM names (all padded rows kept: they are ``padded_vocab_size``)."""
    _check_expressible(config, source)
    state = dict(state)
    fused: dict[str, Tensor] = {}
    for i in range(config.n_layer):
        p, t = f"blocks.{i}.", _LAYER.format(i)
        for part in ("weight", "bias"):
            qkv = [state.pop(f"{p}attn.{n}_proj.{part}", None) for n in "qkv"]
            if qkv[0] is not None:
                q, k, v = qkv
                fused[f"{t}self_attention.query_key_value.{part}"] = torch.cat(
                    [rope_halves_to_pairs(q, config), rope_halves_to_pairs(k, config), v])
        fused[f"{t}mlp.dense_h_to_4h.weight"] = torch.cat([state.pop(f"{p}mlp.gate_proj.weight"),
                                                           state.pop(f"{p}mlp.up_proj.weight")])
    out = {**rename(state, WEIGHT_MAP, 0, source), **fused}
    like = out["transformer.embedding.word_embeddings.weight"]
    rd = config.rotary_dim  # the reference's buffer: base 10,000 whatever rope_ratio, in the weights' dtype
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rd, 2, device=like.device).to(torch.float32) / rd))
    out[_INV_FREQ] = inv_freq.to(like.dtype)
    return out


def from_chatglm(state: Mapping[str, Tensor], config: TransformerConfig, *,
                 source: str = "ChatGLM state dict") -> dict[str, Tensor]:
    """ChatGLM weights -> ours; every name and shape is checked against ``config`` first (one error naming the
    weight)."""
    state = dict(state)
    check_shapes(state, expected_shapes(config, lambda s, c: to_chatglm(s, c, source=source)), source)
    state.pop(_INV_FREQ)
    ours: dict[str, Tensor] = {}
    sizes = [config.n_head * config.head_dim] + [config.n_kv_head * config.head_dim] * 2
    for i in range(config.n_layer):
        p, t = f"blocks.{i}.", _LAYER.format(i)
        for part in ("weight", "bias"):
            qkv = state.pop(f"{t}self_attention.query_key_value.{part}", None)
            if qkv is not None:
                q, k, v = qkv.split(sizes)
                ours[f"{p}attn.q_proj.{part}"] = rope_pairs_to_halves(q, config)
                ours[f"{p}attn.k_proj.{part}"] = rope_pairs_to_halves(k, config)
                ours[f"{p}attn.v_proj.{part}"] = v
        ours[f"{p}mlp.gate_proj.weight"], ours[f"{p}mlp.up_proj.weight"] = \
            state.pop(f"{t}mlp.dense_h_to_4h.weight").chunk(2)
    return {**rename(state, WEIGHT_MAP, 1, source), **ours}
