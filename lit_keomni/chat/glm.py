"""The GLM-4-Voice chat pipeline (seed 003 §2.4, Appendix F), vocoded in blocks of speech tokens.

User speech -> stage-1 speech tokens -> the dialogue template with the answer open -> the LM writes the text answer
first (``text_guided``) and then speech tokens, or speech tokens only (``direct``), or both interleaved
(``streaming``); speech tokens go to the vocoder in blocks of 25 (2 s at 12.5 Hz) as they arrive. A ``direct``
answer's text is the stage-1 ASR decoder's reading of its speech tokens (cheap: no encoder pass).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_keomni.chat.checks import check_flow_decoder, check_vocoder, expect_field, load_chat_vocoder
from lit_keomni.chat.decoding import KVCache, next_token
from lit_keomni.chat.streaming import ChatResult, Clock, UnitStream
from lit_keomni.token2wav import SpeechStream, Token2Wav, decoder_meta, load_token2wav
from lit_keomni.checkpoints import CONFIG_FILE, read_export_meta, unit_meta
from lit_keomni.text.templates import ASSISTANT, BEGIN_AUDIO, END_AUDIO, SYSTEM, USER, Exchange, glm_dialogue

GLM_BLOCK = 25
"""Speech tokens per vocoder block in the GLM pipeline: 2 s at 12.5 Hz (seed 003 §2.4)."""


def _allowed(vocab: int, lo: int, hi: int, extra: Sequence[int], device: torch.device) -> Tensor:
    """A (vocab,) boolean mask: True on ids ``lo`` to ``hi`` (exclusive) and on ``extra``."""
    allow = torch.zeros(vocab, dtype=torch.bool, device=device)
    allow[lo:hi] = True
    allow[list(extra)] = True
    return allow


class GlmChat:
    """GLM-4-Voice: stage-1 speech tokens -> dialogue template -> LM (text, then speech tokens) -> vocoder in blocks
    of ``block`` speech tokens. ``vocoder`` is a unit vocoder (``UnitVocoder``) or the flow decoder with its mel
    vocoder (``Token2Wav``, the paper's decoder), which streams blocks of ``block``, 2, 4, 6, 8 × ``block`` tokens."""

    components = ("tokenizer", "llm", "vocoder")
    units_fingerprint: str | None = None
    """The fingerprint of the stage-1 export whose speech tokens the LM writes (set by ``load``)."""

    def __init__(self, lm: Any, speech: Any, vocoder: Any, *, template: str, block: int = GLM_BLOCK,
                 lookahead: int = 2, paths: Mapping[str, str] | None = None) -> None:
        self.lm, self.speech, self.vocoder = lm, speech, vocoder
        if isinstance(vocoder, Token2Wav):
            self.components = ("tokenizer", "llm", "flow", "vocoder")
        self.template, self.block, self.lookahead = template, block, lookahead
        self.paths = dict(paths or {})
        self.stage1 = str(speech.export)
        self.max_samples = speech.max_samples

    @classmethod
    def load(cls, model: str | Path, vocoder: str | Path | None, *, template: str | None = None,
             speech_export: str | Path | None = None, device: str = "cpu", decoder: str | Path | None = None,
             ode_steps: int = 10, **kw: Any) -> GlmChat:
        """Check the LM, its stage-1 export and the vocoder against each other, then load them. ``decoder``: a
        "flow_decoder" export (or released glm-4-voice-decoder folder) speaking instead of the unit vocoder;
        ``vocoder`` then optionally names a "mel_vocoder" export to use in place of the decoder's own;
        ``ode_steps``: the flow's ODE steps."""
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
        paths = {"model": str(model), "vocoder": str(vocoder), "speech_export": str(stage1)}
        if decoder is not None:
            check_flow_decoder(decoder, decoder_meta(decoder), units, f"{stage1} (the speech tokens of {model})")
            voc = load_token2wav(decoder, vocoder, device, n_timesteps=ode_steps)
            paths["decoder"] = str(decoder)
        elif vocoder is None:
            raise ValueError("GlmChat.load: give a unit vocoder export or a flow decoder (decoder=...)")
        else:
            check_vocoder(vocoder, read_export_meta(vocoder, "vocoder"),
                          {**units, "units_fingerprint": units["fingerprint"]},
                          f"{stage1} (the speech tokens of {model})", None)
            voc, _ = load_chat_vocoder(vocoder, torch.device(device))
        lm = load_speech_lm(model, stage1, device)
        chat = cls(lm, Stage1Speech(stage1, device), voc, template=template or lm.template, paths=paths, **kw)
        chat.units_fingerprint = units["fingerprint"]
        return chat

    def _stream(self, clock: Clock) -> UnitStream | SpeechStream:
        """The vocoding stream of one answer."""
        if isinstance(self.vocoder, Token2Wav):
            return self.vocoder.streamer([self.block * k for k in (1, 2, 4, 6, 8)], clock)
        return UnitStream(self.vocoder, self.block, self.lookahead, clock)

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
        stream = self._stream(clock)
        text_ids: list[int] = []
        cache = KVCache(llm, llm.config.block_size)
        if self.template == "streaming":  # one interleaved answer (13 text, 26 speech, ...) up to <|user|>
            stops = (tok.token_to_id(USER), eos)
            allow = _allowed(vocab, 0, off + tok.num_audio_tokens, stops, device)
            try:
                with clock.part("llm"):
                    logits = cache.logits(cache.feed(prompt))
                for step in range(min(n_text + n_speech, room)):
                    with clock.part("llm"):
                        nxt = next_token(logits, allow, temperature, top_k, generator)
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
                        nxt = next_token(logits, text_allow, temperature, top_k, generator)
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
                    nxt = next_token(logits, speech_allow, temperature, top_k, generator)
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
