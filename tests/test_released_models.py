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

from lit_keomni.chat import GlmChat, read_input, tiny_exports
from lit_keomni.checkpoints import lm_tokenizer, load_lm
from lit_keomni.cli import main
from lit_keomni.configs import TransformerConfig
from lit_keomni.layouts import lm_format, load_lm_folder, save_lm_folder
from lit_keomni.nn.transformer import Transformer
from lit_keomni.release import import_lm, release
from lit_keomni.text.tokenizer import TextTokenizer

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
