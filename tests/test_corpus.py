"""Built-in corpus: deterministic, valid Ke-SpeechChat, sensible word timestamps, unique texts."""

import json
import re
from pathlib import Path

import pytest

from datamodules.corpus import AGENT_SPEAKERS, build_corpus
from datamodules.toy_world import number_words, plan_texts, storycloze_items, toy_world_texts
from datamodules.kespeechchat import collect_utterances, read_dialogues


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("c") / "corpus", num_dialogues=6, seed=11, workers=1, progress=False)


def test_same_seed_same_bytes_any_worker_count(small, tmp_path):
    again = build_corpus(tmp_path / "again", num_dialogues=6, seed=11, workers=2, progress=False)
    assert _files(again) == _files(small)
    other = build_corpus(tmp_path / "other", num_dialogues=6, seed=12, workers=1, progress=False)
    a, b = _files(small), _files(other)
    assert a["toy00000.json"] != b["toy00000.json"]


def test_finished_corpus_is_reused_and_a_foreign_one_refused(small, tmp_path):
    before = (small / "toy00000.json").stat().st_mtime_ns
    assert build_corpus(small, num_dialogues=6, seed=11, workers=1, progress=False) == small
    assert (small / "toy00000.json").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="holds another corpus"):
        build_corpus(small, num_dialogues=6, seed=99, workers=1, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a finished corpus"):
        build_corpus(tmp_path / "junk", num_dialogues=2, workers=1, progress=False)
    assert not list(tmp_path.glob(".*partial*"))


def test_schema_validates_and_layout(small):
    stamp = json.loads((small / "corpus.json").read_text())
    assert (stamp["seed"], stamp["num_dialogues"], stamp["sample_rate"]) == (11, 6, 22050)
    utts = collect_utterances(small, sample_rate=16000, max_duration=10.0)
    assert len(utts) == stamp["utterances"] >= 12
    for d in read_dialogues(small):
        assert d.audio["channel"] == 2 and d.audio["sample_rate"] == 22050
        clock = 0.0
        for i, t in enumerate(d.turns):
            assert t.audio_path == f"{d.id}/{d.id}_{i}_{t.speaker}.wav"
            assert t.channel == i % 2 and d.speakers[t.speaker]["role"] == ("user", "agent")[i % 2]
            assert t.start == pytest.approx(clock, abs=1e-5) and t.end > t.start
            clock = t.end
        assert d.audio["duration"] == pytest.approx(clock, abs=1e-5)
    assert {u.speaker for u in utts if u.role == "agent"} == set(AGENT_SPEAKERS)
    assert {u.language for u in utts} == {"en", "zh"}
    assert len({u.text for u in utts}) == len(utts)
    assert all(0.5 < u.duration < 10 for u in utts)


def test_word_timestamps(small):
    for u in collect_utterances(small, sample_rate=22050, max_duration=10.0):
        if u.language == "en":
            expected = re.findall(r"[A-Za-z0-9']+", u.text)
        else:
            expected = [c for c in u.text if "\u4e00" <= c <= "\u9fff"]
        assert [w for w, _, _ in u.words] == expected, u.text
        starts = [s for _, s, _ in u.words]
        assert starts == sorted(starts) and len(set(starts)) == len(starts), u.words
        assert all(0 <= s < e <= u.duration + 1e-3 for _, s, e in u.words), (u.duration, u.words)


def test_texts_unique_and_varied():
    plans = plan_texts(5, 300)
    texts = [t for _, turns in plans for t in turns]
    assert len(texts) == len(set(texts)) > 600
    assert {lang for lang, _ in plans} == {"en", "zh"}
    assert all(2 <= len(turns) <= 6 and len(turns) % 2 == 0 for _, turns in plans)
    assert not any(re.search(r"\d", t) for t in texts)  # numbers are words: transcripts stay unambiguous
    en_words = {w.lower() for lang, turns in plans if lang == "en" for t in turns for w in re.findall(r"[A-Za-z']+", t)}
    zh_chars = {c for lang, turns in plans if lang == "zh" for t in turns for c in t if "\u4e00" <= c <= "\u9fff"}
    assert len(en_words) > 250 and len(zh_chars) > 250


def test_number_words():
    assert [number_words(n, "en") for n in (0, 7, 13, 20, 81)] == ["zero", "seven", "thirteen", "twenty", "eighty one"]
    assert [number_words(n, "zh") for n in (0, 7, 10, 13, 20, 81)] == ["零", "七", "十", "十三", "二十", "八十一"]
    assert number_words(2, "zh", count=True) == "两"


def test_storycloze_and_text_corpus_are_deterministic():
    items = storycloze_items(3, 20, "zh")
    assert items == storycloze_items(3, 20, "zh") and len({i["context"] for i in items}) == 20
    assert all(i["right"] != i["wrong"] and i["context"] for i in items)
    en = storycloze_items(3, 5, "en")
    assert all(i["context"].endswith(".") for i in en)
    texts = toy_world_texts(3, 101)
    assert len(texts) == len(set(texts)) == 101 and texts == toy_world_texts(3, 101)
    with pytest.raises(ValueError, match="language"):
        storycloze_items(3, 5, "fr")
