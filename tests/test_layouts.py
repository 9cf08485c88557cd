"""Released LM layouts both ways: transformers' Qwen2, Glm, Glm4, THUDM's ChatGLM (golden files of the reference
code), checkpoint errors, and paper-size configs against the released models' parameter counts."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_keomni.configs import TransformerConfig
from lit_keomni.layouts import lm_format, load_lm_folder, save_lm_folder
from lit_keomni.layouts.chatglm import config_from_chatglm
from lit_keomni.layouts.hf_lm import transformer_config_from_hf
from lit_keomni.nn.transformer import Transformer

GOLDEN = Path(__file__).parent / "golden" / "chatglm"
VOCAB = 100  # not a multiple of 64: our rows are padded to 128 on load and trimmed on save

# ------------------------------------------------------------------------------------------------ transformers

HF_CASES = {
    "qwen2": dict(fmt="qwen2", cls="Qwen2ForCausalLM", cfg="Qwen2Config", kw=dict(
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2-tied": dict(fmt="qwen2", cls="Qwen2ForCausalLM", cfg="Qwen2Config", kw=dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "glm": dict(fmt="glm", cls="GlmForCausalLM", cfg="GlmConfig", kw=dict(
        head_dim=16, attention_bias=True, pad_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5})),
    "glm4": dict(fmt="glm4", cls="Glm4ForCausalLM", cfg="Glm4Config", kw=dict(
        head_dim=16, attention_bias=True, pad_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5})),
}


def _randomize(model: torch.nn.Module) -> None:
    """Every parameter random (norm scales around 1), so that a swapped or mis-permuted weight shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)


def _hf_model(case: str):
    transformers = pytest.importorskip("transformers")
    spec = HF_CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, spec["cfg"])(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, **spec["kw"])
    cls = getattr(transformers, spec["cls"])
    model = cls(cfg).eval()
    _randomize(model)
    return cls, model


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_parity_both_ways(tmp_path, case):
    cls, hf = _hf_model(case)
    fmt = HF_CASES[case]["fmt"]
    hf.save_pretrained(tmp_path / "hf")
    assert lm_format(tmp_path / "hf") == fmt
    config, state, got_fmt = load_lm_folder(tmp_path / "hf")
    assert got_fmt == fmt and config.padded_vocab_size == 128
    assert config.tie_embeddings == (case == "qwen2-tied")
    assert config.bias and config.sandwich_norm == (fmt == "glm4")
    assert config.rotary_dim == (8 if fmt.startswith("glm") else 16)
    ours = Transformer(config).eval()
    ours.load_state_dict(state, strict=True)

    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
    torch.testing.assert_close(got[..., :VOCAB], want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[..., VOCAB:] == 0)

    save_lm_folder(ours.state_dict(), config, tmp_path / "ours", fmt, vocab_size=VOCAB)
    assert lm_format(tmp_path / "ours") == fmt
    theirs, mine = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(
        str(tmp_path / "ours" / "model.safetensors"))
    assert sorted(mine) == sorted(theirs)
    for k, v in theirs.items():
        assert mine[k].dtype == v.dtype and torch.equal(mine[k], v), k
    back = cls.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ ChatGLM golden


def test_chatglm_golden_both_ways(tmp_path):
    assert lm_format(GOLDEN) == "chatglm"
    config, state, fmt = load_lm_folder(GOLDEN)
    assert fmt == "chatglm"
    assert (config.n_kv_head, config.rotary_dim, config.rope_base, config.bias) == (2, 8, 20000.0, True)
    ours = Transformer(config).eval()
    ours.load_state_dict(state, strict=True)
    golden = load_file(str(GOLDEN / "logits.safetensors"))
    for i in range(3):
        with torch.no_grad():
            got = ours(golden[f"ids_{i}"])
        torch.testing.assert_close(got, golden[f"logits_{i}"], rtol=1e-5, atol=1e-5)

    save_lm_folder(ours.state_dict(), config, tmp_path / "ours", "chatglm")
    ref, mine = load_file(str(GOLDEN / "model.safetensors")), load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert sorted(mine) == sorted(ref)  # inv_freq buffer included
    for k, v in ref.items():
        assert mine[k].dtype == v.dtype and torch.equal(mine[k], v), k

    want = json.loads((GOLDEN / "config.json").read_text())
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    for k in sorted(set(want) - {"transformers_version", "_name_or_path"}):
        if k in ("torch_dtype", "dtype"):
            assert written.get("torch_dtype", written.get("dtype")) == want[k]
        else:
            assert written.get(k, "<missing>") == want[k], k
    assert lm_format(tmp_path / "ours") == "chatglm"


# ------------------------------------------------------------------------------------------------ errors


@pytest.fixture
def qwen2_folder(tmp_path) -> Path:
    _, hf = _hf_model("qwen2")
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_weight_named(qwen2_folder):
    path = qwen2_folder / "model.safetensors"
    state = load_file(str(path))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"hf/model\.safetensors: weight 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                         r"missing"):
        load_lm_folder(qwen2_folder)


def test_wrong_shape_named(qwen2_folder):
    cfg = qwen2_folder / "config.json"
    hf = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**hf, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"hf/model\.safetensors: weight 'model\.layers\.0\.mlp\.gate_proj\.weight' "
                                         r"has shape \[96, 64\], config\.json implies \[128, 64\]"):
        load_lm_folder(qwen2_folder)


@pytest.mark.parametrize("layers, match", [
    (3, r"hf/model\.safetensors: weight 'model\.layers\.2\.[a-z_.]+' missing"),
    (1, r"hf/model\.safetensors: weight 'model\.layers\.1\.[a-z_.]+' has no counterpart"),
])
def test_layer_count_mismatch_named(qwen2_folder, layers, match):
    cfg = qwen2_folder / "config.json"
    hf = json.loads(cfg.read_text())
    hf["num_hidden_layers"] = layers
    hf.pop("layer_types", None)
    cfg.write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=match):
        load_lm_folder(qwen2_folder)


def test_unsupported_config_field_named(qwen2_folder, tmp_path):
    cfg = qwen2_folder / "config.json"
    hf = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**hf, "use_sliding_window": True}))
    with pytest.raises(ValueError, match=r"hf/config\.json: field 'use_sliding_window'"):
        load_lm_folder(qwen2_folder)
    glm = tmp_path / "glm"
    shutil.copytree(GOLDEN, glm)
    golden = json.loads((glm / "config.json").read_text())
    (glm / "config.json").write_text(json.dumps({**golden, "add_bias_linear": True}))
    with pytest.raises(ValueError, match=r"glm/config\.json: field 'add_bias_linear'"):
        load_lm_folder(glm)


# ------------------------------------------------------------------------------------------------ released sizes

LLAMA_31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}
QWEN25_05B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
GLM_4_9B = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False, "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696, "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096,
    "kv_channels": 128, "layernorm_epsilon": 1.5625e-07, "multi_query_attention": True, "multi_query_group_num": 2,
    "num_attention_heads": 32, "num_layers": 40, "original_rope": True, "padded_vocab_size": 151552,
    "post_layer_norm": True, "rmsnorm": True, "rope_ratio": 1, "seq_length": 8192, "use_cache": True,
    "torch_dtype": "bfloat16", "tie_word_embeddings": False, "eos_token_id": [151329, 151336, 151338],
    "pad_token_id": 151329,
}
GLM_4_VOICE_9B = {**GLM_4_9B, "architectures": ["ChatGLMForConditionalGeneration"], "padded_vocab_size": 168960}

RELEASED = {
    "meta-llama/Llama-3.1-8B-Instruct": (LLAMA_31_8B_INSTRUCT, 8_030_261_248),
    "Qwen/Qwen2.5-7B-Instruct": (QWEN25_7B_INSTRUCT, 7_615_616_512),
    "Qwen/Qwen2.5-0.5B-Instruct": (QWEN25_05B_INSTRUCT, 494_032_768),
    "THUDM/glm-4-9b": (GLM_4_9B, 9_399_951_360),
    "THUDM/glm-4-voice-9b": (GLM_4_VOICE_9B, 9_399_951_360 + 2 * 17408 * 4096),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_parameter_count(name):
    hf, expected = RELEASED[name]
    if hf["model_type"] == "chatglm":
        config = config_from_chatglm(hf)
    else:
        config = transformer_config_from_hf(hf)
    assert config.padded_vocab_size == hf.get("vocab_size", hf.get("padded_vocab_size"))
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == expected  # parameters() counts a tied matrix once
    assert (model.lm_head.weight is model.embed.weight) == hf["tie_word_embeddings"]


@pytest.mark.parametrize("preset, name", [("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct"),
                                          ("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct"),
                                          ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct"),
                                          ("glm-4-9b", "THUDM/glm-4-9b")])
def test_presets_equal_released_configs(preset, name):
    hf = RELEASED[name][0]
    released = config_from_chatglm(hf) if hf["model_type"] == "chatglm" else transformer_config_from_hf(hf)
    ours = TransformerConfig.from_name(preset)
    fields = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size", "rope_base",
              "rotary_dim", "rope_scaling", "norm_eps", "bias", "sandwich_norm", "tie_embeddings", "padded_vocab_size")
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(released, f) for f in fields}
