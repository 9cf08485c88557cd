"""Whisper word alignment: DTW on known attention, a tiny random Whisper end to end, and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

transformers = pytest.importorskip("transformers")

from lit_keomni import align as A  # noqa: E402

SPECIALS = ["<|startoftranscript|>", "<|en|>", "<|zh|>", "<|transcribe|>", "<|notimestamps|>"]


def save_whisper(folder: Path, *, alignment_heads: bool = True) -> Path:
    """A tiny random Whisper with a byte-level tokenizer (one token per UTF-8 byte), saved for offline loading."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = transformers.WhisperTokenizer(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[])
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    ids = dict(zip(SPECIALS, tok.convert_tokens_to_ids(SPECIALS)))
    transformers.WhisperProcessor(feature_extractor=transformers.WhisperFeatureExtractor(feature_size=80),
                                  tokenizer=tok).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, max_target_positions=128,
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=256, pad_token_id=256, bos_token_id=256)
    transformers.WhisperForConditionalGeneration(config).save_pretrained(str(folder))
    # what openai/whisper-* folders carry in generation_config.json (transformers does not save these fields itself)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen.update(lang_to_id={"<|en|>": ids["<|en|>"], "<|zh|>": ids["<|zh|>"]},
               task_to_id={"transcribe": ids["<|transcribe|>"]}, no_timestamps_token_id=ids["<|notimestamps|>"],
               is_multilingual=True)
    if alignment_heads:
        gen["alignment_heads"] = [[1, 0], [1, 1]]
    gen_path.write_text(json.dumps(gen))
    return folder


@pytest.fixture(scope="module")
def whisper(tmp_path_factory) -> Path:
    return save_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper")


def write_corpus(folder: Path, turns: list[tuple[str, str, float]], *, words_on_first: bool = False) -> Path:
    """One dialogue whose turns are (language, text, seconds of noise) wavs; returns the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    dialog, clock = [], 0.0
    for i, (lang, text, seconds) in enumerate(turns):
        sf.write(folder / f"t{i}.wav", (0.1 * rng.standard_normal(int(22050 * seconds))).astype(np.float32), 22050)
        row = {"channel": i % 2, "speaker": ("u", "a")[i % 2], "text": text, "start": clock, "end": clock + seconds,
               "audio_path": f"t{i}.wav"}
        if words_on_first and i == 0:
            row["words"] = [{"word": "kept", "start": 0.0, "end": 0.1}]
        dialog.append(row)
        clock += seconds
    d = {"id": "d1", "speaker": {"u": {"role": "user", "gender": "male"}, "a": {"role": "agent", "gender": "female"}},
         "audio": {"channel": 2, "duration": clock, "sample_rate": 22050},
         "channel": [{"channel_index": 0, "language": turns[0][0]}, {"channel_index": 1, "language": turns[1][0]}],
         "dialog": dialog}
    path = folder / "d1.json"
    path.write_text(json.dumps(d, ensure_ascii=False))
    return path


def test_dtw_finds_the_diagonal_of_a_known_attention():
    # row r attends to frames 10r..10r+9: the path enters row r at frame 10r
    w = torch.full((2, 5, 50), 0.01)
    for r in range(5):
        w[:, r, 10 * r : 10 * r + 10] = 1.0
    np.testing.assert_allclose(A.row_times(w), [0.0, 0.2, 0.4, 0.6, 0.8])
    rows, frames = A.dtw(np.zeros((3, 7)))
    assert rows[0] == frames[0] == 0 and rows[-1] == 2 and frames[-1] == 6
    assert (np.diff(rows) >= 0).all() and (np.diff(frames) >= 0).all()


def test_word_times_spread_tokens_over_characters():
    # byte tokens of "一二": three per character; one multi-character token "ab cd" spanning two English words
    offsets = [(0, 1)] * 3 + [(1, 2)] * 3
    starts, ends = np.arange(6) * 0.1, np.arange(1, 7) * 0.1
    assert A.word_times("一二", "zh", offsets, starts, ends, 1.0) == [("一", 0.0, 0.3), ("二", 0.3, 0.6)]
    words = A.word_times("ab cd", "en", [(0, 5)], np.array([0.0]), np.array([1.0]), 0.9)
    assert words == [("ab", 0.0, 0.4), ("cd", 0.6, 0.9)]  # clipped to the clip's 0.9 s


def test_align_writes_monotone_words_for_every_turn(whisper, tmp_path):
    from datamodules.kespeechchat import collect_utterances, read_dialogues
    from datamodules.toy_world import split_words

    turns = [("en", "Ella works as a cook, and Zoe's dog sleeps.", 2.0), ("zh", "好的，那他有什么爱好？", 1.5),
             ("en", "What happened next?", 1.0)]
    src = write_corpus(tmp_path / "src", turns, words_on_first=True)
    out = tmp_path / "aligned"
    summary = A.align(whisper, src, out, batch_size=2, device="cpu")
    assert summary == {"dialogues": 1, "turns": 3, "aligned_turns": 2, "kept_turns": 1}
    (d,) = read_dialogues(out)  # the copies validate, and their audio paths resolve from the new folder
    assert len(collect_utterances(out, sample_rate=16000)) == 3
    assert [(w.word, w.start, w.end) for w in d.turns[0].words] == [("kept", 0.0, 0.1)]
    for (lang, text, seconds), turn in zip(turns[1:], d.turns[1:]):
        assert [w.word for w in turn.words] == [w for _, _, w in split_words(text, lang)]
        times = [(w.start, w.end) for w in turn.words]
        assert all(0 <= s <= e <= seconds for s, e in times)
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(times, times[1:]))  # monotone, no overlap
        assert times[-1][1] > times[0][0]
    # without alignment heads: the upper half of the decoder's heads, same output format
    plain = save_whisper(tmp_path / "no-heads", alignment_heads=False)
    A.align(plain, src, tmp_path / "aligned2", device="cpu")
    (d2,) = read_dialogues(tmp_path / "aligned2")
    assert [w.word for w in d2.turns[2].words] == ["What", "happened", "next"]


def test_bad_inputs_give_one_clear_error(whisper, tmp_path):
    from lit_keomni.cli import main

    src = write_corpus(tmp_path / "src", [("en", "hello there", 1.0), ("zh", "你好", 1.0)])
    with pytest.raises(FileNotFoundError, match="no-whisper: Whisper folder not found"):
        A.align(tmp_path / "no-whisper", src, tmp_path / "o")
    with pytest.raises(SystemExit, match="error: .*no-whisper: Whisper folder not found"):
        main(["align", "--whisper", str(tmp_path / "no-whisper"), "--data", str(src), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="missing.json: no such dialogue file"):
        A.align(whisper, tmp_path / "missing.json", tmp_path / "o")
    bad = json.loads(src.read_text())
    bad["channel"][1]["language"] = "fr"
    (tmp_path / "fr").mkdir()
    shutil.copy(tmp_path / "src" / "t0.wav", tmp_path / "fr" / "t0.wav")
    shutil.copy(tmp_path / "src" / "t1.wav", tmp_path / "fr" / "t1.wav")
    (tmp_path / "fr" / "d1.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"dialogue 'd1' dialog\[1\].text: language 'fr' .*'lang_to_id'"):
        A.align(whisper, tmp_path / "fr" / "d1.json", tmp_path / "o", device="cpu")
    (tmp_path / "src" / "t1.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"dialog\[1\].audio_path"):
        A.align(whisper, src, tmp_path / "o", device="cpu")
    long = write_corpus(tmp_path / "long", [("en", "one " * 200, 1.0), ("en", "two", 1.0)])
    with pytest.raises(ValueError, match=r"dialog\[0\].text: \d+ Whisper tokens, more than its 128 positions"):
        A.align(whisper, long, tmp_path / "o", device="cpu")
    hubert_like = tmp_path / "not-whisper"
    hubert_like.mkdir()
    (hubert_like / "config.json").write_text('{"model_type": "hubert"}')
    with pytest.raises(ValueError, match="field 'model_type' is 'hubert', expected 'whisper'"):
        A.align(hubert_like, write_corpus(tmp_path / "ok", [("en", "hi", 1.0), ("en", "yo", 1.0)]), tmp_path / "o")
