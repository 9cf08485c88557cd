"""Hugging Face decoder LMs <-> our ``nn.transformer.Transformer``: Llama(-3.x), Qwen2, GLM and GLM-4.

transformers' ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``GlmForCausalLM`` and ``Glm4ForCausalLM`` are our network
up to names and three details, each handled once here:

- Qwen2 always has q/k/v biases, GLM has them when ``attention_bias`` (GLM-4-9B's ``add_qkv_bias``): ``config.bias``;
- GLM and GLM-4 fuse the SwiGLU gate and up projections into ``mlp.gate_up_proj`` (gate rows first): split on load,
  concatenated on save;
- GLM rotates the first ``partial_rotary_factor`` of each head in interleaved pairs (2i, 2i+1), ours (Llama's
  ``rotate_half``) in pairs (i, i + rotary_dim/2) with the same frequencies. Attention only sees q·k, so permuting the
  same rows of q_proj and k_proj (weights and biases) within each head makes one attention exact for both
  (``rope_pairs_to_halves`` on load, ``rope_halves_to_pairs`` on save; the ChatGLM layout reuses them);
- GLM-4 (0414) normalises each branch's output (``post_self_attn_layernorm``, ``post_mlp_layernorm``):
  ``config.sandwich_norm``.

Vocabulary rows: a released ``vocab_size`` is the number of embedding rows; ours zero-pads them to
``padded_vocab_size`` on load and trims them on save.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lit_keomni.configs import LLAMA3_ROPE_KEYS, TransformerConfig

HF_FORMATS = ("llama", "qwen2", "glm", "glm4")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "glm": "GlmForCausalLM",
                 "glm4": "Glm4ForCausalLM"}

WEIGHT_MAP = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("blocks.{}.attn_norm.weight", "model.layers.{}.input_layernorm.weight"),
    ("blocks.{}.attn.q_proj.weight", "model.layers.{}.self_attn.q_proj.weight"),
    ("blocks.{}.attn.k_proj.weight", "model.layers.{}.self_attn.k_proj.weight"),
    ("blocks.{}.attn.v_proj.weight", "model.layers.{}.self_attn.v_proj.weight"),
    ("blocks.{}.attn.q_proj.bias", "model.layers.{}.self_attn.q_proj.bias"),
    ("blocks.{}.attn.k_proj.bias", "model.layers.{}.self_attn.k_proj.bias"),
    ("blocks.{}.attn.v_proj.bias", "model.layers.{}.self_attn.v_proj.bias"),
    ("blocks.{}.attn.o_proj.weight", "model.layers.{}.self_attn.o_proj.weight"),
    ("blocks.{}.attn_post_norm.weight", "model.layers.{}.post_self_attn_layernorm.weight"),
    ("blocks.{}.mlp_norm.weight", "model.layers.{}.post_attention_layernorm.weight"),
    ("blocks.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.gate_proj.weight"),
    ("blocks.{}.mlp.up_proj.weight", "model.layers.{}.mlp.up_proj.weight"),
    ("blocks.{}.mlp.down_proj.weight", "model.layers.{}.mlp.down_proj.weight"),
    ("blocks.{}.mlp_post_norm.weight", "model.layers.{}.post_mlp_layernorm.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
"""Our name <-> the transformers name ({} = layer index), shared by the four layouts; a layout's checkpoint holds
the subset its options give (biases, sandwich norms), GLM's fused ``gate_up_proj`` is split into the two MLP names
before renaming."""

_FUSED_MLP = ".mlp.gate_up_proj.weight"
_GLM_PAD_DEFAULT = 151329  # transformers' GlmConfig / Glm4Config pad_token_id (GLM-4's <|endoftext|>)
_ROTATED = re.compile(r"\.self_attn\.[qk]_proj\.(weight|bias)$")


def rename(state: Mapping[str, Tensor], pairs: tuple[tuple[str, str], ...], src: int, source: str) -> dict[str, Tensor]:
    """Rename ``state`` by ``pairs`` from side ``src`` (0 = ours, 1 = theirs) to the other; a name without a
    counterpart raises naming it."""
    patterns = [(re.compile("^" + re.escape(p[src]).replace(r"\{\}", r"(\d+)") + "$"), p[1 - src]) for p in pairs]
    out = {}
    for k, v in state.items():
        for pattern, target in patterns:
            m = pattern.match(k)
            if m:
                out[target.format(*m.groups())] = v
                break
        else:
            raise ValueError(f"{source}: weight '{k}' has no counterpart in this layout")
    return out


def _rope_order(config: TransformerConfig, rows: int) -> Tensor:
    """Row order that takes a projection of ``rows`` output rows from GLM's interleaved pairs to our halves: within
    each head, our row i < rd/2 is GLM's 2i and our row rd/2 + i is GLM's 2i + 1; unrotated rows stay."""
    hd, rd = config.head_dim, config.rotary_dim
    head = torch.cat([torch.arange(0, rd, 2), torch.arange(1, rd, 2), torch.arange(rd, hd)])
    return torch.cat([head + h * hd for h in range(rows // hd)])


def rope_pairs_to_halves(w: Tensor, config: TransformerConfig) -> Tensor:
    """A q or k projection (weight or bias, rows = heads * head_dim) with GLM's rotary pairing -> ours."""
    return w[_rope_order(config, w.shape[0]).to(w.device)]


def rope_halves_to_pairs(w: Tensor, config: TransformerConfig) -> Tensor:
    """Inverse of ``rope_pairs_to_halves``."""
    return w[torch.argsort(_rope_order(config, w.shape[0])).to(w.device)]


def pad_vocab_rows(w: Tensor, config: TransformerConfig) -> Tensor:
    """Embedding/head rows zero-padded from ``config.vocab_size`` to ``config.padded_vocab_size``."""
    return torch.cat([w, w.new_zeros(config.padded_vocab_size - w.shape[0], *w.shape[1:])])


def expected_shapes(config: TransformerConfig, to_theirs: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes a layout's checkpoint must hold for ``config``: our model built on the meta device (no memory)
    mapped by ``to_theirs(state, config)``."""
    from lit_keomni.nn.transformer import Transformer

    with torch.device("meta"):
        state = Transformer(config).state_dict()
    return {k: tuple(v.shape) for k, v in to_theirs(state, config).items()}


def check_shapes(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], source: str) -> None:
    """One error naming the first missing, unexpected or wrongly shaped weight of a released checkpoint."""
    for k, shape in expected.items():
        if k not in state:
            raise ValueError(f"{source}: weight '{k}' missing (config.json implies it, shape {list(shape)})")
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{source}: weight '{k}' has shape {list(state[k].shape)}, config.json implies "
                             f"{list(shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"{source}: weight '{extra[0]}' has no counterpart in this layout ({len(extra)} such)")


# ------------------------------------------------------------------------------------------------ weights


def check_expressible(config: TransformerConfig, fmt: str, source: str) -> None:
    """Raise naming the TransformerConfig field that layout ``fmt`` cannot express."""
    if fmt not in HF_FORMATS:
        raise ValueError(f"{source}: format {fmt!r} is not a transformers layout; expected one of {HF_FORMATS}")
    want: dict[str, Any] = {"sandwich_norm": fmt == "glm4", "causal": True}
    if fmt in ("llama", "qwen2"):
        want.update(rotary_dim_fraction=1.0, bias=fmt == "qwen2")
    for field, value in want.items():
        if getattr(config, field) != value:
            raise ValueError(f"{source}: TransformerConfig field '{field}' is {getattr(config, field)}; "
                             f"{ARCHITECTURES[fmt]} needs {value}")


def to_hf(state: Mapping[str, Tensor], config: TransformerConfig, fmt: str, *,
          source: str = "Transformer state dict") -> dict[str, Tensor]:
    """Our ``Transformer`` weights -> ``fmt``'s transformers names (padding rows trimmed, tied head left out)."""
    check_expressible(config, fmt, source)
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    out = rename(state, WEIGHT_MAP, 0, source)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in out:
            out[k] = out[k][: config.vocab_size]
    if fmt in ("glm", "glm4"):
        out = {k: rope_halves_to_pairs(v, config) if _ROTATED.search(k) else v for k, v in out.items()}
        for k in [k for k in out if k.endswith(".mlp.gate_proj.weight")]:
            prefix = k.removesuffix(".mlp.gate_proj.weight")
            out[prefix + _FUSED_MLP] = torch.cat([out.pop(k), out.pop(prefix + ".mlp.up_proj.weight")])
    return out


def from_hf(state: Mapping[str, Tensor], config: TransformerConfig, fmt: str, *,
            source: str = "Hugging Face state dict") -> dict[str, Tensor]:
    """``fmt``'s transformers weights -> ours (vocab rows zero-padded; a tied head taken from the embedding). Every
    name and shape is checked against ``config`` first, so a mismatch is one error naming the weight."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    check_expressible(config, fmt, source)
    check_shapes(state, expected_shapes(config, lambda s, c: to_hf(s, c, fmt)), source)
    if fmt in ("glm", "glm4"):
        for k in [k for k in state if k.endswith(_FUSED_MLP)]:
            prefix = k.removesuffix(_FUSED_MLP)
            state[prefix + ".mlp.gate_proj.weight"], state[prefix + ".mlp.up_proj.weight"] = state.pop(k).chunk(2)
        state = {k: rope_pairs_to_halves(v, config) if _ROTATED.search(k) else v for k, v in state.items()}
    out = rename(state, WEIGHT_MAP, 1, source)
    for k in ("embed.weight", "lm_head.weight"):
        if k in out:
            out[k] = pad_vocab_rows(out[k], config)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


# ------------------------------------------------------------------------------------------------ config.json


def _rope_from_hf(hf: Mapping[str, Any], source: str) -> tuple[float, dict[str, Any] | None, float]:
    """(rope base, llama3 scaling or None, partial rotary factor) from transformers v4 (``rope_theta``,
    ``rope_scaling``, ``partial_rotary_factor``) or v5 (``rope_parameters``) fields."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {}) or params
    base = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    if kind == "default":
        return float(base), None, partial
    if kind != "llama3":
        raise ValueError(f"{source}: field '{field}.rope_type' is {kind!r}; only 'default' and 'llama3' are supported")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"{source}: field '{field}' lacks {missing}")
    return float(base), {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_ROPE_KEYS}}, partial


def transformer_config_from_hf(hf_config: Mapping[str, Any], *, source: str = "config.json") -> TransformerConfig:
    """A transformers ``config.json`` of a Llama, Qwen2, Glm or Glm4 LM -> ``TransformerConfig``; an option our
    network does not have (another activation, sliding windows, output biases, a separate head width, yarn RoPE)
    raises naming the field."""
    hf = dict(hf_config)
    fmt = hf.get("model_type", "llama")
    if fmt not in HF_FORMATS:
        raise ValueError(f"{source}: field 'model_type' is {fmt!r}; expected one of {HF_FORMATS}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if field not in hf:
            raise ValueError(f"{source}: field '{field}' missing")
    fixed: dict[str, Any] = {"hidden_act": "silu"}
    if fmt == "llama":
        fixed.update(attention_bias=False, mlp_bias=False)
    if fmt == "qwen2":  # sliding-window attention is off in every Qwen2.5 release; we have full attention only
        fixed.update(use_sliding_window=False)
    for field, want in fixed.items():
        if hf.get(field, want) != want:
            raise ValueError(f"{source}: field '{field}' is {hf[field]!r}; only {want!r} is supported")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"{source}: field 'layer_types' holds {sorted(layer_types)}; only 'full_attention' is "
                         f"supported")
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    if head_dim * n_head != hf["hidden_size"]:
        raise ValueError(f"{source}: field 'head_dim' is {head_dim}, but hidden_size / num_attention_heads = "
                         f"{hf['hidden_size'] / n_head}; a separate head width is not supported")
    rope_base, rope_scaling, partial = _rope_from_hf(hf, source)
    glm = fmt in ("glm", "glm4")
    if not glm and partial not in (None, 1.0):
        raise ValueError(f"{source}: field 'partial_rotary_factor' is {partial}; {fmt} rotates whole heads")
    return TransformerConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, intermediate_size=hf["intermediate_size"],
        rope_base=rope_base, rope_scaling=rope_scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
        rotary_dim_fraction=float(partial if partial is not None else 0.5) if glm else 1.0,
        bias=fmt == "qwen2" or (glm and bool(hf.get("attention_bias", True))), sandwich_norm=fmt == "glm4",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        block_size=hf.get("max_position_embeddings", 2048),
    )


def hf_config_json(config: TransformerConfig, fmt: str, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` transformers reads for ``config`` in layout ``fmt`` (``check_expressible`` first)."""
    check_expressible(config, fmt, "hf_config_json")
    rope = {"rope_type": "default", "rope_theta": config.rope_base, **(config.rope_scaling or {})}
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[fmt]], "model_type": fmt, "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "rope_theta": config.rope_base,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if fmt == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif fmt == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer,
                  layer_types=["full_attention"] * config.n_layer)
    else:
        hf.update(attention_bias=config.bias, partial_rotary_factor=config.rotary_dim_fraction)
        rope["partial_rotary_factor"] = config.rotary_dim_fraction
        if config.vocab_size <= _GLM_PAD_DEFAULT:  # GlmConfig's default pad id has no row: nn.Embedding refuses it
            hf["pad_token_id"] = None
    # transformers >= 5 reads rope_parameters, 4.x reads rope_theta (+ rope_scaling, partial_rotary_factor): both.
    hf["rope_parameters"] = rope
    if config.rope_scaling is not None:
        hf["rope_scaling"] = dict(config.rope_scaling)
    return hf
