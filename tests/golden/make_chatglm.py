"""Golden files for the ChatGLM layout (GLM-4-9B / glm-4-voice-9b remote code): tests/golden/chatglm/.

Made by the reference code, never by ours: THUDM's ``modeling_chatglm.py`` + ``configuration_chatglm.py`` of
glm-4-voice-9b, as copied unchanged into github.com/WenzheLiu-Speech/GLM-4-Voice-SFT, path ``model/``, commit
0fc6ca48c64811400dd6648f57ba1cf2009dfa24 (files added in 92bd942d98c7039c3eff29107914ea311430885a and
df4d3262aad9544699b147cb6a63919601c52e2d). It is the GLM-4 version: ``rope_ratio``, ``add_qkv_bias``,
``multi_query_group_num``, ``original_rope``, rotary on half of each head in interleaved pairs.

Run by hand, outside the project environment (the remote code needs transformers 4.44):

    python -m venv --system-site-packages /tmp/ref_B/venv
    /tmp/ref_B/venv/bin/pip install transformers==4.44.2
    mkdir -p /tmp/ref_B/glm4voice_sft   # modeling_chatglm.py, configuration_chatglm.py from the commit above
    /tmp/ref_B/venv/bin/python tests/golden/make_chatglm.py /tmp/ref_B/glm4voice_sft tests/golden/chatglm

It builds a tiny random ``ChatGLMForConditionalGeneration`` with glm-4-voice-9b's options (2 KV groups, qkv bias,
RMSNorm, final norm, untied output layer, epsilon 1.5625e-7) but ``rope_ratio`` 2 so the base scaling is exercised,
saves it with ``save_pretrained`` (config.json with the released ``auto_map`` + model.safetensors) and the float32
logits of three fixed id sequences (``logits.safetensors``: ids_i, logits_i).
"""

import importlib.util
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

AUTO_MAP = {  # as in THUDM's released GLM-4 config.json files
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}


def _reference(ref: Path):
    """The remote code as the package ``chatglm_ref`` (modeling imports ``.configuration_chatglm``)."""
    spec = importlib.util.spec_from_file_location("chatglm_ref", ref / "__init__.py", submodule_search_locations=[str(ref)])
    (ref / "__init__.py").touch()
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["chatglm_ref"] = pkg
    spec.loader.exec_module(pkg)
    import chatglm_ref.configuration_chatglm as conf
    import chatglm_ref.modeling_chatglm as modeling
    return conf.ChatGLMConfig, modeling.ChatGLMForConditionalGeneration


def main(ref: str, out: str) -> None:
    ChatGLMConfig, Model = _reference(Path(ref))
    config = ChatGLMConfig(
        num_layers=2, padded_vocab_size=320, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
        num_attention_heads=4, seq_length=128, layernorm_epsilon=1.5625e-07, rmsnorm=True,
        apply_residual_connection_post_layernorm=False, post_layer_norm=True, add_bias_linear=False,
        add_qkv_bias=True, multi_query_attention=True, multi_query_group_num=2, rope_ratio=2,
        original_rope=True, tie_word_embeddings=False, use_cache=True, torch_dtype="float32",
    )
    config.auto_map = AUTO_MAP
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Model(config, empty_init=False).eval()
    with torch.no_grad():  # every tensor random (RMSNorm weights start empty), so a mixed-up weight shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i, length in enumerate((5, 12, 23)):
        ids = torch.randint(0, 320, (1, length), generator=g)
        with torch.no_grad():
            tensors[f"ids_{i}"] = ids
            tensors[f"logits_{i}"] = model(input_ids=ids).logits.float().contiguous()
    save_file(tensors, str(Path(out) / "logits.safetensors"))
    (Path(out) / "generation_config.json").unlink(missing_ok=True)  # not part of the layout


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
