"""recipes/paper/: they parse, carry the seed's hyper-parameters (seeds/003 App. B.1, B.3, B.4; seeds/000 §4-5),
describe a launch whose batch arithmetic holds, and name model presets of the seed's sizes (built on the meta device,
no memory)."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_keomni.cli import main
from lit_keomni.configs import SpeechTokenizerConfig, TransformerConfig
from lit_keomni.nn.adapter import SpeechAdapter
from lit_keomni.nn.keomni import KeOmni
from lit_keomni.nn.transformer import Transformer
from lit_keomni.nn.whisper import SpeechEncoder, SpeechTokenizerModel
from lit_keomni.stages.sft import whisper_encoder_config
from lit_keomni.text.tokenizer import ROLE_TOKENS

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "recipes" / "paper"
# Parameter counts of the Hugging Face models (transformers' GlmForCausalLM / LlamaForCausalLM / WhisperEncoder of
# these configs; also the checkpoints' safetensors totals for GLM-4-9B and Llama-3.1-8B).
GLM_4_9B = 9_399_951_360
LLAMA_3_1_8B = 8_030_261_248
WHISPER_LARGE_V3_ENCODER = 636_968_960  # with its fixed 1500 x 1280 position table


def printed(recipe: Path, capsys, monkeypatch) -> dict:
    """The recipe as ``python -m lit_keomni fit --config RECIPE --print_config`` prints it, parsed."""
    monkeypatch.setattr(sys, "argv", ["lit_keomni"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("recipe, global_batch", [("stage1", 4096), ("stage2", 256), ("stage3", 1024),
                                                   ("stage4", 64), ("stage4_keomni", 256), ("stage4_glm4voice", 64)])
def test_paper_recipe_launch_arithmetic(recipe, global_batch, capsys, monkeypatch):
    cfg = printed(PAPER / f"{recipe}.yaml", capsys, monkeypatch)
    t = cfg["trainer"]
    assert t["accelerator"] == "cuda" and t["precision"] == "bf16-mixed"
    assert t["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    mesh = t["strategy"]["init_args"]
    assert mesh["data_parallel_size"] == t["num_nodes"] * t["devices"] and mesh["tensor_parallel_size"] == 1
    per_step = mesh["data_parallel_size"] * cfg["data"]["init_args"]["batch_size"] * t["accumulate_grad_batches"]
    assert per_step == global_batch
    callbacks = [c["class_path"] for c in t["callbacks"]]
    assert callbacks[-1] == "lit_keomni.checkpoints.Export"


def test_paper_stage1_is_whisper_large_v3_at_12_5hz(capsys, monkeypatch):
    m = printed(PAPER / "stage1.yaml", capsys, monkeypatch)["model"]["init_args"]
    assert (m["lr"], m["vq_start"], m["ctc_weight"]) == (1e-5, 0.0, 0.0) and m["init_from"]
    c = SpeechTokenizerConfig.from_name(m["config"], **(m["overrides"] or {}))
    assert (c.frame_rate_hz, c.codebook_size, c.vq_decay, c.commitment) == (12.5, 16384, 0.99, 10.0)
    assert c.block_seconds == 2.0  # block-causal attention, 2 s blocks (Table 11)
    with torch.device("meta"):
        model = SpeechTokenizerModel(c)
    # HF WhisperForConditionalGeneration(whisper-large-v3) has 1,543,490,560 parameters; its fixed 1500 x 1280
    # encoder position table is a buffer here. The VQ codebook is an EMA buffer; the unused CTC head is not counted.
    assert n_params(model.encoder) + n_params(model.decoder) + 1500 * 1280 == 1_543_490_560
    assert n_params(model.encoder.quantizer) == 0 and model.encoder.quantizer.codebook.shape == (16384, 1280)


def test_paper_stage2_is_the_1_5b_text_to_token_model(capsys, monkeypatch):
    m = printed(PAPER / "stage2.yaml", capsys, monkeypatch)["model"]["init_args"]
    assert (m["lr"], m["min_lr_ratio"], m["weight_decay"]) == (4e-4, 0.1, 0.1)
    c = TransformerConfig.from_name(m["config"], **(m["overrides"] or {}))
    # Table 12: 28 layers, hidden 2048, FFN 6144, 16 heads of 128, group size 4, vocab 59,264 (no speech tokens);
    # GLM: bias on q/k/v only, untied output layer.
    h, layers, ffn, kv, vocab = 2048, 28, 6144, 4 * 128, 59264
    block = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * ffn + 2 * h
    text_only = 2 * vocab * h + layers * block + h
    with torch.device("meta"):
        model = Transformer(c)
    assert n_params(model) == text_only and 1.5e9 < text_only < 1.65e9
    speech = 16384 + len(ROLE_TOKENS)  # the stage-1 export's 12.5 Hz codebook and the dialogue markers
    with torch.device("meta"):
        model = Transformer(c.replace(vocab_size=vocab + speech))
    rows = model.config.padded_vocab_size - vocab
    assert n_params(model) == text_only + 2 * rows * h and rows - speech < c.padded_vocab_multiple


@pytest.mark.parametrize("recipe", ["stage3", "stage4"])
def test_paper_speech_lm_is_glm_4_9b_with_speech_tokens(recipe, capsys, monkeypatch):
    m = printed(PAPER / f"{recipe}.yaml", capsys, monkeypatch)["model"]["init_args"]
    assert m["speech_export"] == "checkpoints/paper/stage1/export"
    if recipe == "stage3":
        assert (m["lr"], m["min_lr_ratio"], m["decay"]) == (6e-5, 0.1, "linear")  # 6e-5 -> 6e-6, linear (§3.1)
    else:
        assert m["mode"] == "discrete" and m["init_from"] == "checkpoints/paper/stage3/export"
        assert (m["lr"], m["min_lr_ratio"]) == (5e-5, 0.1)  # 5e-5 -> 5e-6 (§3.1)
    c = TransformerConfig.from_name(m["config"], **(m["overrides"] or {}))
    assert c.block_size >= 8192  # pre-training rows of 8192 tokens; fine-tuning at 4096
    # Table 13 "9B" (GLM-4-9B-Base): 40 layers, hidden 4096, FFN 13696, 32 heads of 128, group size 2, vocab 151,552;
    # GLM: bias on q/k/v only, untied output layer.
    h, layers, ffn, kv, vocab = 4096, 40, 13696, 2 * 128, 151552
    block = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * ffn + 2 * h
    text_only = 2 * vocab * h + layers * block + h
    assert text_only == GLM_4_9B
    with torch.device("meta"):
        model = Transformer(c)
    assert n_params(model) == text_only
    speech = 16384 + len(ROLE_TOKENS)  # the stage-1 export's 12.5 Hz codebook and the dialogue markers
    with torch.device("meta"):
        model = Transformer(c.replace(vocab_size=vocab + speech))
    rows = model.config.padded_vocab_size - vocab
    assert n_params(model) == text_only + 2 * rows * h and rows - speech < c.padded_vocab_multiple


def test_paper_stage4_glm4voice_fine_tunes_the_released_model_in_its_own_format(capsys, monkeypatch):
    cfg = printed(PAPER / "stage4_glm4voice.yaml", capsys, monkeypatch)
    m, d = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert m["template"] == d["template"] == "streaming" and m["mode"] == d["mode"] == "discrete"
    assert m["init_from"] == m["tokenizer"] == d["tokenizer"] and m["speech_export"] == d["speech_export"]
    assert (m["lr"], m["min_lr_ratio"]) == (5e-5, 0.1) and d["max_length"] == 4096


def test_paper_stage4_keomni_is_whisper_large_v3_adapter_and_llama_3_1_8b(capsys, monkeypatch):
    m = printed(PAPER / "stage4_keomni.yaml", capsys, monkeypatch)["model"]["init_args"]
    assert (m["mode"], m["stack"], m["freeze_llm"], m["lr"]) == ("continuous", 5, False, 1e-4)
    llm_config = TransformerConfig.from_name(m["config"], **(m["overrides"] or {}))
    # whisper-large-v3's config.json fields that the stage reads from encoder_from
    whisper = {"d_model": 1280, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "encoder_layers": 32,
               "num_mel_bins": 128, "max_source_positions": 1500, "vocab_size": 51866}
    enc_config = whisper_encoder_config(whisper, source="whisper-large-v3/config.json")
    vocab = 128256 + len(ROLE_TOKENS) + 1  # Llama-3.1's vocabulary with the dialogue markers and the speech slot
    with torch.device("meta"):
        llm = Transformer(llm_config)
        encoder = SpeechEncoder(enc_config)
        adapter = SpeechAdapter(1280, llm_config.n_embd, m["stack"], m["adapter_hidden"])
        model = KeOmni(encoder, adapter, Transformer(llm_config.replace(vocab_size=vocab)))
    assert n_params(llm) == LLAMA_3_1_8B
    assert n_params(encoder) + 1500 * 1280 == WHISPER_LARGE_V3_ENCODER  # the position table is a buffer here
    # 5 stacked 1280-d frames (50 Hz -> 10 Hz) -> 4096 -> 4096, each Linear with bias
    assert n_params(adapter) == (5 * 1280 * 4096 + 4096) + (4096 * 4096 + 4096)
    rows = model.llm.config.padded_vocab_size - 128256
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == LLAMA_3_1_8B + 2 * rows * 4096 + n_params(adapter)  # the encoder is frozen
    assert n_params(model) == trained + n_params(encoder) and rows - len(ROLE_TOKENS) < llm_config.padded_vocab_multiple
