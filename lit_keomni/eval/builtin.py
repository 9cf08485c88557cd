"""Built-in toy evaluation sets with audio, made offline from the toy world of the built-in corpus (seed 1234).

- ``build_storycloze_set``: spoken StoryCloze (GLM-4-Voice §3.1 "Speech Language Modeling", Appendix C: contexts and
  both endings synthesised by a TTS engine): ``datamodules.toy_world.storycloze_items`` in English and Chinese.
- ``build_qa_set``: spoken questions with known answers (§3.1 "Spoken Question Answering"):
  ``datamodules.toy_world.qa_items`` about the people, capitals and arithmetic of the same world.

Speech is espeak-ng (``datamodules.corpus.synthesize``) with one fixed user voice, resampled to 16 kHz. A set is a
folder with a JSONL (audio paths relative to it), ``audio/*.wav`` and a ``builtin.json`` stamp; it is written under a
temporary name and renamed, and a folder whose stamp matches is reused as it is. Same arguments, same bytes.
The stories and facts are those the built-in training corpus speaks about, so these sets measure what a model learnt
of that world (closed-book, like the paper's QA sets measure world knowledge).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lit_keomni.atomic import staged_dir, write_json
from lit_keomni.audio import SAMPLE_RATE, resample
from lit_keomni.nn.audio import save_wav

SET_VERSION = 1
"""Bump when the texts or the synthesis of a set change: a folder stamped with another version is rebuilt."""
STAMP = "builtin.json"
SPEAKER_ID = "user-m1-p50-r165"
"""The fixed user voice every built-in evaluation utterance is spoken in."""
STORYCLOZE_FILE = "storycloze.jsonl"
QA_FILE = "spoken_qa.jsonl"


def _speak(text: str, language: str, path: Path) -> str:
    """Synthesise ``text`` into ``path`` (16 kHz mono PCM-16); returns the path relative to the set folder."""
    from datamodules.corpus import ESPEAK_SAMPLE_RATE, USER_SPEAKERS, synthesize

    speaker = next(s for s in USER_SPEAKERS if s.id == SPEAKER_ID)
    audio, _ = synthesize(text, language, speaker)
    save_wav(path, resample(audio.astype("float32") / 32768.0, ESPEAK_SAMPLE_RATE, SAMPLE_RATE), SAMPLE_RATE)
    return f"{path.parent.name}/{path.name}"


def _build(out_dir: str | Path, name: str, stamp: dict[str, Any],
           make: Callable[[Path], list[dict[str, Any]]]) -> Path:
    """Reuse ``out_dir`` when its stamp equals ``stamp``, else write the records ``make(folder)`` returns (it writes
    the audio into ``folder/audio``) as ``out_dir/name``. Returns the JSONL path."""
    out = Path(out_dir)
    stamp = {"version": SET_VERSION, **stamp}
    stamp_path = out / STAMP
    if stamp_path.is_file():
        try:
            found = json.loads(stamp_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            found = None
        if found == stamp and (out / name).is_file():
            return out / name
        if not isinstance(found, dict) or found.get("set") != stamp["set"]:
            raise ValueError(f"{stamp_path}: not a built-in {stamp['set']} set; delete {out} or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not a built-in evaluation set (no {STAMP}); delete it or choose "
                         "another --out")
    with staged_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the set is ordinary data
        (tmp / "audio").mkdir()
        records = make(tmp)
        (tmp / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        write_json(tmp / STAMP, stamp)
    return out / name


def build_storycloze_set(out_dir: str | Path, n_per_language: int = 100, seed: int = 1234) -> Path:
    """Spoken StoryCloze of the toy world of ``seed``: ``n_per_language`` stories in English and in Chinese, each
    ``{context_text, context_audio, right_text, right_audio, wrong_text, wrong_audio, language}``. Returns the JSONL."""
    from datamodules.toy_world import storycloze_items

    if n_per_language < 1:
        raise ValueError(f"build_storycloze_set: n_per_language={n_per_language} must be >= 1")

    def make(folder: Path) -> list[dict[str, Any]]:
        records = []
        for lang in ("en", "zh"):
            for i, item in enumerate(storycloze_items(seed, n_per_language, lang)):
                rec = {}
                for part, text in (("context", item["context"]), ("right", item["right"]), ("wrong", item["wrong"])):
                    rec[f"{part}_text"] = text
                    rec[f"{part}_audio"] = _speak(text, lang, folder / "audio" / f"{lang}{i:04d}_{part}.wav")
                records.append({"id": f"{lang}{i:04d}", **rec, "language": lang})
        return records

    return _build(out_dir, STORYCLOZE_FILE, {"set": "storycloze", "seed": seed, "n_per_language": n_per_language},
                  make)


def build_qa_set(out_dir: str | Path, n_per_language: int = 100, seed: int = 1234) -> Path:
    """Spoken questions about the toy world of ``seed``: ``n_per_language`` per language, each ``{question_text,
    question_audio, answers, candidates, reference, topic, language}``. Returns the JSONL."""
    from datamodules.toy_world import qa_items

    if n_per_language < 1:
        raise ValueError(f"build_qa_set: n_per_language={n_per_language} must be >= 1")

    def make(folder: Path) -> list[dict[str, Any]]:
        records = []
        for lang in ("en", "zh"):
            for i, item in enumerate(qa_items(seed, n_per_language, lang)):
                wav = _speak(item["question"], lang, folder / "audio" / f"{lang}{i:04d}_question.wav")
                records.append({"id": f"{lang}{i:04d}", "question_text": item["question"], "question_audio": wav,
                                "answers": item["answers"], "candidates": item["candidates"],
                                "reference": item["reference"], "topic": item["topic"], "language": lang})
        return records

    return _build(out_dir, QA_FILE, {"set": "spoken_qa", "seed": seed, "n_per_language": n_per_language}, make)
