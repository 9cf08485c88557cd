"""nn/transformer.py, TransformerConfig and the HF Llama weight map: parity with transformers, masks, cache, sizes."""

import pytest
import torch

from lit_keomni.checkpoints import load_state_checked
from lit_keomni.configs import TransformerConfig
from lit_keomni.layouts import load_lm_folder, save_lm_folder
from lit_keomni.layouts.hf_lm import transformer_config_from_hf
from lit_keomni.nn.transformer import Transformer

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig.from_name("tiny", **overrides)).eval()


# ------------------------------------------------------------------------------------------------ HF parity


def _hf_llama(tied: bool = False, **rope):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tied, **rope,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm scales so that a mixed-up norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return transformers, model


ROPES = {
    "default": dict(rope_theta=10000.0),
    "llama3": dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
}


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("tied", [False, True])
def test_hf_llama_parity_both_ways(tmp_path, rope, tied):
    transformers, hf = _hf_llama(tied, **ROPES[rope])
    hf.save_pretrained(tmp_path / "hf")
    config, state, fmt = load_lm_folder(tmp_path / "hf")
    assert fmt == "llama"
    assert config.tie_embeddings == tied and config.padded_vocab_size == 128
    if rope == "llama3":
        assert config.rope_base == 500000.0 and config.rope_scaling["factor"] == 8.0
    ours = Transformer(config).eval()
    load_state_checked(ours, state, str(tmp_path / "hf"))

    x = torch.randint(0, 100, (2, 300))  # past original_max_position_embeddings=64: every llama3 band is used
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
    torch.testing.assert_close(got[..., :100], want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[..., 100:] == 0)  # zero padding rows
    if rope == "llama3":  # the scaling is really exercised: plain RoPE at the same base gives other logits
        plain = Transformer(config.replace(rope_scaling=None)).eval()
        load_state_checked(plain, state, str(tmp_path / "hf"))
        with torch.no_grad():
            assert (plain(x)[..., :100] - want).abs().max() > 1e-3

    save_lm_folder(ours.state_dict(), config, tmp_path / "ours", "llama")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, rtol=1e-5, atol=1e-5)


def test_hf_config_unsupported_field_named():
    base = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4)
    with pytest.raises(ValueError, match="x/config.json: field 'hidden_act'"):
        transformer_config_from_hf({**base, "hidden_act": "gelu"}, source="x/config.json")
    with pytest.raises(ValueError, match="field 'rope_scaling.rope_type' is 'yarn'"):
        transformer_config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="field 'model_type'"):
        transformer_config_from_hf({**base, "model_type": "mistral"})
    with pytest.raises(ValueError, match="field 'attention_bias'"):
        transformer_config_from_hf({**base, "attention_bias": True})


# ------------------------------------------------------------------------------------------------ config


def test_gqa_and_head_divisibility():
    m = tiny(n_head=8, n_kv_head=2, n_embd=64)
    assert m.blocks[0].attn.k_proj.weight.shape == (2 * 8, 64)
    assert m(torch.randint(0, 512, (1, 7))).shape == (1, 7, 512)
    with pytest.raises(ValueError, match="'n_head' \\(4\\) is not divisible by field 'n_kv_head' \\(3\\)"):
        TransformerConfig.from_name("tiny", n_kv_head=3)


def test_padded_vocab():
    c = TransformerConfig.from_name("tiny", vocab_size=500)
    assert c.padded_vocab_size == 512
    assert Transformer(c).lm_head.weight.shape[0] == 512


# ------------------------------------------------------------------------------------------------ masks


def test_causal_vs_bidirectional():
    x = torch.randint(0, 512, (1, 12))
    x2 = x.clone()
    x2[0, 9] = (x2[0, 9] + 1) % 512
    causal = tiny()
    with torch.no_grad():
        a, b = causal(x), causal(x2)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    bidir = tiny(causal=False)
    with torch.no_grad():
        a, b = bidir(x), bidir(x2)
    assert not torch.allclose(a[:, :9], b[:, :9])


def test_bidirectional_key_padding():
    m = tiny(causal=False)
    x = torch.randint(0, 512, (1, 10))
    padded = torch.cat([x, torch.randint(0, 512, (1, 5))], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], 1)
    with torch.no_grad():
        torch.testing.assert_close(m(padded, attention_mask=mask)[:, :10], m(x), rtol=1e-5, atol=1e-5)


def test_document_masking_matches_separate_documents():
    m = tiny()
    a, b = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 9))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        out = m(packed, document_ids=docs)
        torch.testing.assert_close(out[:, :7], m(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 7:], m(b), rtol=1e-5, atol=1e-5)
        hidden = m(packed, document_ids=docs, return_hidden=True)
    assert hidden.shape == (1, 16, 64)


# ------------------------------------------------------------------------------------------------ KV cache


def test_kv_cache_decoding_equals_full_recompute():
    m = tiny()
    x = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = m(x)
        m.set_kv_cache(2, 32)
        steps = [m(x[:, :5], input_pos=torch.arange(5))]
        steps += [m(x[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(5, 20)]
        m.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_left_padding_matches_unpadded_row():
    m = tiny()
    short, long = torch.randint(0, 512, (1, 4)), torch.randint(0, 512, (1, 9))
    pad = 5
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :pad] = False
    nxt = torch.randint(0, 512, (2, 1))
    with torch.no_grad():
        m.set_kv_cache(2, 16)
        first = m(batch, input_pos=torch.arange(9), attention_mask=mask)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
        second = m(nxt, input_pos=torch.tensor([9]), attention_mask=mask)
        m.clear_kv_cache()
        alone = m(torch.cat([short, nxt[:1]], 1))
        # and the same without a cache: the full padded batch with its mask
        nocache = m(torch.cat([batch, nxt], 1), attention_mask=mask)
    torch.testing.assert_close(first[0, pad:], alone[0, :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[0, 0], alone[0, 4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nocache[0, pad:], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(first).all()


def test_inputs_embeds_equals_ids():
    m = tiny()
    x = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(m(inputs_embeds=m.embed(x)), m(x))
    with pytest.raises(ValueError, match="exactly one of idx and inputs_embeds"):
        m()


# ------------------------------------------------------------------------------------------------ vocab and init


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings_keeps_rows(tied):
    m = tiny(vocab_size=500, tie_embeddings=tied)
    old_e, old_h = m.embed.weight.detach().clone(), m.lm_head.weight.detach().clone()
    m.resize_token_embeddings(600)
    assert m.config.vocab_size == 600 and m.embed.weight.shape[0] == 640 == m.lm_head.weight.shape[0]
    torch.testing.assert_close(m.embed.weight[:500], old_e[:500])
    torch.testing.assert_close(m.lm_head.weight[:500], old_h[:500])
    torch.testing.assert_close(m.embed.weight[550], old_e[:500].mean(0))
    assert (m.lm_head.weight is m.embed.weight) == tied
    assert m(torch.tensor([[599, 3]])).shape == (1, 2, 640)
    with pytest.raises(ValueError, match="smaller than TransformerConfig field 'vocab_size'"):
        m.resize_token_embeddings(10)


def test_meta_init_then_reset():
    with torch.device("meta"):
        m = Transformer(TransformerConfig.from_name("tiny", tie_embeddings=True))
    m.to_empty(device="cpu")
    m.reset_parameters()
    assert m.lm_head.weight is m.embed.weight
    w = m.blocks[0].attn.q_proj.weight
    assert 0.015 < w.std() < 0.025
    assert m.blocks[0].mlp.down_proj.weight.std() < 0.015  # scaled residual projection
    assert torch.isfinite(m(torch.randint(0, 512, (1, 5)))).all()


# ------------------------------------------------------------------------------------------------ presets


def expected_params(c: TransformerConfig) -> int:
    hd = c.n_embd // c.n_head
    attn = c.n_embd * hd * (c.n_head + 2 * c.n_kv_head) + c.n_head * hd * c.n_embd
    if c.bias:
        attn += hd * (c.n_head + 2 * c.n_kv_head)
    per_block = attn + 3 * c.n_embd * c.intermediate_size + 2 * c.n_embd
    vocab = c.padded_vocab_size * c.n_embd * (1 if c.tie_embeddings else 2)
    return c.n_layer * per_block + c.n_embd + vocab


@pytest.mark.parametrize("name", sorted(TransformerConfig.presets))
def test_preset_parameter_counts(name):
    c = TransformerConfig.from_name(name)
    with torch.device("meta"):
        m = Transformer(c)
    n = sum(p.numel() for p in m.parameters())
    assert n == expected_params(c)
    approx = {"llama-3.1-8b": 8.03e9, "glm-4-voice-9b": 9.40e9, "glm-4-9b": 9.40e9, "text-to-token-1.5b": 1.59e9,
              "qwen2.5-7b": 7.62e9, "qwen2.5-0.5b": 0.494e9}
    if name in approx:
        assert abs(n / approx[name] - 1) < 0.01, n


def test_cpu_bf16_training_attention_runs_in_float32():
    from lit_keomni.nn.attention import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.rand(2, 1, 37, 37, generator=g) > 0.3
    mask[..., 0] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sdpa(q, k, v, attn_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, ref.bfloat16())
    y.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16
    with torch.no_grad():  # inference keeps the bf16 kernel
        y_inf = sdpa(q, k, v, attn_mask=mask)
    assert torch.equal(y_inf, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
