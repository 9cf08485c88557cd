"""Built-in bilingual synthetic corpus: Ke-SpeechChat dialogues spoken by espeak-ng, made offline in about a minute.

    python -m lit_keomni prepare            # calls build_corpus(out_dir)

Notable features
- Text comes from the seeded bilingual toy world (``datamodules/toy_world.py``): facts, arithmetic, counting, stories
  with a right and a wrong ending, so every stage has something learnable and ``eval`` has questions with known
  answers. Every utterance text is unique across the corpus, so a held-out split holds unseen sentences.
- A dialogue is 1-3 exchanges (user asks, agent answers); follow-ups refer back ("And where does she live?",
  "Now add three to that.").
- Speech comes from espeak-ng (the `espeakng-loader` wheel ships the library and its voices) through ctypes. User
  speakers are voice variant x pitch x rate (x English accent); the two agents `agentFemale` and `agentMale` are fixed,
  since one vocoder is trained per agent voice. Word timestamps (our ``words`` field) come from espeak-ng WORD events.
- Deterministic: the same seed gives identical JSON and identical wav bytes, whatever the number of workers.

Output: ``out_dir/<id>.json`` per dialogue, wavs in ``out_dir/<id>/<id>_<turn>_<speaker>.wav``, and a ``corpus.json``
stamp written last; the corpus is built in a temporary sibling folder and renamed into place, so an interrupted build
never looks finished.
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import soundfile as sf

from datamodules.kespeechchat import STAMP_NAME, Dialogue, Turn, Word, write_dialogue
from datamodules.toy_world import plan_texts, split_words
from lit_keomni.audio import resample

CORPUS_VERSION = 1
"""Bump when the text generator or the synthesis changes: a stamp with another version is not reused."""

# ================================================================================================ espeak-ng speech
ESPEAK_SAMPLE_RATE = 22050
_AUDIO_OUTPUT_SYNCHRONOUS, _INITIALIZE_DONT_EXIT, _CHARS_UTF8, _POS_CHARACTER = 2, 0x8000, 1, 1
_EVENT_LIST_TERMINATED, _EVENT_WORD, _RATE, _PITCH = 0, 1, 1, 3


class _Event(ctypes.Structure):  # espeak_EVENT from speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Speaker:
    id: str
    gender: str
    variant: str
    """espeak-ng voice variant (a file in espeak-ng-data/voices/!v)."""
    pitch: int
    """0-100, espeak-ng's default 50."""
    rate: int
    """Words per minute, espeak-ng's default 175."""
    english: str
    """The English voice this speaker uses (an accent); Chinese is always ``cmn``."""

    def voice(self, language: str) -> str:
        return f"{'cmn' if language == 'zh' else self.english}+{self.variant}"


_USER_VARIANTS = {"male": "m1 m2 m4 m5 m6 m7 Andy Lee Denis michel antonio sandro victor".split(),
                  "female": "f1 f3 f4 f5 Alicia Andrea Annie anika aunty belinda linda steph3".split()}
_ENGLISH = ("en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en")


def _user_speakers() -> list[Speaker]:
    speakers = []
    for gender, variants in _USER_VARIANTS.items():
        for v in variants:
            for pitch in (30, 40, 50, 60, 70):
                for rate in (150, 165, 180, 195):
                    sid = f"user-{v}-p{pitch}-r{rate}"
                    speakers.append(Speaker(sid, gender, v, pitch, rate, _ENGLISH[zlib.crc32(sid.encode()) % 6]))
    return speakers


USER_SPEAKERS = _user_speakers()
"""Voice variant x pitch x rate: 500 user speakers, each with a fixed English accent (Marco, too slow, is left out)."""
# The agents' variants are not among the users': one vocoder is trained per agent voice, and it should be theirs.
AGENT_SPEAKERS = {"agentFemale": Speaker("agentFemale", "female", "f2", 50, 170, "en-us"),
                  "agentMale": Speaker("agentMale", "male", "m3", 45, 170, "en-us")}


class _Espeak:
    """libespeak-ng, loaded afresh for every utterance.

    espeak-ng keeps synthesis state in C globals that neither ``espeak_Terminate`` nor re-initialising resets (pitch
    flutter phase, wave-generator phase and filters), so an utterance's samples would depend on what was spoken before
    it in the process, and a multi-process build would not be reproducible. Unloading the library (``dlclose``) and
    loading it again re-creates those globals from the file: ~2 ms per utterance. The library is a private copy, so
    nobody else in the process holds it open and ``dlclose`` really unloads it.
    """

    def __init__(self) -> None:
        import espeakng_loader  # imported here: only synthesis needs it

        self.tmp = Path(tempfile.mkdtemp(prefix="lit_keomni_espeak_"))
        atexit.register(shutil.rmtree, self.tmp, True)
        self.lib_path = self.tmp / Path(espeakng_loader.get_library_path()).name
        shutil.copyfile(espeakng_loader.get_library_path(), self.lib_path)
        self.data_path = espeakng_loader.get_data_path().encode()

    def synth(self, text: str, voice: str, pitch: int, rate: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """int16 samples at 22,050 Hz and WORD events as (character index, sample index)."""
        chunks, events = [], []

        def on_audio(wav, n, ev):  # called synchronously from espeak_Synth
            if n > 0:
                chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
            i = 0
            while ev[i].type != _EVENT_LIST_TERMINATED:
                if ev[i].type == _EVENT_WORD:
                    events.append((ev[i].text_position - 1, ev[i].sample))
                i += 1
            return 0

        callback = _SynthCallback(on_audio)
        lib = ctypes.CDLL(str(self.lib_path))
        try:
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            rate_hz = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path, _INITIALIZE_DONT_EXIT)
            if rate_hz != ESPEAK_SAMPLE_RATE:
                raise RuntimeError(f"espeak-ng initialisation failed (returned {rate_hz}), data at {self.data_path!r}")
            lib.espeak_SetSynthCallback(callback)
            if hasattr(lib, "espeak_ng_SetRandSeed"):  # noise sources (breathy variants) are seeded too
                lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            lib.espeak_SetParameter(_RATE, rate, 0)
            lib.espeak_SetParameter(_PITCH, pitch, 0)
            data = text.encode()
            lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                         ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            lib.espeak_Terminate()
        finally:
            _ctypes.dlclose(lib._handle)
        if err != 0 or not chunks:
            raise RuntimeError(f"espeak-ng failed (error {err}) on {text!r} with voice {voice!r}")
        return np.concatenate(chunks), events


_ESPEAK: _Espeak | None = None  # one per process


def synthesize(text: str, language: str, speaker: Speaker) -> tuple[np.ndarray, list[Word]]:
    """Speak `text` as `speaker`: int16 mono at 22,050 Hz and the word (Chinese: character) timestamps in seconds.

    Deterministic: the same arguments give the same samples, whatever was synthesised before in the process.
    """
    global _ESPEAK
    if _ESPEAK is None:
        _ESPEAK = _Espeak()
    audio, events = _ESPEAK.synth(text, speaker.voice(language), speaker.pitch, speaker.rate)
    return audio, _align_words(text, language, events, audio)


def _align_words(text: str, language: str, events: list[tuple[int, int]], audio: np.ndarray) -> list[Word]:
    """Word timestamps from WORD events: a word starts at its event; it ends where the next word starts.

    espeak-ng may give one event for several units (a Chinese word of two characters, "twenty-one"): the units without
    an event share their group's time span evenly. The last word ends where speech ends (trailing silence cut).
    """
    tokens = split_words(text, language)
    if not tokens:
        return []
    sr = ESPEAK_SAMPLE_RATE
    starts: list[float | None] = [None] * len(tokens)
    for pos, sample in events:
        j = next((j for j, (_, end, _) in enumerate(tokens) if end > pos), None)
        if j is not None and starts[j] is None:
            starts[j] = sample / sr
    starts[0] = starts[0] or 0.0
    loud = np.flatnonzero(np.abs(audio.astype(np.int32)) > 0.02 * max(1, int(np.abs(audio).max())))
    speech_end = min(len(audio), int(loud[-1]) + int(0.03 * sr)) / sr if len(loud) else len(audio) / sr
    timed = [0]  # indices with a start; drop any that would not increase
    for j in range(1, len(tokens)):
        if starts[j] is not None and starts[j] > starts[timed[-1]]:
            timed.append(j)
    bounds = timed + [len(tokens)]
    times = [0.0] * (len(tokens) + 1)
    for g, j in enumerate(timed):
        t0 = starts[j]
        t1 = starts[bounds[g + 1]] if g + 1 < len(timed) else max(speech_end, t0 + 0.01 * (bounds[g + 1] - j))
        for k in range(j, bounds[g + 1]):
            times[k] = t0 + (t1 - t0) * (k - j) / (bounds[g + 1] - j)
        times[bounds[g + 1]] = t1
    return [Word(tok, round(times[k], 4), round(times[k + 1], 4)) for k, (_, _, tok) in enumerate(tokens)]


# ===================================================================================================== the build
_SPEAKERS = {s.id: s for s in [*USER_SPEAKERS, *AGENT_SPEAKERS.values()]}


def _synth_task(task: tuple[str, str, str, str, int]) -> tuple[int, list[Word]]:
    """Worker: speak one turn, write its wav (mono PCM_16); return its length in samples and its words."""
    text, language, speaker_id, wav_path, sample_rate = task
    audio, words = synthesize(text, language, _SPEAKERS[speaker_id])
    if sample_rate != ESPEAK_SAMPLE_RATE:
        resampled = resample(audio.astype(np.float32) / 32768, ESPEAK_SAMPLE_RATE, sample_rate)
        audio = np.clip(np.round(resampled * 32768), -32768, 32767).astype(np.int16)
    sf.write(wav_path, audio, sample_rate, subtype="PCM_16", format="WAV")
    return len(audio), words


def _stamp(seed: int, num_dialogues: int, sample_rate: int) -> dict:
    return {"version": CORPUS_VERSION, "seed": seed, "num_dialogues": num_dialogues, "sample_rate": sample_rate}


def build_corpus(out_dir: str | Path, *, num_dialogues: int = 1200, seed: int = 1234,
                 sample_rate: int = ESPEAK_SAMPLE_RATE, workers: int = 2, progress: bool = True) -> Path:
    """Synthesise the built-in corpus into `out_dir` (Ke-SpeechChat layout) and return `out_dir`.

    Same seed, same bytes. Dialogues alternate English / Chinese and the two agents, users are drawn from
    `USER_SPEAKERS`; turns follow one another on the dialogue timeline (user on channel 0, agent on channel 1).
    If `out_dir` already holds a finished corpus with the same stamp it is returned as is; a different corpus, or a
    folder that is not a corpus, raises ``ValueError`` rather than being overwritten.
    """
    out_dir = Path(out_dir)
    stamp = _stamp(seed, num_dialogues, sample_rate)
    stamp_path = out_dir / STAMP_NAME
    if stamp_path.is_file():
        found = json.loads(stamp_path.read_text(encoding="utf-8"))
        if {k: found.get(k) for k in stamp} == stamp:
            return out_dir
        raise ValueError(f"{stamp_path}: holds another corpus ({ {k: found.get(k) for k in stamp} }, asked for {stamp});"
                         " delete it or choose another out_dir")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir}: exists and is not a finished corpus (no {STAMP_NAME}); delete it or choose another")
    if num_dialogues < 1:
        raise ValueError(f"build_corpus: num_dialogues must be >= 1, got {num_dialogues}")

    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        dialogues, tasks = _plan(tmp, seed, num_dialogues, sample_rate)
        results = list(_run(tasks, workers, progress))
        total_seconds = _assemble(dialogues, results, sample_rate)
        for d in dialogues:
            write_dialogue(d, d.source)
        n_utts = len(tasks)
        summary = {**stamp, "utterances": n_utts, "hours": round(total_seconds / 3600, 4),
                   "languages": {lang: sum(d.channels[0]["language"] == lang for d in dialogues) for lang in ("en", "zh")},
                   "espeakng_loader": package_version("espeakng-loader")}
        write_dialogue(summary, tmp / STAMP_NAME)  # last: a folder with a stamp is complete
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); os.rename cannot replace a folder
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"built {num_dialogues} dialogues, {n_utts} utterances, {total_seconds / 3600:.2f} h of audio in "
              f"{time.perf_counter() - started:.1f} s -> {out_dir}")
    return out_dir


def _plan(root: Path, seed: int, num_dialogues: int, sample_rate: int) -> tuple[list[Dialogue], list[tuple]]:
    """Dialogues with texts, speakers and paths (times still zero) and one synthesis task per turn."""
    rng = random.Random(f"speakers-{seed}")
    dialogues, tasks = [], []
    for i, (lang, texts) in enumerate(plan_texts(seed, num_dialogues)):
        did = f"toy{i:05d}"
        user = rng.choice(USER_SPEAKERS)
        agent = AGENT_SPEAKERS[("agentFemale", "agentMale")[(i // 2) % 2]]  # both agents in any 4 dialogues
        (root / did).mkdir()
        turns = []
        for t, text in enumerate(texts):
            spk = (user, agent)[t % 2]
            rel = f"{did}/{did}_{t}_{spk.id}.wav"
            turns.append(Turn(channel=t % 2, speaker=spk.id, text=text, start=0.0, end=0.0, audio_path=rel))
            tasks.append((text, lang, spk.id, str(root / rel), sample_rate))
        dialogues.append(Dialogue(
            id=did, speakers={s.id: {"role": role, "gender": s.gender} for s, role in ((user, "user"), (agent, "agent"))},
            audio={"channel": 2, "duration": 0.0, "sample_rate": sample_rate},
            channels=[{"channel_index": 0, "language": lang}, {"channel_index": 1, "language": lang}],
            turns=turns, source=root / f"{did}.json"))
    return dialogues, tasks


def _run(tasks: list[tuple], workers: int, progress: bool) -> Iterator[tuple[int, list[Word]]]:
    """Synthesise in order; with `workers` > 1 in a spawn pool (safe next to torch/CUDA in the parent)."""
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        bar = Progress("synthesising", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        bar.start()
        job = bar.add_task("synth", total=len(tasks))
    try:
        if workers <= 1:
            results = map(_synth_task, tasks)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers)
            results = pool.imap(_synth_task, tasks, chunksize=16)
        try:
            for r in results:
                if bar is not None:
                    bar.advance(job)
                yield r
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    finally:
        if bar is not None:
            bar.stop()


def _assemble(dialogues: list[Dialogue], results: list[tuple[int, list[Word]]], sample_rate: int) -> float:
    """Lay the turns end to end on each dialogue's timeline; return the total seconds of audio."""
    it, total = iter(results), 0.0
    for d in dialogues:
        clock = 0.0
        for turn in d.turns:
            n, words = next(it)
            turn.start, clock = round(clock, 6), clock + n / sample_rate
            turn.end, turn.words = round(clock, 6), words
        d.audio["duration"] = round(clock, 6)
        total += clock
    return total
