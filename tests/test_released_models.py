"""Released models through the stages: a released LM folder (its own vocabulary, its own layout) is an ``init_from`` of
stages 2-4 and an ``import lm``; its speech tokens are used, not added; its exports go back to that layout
(``release``) with the same weights; wrong pairings stop with one error naming the file and field.

The folders here are tiny stand-ins in the released layouts: GLM-4's vocabulary is the golden ``tokenizer.model`` +
``tokenizer_config.json`` (made by ChatGLM4Tokenizer, tests/golden/make_glm4_tokenizer.py) with its 64
``<|audio_N|>`` tokens, the weights random."""

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lit_keomni.chat import GlmChat
from lit_keomni.checkpoints import lm_tokenizer, load_lm
from lit_keomni.cli import main
from lit_keomni.configs import TransformerConfig
from lit_keomni.layouts import lm_format, load_lm_folder, save_lm_folder
from lit_keomni.nn.transformer import Transformer
from lit_keomni.release import import_lm, release
from lit_keomni.text.tokenizer import TextTokenizer
from tests.exports import tiny_exports, tiny_vocoder

GOLDEN = Path(__file__).resolve().parent / "golden"
GLM_VOCAB = GOLDEN / "glm4_tokenizer"
CHATGLM = GOLDEN / "chatglm"
CODES = 64  # the <|audio_N|> tokens of the golden GLM-4 vocabulary


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A 64-code stage-1 export and a vocoder for its units (random weights)."""
    return tiny_exports(tmp_path_factory.mktemp("tiny64"), codebook=CODES)


def glm_voice_folder(out: Path, seed: int = 0) -> Path:
    """A tiny glm-4-voice-9b stand-in in the ChatGLM layout: the golden ChatGLM config's options (from the reference
    code), rows for GLM-4's vocabulary with its audio tokens, random weights; GLM-4's vocabulary files."""
    config, _, _ = load_lm_folder(CHATGLM)
    vocab = TextTokenizer.from_folder(GLM_VOCAB).vocab_size
    config = config.replace(vocab_size=vocab, block_size=512)
    torch.manual_seed(seed)
    model = Transformer(config)
    save_lm_folder(model.state_dict(), model.config, out, "chatglm", vocab_size=vocab)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(GLM_VOCAB / f, out / f)
    (out / "modeling_chatglm.py").write_text("# the remote code a released folder carries\n")
    return out


def test_import_uses_the_released_speech_tokens_and_chats(exports, tmp_path):
    folder = glm_voice_folder(tmp_path / "glm-4-voice-9b")
    assert lm_format(folder) == "chatglm"
    out = import_lm(folder, exports["stage1"], tmp_path / "sft", template="streaming")
    model, tok, meta = load_lm(out)
    released = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    ids = {v["content"]: int(k) for k, v in released.items()}
    # the folder's <|audio_N|> ids are the speech tokens: nothing added, the LM's rows as released
    assert tok.audio_token_offset == ids["<|audio_0|>"] and tok.num_audio_tokens == CODES
    assert tok.vocab_size == TextTokenizer.from_folder(folder).vocab_size
    assert meta["weights_source"] == {"format": "chatglm", "folder": str(folder.resolve())}
    assert meta["template"] == "streaming" and meta["stage"] == "sft"
    chat = GlmChat.load(out, exports["vocoder"], block=5, lookahead=0)
    wav = torch.sin(torch.arange(16000) / 16000 * 2 * torch.pi * 220) * 0.3
    r = chat(wav, max_new_tokens=4, max_speech_seconds=1.0)
    assert len(r.text_ids) + len(r.units) > 0 and all(0 <= u < CODES for u in r.units)


def test_release_gives_the_released_layout_back(exports, tmp_path):
    folder = glm_voice_folder(tmp_path / "glm-4-voice-9b")
    out = import_lm(folder, exports["stage1"], tmp_path / "sft")
    back = release(out, tmp_path / "released")
    assert lm_format(back) == "chatglm" and (back / "modeling_chatglm.py").is_file()
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (TextTokenizer.from_folder(back).backend.get_vocab(with_added_tokens=True)
            == TextTokenizer.from_folder(folder).backend.get_vocab(with_added_tokens=True))
    # another layout on request: transformers' own GLM class (GLM-4-9B's network; Glm4 adds sandwich norms)
    glm = release(out, tmp_path / "glm", "glm")
    assert lm_format(glm) == "glm"
    with pytest.raises(ValueError, match=r"field 'sandwich_norm' is False; Glm4ForCausalLM needs True"):
        release(out, tmp_path / "glm4", "glm4")


def test_codebook_that_disagrees_with_the_released_audio_tokens(stage1_export, tmp_path):
    folder = glm_voice_folder(tmp_path / "glm-4-voice-9b")
    with pytest.raises(ValueError, match=r"tokenizer_config.json.*64 audio tokens.*codebook_size=16.*config.json"):
        lm_tokenizer(stage1_export, folder)


def test_vocabulary_that_does_not_match_the_weights(exports, tmp_path):
    """A released LM folder trained with its own vocabulary, but the stage names the stage-1 export's: the first
    differing token is named with both ids."""
    from lit_keomni.stages.pretrain import Pretrain

    folder = glm_voice_folder(tmp_path / "glm-4-voice-9b")
    model = Pretrain(config="tiny", speech_export=str(exports["stage1"]), init_from=str(folder))
    with pytest.raises(ValueError, match=r"tokenizer.model: the vocabulary .* does not match the stage's .*"
                                         r"model.tokenizer=None.*set model.tokenizer"):
        model.configure_model()


def test_a_folder_of_another_architecture_is_one_error(exports, tmp_path):
    import transformers

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(SystemExit, match=r"config.json.*(model_type|architectures)"):
        main(["import", "lm", str(tmp_path / "bert"), "--speech-export", str(exports["stage1"]),
              "--out", str(tmp_path / "x")])


def llama_folder(out: Path, prepared: Path) -> Path:
    """A tiny Llama-3.x stand-in: random LlamaForCausalLM weights and a byte-level BPE vocabulary with Llama-3's
    specials and roles (``<|eot_id|>`` ends a turn; no pad, no ``<|pad|>``, no dialogue role tokens)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [json.loads(line)["text"] for line in (prepared / "corpus.jsonl").read_text().splitlines()] \
        if (prepared / "corpus.jsonl").is_file() else ["Sam lives here.", "今天天气很好。", "The answer is four."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=172,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def test_keomni_sft_from_a_released_llama_with_its_own_vocabulary(prepared, stage1_export, tmp_path):
    """KE-Omni (continuous SFT) on a Llama-3-style folder: the speech slots and role tokens are appended to its
    vocabulary, answers end with its own eos (``<|eot_id|>``), and the folder's rows keep their ids."""
    from datamodules.sft import SFTDataModule
    from lit_keomni.checkpoints import Export
    from lit_keomni.stages.sft import SFT
    from lit_keomni.text.tokenizer import SPEECH_SLOT

    folder = llama_folder(tmp_path / "llama", prepared)
    released = TextTokenizer.from_folder(folder)
    L.seed_everything(0)
    model = SFT(mode="continuous", config="tiny", init_from=str(folder), tokenizer=str(folder),
                speech_export=str(stage1_export), encoder_from=str(stage1_export), warmup_steps=1,
                max_answer_tokens=8, export_dir=str(tmp_path / "export"))
    data = SFTDataModule(mode="continuous", tokenizer=str(folder), speech_export=str(stage1_export),
                         tokens_dir=str(tmp_path / "tokens"), sft_dir=str(tmp_path / "sft"), data_dir=str(prepared),
                         batch_size=4, num_workers=0, max_length=512)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        callbacks=[Export()], default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    tok = model.text_tokenizer
    assert tok.eos_token == "<|eot_id|>" and tok.pad_token == "<|eot_id|>"
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    assert all(vocab[t] == i for t, i in released.backend.get_vocab(with_added_tokens=True).items())
    assert vocab[SPEECH_SLOT] >= released.vocab_size
    batch = next(iter(data.train_dataloader()))
    slots = batch["input"] == vocab[SPEECH_SLOT]
    assert torch.equal(slots, batch["speech_mask"].bool()) and slots.any()
    assert (batch["target"] == tok.eos_id).any()  # answers end with the LLM's own eos, and it is trained
    assert (tmp_path / "export" / "config.json").is_file()


def test_chat_runs_the_released_tokenizer_and_lm(tmp_path):
    """`chat --pipeline glm` on GLM-4-Voice as released: the speech tokenizer folder (golden, made by the reference
    code, 64 codes) and a glm-4-voice-9b stand-in whose vocabulary holds 64 <|audio_N|> tokens, both imported; the
    question's tokens are the reference tokenizer's ids."""
    import soundfile as sf

    from lit_keomni.release import import_speech_tokenizer

    golden = GOLDEN / "glm4voice_tokenizer"
    stage1 = import_speech_tokenizer(golden, tmp_path / "stage1")
    sft = import_lm(glm_voice_folder(tmp_path / "glm-4-voice-9b"), stage1, tmp_path / "sft", template="streaming")
    chat = GlmChat.load(sft, tiny_vocoder(tmp_path / "vocoder", stage1), block=5, lookahead=0)
    wav = torch.from_numpy(sf.read(golden / "clip_1.flac", dtype="float32")[0])
    assert [int(c) for c in chat.speech.encoder([wav])[0]] == \
        load_file(str(golden / "reference.safetensors"))["ids_alone_1"].tolist()
    r = chat(wav, max_new_tokens=4, max_speech_seconds=1.0)
    assert len(r.text_ids) + len(r.units) > 0 and all(0 <= u < CODES for u in r.units)


def glm_base_folder(out: Path, seed: int = 1) -> Path:
    """A tiny GLM-4-9B-Base stand-in in the ChatGLM layout: GLM-4's vocabulary without speech tokens (its 14
    specials after the ranks), rows for it, random weights."""
    config, _, _ = load_lm_folder(CHATGLM)
    out.mkdir(parents=True)
    shutil.copy(GLM_VOCAB / "tokenizer.model", out / "tokenizer.model")
    cfg = json.loads((GLM_VOCAB / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items()
                                   if v["content"] in cfg["additional_special_tokens"]}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    vocab = TextTokenizer.from_folder(out).vocab_size
    torch.manual_seed(seed)
    model = Transformer(config.replace(vocab_size=vocab, block_size=512))
    save_lm_folder(model.state_dict(), model.config, out, "chatglm", vocab_size=vocab)
    return out


def test_pretrain_from_glm_4_9b_base_in_its_layout_and_back(prepared, stage1_export, speech_tokens, tmp_path):
    """Stage 3 init_from GLM-4-9B-Base (ChatGLM layout) with its own vocabulary: the 16 speech tokens of the stage-1
    export are appended after GLM-4's ids, the text rows start as released, and the export goes back to the ChatGLM
    layout with the same text rows."""
    from datamodules.pretrain import PretrainDataModule
    from lit_keomni.checkpoints import Export
    from lit_keomni.stages.pretrain import Pretrain

    folder = glm_base_folder(tmp_path / "glm-4-9b-base")
    base = TextTokenizer.from_folder(folder)
    L.seed_everything(0)
    model = Pretrain(config="tiny", overrides={"block_size": 64}, speech_export=str(stage1_export),
                     init_from=str(folder), tokenizer=str(folder), warmup_steps=1,
                     export_dir=str(tmp_path / "export"))
    data = PretrainDataModule(speech_export=str(stage1_export), tokens_dir=str(speech_tokens), data_dir=str(prepared),
                              packed_dir=str(tmp_path / "packed"), seq_len=64, batch_size=4, num_workers=0,
                              tokenizer=str(folder), mixture={"interleaved": 0.0, "speech": 0.2, "asr": 0.3,
                                                              "tts": 0.2})
    model.configure_model()
    released = load_file(str(folder / "model.safetensors"))
    emb = released["transformer.embedding.word_embeddings.weight"]
    assert torch.equal(model.model.embed.weight[: base.vocab_size], emb[: base.vocab_size])
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        callbacks=[Export()], default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    lm, tok, meta = load_lm(tmp_path / "export")
    assert meta["weights_source"]["format"] == "chatglm"
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    assert all(vocab[t] == i for t, i in base.backend.get_vocab(with_added_tokens=True).items())
    assert tok.num_audio_tokens == 16 and tok.audio_token_offset >= base.vocab_size
    back = release(tmp_path / "export", tmp_path / "released")
    assert lm_format(back) == "chatglm"
    config, state, _ = load_lm_folder(back)
    assert config.vocab_size >= tok.vocab_size and torch.equal(state["embed.weight"][: tok.vocab_size],
                                                               lm.embed.weight[: tok.vocab_size])
    assert TextTokenizer.from_folder(back).backend.get_vocab(with_added_tokens=True) == vocab


def test_sft_fine_tunes_glm_4_voice_9b_in_its_streaming_format(prepared, exports, tmp_path):
    """Stage 4 (discrete) init_from glm-4-voice-9b with its own vocabulary and template: its <|audio_N|> ids are the
    speech tokens (nothing added, the rows as released), the loss falls, and the export releases to the ChatGLM layout
    with one row per released row."""
    from datamodules.sft import SFTDataModule
    from lit_keomni.checkpoints import Export
    from lit_keomni.stages.sft import SFT

    folder = glm_voice_folder(tmp_path / "glm-4-voice-9b")
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.seed_everything(0)
    model = SFT(mode="discrete", config="tiny", overrides={"block_size": 512}, template="streaming",
                init_from=str(folder), tokenizer=str(folder),
                speech_export=str(exports["stage1"]), warmup_steps=1, lr=3e-3, export_dir=str(tmp_path / "export"))
    data = SFTDataModule(mode="discrete", template="streaming", tokenizer=str(folder),
                         speech_export=str(exports["stage1"]), tokens_dir=str(tmp_path / "tokens"),
                         sft_dir=str(tmp_path / "sft"), data_dir=str(prepared), batch_size=4, num_workers=0,
                         max_length=512)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        callbacks=[Record(), Export()], default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    assert losses[-1] < losses[0], losses
    lm, tok, meta = load_lm(tmp_path / "export")
    assert meta["template"] == "streaming" and meta["weights_source"]["format"] == "chatglm"
    assert tok.vocab_size == TextTokenizer.from_folder(folder).vocab_size and tok.num_audio_tokens == CODES
    back = release(tmp_path / "export", tmp_path / "released")
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
