"""Ke-SpeechChat dialogues: read, validate, write (KE-Omni, seeds/000 Appendix C "Dialogue Format").

One dialogue is one JSON object::

    {"id": "d12",
     "speaker": {"SPK1486m": {"role": "user", "gender": "male"}, "agentFemale": {"role": "agent", "gender": "female"}},
     "audio": {"channel": 2, "duration": 40.19, "sample_rate": 22050},
     "channel": [{"channel_index": 0, "language": "en"}, {"channel_index": 1, "language": "en"}],
     "dialog": [{"channel": 0, "speaker": "SPK1486m", "text": "...", "start": 0.0, "end": 8.94,
                 "audio_path": "d12/d12_0_SPK1486m.wav",
                 "words": [{"word": "I'm", "start": 0.0, "end": 0.21}, ...]}, ...]}

`audio_path` is relative to the JSON file's folder. `words` is our extension (optional): word timestamps in seconds,
relative to the turn's wav (Mandarin: one entry per character).

Sources: a folder of per-dialogue ``*.json`` files (recursive, sorted; a ``corpus.json`` stamp is skipped), one ``.json`` file holding a dialogue or a list
of dialogues, or a ``.jsonl`` file with one dialogue per line.

Every problem raises `KeSpeechChatError` (a ``ValueError``) whose message names the file (and line), the dialogue id
and the field, e.g. ``data/x.json: dialogue 'd12' dialog[1].start: 3.2 > end 1.0``, so a bad corpus is fixed from the
message alone. `collect_utterances` turns dialogues into the flat, picklable `Utterance` list that data loaders use.
"""

from __future__ import annotations

import json
import logging
import math
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from lit_keomni.atomic import write_json
from lit_keomni.audio import resample

log = logging.getLogger(__name__)

ROLES = ("user", "agent")
OVERLAP_TOLERANCE = 1e-3
"""Seconds two consecutive turns of one channel may overlap (rounding of hand-made timestamps)."""
STAMP_NAME = "corpus.json"
"""A corpus folder's description (see `datamodules.corpus`), not a dialogue: folder scans skip it."""


class KeSpeechChatError(ValueError):
    """A dialogue or its audio is invalid; the message names file, dialogue id and field."""

    def __init__(self, source: str | Path, reason: str, *, dialogue_id: str | None = None, field: str = "",
                 line: int | None = None) -> None:
        self.source, self.dialogue_id, self.field, self.reason, self.line = str(source), dialogue_id, field, reason, line
        where = f"{source}:{line}" if line is not None else str(source)
        who = f" dialogue {dialogue_id!r}" if dialogue_id is not None else ""
        what = f" {field}" if field else ""
        super().__init__(f"{where}:{who}{what}: {reason}" if who or what else f"{where}: {reason}")


class MissingAudioError(KeSpeechChatError, FileNotFoundError):
    """The audio file a turn points to does not exist (also a ``FileNotFoundError``)."""


@dataclass
class Word:
    word: str
    start: float
    """Seconds from the start of the turn's wav."""
    end: float


@dataclass
class Turn:
    channel: int
    speaker: str
    text: str
    start: float
    """Seconds on the dialogue timeline."""
    end: float
    audio_path: str
    """Relative to the dialogue JSON's folder."""
    words: list[Word] | None = None


@dataclass
class Dialogue:
    id: str
    speakers: dict[str, dict]
    """speaker id -> {"role": "user" | "agent", "gender": ...}"""
    audio: dict
    channels: list[dict]
    turns: list[Turn]
    source: Path
    """The JSON (or JSONL) file this dialogue came from or will be written to; audio paths resolve against its folder."""


@dataclass(frozen=True)
class Utterance:
    """One turn, flattened: small and picklable, this is what crosses into data-loader worker processes."""

    id: str
    dialogue_id: str
    turn: int
    speaker: str
    role: str
    gender: str
    language: str
    text: str
    audio_path: Path
    """Absolute path of the wav."""
    start: float
    end: float
    words: tuple[tuple[str, float, float], ...] | None
    source: Path
    duration: float = 0.0
    """Length of the clip in seconds (from the wav's header, or the segment's length)."""
    offset: float = 0.0
    """Seconds into the audio file where the clip starts (segments of long recordings)."""
    clip: float | None = None
    """Seconds read from ``offset``; None = to the end of the file."""
    channel: int | None = None
    """Channel of a multi-channel file the clip is on; None = all channels averaged."""
    row: int | None = None
    """Row of a parquet/arrow file (``audio_path``) whose ``column`` holds the encoded audio; None = a plain audio file."""
    column: str = ""
    split: str | None = None
    """The corpus's own split this item belongs to (a Hugging Face dataset's ``train``, ``validation``, ...); None =
    ``prepare`` splits by a hash of ``dialogue_id``."""


# ----------------------------------------------------------------------------------------------------------- reading
def read_dialogues(source: str | Path) -> Iterator[Dialogue]:
    """Yield validated dialogues from a folder, a ``.json`` file (one dialogue or a list) or a ``.jsonl`` file.

    Raises `KeSpeechChatError` at the first invalid dialogue (and ``FileNotFoundError`` if `source` is missing).
    """
    for item in _iter_dialogues(Path(source)):
        if isinstance(item, KeSpeechChatError):
            raise item
        yield item


def _iter_dialogues(source: Path) -> Iterator[Dialogue | KeSpeechChatError]:
    """Like `read_dialogues` but yields errors instead of raising, so `collect_utterances` can skip and report."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*.json") if p.name != STAMP_NAME)
        if not files:
            raise FileNotFoundError(f"{source}: no *.json dialogue files in this folder")
        for path in files:
            yield from _iter_file(path)
    elif source.is_file():
        yield from _iter_file(source)
    else:
        raise FileNotFoundError(f"{source}: no such dialogue file or folder")


def _iter_file(path: Path) -> Iterator[Dialogue | KeSpeechChatError]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        yield KeSpeechChatError(path, f"cannot read file ({e})")
        return
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield _parse_one(line, path, line=lineno)
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        yield KeSpeechChatError(path, f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})")
        return
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            yield _validate(item, path, index=i)
    else:
        yield _validate(obj, path)


def _parse_one(raw: str, path: Path, line: int) -> Dialogue | KeSpeechChatError:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return KeSpeechChatError(path, f"invalid JSON ({e.msg} at column {e.colno})", line=line)
    return _validate(obj, path, line=line)


# -------------------------------------------------------------------------------------------------------- validation
class _Checker:
    """Field checks for one dialogue; every failure names the file/line, the dialogue id (once known) and the field."""

    def __init__(self, path: Path, line: int | None, index: int | None) -> None:
        self.path, self.line = path, line
        # In a JSON list the id may be the broken part, so until it is known the item index stands in for it.
        self.dialogue_id: str | None = None
        self.prefix = f"[{index}]" if index is not None else ""

    def fail(self, field: str, reason: str) -> KeSpeechChatError:
        name = field if self.dialogue_id is not None or not self.prefix else f"{self.prefix}.{field}"
        return KeSpeechChatError(self.path, reason, dialogue_id=self.dialogue_id, field=name, line=self.line)

    def get(self, obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in obj:
            raise self.fail(name, "missing field")
        value = obj[key]
        # bool is an int subclass: true/false where a number belongs is a typo, not a number.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(name, f"expected {_kind_name(kind)}, got bool {value!r}")
        if not isinstance(value, kind):
            raise self.fail(name, f"expected {_kind_name(kind)}, got {type(value).__name__} {_short(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(name, f"not a finite number: {value!r}")
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(dict.fromkeys("number" if k in (int, float) and len(kinds) > 1 else names.get(k, k.__name__)
                                     for k in kinds))


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


_NUM = (int, float)


def _validate(obj: Any, path: Path, *, line: int | None = None, index: int | None = None) -> Dialogue | KeSpeechChatError:
    c = _Checker(path, line, index)
    try:
        if not isinstance(obj, dict):
            raise c.fail("", f"a dialogue must be a JSON object, got {type(obj).__name__}")
        dialogue_id = c.get(obj, "id", str, "")
        if not dialogue_id.strip():
            raise c.fail("id", "empty id")
        c.dialogue_id = dialogue_id

        speakers = c.get(obj, "speaker", dict, "")
        if not speakers:
            raise c.fail("speaker", "no speakers")
        for spk, info in speakers.items():
            where = f"speaker[{spk!r}]"
            if not isinstance(info, dict):
                raise c.fail(where, f"expected object, got {type(info).__name__}")
            role = c.get(info, "role", str, where)
            if role not in ROLES:
                raise c.fail(f"{where}.role", f"{role!r} is not one of {ROLES}")
            c.get(info, "gender", str, where)

        audio = c.get(obj, "audio", dict, "")
        c.get(audio, "channel", int, "audio")
        if c.get(audio, "duration", _NUM, "audio") < 0:
            raise c.fail("audio.duration", f"negative duration {audio['duration']}")
        if c.get(audio, "sample_rate", int, "audio") <= 0:
            raise c.fail("audio.sample_rate", f"must be positive, got {audio['sample_rate']}")

        channels = c.get(obj, "channel", list, "")
        languages: dict[int, str] = {}
        for i, ch in enumerate(channels):
            where = f"channel[{i}]"
            if not isinstance(ch, dict):
                raise c.fail(where, f"expected object, got {type(ch).__name__}")
            languages[c.get(ch, "channel_index", int, where)] = c.get(ch, "language", str, where)

        dialog = c.get(obj, "dialog", list, "")
        if not dialog:
            raise c.fail("dialog", "no turns")
        turns = [_validate_turn(c, t, i, speakers, languages) for i, t in enumerate(dialog)]
        _check_no_overlap(c, turns)
    except KeSpeechChatError as e:
        return e
    return Dialogue(id=dialogue_id, speakers=speakers, audio=audio, channels=channels, turns=turns, source=path)


def _check_no_overlap(c: _Checker, turns: list[Turn]) -> None:
    """One channel is one speaker's track: its turns come in time order and do not overlap (by more than
    ``OVERLAP_TOLERANCE``). Turns on different channels may overlap (a user barging in on the agent)."""
    last: dict[int, tuple[int, float]] = {}
    for i, t in enumerate(turns):
        if t.channel in last and t.start < last[t.channel][1] - OVERLAP_TOLERANCE:
            j, end = last[t.channel]
            raise c.fail(f"dialog[{i}].start", f"{t.start} is before the end {end} of dialog[{j}] on the same channel "
                                                f"{t.channel} (turns of one channel must be in order and not overlap)")
        last[t.channel] = (i, t.end)


def _validate_turn(c: _Checker, t: Any, i: int, speakers: dict, languages: dict[int, str]) -> Turn:
    where = f"dialog[{i}]"
    if not isinstance(t, dict):
        raise c.fail(where, f"expected object, got {type(t).__name__}")
    channel = c.get(t, "channel", int, where)
    if channel not in languages:
        raise c.fail(f"{where}.channel", f"channel {channel} is not in the dialogue's channel list {sorted(languages)}")
    speaker = c.get(t, "speaker", str, where)
    if speaker not in speakers:
        raise c.fail(f"{where}.speaker", f"unknown speaker {speaker!r} (speakers: {sorted(speakers)})")
    text = c.get(t, "text", str, where)
    if not text.strip():
        raise c.fail(f"{where}.text", "empty text")
    if not any(ch.isalnum() for ch in unicodedata.normalize("NFKC", text)):
        raise c.fail(f"{where}.text", f"no letters or digits in {_short(text)}: as an ASR target it normalises to empty")
    start, end = float(c.get(t, "start", _NUM, where)), float(c.get(t, "end", _NUM, where))
    if start < 0:
        raise c.fail(f"{where}.start", f"negative time {start}")
    if start > end:
        raise c.fail(f"{where}.start", f"{start} > end {end}")
    audio_path = c.get(t, "audio_path", str, where)
    if not audio_path.strip():
        raise c.fail(f"{where}.audio_path", "empty path")
    words = None
    if t.get("words") is not None:
        raw = c.get(t, "words", list, where)
        words = []
        for j, w in enumerate(raw):
            wwhere = f"{where}.words[{j}]"
            if not isinstance(w, dict):
                raise c.fail(wwhere, f"expected object, got {type(w).__name__}")
            word = Word(c.get(w, "word", str, wwhere), float(c.get(w, "start", _NUM, wwhere)),
                        float(c.get(w, "end", _NUM, wwhere)))
            if not 0 <= word.start <= word.end:
                raise c.fail(f"{wwhere}.start", f"need 0 <= start <= end, got {word.start} .. {word.end}")
            words.append(word)
    return Turn(channel=channel, speaker=speaker, text=text, start=start, end=end, audio_path=audio_path, words=words)


# -------------------------------------------------------------------------------------------------------- utterances
def collect_utterances(source: str | Path, *, sample_rate: int, max_duration: float = 30.0, skip_invalid: bool = False,
                       report_path: Path | None = None) -> list[Utterance]:
    """Read and validate every dialogue under `source` and each turn's audio header; return one `Utterance` per turn.

    Only headers are read (``soundfile.info``), so this is fast; float wavs, the only kind that can hold NaN/inf, are
    read whole. A rate other than `sample_rate` is fine (`load_audio` resamples). Rejected: schema errors, missing,
    unreadable or empty wavs, clips longer than `max_duration` seconds, NaN/inf samples.

    Without `skip_invalid` the first problem raises `KeSpeechChatError` (`MissingAudioError` for a missing file). With
    it, every rejected dialogue or turn is written to `report_path` as JSONL (``source, dialogue_id, field, reason``)
    and counted in a warning, so nothing disappears silently; if nothing survives, that raises too.
    """
    del sample_rate  # only load_audio needs it; kept in the signature so call sites state the rate they train at
    source = Path(source)
    utterances: list[Utterance] = []
    bad_dialogues: list[KeSpeechChatError] = []
    bad_turns: list[KeSpeechChatError] = []
    n_turns = 0
    for item in _iter_dialogues(source):
        if isinstance(item, KeSpeechChatError):
            if not skip_invalid:
                raise item
            bad_dialogues.append(item)
            continue
        n_turns += len(item.turns)
        for i, turn in enumerate(item.turns):
            try:
                utterances.append(_utterance(item, i, turn, max_duration))
            except KeSpeechChatError as e:
                if not skip_invalid:
                    raise e from None  # the message says it all; the soundfile traceback adds nothing
                bad_turns.append(e)
    rejected = bad_dialogues + bad_turns
    if rejected:
        write_report(rejected, report_path, source)
        log.warning("%s: skipped %d of %d utterances and %d invalid dialogues, kept %d%s", source, len(bad_turns),
                    n_turns, len(bad_dialogues), len(utterances), f", see {report_path}" if report_path else "")
    if not utterances:
        first = f"; first problem: {rejected[0]}" if rejected else ""
        raise KeSpeechChatError(source, f"no valid utterances{first}")
    return utterances


def _utterance(d: Dialogue, i: int, turn: Turn, max_duration: float) -> Utterance:
    field = f"dialog[{i}].audio_path"

    def fail(reason: str, cls: type[KeSpeechChatError] = KeSpeechChatError) -> KeSpeechChatError:
        return cls(d.source, reason, dialogue_id=d.id, field=field)

    path = (d.source.parent / turn.audio_path).resolve()
    duration = audio_duration(path, fail)
    if duration > max_duration:
        raise fail(f"clip is {duration:.2f} s, longer than max_duration {max_duration} s: {path}")
    info_spk = d.speakers[turn.speaker]
    language = next(ch["language"] for ch in d.channels if ch["channel_index"] == turn.channel)
    words = tuple((w.word, w.start, w.end) for w in turn.words) if turn.words is not None else None
    return Utterance(id=f"{d.id}_{i}", dialogue_id=d.id, turn=i, speaker=turn.speaker, role=info_spk["role"],
                     gender=info_spk["gender"], language=language, text=turn.text, audio_path=path, start=turn.start,
                     end=turn.end, words=words, source=d.source, duration=duration)


def audio_duration(path: Path | Any, fail: Any) -> float:
    """Seconds of audio in ``path`` (a file, or a file-like object of encoded audio), from its header.

    ``fail(reason, cls)`` builds the error raised for a missing, unreadable or empty file, or NaN/inf samples.
    Only float files, the only kind that can hold NaN/inf, are read whole (PCM stays header-only), so a bad clip is
    reported or skipped here instead of failing later inside a litdata worker of ``prepare``.
    """
    name = path if isinstance(path, Path) else "audio"
    if isinstance(path, Path) and not path.is_file():
        raise fail(f"audio file not found: {path}", MissingAudioError)
    try:
        info = sf.info(path if not isinstance(path, Path) else str(path))
        if info.subtype in ("FLOAT", "DOUBLE"):
            if not isinstance(path, Path):
                path.seek(0)
            data, _ = sf.read(path if not isinstance(path, Path) else str(path), dtype="float32", always_2d=True)
            if not np.isfinite(data).all():
                raise fail(f"{int((~np.isfinite(data)).sum())} NaN/inf samples: {name}")
    except KeSpeechChatError:
        raise
    except Exception as e:  # libsndfile raises its own error types; any of them means "unreadable"
        raise fail(f"unreadable audio {name}: {e}") from None
    if info.frames <= 0:
        raise fail(f"empty audio (0 frames): {name}")
    return info.frames / info.samplerate


def write_report(rejected: list[KeSpeechChatError], report_path: Path | None, source: Path) -> None:
    """Every rejected item with its reason as JSONL in ``report_path`` (or each as a warning without one)."""
    rows = [{"source": e.source, "dialogue_id": e.dialogue_id, "field": e.field,
             "reason": e.reason if e.line is None else f"line {e.line}: {e.reason}"} for e in rejected]
    if report_path is not None:
        report_path = Path(report_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:  # no report file: each reason goes to the log instead, so nothing is dropped silently
        for e in rejected:
            log.warning("%s: skipped: %s", source, e)


def load_audio(path: Path | Any, sample_rate: int, *, context: str = "", offset: float = 0.0,
               duration: float | None = None, channel: int | None = None) -> np.ndarray:
    """Read audio as float32 mono at `sample_rate`: stereo is averaged (or `channel` taken), another rate is resampled
    (`lit_keomni.audio.resample`, soxr). `offset` and `duration` (seconds) cut a segment; `path` may also be a
    file-like object of encoded audio.

    Raises `KeSpeechChatError` naming the file (and `context`, e.g. the dialogue and field) when the file is
    unreadable, empty or holds NaN/inf samples; `MissingAudioError` when it does not exist.
    """
    is_file = isinstance(path, (str, Path))
    path = Path(path) if is_file else path
    name = path if is_file else "audio"

    def fail(reason: str, cls: type[KeSpeechChatError] = KeSpeechChatError) -> KeSpeechChatError:
        return cls(name, reason, field=f"({context})" if context else "")

    if is_file and not path.is_file():
        raise fail("audio file not found", MissingAudioError)
    try:
        with sf.SoundFile(str(path) if is_file else path) as f:
            rate = f.samplerate
            if offset:
                f.seek(int(round(offset * rate)))
            data = f.read(-1 if duration is None else int(round(duration * rate)), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile error types differ across versions
        raise fail(f"unreadable audio: {e}") from None
    if data.shape[0] == 0:
        raise fail("empty audio (0 frames)" if not offset else f"no audio at offset {offset} s")
    if channel is not None and data.shape[1] > 1:
        if not 0 <= channel < data.shape[1]:
            raise fail(f"channel {channel} not in a file of {data.shape[1]} channels")
        audio = data[:, channel]
    else:
        audio = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(audio).all():
        raise fail(f"{int((~np.isfinite(audio)).sum())} NaN/inf samples")
    return np.ascontiguousarray(resample(audio, rate, sample_rate), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------- writing
def dialogue_to_dict(d: Dialogue) -> dict:
    """The Ke-SpeechChat JSON object of `d` (``words`` only on turns that have them)."""
    turns = []
    for t in d.turns:
        row = {"channel": t.channel, "speaker": t.speaker, "text": t.text, "start": t.start, "end": t.end,
               "audio_path": t.audio_path}
        if t.words is not None:
            row["words"] = [asdict(w) for w in t.words]
        turns.append(row)
    return {"id": d.id, "speaker": d.speakers, "audio": d.audio, "channel": d.channels, "dialog": turns}


def write_dialogue(d: Dialogue | dict, path: Path) -> None:
    """Write one dialogue as pretty UTF-8 JSON, atomically (temp file in the same folder, then ``os.replace``)."""
    obj = dialogue_to_dict(d) if isinstance(d, Dialogue) else d
    write_json(path, obj)
