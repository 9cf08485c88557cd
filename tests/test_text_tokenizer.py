"""TextTokenizer: bilingual round-trips, stable special ids, persistence, foreign tokenizers, speech extension."""

import json
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lit_keomni.text.tokenizer import ROLE_TOKENS, TextTokenizer, audio_token

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speech recognition turns audio into text, and text to speech does the reverse.",
    "I'm testing a small tokenizer for English and Mandarin!",
    "今天天气很好，我们去公园散步吧。",
    "语音识别把声音变成文字，语音合成把文字变成声音。",
    "我用 iPhone 手机听 podcast 学习英语。",
    "北京是中国的首都，上海是最大的城市？",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CORPUS * 3, vocab_size=300, min_frequency=2)


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",  # English: spaces restored
        "今天天气很好，我们去公园散步吧。",  # Chinese: no spaces invented (NFKC turns "，" into ",")
        "我用 iPhone 手机听 podcast 学习英语。",  # mixed: spacing kept exactly as written
        "the dog turns text into speech",  # unseen combination of seen words
        "上海天气",  # unseen combination of seen characters
        "fox  dog",  # double space
    ],
)
def test_round_trip(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.token_to_id("<|unk|>") not in ids
    assert tok.decode(ids) == unicodedata.normalize("NFKC", text)


def test_every_training_character_is_in_vocab(tok: TextTokenizer) -> None:
    unk = tok.token_to_id("<|unk|>")
    for line in CORPUS:
        assert unk not in tok.encode(line)
    # A character never seen in training maps to <|unk|> instead of vanishing silently.
    assert unk in tok.encode("鑫")


def test_han_characters_are_separate_pieces(tok: TextTokenizer) -> None:
    pieces = [tok.backend.id_to_token(i) for i in tok.encode("语音识别")]
    assert [p.lstrip("▁") for p in pieces if p != "▁"] == ["语", "音", "识", "别"]
    # English words carry the word-boundary marker.
    assert tok.backend.id_to_token(tok.encode("the dog")[-1]).startswith("▁")


def test_special_ids_distinct_and_stable(tok: TextTokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.token_to_id("<|unk|>") == 3
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True)
    assert tok.vocab_size <= 300
    ids = tok.encode("hello")
    assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(ids)  # encode adds no specials
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == tok.decode(ids)
    assert "<|bos|>" in tok.decode([tok.bos_id, *ids], skip_special=False)


def test_batch_matches_single(tok: TextTokenizer) -> None:
    batch = tok.encode_batch(CORPUS)
    assert batch == [tok.encode(t) for t in CORPUS]
    assert tok.decode_batch(batch) == [tok.decode(ids) for ids in batch]


def test_save_then_load_gives_identical_ids(tok: TextTokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "<|pad|>" and config["num_audio_tokens"] == 0
    loaded = TextTokenizer.from_file(path)
    assert loaded.encode_batch(CORPUS) == tok.encode_batch(CORPUS)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (
        tok.pad_id,
        tok.bos_id,
        tok.eos_id,
        tok.vocab_size,
    )


def _foreign_tokenizer(tmp_path: Path) -> Path:
    """A WordLevel tokenizer.json without any of our specials, as a stand-in for Whisper's or Llama-3's."""
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<|endoftext|>": 3}
    foreign = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    foreign.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "foreign" / "tokenizer.json"
    path.parent.mkdir()
    foreign.save(str(path))
    return path


def test_foreign_tokenizer_gets_specials(tmp_path: Path) -> None:
    tok = TextTokenizer.from_file(_foreign_tokenizer(tmp_path))
    assert tok.encode("hello world") == [1, 2]  # existing ids untouched
    assert sorted([tok.pad_id, tok.bos_id, tok.eos_id]) == [4, 5, 6]
    assert tok.vocab_size == 7


def test_add_speech_tokens_keeps_old_ids(tok: TextTokenizer, tmp_path: Path) -> None:
    tok = TextTokenizer.from_file(tok.save(tmp_path / "base"))  # private copy: the fixture is shared
    before = tok.encode_batch(CORPUS)
    specials = (tok.pad_id, tok.bos_id, tok.eos_id)
    old_size = tok.vocab_size

    tok.add_speech_tokens(16)
    assert tok.encode_batch(CORPUS) == before
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == specials
    assert tok.num_audio_tokens == 16
    assert tok.vocab_size == old_size + len(ROLE_TOKENS) + 16
    assert tok.audio_token_offset >= old_size
    assert all(tok.token_to_id(t) >= old_size for t in ROLE_TOKENS)

    codes = [0, 15, 7, 7, 3]
    ids = tok.speech_to_ids(codes)
    assert ids[0] == tok.audio_token_offset and ids[1] == tok.token_to_id(audio_token(15))
    assert tok.ids_to_speech(ids) == codes
    assert tok.decode(ids) == ""  # audio tokens are special: hidden from text output

    tok.add_speech_tokens(16)  # idempotent
    assert tok.vocab_size == old_size + len(ROLE_TOKENS) + 16
    with pytest.raises(ValueError, match="16.*32"):
        tok.add_speech_tokens(32)
    with pytest.raises(ValueError, match="not an audio token"):
        tok.ids_to_speech([ids[0], tok.eos_id])
    with pytest.raises(ValueError, match="outside"):
        tok.speech_to_ids([16])

    loaded = TextTokenizer.from_file(tok.save(tmp_path / "speech"))
    assert loaded.num_audio_tokens == 16 and loaded.speech_to_ids(codes) == ids


def test_speech_helpers_need_extension(tok: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="add_speech_tokens"):
        tok.speech_to_ids([0])


def test_config_audio_count_checked_on_load(tok: TextTokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "t")
    config_path = path.parent / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["num_audio_tokens"] = 1024
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_audio_tokens=1024") as err:
        TextTokenizer.from_file(path)
    assert str(config_path) in str(err.value)


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        TextTokenizer.from_file(missing)


def test_invalid_file_names_path(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        TextTokenizer.from_file(bad)


def test_empty_corpus_rejected() -> None:
    with pytest.raises(ValueError, match="texts"):
        TextTokenizer.train(["", ""])


def test_own_tokenizer_through_from_folder_and_save_released(tok: TextTokenizer, tmp_path: Path) -> None:
    """Our exports keep today's layout: from_folder reads them as from_file does, save_released is save."""
    tok.save(tmp_path / "export")
    loaded = TextTokenizer.from_folder(tmp_path / "export")
    assert loaded.released_format is None
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert loaded.encode_batch(CORPUS) == tok.encode_batch(CORPUS)
    assert loaded.encode(CORPUS[0], add_special_tokens=True) == tok.encode(CORPUS[0])  # no post-processor: no bos
    assert loaded.save_released(tmp_path / "out") == tmp_path / "out" / "tokenizer.json"
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "export" / "tokenizer.json").read_bytes()
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "released" not in config and config["eos_token"] == "<|eos|>"
