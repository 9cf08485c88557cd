"""Released text vocabularies: GLM-4's tiktoken `tokenizer.model`, Llama-3's and Qwen2.5's `tokenizer.json`.

GLM-4: golden ids of THUDM's `ChatGLM4Tokenizer` (tests/golden/make_glm4_tokenizer.py) on a small GLM-4-style
vocabulary, plus a live comparison with `tiktoken` itself. Llama-3 / Qwen2.5: tiny tokenizer.json files with each
model's real pre-tokenizer setup, specials and tokenizer_config.json, compared with transformers' own loader.
"""

import base64
import json
import random
import shutil
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lit_keomni.text.tiktoken_bpe import (GLM4_PAT_STR, GLM4_SPECIAL_TOKENS, read_ranks, token_bytes, token_text,
                                          write_ranks)
from lit_keomni.text.tokenizer import ROLE_TOKENS, TextTokenizer, audio_token

GOLDEN = Path(__file__).parent / "golden" / "glm4_tokenizer"
REF = json.loads((GOLDEN / "reference.json").read_text(encoding="utf-8"))
SPEECH_ADDED = ("<|begin_of_audio|>", "<|end_of_audio|>")


@pytest.fixture
def glm(tmp_path: Path) -> Path:
    """A private copy of the golden GLM-4-style folder (tokenizer.model + tokenizer_config.json)."""
    folder = tmp_path / "glm"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(GOLDEN / name, folder / name)
    return folder


def _config(folder: Path) -> dict:
    return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))


def _write_config(folder: Path, config: dict) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def _has_speech(ids: list[int]) -> bool:
    speech = {i for t, i in REF["token_ids"].items() if t.startswith("<|audio_") or t in SPEECH_ADDED}
    return bool(speech & set(ids))


# ---------------------------------------------------------------- GLM-4: golden ids of the reference tokenizer


def test_glm4_ids_match_reference(glm: Path) -> None:
    tok = TextTokenizer.from_folder(glm)
    assert tok.released_format == "tokenizer.model"
    for case in REF["cases"]:
        assert tok.encode(case["text"]) == case["ids_plain"], case["text"]
        assert tok.encode(case["text"], add_special_tokens=True) == case["ids"] == case["call_ids"], case["text"]
    texts = [c["text"] for c in REF["cases"]]
    assert tok.encode_batch(texts) == [c["ids_plain"] for c in REF["cases"]]
    assert tok.vocab_size == REF["vocab_size"]
    assert all(tok.token_to_id(t) == i for t, i in REF["token_ids"].items())
    assert (tok.eos_id, tok.pad_id) == (REF["eos_token_id"], REF["pad_token_id"])
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None and REF["bos_token_id"] is None
    with pytest.raises(ValueError, match="bos_token"):
        tok.bos_id


def test_glm4_decode_matches_reference(glm: Path) -> None:
    """Decode with special tokens skipped equals the reference's. Excluded: ids holding speech tokens, which the
    reference's slow decode keeps as space-joined strings (they are not in its `additional_special_tokens`) while
    ours hides them like every special token (a speech answer decodes to its text)."""
    tok = TextTokenizer.from_folder(glm)
    compared = [c for c in REF["cases"] if not _has_speech(c["ids_plain"])]
    assert len(compared) >= 12
    for case in compared:
        assert tok.decode(case["ids_plain"]) == case["decode_skip_special"], case["text"]


def _glm_encoding(folder: Path) -> tiktoken.Encoding:
    """What `ChatGLM4Tokenizer` builds: tiktoken's own reader of the ranks, GLM-4's regex, the config's tokens."""
    ranks = load_tiktoken_bpe(str(folder / "tokenizer.model"))
    specials = {v["content"]: int(k) for k, v in _config(folder)["added_tokens_decoder"].items()}
    return tiktoken.Encoding("glm4", pat_str=GLM4_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Bilingual noise: words, Han characters (seen and unseen), digits, full-width forms, emoji, odd whitespace."""
    rng = random.Random(seed)
    pieces = ["the", " The", "speech", "token", " model", "It's", " I'LL", "don't", "12345", "3.14", "１２３",
              "今天", "天气", "语音", "识别", "鑫", "龘", "，", "。", "！", "？", "……", "😀", "👍🏽", "🇨🇳", "\n", "\r\n",
              "\t", "  ", "   ", "\u3000", "\u00a0", "café", "naïve", "Ω", "<|user|>", "<|audio_3|>", "<|endoftext|>",
              "[gMASK]", "<|audio_64|>", "'s", "--", "(x)", "$%^", "\x00", "\u2028"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_glm4_ids_match_tiktoken_live(glm: Path) -> None:
    enc = _glm_encoding(glm)
    tok = TextTokenizer.from_folder(glm)
    texts = [*_random_texts(400), *(c["text"] for c in REF["cases"])]
    ours = tok.encode_batch(texts)
    for text, ids in zip(texts, ours):
        assert ids == enc.encode(text, allowed_special="all"), text
        assert tok.decode(ids, skip_special=False) == enc.decode(ids), text


def test_glm4_speech_tokens_used_not_added(glm: Path) -> None:
    tok = TextTokenizer.from_folder(glm)
    size = tok.vocab_size
    tok.add_speech_tokens(64)
    assert tok.vocab_size == size  # glm-4-voice-9b's own <|audio_N|>, roles and begin/end of audio are used
    assert tok.num_audio_tokens == 64
    assert tok.audio_token_offset == REF["token_ids"][audio_token(0)]
    assert all(tok.token_to_id(t) == REF["token_ids"][t] for t in ROLE_TOKENS)
    codes = [0, 63, 7]
    ids = tok.speech_to_ids(codes)
    assert ids == [REF["token_ids"][audio_token(c)] for c in codes] and tok.ids_to_speech(ids) == codes
    with pytest.raises(ValueError, match=r"64 audio tokens.*codebook_size=4096") as err:
        tok.add_speech_tokens(4096)
    assert str(glm / "tokenizer_config.json") in str(err.value)


def test_glm4_save_released_gives_back_the_released_files(glm: Path, tmp_path: Path) -> None:
    tok = TextTokenizer.from_folder(glm)
    tok.add_speech_tokens(64)
    out = tmp_path / "released"
    assert tok.save_released(out) == out / "tokenizer.model"
    assert (out / "tokenizer.model").read_bytes() == (GOLDEN / "tokenizer.model").read_bytes()
    assert _config(out) == _config(glm)
    again = TextTokenizer.from_folder(out)
    assert again.encode_batch([c["text"] for c in REF["cases"]]) == [c["ids_plain"] for c in REF["cases"]]


def test_glm4_export_reads_in_transformers_and_releases_again(glm: Path, tmp_path: Path) -> None:
    """Export (`save`: tokenizer.json) -> transformers' fast tokenizer gives the reference's ids, [gMASK]<sop>
    included; loading the export and `save_released` writes the released files again."""
    tok = TextTokenizer.from_folder(glm)
    path = tok.save(tmp_path / "export")
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for case in REF["cases"]:
        assert fast(case["text"], add_special_tokens=False)["input_ids"] == case["ids_plain"], case["text"]
        assert fast(case["text"])["input_ids"] == case["ids"], case["text"]
    loaded = TextTokenizer.from_file(path)
    assert (loaded.released_format, loaded.eos_id, loaded.pad_id, loaded.bos_token) == (
        "tokenizer.model", REF["eos_token_id"], REF["pad_token_id"], None)
    loaded.save_released(tmp_path / "released")
    assert (tmp_path / "released" / "tokenizer.model").read_bytes() == (GOLDEN / "tokenizer.model").read_bytes()
    assert _config(tmp_path / "released") == _config(glm)


def _glm4_base(glm: Path) -> Path:
    """GLM-4-9B's shape: only GLM-4's 14 special tokens after the ranks, no speech tokens."""
    config = _config(glm)
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                      if v["content"] in config["additional_special_tokens"]}
    _write_config(glm, config)
    return glm


def test_glm4_base_gets_missing_speech_tokens_appended(glm: Path, tmp_path: Path) -> None:
    tok = TextTokenizer.from_folder(_glm4_base(glm))
    n = REF["num_ranks"]
    assert tok.vocab_size == n + 14
    tok.add_speech_tokens(16)
    assert tok.token_to_id("<|user|>") == REF["token_ids"]["<|user|>"]  # GLM-4's own, not a copy
    assert [tok.token_to_id(t) for t in SPEECH_ADDED] == [n + 14, n + 15]
    assert tok.audio_token_offset == n + 16 and tok.vocab_size == n + 16 + 16
    tok.save_released(tmp_path / "out")
    enc = _glm_encoding(tmp_path / "out")  # the reference's view of the written files
    text = "<|user|>你好<|begin_of_audio|><|audio_0|><|audio_15|><|end_of_audio|>"
    assert enc.encode(text, allowed_special="all") == tok.encode(text)
    assert tok.encode(text)[-4:] == [n + 14, n + 16, n + 31, n + 15] == [
        tok.token_to_id("<|begin_of_audio|>"), *tok.speech_to_ids([0, 15]), tok.token_to_id("<|end_of_audio|>")]


def test_glm4_config_without_added_tokens_numbers_specials_after_ranks(glm: Path) -> None:
    """Older copies of the remote code number GLM-4's 14 special tokens after the ranks themselves."""
    config = _config(glm)
    for key in ("added_tokens_decoder", "eos_token", "pad_token"):
        del config[key]
    _write_config(glm, config)
    tok = TextTokenizer.from_folder(glm)
    case = next(c for c in REF["cases"] if c["text"].startswith("<|user|>"))
    assert tok.encode(case["text"], add_special_tokens=True) == case["ids"]
    assert (tok.eos_id, tok.pad_id) == (REF["eos_token_id"], REF["pad_token_id"])


def test_token_built_from_a_higher_ranked_part_matches_tiktoken(tmp_path: Path) -> None:
    """tiktoken forms b"abc" (rank 256) from b"ab" (rank 257): every merge is a candidate once its parts exist.
    b"qzj" no merge makes: tiktoken emits it only as a whole pre-token (the BPE's `ignore_merges`)."""
    tokens = [bytes([b]) for b in range(256)] + [b"abc", b"ab", b"cd", b" a", b"qzj"]
    lines = [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(tokens)]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok = TextTokenizer.from_folder(tmp_path)  # no config: GLM-4's 14 specials numbered after the ranks
    ranks = load_tiktoken_bpe(str(tmp_path / "tokenizer.model"))
    enc = tiktoken.Encoding("t", pat_str=GLM4_PAT_STR, mergeable_ranks=ranks,
                            special_tokens={t: len(tokens) + i for i, t in enumerate(GLM4_SPECIAL_TOKENS)})
    for text in ["abcd", "abc", "xabcx ab abcdabc", " abcd<|user|>abca", "qzj", "qzjq", *_random_texts(50)]:
        assert tok.encode(text) == enc.encode(text, allowed_special="all"), text
    assert tok.encode("xabcx") == [ord("x"), 256, ord("x")] and tok.encode("qzj") == [260]
    assert tok.eos_id == 261 and tok.token_to_id("<|end_of_video|>") == 274


# ---------------------------------------------------------------- GLM-4: bad files, one clear error each


def test_byte_alphabet_and_rank_file_round_trip(tmp_path: Path) -> None:
    every = bytes(range(256))
    assert token_bytes(token_text(every)) == every
    assert set(token_text(every)) == set(pre_tokenizers.ByteLevel.alphabet())
    assert token_text(b" the") == "\u0120the"  # GPT-2's "Ġ": what ByteLevel writes a space as
    ranks = read_ranks(GOLDEN / "tokenizer.model")
    assert ranks == load_tiktoken_bpe(str(GOLDEN / "tokenizer.model"))
    write_ranks(ranks, tmp_path / "tokenizer.model")
    assert (tmp_path / "tokenizer.model").read_bytes() == (GOLDEN / "tokenizer.model").read_bytes()


def test_tokenizer_model_without_every_byte_is_rejected(tmp_path: Path) -> None:
    lines = [f"{base64.b64encode(bytes([b])).decode()} {r}" for r, b in enumerate(b for b in range(256) if b != 7)]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"tokenizer\.model: byte 0x07 has no rank"):
        TextTokenizer.from_folder(tmp_path)


def test_bad_tokenizer_model_line_is_named(glm: Path) -> None:
    lines = (glm / "tokenizer.model").read_text().splitlines(keepends=True)
    lines[41] = "not-base64!! 41\n"
    (glm / "tokenizer.model").write_text("".join(lines))
    with pytest.raises(ValueError, match=r"tokenizer\.model: line 42 is not 'base64-token rank'"):
        TextTokenizer.from_folder(glm)


def test_tokenizer_model_with_missing_rank_is_rejected(glm: Path) -> None:
    lines = (glm / "tokenizer.model").read_text().splitlines(keepends=True)
    (glm / "tokenizer.model").write_text("".join(lines[:300] + lines[301:]))
    with pytest.raises(ValueError, match=r"tokenizer\.model: ranks must be .* rank 300 is missing"):
        TextTokenizer.from_folder(glm)


def test_added_token_colliding_with_a_rank_is_rejected(glm: Path) -> None:
    config = _config(glm)
    config["added_tokens_decoder"]["17"] = config["added_tokens_decoder"].pop(str(REF["num_ranks"] + 79))
    _write_config(glm, config)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: field added_tokens_decoder\['17'\] "
                                         r"\('<\|audio_63\|>'\) collides with rank 17 of .*tokenizer\.model"):
        TextTokenizer.from_folder(glm)


def test_gap_in_added_token_ids_is_rejected(glm: Path) -> None:
    config = _config(glm)
    last = REF["num_ranks"] + 79
    config["added_tokens_decoder"][str(last + 5)] = config["added_tokens_decoder"].pop(str(last))
    _write_config(glm, config)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: added token '<\|audio_63\|>' has id "
                                         rf"{last + 5}, .*expected {last}"):
        TextTokenizer.from_folder(glm)


def test_non_consecutive_audio_ids_are_rejected(glm: Path) -> None:
    config = _config(glm)
    table = config["added_tokens_decoder"]
    a, b = str(REF["token_ids"][audio_token(1)]), str(REF["token_ids"][audio_token(2)])
    table[a], table[b] = table[b], table[a]
    _write_config(glm, config)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: <\|audio_1\|> has id .* must be consecutive"):
        TextTokenizer.from_folder(glm)


def test_eos_token_missing_from_vocabulary_is_rejected(glm: Path) -> None:
    config = _config(glm)
    config["eos_token"] = "<|im_end|>"
    _write_config(glm, config)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: field 'eos_token' names '<\|im_end\|>'"):
        TextTokenizer.from_folder(glm)


def test_folder_without_vocabulary_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no vocabulary: expected tokenizer\.json or tokenizer\.model"):
        TextTokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        TextTokenizer.from_folder(tmp_path / "nowhere")


# ---------------------------------------------------------------- Llama-3 and Qwen2.5: tokenizer.json as released

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>"]
TRAIN_TEXTS = [c["text"] for c in REF["cases"]] + [
    "The quick brown fox jumps over the lazy dog. Speech recognition turns audio into text.",
    "今天天气很好，我们去公园散步吧。语音识别把声音变成文字，语音合成把文字变成声音。",
    "我用 iPhone 手机听 podcast 学习英语。北京是中国的首都，上海是最大的城市？",
    "In 2024, 30% of 1,000,000 hours... It's what we've done; they'd say I'll do it.",
]
TEXTS = [
    "Hello, world! This is Llama-3 / Qwen2.5.",
    "今天天气很好，我们去公园散步吧。",
    "我用 iPhone 15 Pro 手机听 podcast，每天 30 分钟。1234567 ＡＢＣ１２３",
    "Emoji 😀👍🏽 and 中文 🇨🇳! café naïve ｶﾀｶﾅ",
    "line1\nline2\r\n\n\tindented  two  spaces   \n",
    "It's, I'LL, we've, DON'T",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|><|endoftext|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|>",
    "<|audio_3|> not yet a token",
    "",
]
RELEASED = {
    # name: (specials, tokenizer_config.json fields, expected (bos, eos, pad))
    "llama-3.1-instruct": (LLAMA3_SPECIALS, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                             "clean_up_tokenization_spaces": True,
                                             "tokenizer_class": "PreTrainedTokenizerFast"},
                           ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>")),
    "llama-3-base": (LLAMA3_SPECIALS, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                       "tokenizer_class": "PreTrainedTokenizerFast"},
                     ("<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>")),
    "qwen2.5-instruct": (QWEN2_SPECIALS, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                          "add_prefix_space": False, "errors": "replace",
                                          "split_special_tokens": False, "unk_token": None,
                                          "tokenizer_class": "Qwen2Tokenizer"},
                         (None, "<|im_end|>", "<|endoftext|>")),
    "qwen2.5-base": (QWEN2_SPECIALS, {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                      "tokenizer_class": "Qwen2Tokenizer"},
                     (None, "<|endoftext|>", "<|endoftext|>")),
}


def _released_folder(root: Path, name: str) -> Path:
    """A tiny `tokenizer.json` + `tokenizer_config.json` with the named model's real pre-tokenizer, post-processor,
    decoder and special tokens (after the trained vocabulary, as released), and its config's fields."""
    specials, fields, _ = RELEASED[name]
    llama = name.startswith("llama")
    tok = Tokenizer(models.BPE(ignore_merges=llama))
    if not llama:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT if llama else QWEN2_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=llama, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXTS * 2, trainer=trainer)
    tok.add_special_tokens(specials)
    if llama:
        bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|> $B", special_tokens=[bos]),
        ])
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    folder = root / name
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in specials}
    _write_config(folder, {"added_tokens_decoder": added, **fields, "model_max_length": 131072})
    return folder


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_tokenizer_json_matches_transformers(tmp_path: Path, name: str) -> None:
    folder = _released_folder(tmp_path, name)
    size = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    tok = TextTokenizer.from_folder(folder)
    assert tok.released_format == "tokenizer.json" and tok.vocab_size == size  # nothing appended
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == RELEASED[name][2]
    for ref in (AutoTokenizer.from_pretrained(str(folder)),
                PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))):
        for text in TEXTS:
            plain = tok.encode(text)
            assert plain == ref(text, add_special_tokens=False)["input_ids"], text
            assert tok.decode(plain) == ref.decode(plain, skip_special_tokens=True), text
            assert tok.decode(plain, skip_special=False) == ref.decode(plain), text
        assert tok.encode_batch(TEXTS, add_special_tokens=True) == ref(TEXTS)["input_ids"]
    ref = AutoTokenizer.from_pretrained(str(folder))
    assert (tok.eos_id, tok.pad_id) == (ref.eos_token_id, ref.pad_token_id or ref.eos_token_id)
    if ref.bos_token_id is None:
        with pytest.raises(ValueError, match="no bos token"):
            tok.bos_id
    else:
        assert tok.bos_id == ref.bos_token_id


@pytest.mark.parametrize("name", ["llama-3.1-instruct", "qwen2.5-instruct"])
def test_released_tokenizer_json_round_trip_with_speech_tokens(tmp_path: Path, name: str) -> None:
    folder = _released_folder(tmp_path, name)
    tok = TextTokenizer.from_folder(folder)
    size = tok.vocab_size
    tok.add_speech_tokens(8)
    assert tok.audio_token_offset == size + len(ROLE_TOKENS) and tok.vocab_size == size + len(ROLE_TOKENS) + 8
    tok.save_released(tmp_path / "out")
    config = _config(tmp_path / "out")
    assert {k: config[k] for k in RELEASED[name][1]} == RELEASED[name][1]
    ref = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert ref.convert_tokens_to_ids(audio_token(0)) == tok.audio_token_offset
    assert ref.convert_tokens_to_ids("<|user|>") == tok.token_to_id("<|user|>")
    text = "<|user|>\n你好<|begin_of_audio|><|audio_0|><|audio_7|><|end_of_audio|><|assistant|>Hi"
    assert ref(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (ref.eos_token_id, len(ref)) == (tok.eos_id, tok.vocab_size)
    exported = TextTokenizer.from_file(tok.save(tmp_path / "export"))  # an LM export's copy keeps the roles
    assert (exported.bos_token, exported.eos_token, exported.pad_token) == RELEASED[name][2]
    assert exported.num_audio_tokens == 8 and exported.released_format == "tokenizer.json"
