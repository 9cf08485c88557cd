"""Speech and text corpora in their own layouts, read into the `Utterance`s that ``streaming.prepare`` writes as chunks.

| format | source | one utterance |
|---|---|---|
| ``kespeechchat`` | Ke-SpeechChat JSON (``datamodules.kespeechchat``) | a dialogue turn |
| ``lhotse`` | a CutSet, or recordings + supervisions manifests (``*.jsonl.gz``), file or folder | a supervision (cut out of its recording by its times); a cut without one is unsupervised speech |
| ``kaldi`` | a data folder: ``wav.scp``, ``text``, optional ``segments``, ``utt2spk``, ``utt2lang`` | an utterance (a segment of a recording with ``segments``) |
| ``hf`` | a Hugging Face dataset: ``save_to_disk`` folder, or parquet files, with an audio column (bytes or paths) and a text column | a row |
| ``folder`` | audio files, with a ``.txt``/``.lab`` transcript beside each or LibriSpeech's ``*.trans.txt`` tables, or none at all (unsupervised speech) | a file |
| ``text`` | text documents: ``.txt`` (a line each), ``.jsonl`` ("text"), parquet (a text column), or a folder of them | (written as text chunks) |

Every problem is one `SourceError` naming the file, the item and the field (``data/wav.scp:3: item 'utt2' audio:
piped command ...``); `gather` raises the first, or with ``skip_invalid`` writes every rejected item with its reason to
a JSONL report. Audio is read with soundfile; ``utterance_audio`` decodes one utterance (a segment, a parquet row) and
resamples it once, at prepare time.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.kespeechchat import (KeSpeechChatError, MissingAudioError, Utterance, audio_duration, load_audio,
                                      write_report)

log = logging.getLogger(__name__)

FORMATS = ("kespeechchat", "lhotse", "kaldi", "hf", "folder", "text")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif")
TRANSCRIPT_SUFFIXES = (".txt", ".lab")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TIME_TOLERANCE = 0.01
"""Seconds a segment may run past the end of its recording (rounding of manifest times)."""


class SourceError(KeSpeechChatError):
    """An item of a corpus is invalid; the message names file (and line), item id and field."""

    def __init__(self, source: str | Path, reason: str, *, item: str | None = None, field: str = "",
                 line: int | None = None) -> None:
        super().__init__(source, reason, dialogue_id=item, field=field, line=line)
        where = f"{source}:{line}" if line is not None else str(source)
        who = f" item {item!r}" if item is not None else ""
        what = f" {field}" if field else ""
        self.args = (f"{where}:{who}{what}: {reason}" if who or what else f"{where}: {reason}",)


class MissingSourceAudio(SourceError, MissingAudioError):
    """An item's audio file does not exist."""


@dataclass(frozen=True)
class SourceOptions:
    """How a corpus is read: its language and, for ``hf`` and parquet text, its column names."""

    language: str = "en"
    """Language of every item (unless the item names its own: lhotse ``language``, Kaldi ``utt2lang``, HF column)."""
    audio_column: str = "audio"
    text_column: str = "text"
    language_column: str | None = None
    """HF column holding each row's language; None = ``language`` for all."""


def detect_format(source: str | Path) -> str:
    """The format of ``source`` when its layout says it unambiguously; otherwise a ValueError naming the candidates."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such corpus file or folder")
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    found = []
    if any(_is_lhotse(p) for p in files):
        found.append("lhotse")
    if "wav.scp" in names:
        found.append("kaldi")
    if any(p.suffix in (".parquet", ".arrow") for p in files) or path.is_dir() and (path / "dataset_dict.json").is_file():
        found.append("hf")
    if not found and any(p.suffix == ".json" and p.name != "corpus.json" for p in files):
        found.append("kespeechchat")
    if not found and path.suffix == ".jsonl":  # one dialogue per line, or one text document per line
        found.append("kespeechchat" if '"dialog"' in _first_line(path) else "text")
    if not found and any(p.suffix.lower() in AUDIO_SUFFIXES for p in files):
        found.append("folder")
    if not found and files and all(p.suffix in (".txt", ".jsonl") for p in files):
        found.append("text")
    if len(found) != 1:
        what = f"it looks like any of {found}" if found else "no known layout found"
        raise ValueError(f"{path}: cannot tell the corpus format ({what}); give --format, one of {FORMATS}")
    return found[0]


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline()


def read_source(source: str | Path, fmt: str, options: SourceOptions) -> Iterator[Utterance | KeSpeechChatError]:
    """Every utterance of ``source`` in format ``fmt``, or the error of each invalid item, in a fixed order."""
    readers = {"lhotse": read_lhotse, "kaldi": read_kaldi, "hf": read_hf, "folder": read_folder}
    if fmt not in readers:
        raise ValueError(f"read_source: format {fmt!r} has no utterances; expected one of {sorted(readers)}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {fmt} corpus")
    yield from readers[fmt](path, options)


def gather(items: Iterable[Utterance | KeSpeechChatError], source: str | Path, *, max_duration: float,
           skip_invalid: bool = False, report_path: Path | None = None) -> list[Utterance]:
    """The valid utterances of ``items``; the first error (or a clip over ``max_duration``) raises, or with
    ``skip_invalid`` every rejected item goes to ``report_path`` (JSONL) and is counted in a warning."""
    kept: list[Utterance] = []
    rejected: list[KeSpeechChatError] = []
    for it in items:
        if isinstance(it, Utterance) and it.duration > max_duration:
            it = SourceError(it.source, f"clip is {it.duration:.2f} s, longer than max_duration {max_duration} s",
                             item=it.id, field="audio")
        if isinstance(it, KeSpeechChatError):
            if not skip_invalid:
                raise it
            rejected.append(it)
        else:
            kept.append(it)
    if rejected:
        write_report(rejected, report_path, Path(source))
        log.warning("%s: skipped %d invalid items, kept %d%s", source, len(rejected), len(kept),
                    f", see {report_path}" if report_path else "")
    if not kept:
        first = f"; first problem: {rejected[0]}" if rejected else ""
        raise SourceError(source, f"no valid utterances{first}")
    return kept


def utterance_audio(u: Utterance, sample_rate: int) -> np.ndarray:
    """The clip of ``u`` as float32 mono at ``sample_rate`` (a segment of its file, or a parquet/arrow row's bytes)."""
    context = f"{u.source}: item '{u.id}'"
    if u.row is not None:
        return load_audio(io.BytesIO(_row_bytes(str(u.audio_path), u.column, u.row)), sample_rate, context=context)
    return load_audio(u.audio_path, sample_rate, context=context, offset=u.offset, duration=u.clip, channel=u.channel)


def _utterance(uid: str, group: str, text: str, audio: Path, source: Path, language: str, duration: float, *,
               speaker: str = "", gender: str = "", offset: float = 0.0, clip: float | None = None,
               channel: int | None = None, row: int | None = None, column: str = "",
               split: str | None = None) -> Utterance:
    return Utterance(id=uid, dialogue_id=group, turn=0, speaker=speaker, role="user", gender=gender,
                     language=language, text=text, audio_path=audio, start=offset, end=offset + duration, words=None,
                     source=source, duration=duration, offset=offset, clip=clip, channel=channel, row=row,
                     column=column, split=split)


def _check_text(text: str, fail: Any) -> str:
    text = " ".join(text.split())
    if not text:
        raise fail("text", "empty transcript")
    if not any(ch.isalnum() for ch in unicodedata.normalize("NFKC", text)):
        raise fail("text", f"no letters or digits in {text[:40]!r}: as an ASR target it normalises to empty")
    return text


def _segment(uid: str, group: str, text: str, audio: Path, where: Path, language: str, fail: Any, *,
             start: float = 0.0, end: float | None = None, **kw: Any) -> Utterance:
    """An utterance of ``audio`` from ``start`` to ``end`` (None = its end), checked against the file's length."""
    total = audio_duration(audio, lambda reason, cls=SourceError: fail("audio", reason, missing=cls is MissingAudioError))
    if end is None:
        end = total
    if start < 0 or end <= start:
        raise fail("start", f"need 0 <= start < end, got {start} .. {end}")
    if end > total + TIME_TOLERANCE:
        raise fail("end", f"segment {start} .. {end} s ends past the end of its recording ({total:.3f} s): {audio}")
    end = min(end, total)
    clip = None if start == 0 and end >= total else end - start
    return _utterance(uid, group, text, audio, where, language, end - start, offset=start, clip=clip, **kw)


def _failer(where: Path, item: str | None, line: int | None = None) -> Any:
    def fail(field: str, reason: str, missing: bool = False) -> SourceError:
        cls = MissingSourceAudio if missing else SourceError
        return cls(where, reason, item=item, field=field, line=line)
    return fail


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (base / p)


# ---------------------------------------------------------------------------------------------------- folder
CHAPTER_TRANSCRIPTS = ".trans.txt"
"""LibriSpeech's per-folder transcript table: ``ID text`` lines for the ``ID.flac`` files beside it."""


def _chapter_tables(tables: list[Path], audio: dict[Path, Path], base: Path,
                    found: dict[Path, tuple[str, Path, int]]) -> Iterator[KeSpeechChatError]:
    """Read LibriSpeech-style ``*.trans.txt`` tables into ``found`` (audio stem -> (text, table, line)); yields an
    error for a line without text, a duplicate id, or an id without its audio file."""
    for table in tables:
        for lineno, line in enumerate(table.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            key, _, text = line.strip().partition(" ")
            stem = table.parent / key
            uid = stem.relative_to(base).as_posix()
            if stem in found:
                yield SourceError(table, f"id listed twice (first on line {found[stem][2]} of {found[stem][1]})",
                                  item=uid, field="id", line=lineno)
            elif stem not in audio:
                yield SourceError(table, f"transcript without audio: no {key}{{{','.join(AUDIO_SUFFIXES)}}} in "
                                         f"{table.parent}", item=uid, field="audio", line=lineno)
            else:
                found[stem] = (text, table, lineno)


def read_folder(root: Path, options: SourceOptions) -> Iterator[Utterance | KeSpeechChatError]:
    """Audio files under ``root``, each with the transcript ``NAME.txt``/``NAME.lab`` beside it, or listed in a
    LibriSpeech ``*.trans.txt`` table of its folder (``ID text`` lines); with no transcript anywhere, every file is
    unsupervised speech (empty text)."""
    files = sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())
    tables = [p for p in files if p.name.endswith(CHAPTER_TRANSCRIPTS)]
    files = [p for p in files if not p.name.endswith(CHAPTER_TRANSCRIPTS)]
    audio = {p.with_suffix(""): p for p in files if p.suffix.lower() in AUDIO_SUFFIXES}
    transcripts = {p.with_suffix(""): p for p in files if p.suffix.lower() in TRANSCRIPT_SUFFIXES}
    if not audio:
        raise FileNotFoundError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this folder")
    base = root if root.is_dir() else root.parent
    for stem, t in transcripts.items():
        if stem not in audio:
            yield SourceError(t, f"transcript without audio: no {stem.name}{{{','.join(AUDIO_SUFFIXES)}}} beside it",
                              item=stem.relative_to(base).as_posix(), field="audio")
    listed: dict[Path, tuple[str, Path, int]] = {}
    yield from _chapter_tables(tables, audio, base, listed)
    for stem, path in audio.items():
        uid = stem.relative_to(base).as_posix()
        fail = _failer(path, uid)
        try:
            text = ""
            if stem in listed:
                text, table, lineno = listed[stem]
                text = _check_text(text, _failer(table, uid, lineno))
            elif transcripts or tables:
                if stem not in transcripts:
                    raise fail("text", f"no transcript {stem.name}.txt or {stem.name}.lab beside it, nor a line in a "
                                       f"{CHAPTER_TRANSCRIPTS} table of its folder (other files have one)")
                text = _check_text(transcripts[stem].read_text(encoding="utf-8"), _failer(transcripts[stem], uid))
            # LibriSpeech keeps speaker/chapter/ folders: the speaker is the folder above the table's
            speaker = path.parent.parent.name if stem in listed else path.parent.name
            yield _segment(uid, uid, text, path, path, options.language, fail, speaker=speaker)
        except KeSpeechChatError as e:
            yield e
        except (OSError, UnicodeDecodeError) as e:
            yield fail("text", f"cannot read transcript ({e})")


# ---------------------------------------------------------------------------------------------------- kaldi
def _kaldi_table(path: Path, required: bool = True) -> dict[str, tuple[str, int]]:
    """``key value`` lines of a Kaldi table -> {key: (value, line)}; a duplicate key is an error."""
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: missing (a Kaldi data folder needs wav.scp; text for transcripts)")
        return {}
    table: dict[str, tuple[str, int]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if key in table:
            raise SourceError(path, f"duplicate key (first on line {table[key][1]})", item=key, line=lineno)
        table[key] = (value.strip(), lineno)
    return table


def read_kaldi(root: Path, options: SourceOptions) -> Iterator[Utterance | KeSpeechChatError]:
    """A Kaldi data folder: ``wav.scp`` (recording -> audio file; piped commands are refused), ``text``, optional
    ``segments`` (utterance -> recording, start, end; end -1 = to the end), ``utt2spk`` and ``utt2lang``."""
    if root.is_file():
        root = root.parent
    scp = _kaldi_table(root / "wav.scp")
    text = _kaldi_table(root / "text", required=False)
    segments = _kaldi_table(root / "segments", required=False)
    spk = _kaldi_table(root / "utt2spk", required=False)
    lang = _kaldi_table(root / "utt2lang", required=False)
    recordings: dict[str, Path | SourceError] = {}
    for rec, (value, lineno) in scp.items():
        if value.endswith("|") or value.startswith("|"):
            recordings[rec] = SourceError(root / "wav.scp", f"piped command {value[:60]!r} is not run; write the "
                                          f"audio to files first (e.g. with sox) and list their paths",
                                          item=rec, field="audio", line=lineno)
        elif ".ark:" in value or value.endswith(".ark"):
            recordings[rec] = SourceError(root / "wav.scp", f"archive entry {value[:60]!r} is not supported; list "
                                          f"audio file paths", item=rec, field="audio", line=lineno)
        else:  # Kaldi paths are relative to where the recipe runs; else to the data folder
            recordings[rec] = Path(value).resolve() if Path(value).exists() else _resolve(value, root)
    utts = segments if segments else {r: ("", lineno) for r, (_, lineno) in scp.items()}
    table = root / ("segments" if segments else "wav.scp")
    for uid, (txt, lineno) in text.items():
        if uid not in utts:
            yield SourceError(root / "text", f"transcript without audio: not in {table.name}", item=uid, field="audio",
                              line=lineno)
    for uid, (value, lineno) in utts.items():
        fail = _failer(table, uid, lineno)
        try:
            rec, start, end = uid, 0.0, None
            if segments:
                parts = value.split()
                if len(parts) != 3:
                    raise fail("", f"expected 'UTT RECORDING START END', got {value!r}")
                rec = parts[0]
                try:
                    start, end = float(parts[1]), float(parts[2])
                except ValueError:
                    raise fail("start", f"not numbers: {parts[1]!r} {parts[2]!r}") from None
                end = None if end < 0 else end
                if rec not in recordings:
                    raise fail("recording", f"recording {rec!r} is not in wav.scp")
            audio = recordings[rec]
            if isinstance(audio, SourceError):
                raise audio
            transcript = ""
            if text:
                if uid not in text:
                    raise _failer(root / "text", uid)("text", "no transcript in text (other utterances have one)")
                transcript = _check_text(text[uid][0], _failer(root / "text", uid, text[uid][1]))
            yield _segment(uid, rec, transcript, audio, table, lang.get(uid, (options.language,))[0], fail,
                           start=start, end=end, speaker=spk.get(uid, ("",))[0])
        except KeSpeechChatError as e:
            yield e


# ---------------------------------------------------------------------------------------------------- lhotse
def _is_lhotse(path: Path) -> bool:
    name = path.name
    return name.endswith((".jsonl.gz", ".jsonl")) and any(k in name for k in ("cuts", "recordings", "supervisions"))


def _lhotse_manifest(path: Path, kind: str) -> Any:
    try:
        import lhotse
    except ImportError as e:
        raise ValueError(f"{path}: reading lhotse manifests needs lhotse (pip install lhotse)") from e
    cls = {"cuts": lhotse.CutSet, "recordings": lhotse.RecordingSet, "supervisions": lhotse.SupervisionSet}[kind]
    try:
        return cls.from_file(path).to_eager()
    except Exception as e:  # lhotse raises whatever its parser met (JSON, missing keys)
        raise SourceError(path, f"not a lhotse {kind} manifest: {type(e).__name__}: {e}") from None


def _recording_file(rec: Any, manifest: Path, fail: Any) -> Path:
    if len(rec.sources) != 1 or rec.sources[0].type != "file":
        kinds = [s.type for s in rec.sources]
        raise fail("sources", f"recording {rec.id!r} has sources of type {kinds}; only one 'file' source is supported")
    path = Path(rec.sources[0].source)
    if not path.is_absolute() and not path.exists():
        path = manifest.parent / path
    return path


def read_lhotse(path: Path, options: SourceOptions) -> Iterator[Utterance | KeSpeechChatError]:
    """A lhotse CutSet (``*cuts*.jsonl.gz``), or ``*recordings*`` + ``*supervisions*`` manifests of one prefix (a
    folder, or one of the two files). Each supervision becomes a segment of its recording's audio file."""
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if _is_lhotse(p))
    if path.is_file() and "cuts" not in path.name:
        files = sorted(p for p in path.parent.iterdir() if _is_lhotse(p))
    cuts = [p for p in files if "cuts" in p.name]
    if cuts:
        seen: set[str] = set()  # cuts trimmed to supervisions also carry the overlapping neighbours
        for manifest in cuts:
            for cut in _lhotse_manifest(manifest, "cuts"):
                sups = [sup for sup in cut.supervisions if sup.id not in seen]
                if cut.supervisions and not sups:
                    continue
                seen.update(sup.id for sup in sups)
                yield from _lhotse_segments(manifest, cut.recording, sups, options, base=cut.start,
                                            limit=cut.start + cut.duration, cut_id=cut.id)
        return
    recs = [p for p in files if "recordings" in p.name]
    if not recs:
        raise FileNotFoundError(f"{path}: no lhotse manifests (*cuts*.jsonl.gz, or *recordings* + *supervisions*)")
    for rec_path in recs:
        sup_path = rec_path.with_name(rec_path.name.replace("recordings", "supervisions"))
        if not sup_path.is_file():
            raise FileNotFoundError(f"{sup_path}: the supervisions manifest of {rec_path} is missing")
        recordings = _lhotse_manifest(rec_path, "recordings")
        by_rec: dict[str, list[Any]] = {}
        for sup in _lhotse_manifest(sup_path, "supervisions"):
            if sup.recording_id not in recordings:
                yield SourceError(sup_path, f"recording {sup.recording_id!r} is not in {rec_path.name}", item=sup.id,
                                  field="recording_id")
                continue
            by_rec.setdefault(sup.recording_id, []).append(sup)
        for rec in recordings:
            yield from _lhotse_segments(sup_path, rec, by_rec.get(rec.id, []), options, unsupervised=False)


def _lhotse_segments(manifest: Path, rec: Any, sups: list[Any], options: SourceOptions, *, base: float = 0.0,
                     limit: float | None = None, cut_id: str | None = None,
                     unsupervised: bool = True) -> Iterator[Utterance | KeSpeechChatError]:
    """Utterances of ``sups`` (times relative to ``base`` seconds into ``rec``); a cut (``cut_id``) without
    supervisions is one unsupervised utterance of the cut's span."""
    try:
        if rec is None:
            raise _failer(manifest, cut_id)("recording", "cut has no recording")
        audio = _recording_file(rec, manifest, _failer(manifest, cut_id or rec.id))
    except KeSpeechChatError as e:
        yield e
        return
    if not sups and unsupervised and cut_id is not None:
        fail = _failer(manifest, cut_id)
        try:
            yield _segment(cut_id, rec.id, "", audio, manifest, options.language, fail, start=base, end=limit)
        except KeSpeechChatError as e:
            yield e
        return
    for sup in sups:
        fail = _failer(manifest, sup.id)
        try:
            start = base + sup.start
            end = start + sup.duration
            if end > rec.duration + TIME_TOLERANCE:
                raise fail("end", f"supervision ends at {end:.3f} s, past the end of recording {rec.id!r} "
                                  f"({rec.duration:.3f} s)")
            channel = sup.channel if isinstance(sup.channel, int) and rec.num_channels > 1 else None
            yield _segment(sup.id, rec.id, _check_text(sup.text or "", fail), audio, manifest,
                           sup.language or options.language, fail, start=start, end=end,
                           speaker=sup.speaker or "", gender=sup.gender or "", channel=channel)
        except KeSpeechChatError as e:
            yield e


# ---------------------------------------------------------------------------------------------------- hf
def hf_data_files(path: Path) -> list[Path]:
    """The parquet or arrow files of a Hugging Face dataset: a ``.parquet``/``.arrow`` file, a folder of parquet
    files, or a ``save_to_disk`` folder (a Dataset's ``state.json``, or a DatasetDict's split folders)."""
    if path.is_file():
        return [path]
    parquet = sorted(path.rglob("*.parquet"))
    if parquet:
        return parquet
    files = []
    for state in sorted(path.rglob("state.json")):
        info = json.loads(state.read_text(encoding="utf-8"))
        files += [state.parent / f["filename"] for f in info.get("_data_files", [])]
    if not files:
        raise FileNotFoundError(f"{path}: no Hugging Face dataset here (*.parquet, or save_to_disk's state.json + *.arrow)")
    return files


HF_SPLITS = ("train", "validation", "valid", "dev", "test", "eval")
"""Split names of Hugging Face datasets (``train.clean.100`` counts as ``train``)."""


def hf_split(data: Path, root: Path) -> str | None:
    """The split a data file of a dataset belongs to, from its folder (a DatasetDict's ``validation/``) or its name
    (``data/test-00000-of-00001.parquet``); None when the layout names none."""
    rel = data.relative_to(root).parts if data != root and root in data.parents else (data.name,)
    for part in (*rel[:-1], rel[-1].split("-")[0]):
        name = part.split(".")[0].lower()
        if name in HF_SPLITS:
            return part
    return None


@functools.lru_cache(maxsize=4)
def _table(path: str, columns: tuple[str, ...]) -> Any:
    """Columns of one parquet/arrow file as a pyarrow Table (memory-mapped; cached per process)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return pq.read_table(path, columns=list(columns), memory_map=True)
    with pa.memory_map(path) as source:
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
    return table.select(list(columns))


def _schema_names(path: Path) -> list[str]:
    """Column names of a parquet or arrow file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return list(pq.read_schema(path).names)
    with pa.memory_map(str(path)) as source:
        try:
            return list(pa.ipc.open_stream(source).schema.names)
        except pa.ArrowInvalid:
            return list(pa.ipc.open_file(source).schema.names)


def _row_bytes(path: str, column: str, row: int) -> bytes:
    value = _table(path, (column,)).column(0)[row].as_py()
    return value["bytes"] if isinstance(value, dict) else value


def read_hf(path: Path, options: SourceOptions) -> Iterator[Utterance | KeSpeechChatError]:
    """Rows of a Hugging Face dataset: ``audio_column`` holds ``{bytes, path}`` (the ``Audio`` feature), bytes, or a
    path (relative to the data file); ``text_column`` the transcript; an ``id`` column, if any, names the rows. The
    dataset's own splits (``hf_split``) are kept: ``prepare`` trains on ``train`` and validates on the others."""
    try:
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{path}: reading Hugging Face datasets needs pyarrow (pip install pyarrow)") from e
    for data in hf_data_files(path):
        split = hf_split(data, path)
        split = None if split is None else "train" if split.split(".")[0].lower() == "train" else split
        try:
            names = _schema_names(data)
        except Exception as e:  # pyarrow's errors for a broken file
            yield SourceError(data, f"unreadable {data.suffix[1:]} file: {e}")
            continue
        wanted = {"--audio-column": options.audio_column, "--text-column": options.text_column}
        if options.language_column:
            wanted["--language-column"] = options.language_column
        missing = {flag: col for flag, col in wanted.items() if col not in names}
        if missing:
            flag, col = next(iter(missing.items()))
            raise SourceError(data, f"unknown column {col!r} (columns: {names}); set {flag}", field=flag)
        columns = tuple(dict.fromkeys([*wanted.values(), *(["id"] if "id" in names else [])]))
        table = _table(str(data), columns)
        audio_col = table.column(options.audio_column)
        texts = table.column(options.text_column).to_pylist()
        ids = table.column("id").to_pylist() if "id" in names else None
        langs = table.column(options.language_column).to_pylist() if options.language_column else None
        for i in range(table.num_rows):
            uid = str(ids[i]) if ids is not None else f"{data.stem}-{i}"
            fail = _failer(data, uid)
            try:
                value = audio_col[i].as_py()
                text = _check_text(texts[i] or "", lambda f, r: fail(options.text_column, r))
                language = (langs[i] if langs else None) or options.language
                if isinstance(value, dict) and value.get("bytes") is None:
                    value = value.get("path")
                if isinstance(value, str):
                    audio = _resolve(value, data.parent)
                    yield replace(_segment(uid, uid, text, audio, data, language, fail), split=split)
                    continue
                if isinstance(value, dict):
                    value = value["bytes"]
                if not isinstance(value, bytes):
                    raise fail(options.audio_column, f"expected audio bytes or a path, got {type(value).__name__}")
                duration = audio_duration(io.BytesIO(value), lambda reason, cls=None: fail(options.audio_column, reason))
                yield _utterance(uid, uid, text, data, data, language, duration, row=i, column=options.audio_column,
                                 split=split)
            except KeSpeechChatError as e:
                yield e


# ---------------------------------------------------------------------------------------------------- text
def read_text(source: Path, options: SourceOptions) -> Iterator[tuple[str, str]]:
    """``(id, text)`` of every document: parquet rows (``text_column``), else ``interleave.read_documents``
    (``.txt`` lines, ``.jsonl`` "text", folders of those)."""
    from lit_keomni.interleave import read_documents

    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{source}: no text files")
    for f in files:
        if f.suffix != ".parquet":
            yield from read_documents(f)
            continue
        try:
            names = _schema_names(f)
        except Exception as e:
            raise SourceError(f, f"unreadable parquet file: {e}") from None
        if options.text_column not in names:
            raise SourceError(f, f"unknown column {options.text_column!r} (columns: {names}); set --text-column",
                              field="--text-column")
        for i, text in enumerate(_table(str(f), (options.text_column,)).column(0).to_pylist()):
            if text is not None and not isinstance(text, str):
                raise SourceError(f, f"expected a string, got {type(text).__name__}", item=f"{f.stem}-{i}",
                                  field=options.text_column)
            if text and text.strip():
                yield f"{f.stem}-{i}", text
