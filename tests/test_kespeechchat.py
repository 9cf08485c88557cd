"""Ke-SpeechChat reader: one test per bad-input class; each error names the file, the dialogue id and the field."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from datamodules.kespeechchat import (KeSpeechChatError, MissingAudioError, collect_utterances, load_audio,
                                      read_dialogues, write_dialogue)

SR = 16000


def _wav(path: Path, seconds: float = 0.5, sr: int = SR, channels: int = 1, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t)
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, sr, subtype=subtype)
    return path


def _dialogue(did: str = "d1", n_turns: int = 2) -> dict:
    turns = [{"channel": i % 2, "speaker": ("spkA", "agentFemale")[i % 2], "text": f"turn {i} text",
              "start": 0.5 * i, "end": 0.5 * (i + 1), "audio_path": f"{did}/{did}_{i}.wav",
              "words": [{"word": "turn", "start": 0.0, "end": 0.2}]} for i in range(n_turns)]
    return {"id": did, "speaker": {"spkA": {"role": "user", "gender": "male"},
                                   "agentFemale": {"role": "agent", "gender": "female"}},
            "audio": {"channel": 2, "duration": 0.5 * n_turns, "sample_rate": SR},
            "channel": [{"channel_index": 0, "language": "en"}, {"channel_index": 1, "language": "en"}],
            "dialog": turns}


def _corpus(root: Path, dialogues: list[dict]) -> Path:
    """One JSON per dialogue plus its wavs, like a real corpus folder."""
    for d in dialogues:
        write_dialogue(d, root / f"{d['id']}.json")
        for t in d["dialog"]:
            if isinstance(t.get("audio_path"), str):
                _wav(root / t["audio_path"])
    return root


def _bad(tmp_path: Path, mutate, did: str = "d1") -> Path:
    d = _dialogue(did)
    mutate(d)
    return _corpus(tmp_path / "data", [d])


def _assert_names(err: Exception, *parts: str) -> None:
    for part in parts:
        assert part in str(err), f"{part!r} not in {str(err)!r}"


def test_round_trip_reads_what_was_written(tmp_path):
    root = _corpus(tmp_path / "data", [_dialogue("d1"), _dialogue("d2", 3)])
    dialogues = list(read_dialogues(root))
    assert [d.id for d in dialogues] == ["d1", "d2"]
    assert dialogues[1].turns[2].words[0].word == "turn"
    utts = collect_utterances(root, sample_rate=SR)
    assert [u.id for u in utts] == ["d1_0", "d1_1", "d2_0", "d2_1", "d2_2"]
    u = utts[1]
    assert (u.role, u.gender, u.language, u.speaker) == ("agent", "female", "en", "agentFemale")
    assert u.audio_path.is_absolute() and u.audio_path.is_file() and u.source == root / "d1.json"
    assert u.words == (("turn", 0.0, 0.2),) and u.duration == pytest.approx(0.5)


def test_bad_json_names_file(tmp_path):
    path = tmp_path / "d1.json"
    path.write_text('{"id": "d1", "speaker": ', encoding="utf-8")
    with pytest.raises(KeSpeechChatError, match="invalid JSON") as e:
        list(read_dialogues(path))
    _assert_names(e.value, str(path))


def test_bad_jsonl_line_names_line(tmp_path):
    path = tmp_path / "all.jsonl"
    path.write_text(json.dumps(_dialogue("d1")) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(KeSpeechChatError, match="invalid JSON") as e:
        list(read_dialogues(path))
    _assert_names(e.value, f"{path}:2")


@pytest.mark.parametrize(("mutate", "field", "reason"), [
    (lambda d: d["dialog"][1].pop("text"), "dialog[1].text", "missing field"),
    (lambda d: d["dialog"][0].update(start="0.0"), "dialog[0].start", "expected number, got str"),
    (lambda d: d["dialog"][0].update(channel=True), "dialog[0].channel", "got bool"),
    (lambda d: d["audio"].update(sample_rate=22050.5), "audio.sample_rate", "expected integer"),
    (lambda d: d["dialog"][1].update(text="   "), "dialog[1].text", "empty text"),
    (lambda d: d["dialog"][1].update(start=3.2, end=1.0), "dialog[1].start", "3.2 > end 1.0"),
    (lambda d: d["dialog"][0].update(speaker="nobody"), "dialog[0].speaker", "unknown speaker 'nobody'"),
    (lambda d: d["dialog"][0].update(channel=5), "dialog[0].channel", "channel 5 is not"),
    (lambda d: d["dialog"][0].pop("audio_path"), "dialog[0].audio_path", "missing field"),
    (lambda d: d["speaker"]["spkA"].update(role="robot"), "speaker['spkA'].role", "'robot' is not one of"),
    (lambda d: d["dialog"][0]["words"][0].update(start=0.3, end=0.1), "dialog[0].words[0].start", "start <= end"),
], ids=["missing-text", "string-start", "bool-channel", "float-rate", "empty-text", "start-after-end",
        "unknown-speaker", "bad-channel", "no-audio-path", "bad-role", "bad-word-times"])
def test_schema_errors_name_file_dialogue_and_field(tmp_path, mutate, field, reason):
    root = _bad(tmp_path, mutate)
    with pytest.raises(KeSpeechChatError) as e:
        collect_utterances(root, sample_rate=SR)
    _assert_names(e.value, str(root / "d1.json"), "dialogue 'd1'", field, reason)
    assert e.value.field == field and e.value.dialogue_id == "d1"


def test_missing_audio_file(tmp_path):
    root = _corpus(tmp_path / "data", [_dialogue()])
    (root / "d1" / "d1_1.wav").unlink()
    with pytest.raises(MissingAudioError) as e:
        collect_utterances(root, sample_rate=SR)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    _assert_names(e.value, str(root / "d1.json"), "dialogue 'd1'", "dialog[1].audio_path", "not found")


def test_corrupt_audio(tmp_path):
    root = _corpus(tmp_path / "data", [_dialogue()])
    (root / "d1" / "d1_0.wav").write_bytes(b"RIFF garbage, not a wav at all" * 10)
    with pytest.raises(KeSpeechChatError, match="unreadable audio") as e:
        collect_utterances(root, sample_rate=SR)
    _assert_names(e.value, str(root / "d1.json"), "dialogue 'd1'", "dialog[0].audio_path")
    with pytest.raises(KeSpeechChatError, match="unreadable audio"):
        load_audio(root / "d1" / "d1_0.wav", SR, context="d1 turn 0")


def test_empty_audio(tmp_path):
    root = _corpus(tmp_path / "data", [_dialogue()])
    sf.write(root / "d1" / "d1_1.wav", np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(KeSpeechChatError, match="0 frames") as e:
        collect_utterances(root, sample_rate=SR)
    _assert_names(e.value, str(root / "d1.json"), "dialogue 'd1'", "dialog[1].audio_path")


def test_clip_longer_than_max_duration(tmp_path):
    root = _corpus(tmp_path / "data", [_dialogue()])
    _wav(root / "d1" / "d1_0.wav", seconds=2.0)
    with pytest.raises(KeSpeechChatError, match="longer than max_duration 1.5") as e:
        collect_utterances(root, sample_rate=SR, max_duration=1.5)
    _assert_names(e.value, str(root / "d1.json"), "dialogue 'd1'", "dialog[0].audio_path")


def test_nan_samples_raised_by_load_audio(tmp_path):
    path = tmp_path / "nan.wav"
    x = np.full(800, 0.1, dtype=np.float32)
    x[100] = np.nan
    sf.write(path, x, SR, subtype="FLOAT")
    with pytest.raises(KeSpeechChatError, match="NaN") as e:
        load_audio(path, SR, context="data/d1.json: dialogue 'd1' dialog[0].audio_path")
    _assert_names(e.value, str(path), "dialogue 'd1'", "dialog[0].audio_path")


def test_load_audio_resamples_and_downmixes(tmp_path):
    y = load_audio(_wav(tmp_path / "a.wav", seconds=1.0, sr=22050), SR)
    assert y.dtype == np.float32 and y.ndim == 1 and abs(len(y) - SR) <= 1
    stereo = tmp_path / "s.wav"
    sf.write(stereo, np.stack([np.full(400, 0.5), np.full(400, -0.1)], axis=1), SR)
    y = load_audio(stereo, SR)
    assert y.shape == (400,) and np.allclose(y, 0.2, atol=1e-3)
    with pytest.raises(MissingAudioError):
        load_audio(tmp_path / "nope.wav", SR)


def test_skip_invalid_reports_and_keeps_the_good(tmp_path, caplog):
    good, broken_schema, broken_audio = _dialogue("d1"), _dialogue("d2"), _dialogue("d3", 3)
    broken_schema["dialog"][0]["speaker"] = "ghost"
    root = _corpus(tmp_path / "data", [good, broken_schema, broken_audio])
    (root / "d3" / "d3_2.wav").unlink()
    _wav(root / "d3" / "d3_0.wav", seconds=3.0)
    report = tmp_path / "report.jsonl"
    with caplog.at_level(logging.WARNING):
        utts = collect_utterances(root, sample_rate=SR, max_duration=2.0, skip_invalid=True, report_path=report)
    assert [u.id for u in utts] == ["d1_0", "d1_1", "d3_1"]
    rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert [(r["dialogue_id"], r["field"]) for r in rows] == [
        ("d2", "dialog[0].speaker"), ("d3", "dialog[0].audio_path"), ("d3", "dialog[2].audio_path")]
    assert all(r["source"] and r["reason"] for r in rows)
    assert "skipped 2 of 5 utterances and 1 invalid dialogues" in caplog.text and str(report) in caplog.text


def test_everything_rejected_raises(tmp_path):
    root = _corpus(tmp_path / "data", [_dialogue()])
    for wav in (root / "d1").glob("*.wav"):
        wav.unlink()
    with pytest.raises(KeSpeechChatError, match="no valid utterances"):
        collect_utterances(root, sample_rate=SR, skip_invalid=True, report_path=tmp_path / "r.jsonl")


def test_jsonl_and_json_list_read_like_a_folder(tmp_path):
    dialogues = [_dialogue("d1"), _dialogue("d2", 3)]
    root = _corpus(tmp_path / "data", dialogues)
    (root / "all.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dialogues), encoding="utf-8")
    (root / "list.txt").write_text(json.dumps(dialogues), encoding="utf-8")
    (root / "list.txt").rename(tmp_path / "list.json")
    for d in dialogues:  # wavs resolve relative to each source file's folder
        for t in d["dialog"]:
            _wav(tmp_path / t["audio_path"])

    def key(utts):
        return [(u.id, u.text, u.speaker, u.start, u.end, u.words, u.audio_path.name) for u in utts]

    folder = key(collect_utterances(root, sample_rate=SR))
    assert key(collect_utterances(root / "all.jsonl", sample_rate=SR)) == folder
    assert key(collect_utterances(tmp_path / "list.json", sample_rate=SR)) == folder


def test_write_dialogue_is_pretty_utf8(tmp_path):
    d = _dialogue()
    d["dialog"][0]["text"] = "小明的猫是什么颜色？"
    path = tmp_path / "out" / "d1.json"
    write_dialogue(d, path)
    text = path.read_text(encoding="utf-8")
    assert "小明的猫" in text and "\n  " in text
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
