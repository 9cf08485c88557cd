"""Speech in, streamed speech out: the two spoken-dialogue pipelines, timed, from exports only.

    python -m lit_keomni chat --pipeline keomni --model checkpoints/stage4_keomni/export \
        --duration checkpoints/stage5/export --unit-generator checkpoints/stage6/export \
        --vocoder checkpoints/stage7/export question.wav --out chat_out --json chat.json
    python -m lit_keomni chat --pipeline glm --model checkpoints/stage4/export --vocoder checkpoints/stage7/export \
        question.wav

- KE-Omni (seed 000 §4, §4.3): user speech -> encoder + adapter -> LLM, which writes the text answer one token at a
  time with the KV cache. Each token's last hidden state (after the final norm) is taken when the token is fed back,
  which is the teacher-forced state stages 5/6 train on (``nn.keomni.answer_hidden_states``). Every ``text_chunk``
  tokens (and at the end) the chunk's states go through the duration predictor and the unit generator
  (``nn.speech_decoder.decode_units``; both are bidirectional, so they see one chunk at a time) and the units into
  the vocoder, whose audio is appended as it comes.
- GLM-4-Voice (seed 003 §2.4, Appendix F): user speech -> stage-1 speech tokens -> the dialogue template with the
  answer open -> the LM writes the text answer first (``text_guided``) and then speech tokens, or speech tokens only
  (``direct``); speech tokens go to the vocoder in blocks of 25 (2 s at 12.5 Hz) as they arrive. A ``direct`` answer's
  text is the stage-1 ASR decoder's reading of its speech tokens (cheap: no encoder pass).
- Vocoding (``UnitStream``): a block is synthesised once ``lookahead`` later units exist, with the vocoder's whole
  receptive field of earlier units as left context, and cropped; with ``lookahead >= receptive_units`` the streamed
  audio equals one ``UnitVocoder.forward`` over all units (``UnitVocoder.stream`` does the same for units known in
  advance). Each pipeline's audio is ``units x hop`` samples long.
- Timing: time to first audio is measured from the start of a request (after loading), compute time per component;
  the real-time factor is the request's wall-clock seconds / seconds of audio produced. The ASR check (the stage-1
  ASR model transcribes the produced audio; CER against the printed text answer) is timed apart and not counted.
Every export is checked against the others before any weight is loaded: one error names the file, the field, what it
holds and what the other export expects.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_keomni.checkpoints import CONFIG_FILE, export_fingerprint, read_export_meta, unit_meta
from lit_keomni.generate import sample
from lit_keomni.nn.audio import load_wav, resample, save_wav
from lit_keomni.text.templates import (ASSISTANT, BEGIN_AUDIO, DIALOGUE_MODES, END_AUDIO, SYSTEM, USER, Exchange,
                                       glm_dialogue, keomni_dialogue)
from lit_keomni.text.tokenizer import SPEECH_SLOT

SAMPLE_RATE = 16_000
"""Input rate of the speech encoders."""
GLM_BLOCK = 25
"""Speech tokens per vocoder block in the GLM pipeline: 2 s at 12.5 Hz (seed 003 §2.4)."""


# ---------------------------------------------------------------------------------------------------- timing


class Clock:
    """Per-request timer: seconds per component, the time of the first audio since the request began, the seconds
    per component spent until then, and the request's wall-clock total."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.perf_counter()
        self.times: dict[str, float] = defaultdict(float)
        self.first_audio: float | None = None
        self.first_times: dict[str, float] = {}
        self.total = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        self._sync()
        t = time.perf_counter()
        yield
        self._sync()
        self.times[name] += time.perf_counter() - t

    def stop(self) -> float:
        """End of the request: its wall-clock seconds."""
        self._sync()
        self.total = time.perf_counter() - self.start
        return self.total

    def audio(self, chunk: Tensor) -> None:
        """Note that ``chunk`` of audio is ready (the first non-empty one sets the time to first audio)."""
        if self.first_audio is None and chunk.numel():
            self.first_audio = time.perf_counter() - self.start
            self.first_times = dict(self.times)


class _Timed:
    """A module called inside ``clock.part(name)`` (so ``decode_units`` reports its two models apart)."""

    def __init__(self, module: torch.nn.Module, clock: Clock, name: str) -> None:
        self.module, self.clock, self.name = module, clock, name

    def __call__(self, *args: Any) -> Tensor:
        with self.clock.part(self.name):
            return self.module(*args)


# ---------------------------------------------------------------------------------------------------- vocoding


class UnitStream:
    """Incremental vocoding of units that arrive in pieces: ``push`` synthesises every whole ``block`` of units that
    has ``lookahead`` later units after it, ``flush`` the rest; the audio chunks collect in ``chunks``. Each piece is
    synthesised with the vocoder's receptive field of earlier units as left context and up to ``receptive_units``
    later ones, then cropped, so its length is exactly units x hop. With a ``clock`` the work counts as "vocoder"
    and the first chunk marks the time to first audio."""

    def __init__(self, vocoder: Any, block: int = 1, lookahead: int = 2, clock: Clock | None = None) -> None:
        if block < 1 or lookahead < 0:
            raise ValueError(f"UnitStream: block {block} must be >= 1 and lookahead {lookahead} >= 0")
        self.vocoder, self.block, self.lookahead, self.clock = vocoder, block, lookahead, clock
        self.context = int(vocoder.receptive_units)
        self.units: list[int] = []
        self.chunks: list[Tensor] = []
        self.done = 0

    def push(self, units: Sequence[int]) -> list[Tensor]:
        """Add units; the audio chunks this made ready."""
        self.units.extend(int(u) for u in units)
        n = (len(self.units) - self.lookahead - self.done) // self.block * self.block
        return self._synthesise(self.done + n) if n > 0 else []

    def flush(self) -> list[Tensor]:
        """The audio of every unit not yet synthesised."""
        return self._synthesise(len(self.units)) if self.done < len(self.units) else []

    def audio(self) -> Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.zeros(0)

    @torch.no_grad()
    def _synthesise(self, end: int) -> list[Tensor]:
        with self.clock.part("vocoder") if self.clock else contextlib.nullcontext():
            start, hop = self.done, self.vocoder.hop
            a, b = max(0, start - self.context), min(len(self.units), end + self.context)
            device = next(self.vocoder.parameters()).device
            wav = self.vocoder(torch.tensor([self.units[a:b]], dtype=torch.long, device=device))[0]
            chunk = wav[(start - a) * hop: (end - a) * hop].float().cpu()
        self.done = end
        if self.clock:
            self.clock.audio(chunk)
        self.chunks.append(chunk)
        return [chunk]


# ---------------------------------------------------------------------------------------------------- decoding


class _Cache:
    """One sequence decoded with an LLM's KV cache; ``ids`` are the tokens it holds, in slot order."""

    def __init__(self, llm: Any, length: int) -> None:
        self.llm, self.length = llm, length
        self.ids: list[int] = []
        llm.set_kv_cache(1, length, device=llm.embed.weight.device)

    def feed(self, ids: Sequence[int], embeds: Tensor | None = None) -> Tensor:
        """Append ``ids`` (or their input ``embeds`` (1, T, d)); the last hidden states (1, T, d) at their positions."""
        start = len(self.ids)
        if start + len(ids) > self.length:
            raise ValueError(f"chat: {start + len(ids)} tokens exceed the KV cache of {self.length}")
        device = self.llm.embed.weight.device
        pos = torch.arange(start, start + len(ids), device=device)
        if embeds is None:
            embeds = self.llm.embed(torch.tensor([list(ids)], dtype=torch.long, device=device))
        self.ids.extend(int(i) for i in ids)
        return self.llm(inputs_embeds=embeds, input_pos=pos, return_hidden=True)

    def extend_to(self, ids: Sequence[int]) -> Tensor:
        """Make the cache hold ``ids``: keep the common prefix, feed the rest (at least the last token)."""
        keep = 0
        while keep < min(len(self.ids), len(ids) - 1) and self.ids[keep] == ids[keep]:
            keep += 1
        self.ids = self.ids[:keep]
        return self.feed(ids[keep:])

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits (V,) over the real vocabulary from the last hidden state."""
        return self.llm.lm_head(hidden[0, -1])[: self.llm.config.vocab_size].float()

    def close(self) -> None:
        self.llm.clear_kv_cache()


def _next(logits: Tensor, allow: Tensor | None, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> int:
    if allow is not None:
        logits = logits.masked_fill(~allow, float("-inf"))
    return int(sample(logits[None], temperature, top_k, generator=generator)[0])


def _allowed(vocab: int, lo: int, hi: int, extra: Sequence[int], device: torch.device) -> Tensor:
    allow = torch.zeros(vocab, dtype=torch.bool, device=device)
    allow[lo:hi] = True
    allow[list(extra)] = True
    return allow


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class ChatResult:
    """One answer: its text, audio (at ``sample_rate``), the units/speech tokens voiced, and timings (seconds)."""

    text: str
    wav: Tensor
    sample_rate: int
    units: list[int]
    times: dict[str, float]
    """Seconds per component."""
    compute: float
    """Wall-clock seconds of the request (components and the glue between them)."""
    first_audio: float | None
    chunks: int
    text_ids: list[int] = field(default_factory=list)
    first_times: dict[str, float] = field(default_factory=dict)
    """Seconds per component spent before the first audio chunk was ready."""
    hidden: Tensor | None = None
    """KE-Omni: the LLM's last hidden states (T, d) of the answer's text tokens, as the speech decoder read them."""
    extra_times: dict[str, float] = field(default_factory=dict)
    """Work outside the answer's production (the ``direct`` answer's ASR text), not counted in ``compute``."""

    @property
    def audio_seconds(self) -> float:
        return self.wav.numel() / self.sample_rate

    @property
    def rtf(self) -> float | None:
        return self.compute / self.audio_seconds if self.wav.numel() else None

    def summary(self) -> dict[str, Any]:
        return {"text": self.text, "first_audio_s": self.first_audio, "rtf": self.rtf,
                "compute_s": self.compute, "audio_s": self.audio_seconds, "units": len(self.units),
                "text_tokens": len(self.text_ids), "audio_chunks": self.chunks,
                "times_s": {**dict(self.times), **self.extra_times},
                "first_audio_times_s": self.first_times}


# ---------------------------------------------------------------------------------------------------- checks


def _field(meta: Mapping[str, Any], name: str) -> Any:
    """A handoff field of an export's config.json: top level, else inside ``config``."""
    return meta[name] if name in meta else meta.get("config", {}).get(name)


def expect_field(path: str | Path, meta: Mapping[str, Any], name: str, want: Any, what: str) -> None:
    """Raise naming ``path``'s config.json, the field, its value and ``want`` (``what``: where ``want`` comes from)."""
    found = _field(meta, name)
    if isinstance(want, float) and isinstance(found, (int, float)) and abs(found - want) < 1e-9:
        return
    if found != want:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: field '{name}' is {found!r}, expected {want!r} ({what}); "
                         f"these exports do not belong together")


def _vocoder_meta(path: str | Path) -> dict[str, Any]:
    return read_export_meta(path, "vocoder")


def _load_vocoder(path: str | Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    from lit_keomni.checkpoints import load_vocoder

    vocoder, meta = load_vocoder(path)
    if vocoder.config.num_speakers:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: field 'config.num_speakers' is {vocoder.config.num_speakers}; "
                         "chat speaks with a one-speaker vocoder (KE-Omni §5.1: one per agent speaker)")
    return vocoder.to(device).eval(), meta


def _check_vocoder(path: str | Path, meta: Mapping[str, Any], units: Mapping[str, Any], source: str,
                   speaker: str | None) -> None:
    for name in ("num_units", "frame_rate", "units_fingerprint"):
        expect_field(path, meta, name, units[name], f"the units {source} uses")
    if speaker is not None:
        expect_field(path, meta, "speaker", speaker, f"the speaker {source} was trained for")


# ---------------------------------------------------------------------------------------------------- KE-Omni


class KeOmniChat:
    """KE-Omni: encoder + adapter + LLM (text, one token at a time) -> duration predictor -> unit generator ->
    vocoder, streamed every ``text_chunk`` text tokens."""

    components = ("encoder+adapter", "llm", "duration", "unit_generator", "vocoder")
    units_fingerprint: str | None = None
    """The fingerprint of the unit source the answer's units come from (set by ``load``)."""

    def __init__(self, model: Any, tokenizer: Any, duration: Any, generator: Any, vocoder: Any, *,
                 text_chunk: int = 8, lookahead: int = 2, paths: Mapping[str, str] | None = None,
                 stage1: str | None = None) -> None:
        if text_chunk < 1:
            raise ValueError(f"chat: --text-chunk {text_chunk} must be >= 1")
        self.model, self.tokenizer, self.duration, self.generator = model, tokenizer, duration, generator
        self.vocoder, self.text_chunk, self.lookahead = vocoder, text_chunk, lookahead
        self.paths, self.stage1 = dict(paths or {}), stage1
        self.max_samples = model.encoder.config.max_source_positions * 2 * model.logmel.hop_length

    @classmethod
    def load(cls, model: str | Path, duration: str | Path, unit_generator: str | Path, vocoder: str | Path, *,
             device: str = "cpu", **kw: Any) -> KeOmniChat:
        """Check the four exports against each other (sizes, fingerprints, units, speaker), then load them."""
        from lit_keomni.checkpoints import load_duration, load_keomni, load_unit_generator

        llm = read_export_meta(model, "keomni_lm")
        n_embd, vocab = llm["config"]["llm"]["n_embd"], llm["config"]["llm"]["vocab_size"]
        fingerprint = export_fingerprint(model)
        dur, gen, voc = (read_export_meta(duration, "duration"), read_export_meta(unit_generator, "unit_generator"),
                         _vocoder_meta(vocoder))
        for path, meta in ((duration, dur), (unit_generator, gen)):
            expect_field(path, meta, "hidden_size", n_embd, f"the LLM's width, {Path(model) / CONFIG_FILE} field "
                                                            "'config.llm.n_embd'")
            if "llm_vocab_size" in meta:  # the fingerprint covers it; a clearer message where it is recorded
                expect_field(path, meta, "llm_vocab_size", vocab, f"the LLM's vocabulary, {model}")
            expect_field(path, meta, "llm_fingerprint", fingerprint, f"the fingerprint of {model}: trained on the "
                                                                     "hidden states of another LLM")
        expect_field(unit_generator, gen, "frame_rate", float(_field(dur, "frame_rate")),
                     f"the unit rate of the duration predictor's frames, {duration}")
        if dur.get("speaker") is not None:
            expect_field(unit_generator, gen, "speaker", dur["speaker"], f"the speaker of {duration}")
        units = {k: gen[k] for k in ("num_units", "frame_rate", "units_fingerprint")}
        _check_vocoder(vocoder, voc, units, str(unit_generator), gen.get("speaker"))

        dev = torch.device(device)
        keomni, tokenizer, meta = load_keomni(model, answers=True)
        dp, _ = load_duration(duration)
        ug, _ = load_unit_generator(unit_generator)
        voc_model, _ = _load_vocoder(vocoder, dev)
        stage1 = (meta.get("speech_tokenizer") or {}).get("export") or meta.get("encoder_from")
        paths = {"model": str(model), "duration": str(duration), "unit_generator": str(unit_generator),
                 "vocoder": str(vocoder)}
        chat = cls(keomni.to(dev), tokenizer, dp.to(dev), ug.to(dev), voc_model, paths=paths, stage1=stage1, **kw)
        chat.units_fingerprint = gen["units_fingerprint"]
        return chat

    @torch.no_grad()
    def __call__(self, wav: Tensor, *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> ChatResult:
        """Answer one question ``wav`` (mono 16 kHz float)."""
        from lit_keomni.nn.speech_decoder import decode_units

        m, tok = self.model, self.tokenizer
        device = m.llm.embed.weight.device
        clock = Clock(device)
        n_frames = m.speech_frames(wav.shape[-1])
        if n_frames < 1:
            raise ValueError(f"audio of {wav.shape[-1]} samples is shorter than one adapter frame ({m.stack * 20} ms)")
        prompt = keomni_dialogue(tok, [Exchange(user_frames=n_frames)])[0]
        steps = min(max_new_tokens, m.llm.config.block_size - len(prompt))
        if steps < 1:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in the LLM's block_size "
                             f"{m.llm.config.block_size}")
        with clock.part("encoder+adapter"):
            mels, mel_lengths = m.features([wav.to(device)])
            frames, lengths = m.encode(mels, mel_lengths)
        stream = UnitStream(self.vocoder, 1, self.lookahead, clock)
        duration, unit_gen = _Timed(self.duration, clock, "duration"), _Timed(self.generator, clock, "unit_generator")
        ids: list[int] = []
        pending: list[Tensor] = []
        states: list[Tensor] = []

        def speak(final: bool) -> None:
            if pending:
                hidden = torch.stack(pending)[None]
                states.extend(pending)
                pending.clear()
                mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=device)
                stream.push(decode_units(duration, unit_gen, hidden, mask,
                                         min_frames=int(final and not stream.units))[0].tolist())
            if final:
                stream.flush()

        cache = _Cache(m.llm, len(prompt) + steps)
        try:
            with clock.part("llm"):
                x = m.llm.embed(torch.tensor([prompt], device=device))
                slots = torch.tensor([prompt], device=device) == tok.token_to_id(SPEECH_SLOT)
                x = x.masked_scatter(slots[..., None], frames[0, : int(lengths[0])].to(x.dtype))
                logits = cache.logits(cache.feed(prompt, x))
            for _ in range(steps):
                with clock.part("llm"):
                    nxt = _next(logits, None, temperature, top_k, generator)
                    if nxt == tok.eos_id:
                        break
                    hidden = cache.feed([nxt])
                    logits = cache.logits(hidden)
                ids.append(nxt)
                pending.append(hidden[0, -1])
                if len(pending) == self.text_chunk:
                    speak(False)
            speak(True)
        finally:
            cache.close()
        total = clock.stop()
        return ChatResult(tok.decode(ids).strip(), stream.audio(), self.vocoder.sample_rate, stream.units,
                          dict(clock.times), total, clock.first_audio, len(stream.chunks), ids, clock.first_times,
                          torch.stack(states) if states else None)


# ---------------------------------------------------------------------------------------------------- GLM-4-Voice


class GlmChat:
    """GLM-4-Voice: stage-1 speech tokens -> dialogue template -> LM (text, then speech tokens) -> vocoder in blocks
    of ``block`` speech tokens."""

    components = ("tokenizer", "llm", "vocoder")
    units_fingerprint: str | None = None
    """The fingerprint of the stage-1 export whose speech tokens the LM writes (set by ``load``)."""

    def __init__(self, lm: Any, speech: Any, vocoder: Any, *, template: str, block: int = GLM_BLOCK,
                 lookahead: int = 2, paths: Mapping[str, str] | None = None) -> None:
        self.lm, self.speech, self.vocoder = lm, speech, vocoder
        self.template, self.block, self.lookahead = template, block, lookahead
        self.paths = dict(paths or {})
        self.stage1 = str(speech.export)
        self.max_samples = speech.max_samples

    @classmethod
    def load(cls, model: str | Path, vocoder: str | Path, *, template: str | None = None,
             speech_export: str | Path | None = None, device: str = "cpu", **kw: Any) -> GlmChat:
        """Check the LM, its stage-1 export and the vocoder against each other, then load them."""
        from lit_keomni.eval.lm_scoring import Stage1Speech, load_speech_lm

        meta = read_export_meta(model, "speech_lm")
        if meta.get("stage") != "sft":
            raise ValueError(f"{Path(model) / CONFIG_FILE}: field 'stage' is {meta.get('stage')!r}, expected 'sft' "
                             "(a spoken-dialogue model from stage 4)")
        stage1 = speech_export or (meta.get("speech_tokenizer") or {}).get("export")
        if not stage1:
            raise ValueError(f"{Path(model) / CONFIG_FILE}: field 'speech_tokenizer.export' missing; "
                             "pass --speech-export")
        units = unit_meta(stage1)
        recorded = meta["speech_tokenizer"]
        expect_field(stage1, {"codebook_size": units["num_units"]}, "codebook_size", recorded["codebook_size"],
                     f"the speech tokens of {model}")
        expect_field(stage1, {"frame_rate_hz": units["frame_rate"]}, "frame_rate_hz",
                     float(recorded["frame_rate_hz"]), f"the speech-token rate of {model}")
        _check_vocoder(vocoder, _vocoder_meta(vocoder), {**units, "units_fingerprint": units["fingerprint"]},
                       f"{stage1} (the speech tokens of {model})", None)
        lm = load_speech_lm(model, stage1, device)
        voc, _ = _load_vocoder(vocoder, torch.device(device))
        paths = {"model": str(model), "vocoder": str(vocoder), "speech_export": str(stage1)}
        chat = cls(lm, Stage1Speech(stage1, device), voc, template=template or lm.template, paths=paths, **kw)
        chat.units_fingerprint = units["fingerprint"]
        return chat

    @torch.no_grad()
    def __call__(self, wav: Tensor, *, max_new_tokens: int = 128, max_speech_seconds: float = 10.0,
                 temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> ChatResult:
        """Answer one question ``wav`` (mono 16 kHz float)."""
        tok, llm = self.lm.tokenizer, self.lm.model
        device = llm.embed.weight.device
        clock = Clock(device)
        with clock.part("tokenizer"):
            codes = [int(c) for c in self.speech.encoder([wav.float().cpu()])[0]]
        if not codes:
            raise ValueError(f"audio of {wav.shape[-1]} samples gives no speech tokens")
        boa, eoa, asst = (tok.token_to_id(t) for t in (BEGIN_AUDIO, END_AUDIO, ASSISTANT))
        eos = tok.eos_id
        vocab = llm.config.vocab_size
        text_allow = _allowed(vocab, 0, tok.token_to_id(SYSTEM), (eos, boa, asst), device)
        off = tok.audio_token_offset
        speech_allow = _allowed(vocab, off, off + tok.num_audio_tokens, (eoa,), device)
        prompt = glm_dialogue(tok, [Exchange(user_codes=codes)], self.template)[0]
        room = llm.config.block_size - len(prompt) - 8  # the re-rendered speech prompt adds a few tokens
        n_text = min(max_new_tokens, room) if self.template != "direct" else 0
        n_speech = min(max(1, round(max_speech_seconds * self.lm.frame_rate_hz)), room - n_text)
        if n_speech < 1:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in the LM's block_size "
                             f"{llm.config.block_size}")
        stream = UnitStream(self.vocoder, self.block, self.lookahead, clock)
        text_ids: list[int] = []
        cache = _Cache(llm, llm.config.block_size)
        if self.template == "streaming":  # one interleaved answer (13 text, 26 speech, ...) up to <|user|>
            stops = (tok.token_to_id(USER), eos)
            allow = _allowed(vocab, 0, off + tok.num_audio_tokens, stops, device)
            try:
                with clock.part("llm"):
                    logits = cache.logits(cache.feed(prompt))
                for step in range(min(n_text + n_speech, room)):
                    with clock.part("llm"):
                        nxt = _next(logits, allow, temperature, top_k, generator)
                        if nxt in stops:
                            break
                        logits = cache.logits(cache.feed([nxt]))
                    if off <= nxt < off + tok.num_audio_tokens:
                        stream.push([nxt - off])
                    else:
                        text_ids.append(nxt)
                stream.flush()
            finally:
                cache.close()
            total = clock.stop()
            return ChatResult(tok.decode(text_ids).strip(), stream.audio(), self.vocoder.sample_rate, stream.units,
                              dict(clock.times), total, clock.first_audio, len(stream.chunks), text_ids,
                              clock.first_times)
        try:
            if self.template == "text_guided":
                with clock.part("llm"):
                    logits = cache.logits(cache.feed(prompt))
                for _ in range(n_text):
                    with clock.part("llm"):
                        nxt = _next(logits, text_allow, temperature, top_k, generator)
                        if nxt in (eos, boa, asst):
                            break
                        text_ids.append(nxt)
                        if len(text_ids) < n_text:
                            logits = cache.logits(cache.feed([nxt]))
            text = tok.decode(text_ids).strip()
            # The template with an empty speech answer, its <|end_of_audio|> dropped: ends at <|begin_of_audio|>.
            spoken = Exchange(user_codes=codes, text=text if self.template == "text_guided" else None, codes=[])
            with clock.part("llm"):
                logits = cache.logits(cache.extend_to(glm_dialogue(tok, [spoken], self.template)[0][:-1]))
            for step in range(n_speech):
                with clock.part("llm"):
                    nxt = _next(logits, speech_allow, temperature, top_k, generator)
                    if nxt == eoa:
                        break
                    if step + 1 < n_speech:
                        logits = cache.logits(cache.feed([nxt]))
                stream.push([nxt - off])
            stream.flush()
        finally:
            cache.close()
        total = clock.stop()
        extra: dict[str, float] = {}
        if self.template == "direct":
            t = time.perf_counter()
            text = self.speech.transcribe([stream.units])[0].strip()
            extra["asr_text"] = time.perf_counter() - t
        return ChatResult(text, stream.audio(), self.vocoder.sample_rate, stream.units, dict(clock.times), total,
                          clock.first_audio, len(stream.chunks), text_ids, clock.first_times, extra_times=extra)


# ---------------------------------------------------------------------------------------------------- inputs


def input_files(path: str | Path) -> list[Path]:
    """``path`` itself (a file) or the ``.wav`` files of a folder, sorted."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".wav" and f.is_file())
        if not files:
            raise FileNotFoundError(f"{p}: no .wav files in this folder")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such audio file or folder")
    return [p]


def read_input(path: Path, max_samples: int) -> Tensor:
    """A question file as mono 16 kHz float32, with one error naming the file when it cannot be used."""
    try:
        wav, _ = load_wav(path, SAMPLE_RATE)
    except (RuntimeError, ValueError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise ValueError(f"{path}: not a readable audio file ({str(e).strip() or type(e).__name__})") from None
    if not wav.size or not np.isfinite(wav).all():
        raise ValueError(f"{path}: no audio samples" if not wav.size else f"{path}: audio holds NaN or inf samples")
    if len(wav) > max_samples:
        raise ValueError(f"{path}: lasts {len(wav) / SAMPLE_RATE:.1f} s, longer than the speech encoder's "
                         f"{max_samples / SAMPLE_RATE:.0f} s")
    return torch.from_numpy(wav)


def answer_language(text: str) -> str:
    """"zh" when the answer holds a Han character, else "en" (the ASR check's scoring language)."""
    return "zh" if any("\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff" for c in text) else "en"


class AsrCheck:
    """The stage-1 ASR model reads produced audio back; ``score`` gives its transcript and its CER against the text.
    When the answer's units are this export's speech tokens (``units_fingerprint``), its ASR decoder also reads the
    units themselves (no vocoder): the two CERs tell the vocoder's loss from the LM's and speech decoder's."""

    def __init__(self, export: str | Path, device: str = "cpu", units_fingerprint: str | None = None) -> None:
        from lit_keomni.eval.asr import Transcriber
        from lit_keomni.eval.lm_scoring import Stage1Speech

        self.transcriber = Transcriber(export, device, batch_size=1)
        self.export = Path(export)
        same = units_fingerprint is not None and units_fingerprint == export_fingerprint(export)
        self.units_reader = Stage1Speech(export, device) if same else None

    def score(self, result: ChatResult) -> dict[str, Any]:
        from lit_keomni.eval.asr import error_rate

        t = time.perf_counter()
        wav = result.wav.numpy()
        if result.sample_rate != SAMPLE_RATE:
            wav = resample(wav, result.sample_rate, SAMPLE_RATE)
        seconds = len(wav) / SAMPLE_RATE
        self.transcriber.max_tokens = min(self.transcriber.model.config.max_target_positions, int(25 * seconds) + 8)
        heard = self.transcriber([torch.from_numpy(wav)])[0][0].strip() if len(wav) else ""
        language = answer_language(result.text)
        out = {"asr_text": heard, "cer": error_rate([result.text], [heard], [language]).get("cer")}
        if self.units_reader is not None:
            read = self.units_reader.transcribe([result.units])[0].strip()
            out.update(units_asr_text=read, units_cer=error_rate([result.text], [read], [language]).get("cer"))
        return {**out, "asr_s": time.perf_counter() - t}


# ---------------------------------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="question audio: a wav file or a folder of wavs (any rate or channels)")
    p.add_argument("--pipeline", choices=("keomni", "glm"), default="keomni")
    p.add_argument("--model", required=True, help="stage-4 export: keomni_lm (keomni) or speech_lm SFT (glm)")
    p.add_argument("--duration", help="stage-5 duration predictor export (keomni)")
    p.add_argument("--unit-generator", help="stage-6 unit generator export (keomni)")
    p.add_argument("--vocoder", required=True, help="stage-7 vocoder export")
    p.add_argument("--template", choices=DIALOGUE_MODES, default=None,
                   help="glm: dialogue template (default: the one the model was trained with)")
    p.add_argument("--speech-export", default=None, help="glm: stage-1 export (default: the one the model records)")
    p.add_argument("--out", default="chat_out", help="folder for one answer wav per input")
    p.add_argument("--json", default=None, help="write text, timings and ASR check per input to this file")
    p.add_argument("--max-new-tokens", type=int, default=128, help="text tokens of an answer")
    p.add_argument("--max-speech-seconds", type=float, default=10.0, help="glm: speech of an answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--text-chunk", type=int, default=8, help="keomni: text tokens per speech-decoder call")
    p.add_argument("--block", type=int, default=GLM_BLOCK, help="glm: speech tokens per vocoder block")
    p.add_argument("--lookahead", type=int, default=2,
                   help="units after a block before it is vocoded (>= the vocoder's receptive field: exact audio)")
    p.add_argument("--no-asr", action="store_true", help="skip reading the answer back with the stage-1 ASR model")
    p.add_argument("--asr-export", default=None, help="stage-1 export of the ASR check (default: the model's)")
    p.add_argument("--warmup", action="store_true", help="answer the first input once, untimed, before the others")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is often fastest for one request on a busy machine")


def build(args: argparse.Namespace) -> KeOmniChat | GlmChat:
    if args.pipeline == "keomni":
        missing = [f"--{n}" for n in ("duration", "unit-generator") if not getattr(args, n.replace("-", "_"))]
        if missing:
            raise ValueError(f"chat --pipeline keomni needs {' and '.join(missing)}")
        return KeOmniChat.load(args.model, args.duration, args.unit_generator, args.vocoder, device=args.device,
                               text_chunk=args.text_chunk, lookahead=args.lookahead)
    return GlmChat.load(args.model, args.vocoder, template=args.template, speech_export=args.speech_export,
                        device=args.device, block=args.block, lookahead=args.lookahead)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Answer every input, write the wavs (and the JSON); returns what the JSON holds."""
    files = input_files(args.input)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = build(args)
    wavs = [read_input(f, pipe.max_samples) for f in files]
    asr_export = args.asr_export or pipe.stage1
    asr = (None if args.no_asr or not asr_export or not Path(asr_export).is_dir()
           else AsrCheck(asr_export, args.device, pipe.units_fingerprint))
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    kw: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              generator=generator)
    if isinstance(pipe, GlmChat):
        kw["max_speech_seconds"] = args.max_speech_seconds
    if args.warmup:
        pipe(wavs[0], **kw)
    out = Path(args.out)
    results = []
    for f, wav in zip(files, wavs):
        try:
            r = pipe(wav, **kw)
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from None
        target = out / f"{f.stem}.wav"
        save_wav(target, r.wav, r.sample_rate)
        row = {"input": str(f), "output": str(target), **r.summary()}
        if asr is not None:
            row.update(asr.score(r))
        results.append(row)
        first = "none" if r.first_audio is None else f"{1000 * r.first_audio:.0f} ms"
        rtf = "n/a" if r.rtf is None else f"{r.rtf:.3f}"
        parts = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in row["times_s"].items())
        print(f"{f}: {r.text!r}\n  -> {target} ({r.audio_seconds:.2f} s, {len(r.units)} units); first audio "
                 f"{first}, RTF {rtf}; {parts}")
        if asr is not None:
            line = f"  ASR check ({asr.export}): audio {row['asr_text']!r}, CER {_percent(row['cer'])}"
            if "units_cer" in row:
                line += (f"; its units, read without the vocoder: {row['units_asr_text']!r}, "
                         f"CER {_percent(row['units_cer'])}")
            print(line)
    report = {"pipeline": args.pipeline, "exports": pipe.paths, "device": args.device,
              "threads": torch.get_num_threads(), "template": getattr(pipe, "template", None), "text_chunk": getattr(pipe, "text_chunk", None),
              "block": getattr(pipe, "block", None), "lookahead": args.lookahead, "temperature": args.temperature,
              "asr_export": str(asr.export) if asr else None, "results": results}
    if args.json:
        from lit_keomni.atomic import write_json

        write_json(args.json, report)
    return report


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def main(argv: Sequence[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m lit_keomni chat",
                                description="Speech in, streamed speech out (KE-Omni or GLM-4-Voice pipeline), timed.")
    add_arguments(p)
    return run(p.parse_args(list(argv)))


# ---------------------------------------------------------------------------------------------------- tiny exports

TINY_TEXTS = ("Does Sam have a pet? Sam lives with a duck.", "What is two plus three? Two plus three is five.",
              "山姆有宠物吗？山姆和一只鸭子住在一起。", "The cat sat on the mat and looked at the red ball.")
"""What the tiny exports' BPE tokenizer is trained on."""


def tiny_exports(out: str | Path, *, codebook: int = 16, speaker: str = "agentFemale", frames_per_token: float = 2.0,
                 seed: int = 0) -> dict[str, Path]:
    """Random-weight exports of every piece both pipelines load, consistent with each other and as small as CPU tests
    want: ``stage1`` (speech tokenizer, ``codebook`` codes, with a BPE tokenizer trained on ``TINY_TEXTS``),
    ``keomni`` (keomni_lm), ``glm`` (speech_lm, text_guided SFT), ``duration``, ``unit_generator``, ``vocoder``
    (for ``speaker``). Answers run to their length limits: the LMs' output rows of their stop tokens (``<|eos|>``,
    ``<|begin_of_audio|>``, ``<|assistant|>``, ``<|end_of_audio|>``, ``<|user|>``) are zeroed, a logit of 0 against random ones. The
    duration predictor says ``frames_per_token`` for every token (its input projection is zeroed and its head scaled),
    so an answer's length in units is known. Used by the tests and the latency benchmark."""
    from lit_keomni.checkpoints import decoder_handoff, lm_tokenizer, write_export
    from lit_keomni.configs import SpeechTokenizerConfig, TransformerConfig, config_dict
    from lit_keomni.nn.adapter import SpeechAdapter
    from lit_keomni.nn.keomni import KeOmni
    from lit_keomni.nn.speech_decoder import DurationPredictor, UnitGenerator
    from lit_keomni.nn.transformer import Transformer
    from lit_keomni.nn.whisper import SpeechEncoder, SpeechTokenizerModel
    from lit_keomni.text.tokenizer import TextTokenizer

    out = Path(out)
    torch.manual_seed(seed)
    text_tok = TextTokenizer.train(list(TINY_TEXTS) * 4, vocab_size=300, min_frequency=1)
    s1 = SpeechTokenizerConfig(d_model=64, n_head=4, ffn_dim=128, encoder_layers=2, vq_position=1, decoder_layers=1,
                               codebook_size=codebook, commitment=0.25, vocab_size=text_tok.vocab_size)
    paths = {"stage1": write_export(out / "stage1", kind="speech_tokenizer", config=config_dict(s1),
                                    state_dict=SpeechTokenizerModel(s1).state_dict(),
                                    extra={"frame_rate_hz": s1.frame_rate_hz, "codebook_size": codebook,
                                           "sample_rate": SAMPLE_RATE, "vq_active": True},
                                    files={"tokenizer": text_tok.save})}
    tok, _ = lm_tokenizer(paths["stage1"])
    lm = TransformerConfig.from_name("tiny", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=172,
                                     block_size=512, vocab_size=tok.vocab_size)
    stops = [tok.eos_id, *(tok.token_to_id(t) for t in (BEGIN_AUDIO, ASSISTANT, END_AUDIO, USER))]
    keomni = KeOmni(SpeechEncoder(s1), SpeechAdapter(64, 64, stack=5, hidden=48), Transformer(lm))
    glm = Transformer(lm)
    with torch.no_grad():
        for head in (keomni.llm.lm_head, glm.lm_head):
            head.weight[stops] = 0.0
    paths["keomni"] = write_export(out / "keomni", kind="keomni_lm", config=keomni.config_dict(),
                                   state_dict=keomni.state_dict(), files={"tokenizer": tok.save},
                                   extra={"stage": "sft", "encoder_from": str(paths["stage1"].resolve()),
                                          "speech_tokenizer": {"frame_rate_hz": s1.frame_rate_hz,
                                                               "codebook_size": codebook,
                                                               "export": str(paths["stage1"].resolve())}})
    paths["glm"] = write_export(out / "glm", kind="speech_lm", config=config_dict(lm), state_dict=glm.state_dict(),
                                files={"tokenizer": tok.save},
                                extra={"stage": "sft", "template": "text_guided",
                                       "speech_tokenizer": {"frame_rate_hz": s1.frame_rate_hz,
                                                            "codebook_size": codebook,
                                                            "export": str(paths["stage1"].resolve())}})
    handoff = decoder_handoff(paths["keomni"], paths["stage1"])
    dec = TransformerConfig.from_name("tiny", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=172,
                                      block_size=512)
    dp = DurationPredictor(64, dec)
    with torch.no_grad():
        dp.proj.weight.zero_()
        raw = float(dp.raw(torch.zeros(1, 1, 64), torch.ones(1, 1, dtype=torch.bool))[0, 0])
        dp.net.lm_head.weight.mul_(frames_per_token / raw)
    paths["duration"] = write_export(out / "duration", kind="duration", config=config_dict(dp.config),
                                     state_dict=dp.state_dict(), extra={**handoff, "speaker": speaker})
    ug = UnitGenerator(64, codebook, dec)
    paths["unit_generator"] = write_export(out / "unit_generator", kind="unit_generator",
                                           config=config_dict(ug.config), state_dict=ug.state_dict(),
                                           extra={**handoff, "speaker": speaker})
    paths["vocoder"] = tiny_vocoder(out / "vocoder", paths["stage1"], speaker=speaker)
    return paths


def tiny_vocoder(out: str | Path, stage1: str | Path, *, speaker: str = "agentFemale") -> Path:
    """A random-weight unit vocoder export for the units of the stage-1 export ``stage1`` (any tokenizer's)."""
    from lit_keomni.checkpoints import write_export
    from lit_keomni.configs import config_dict
    from lit_keomni.nn.hifigan import UnitVocoder, VocoderConfig

    units = unit_meta(stage1)
    vc = VocoderConfig.from_name("tiny", upsample_initial_channel=32, resblock_kernel_sizes=(3,),
                                 resblock_dilation_sizes=((1, 3),))
    vocoder = UnitVocoder(units["num_units"], vc)
    return write_export(out, kind="vocoder", config=config_dict(vc), state_dict=vocoder.state_dict(),
                        extra={"num_units": units["num_units"], "frame_rate": units["frame_rate"],
                               "sample_rate": vc.sample_rate, "hop": vocoder.hop, "speaker": speaker,
                               "units_fingerprint": units["fingerprint"], "units_kind": units["kind"],
                               "units_from": str(Path(stage1).resolve())})
