"""The KE-Omni chat pipeline (seed 000 §4, §4.3), streamed every ``text_chunk`` text tokens.

User speech -> encoder + adapter -> LLM, which writes the text answer one token at a time with the KV cache. Each
token's last hidden state (after the final norm) is taken when the token is fed back, which is the teacher-forced
state stages 5/6 train on (``nn.keomni.answer_hidden_states``). Every ``text_chunk`` tokens (and at the end) the
chunk's states go through the duration predictor and the unit generator (``nn.speech_decoder.decode_units``; both
are bidirectional, so they see one chunk at a time) and the units into the vocoder, whose audio is appended as it
comes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_keomni.chat.checks import check_vocoder, expect_field, export_field, load_chat_vocoder
from lit_keomni.chat.decoding import KVCache, next_token
from lit_keomni.chat.streaming import ChatResult, Clock, Timed, UnitStream
from lit_keomni.checkpoints import CONFIG_FILE, export_fingerprint, read_export_meta
from lit_keomni.text.templates import Exchange, keomni_dialogue
from lit_keomni.text.tokenizer import SPEECH_SLOT


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
                         read_export_meta(vocoder, "vocoder"))
        for path, meta in ((duration, dur), (unit_generator, gen)):
            expect_field(path, meta, "hidden_size", n_embd, f"the LLM's width, {Path(model) / CONFIG_FILE} field "
                                                            "'config.llm.n_embd'")
            if "llm_vocab_size" in meta:  # the fingerprint covers it; a clearer message where it is recorded
                expect_field(path, meta, "llm_vocab_size", vocab, f"the LLM's vocabulary, {model}")
            expect_field(path, meta, "llm_fingerprint", fingerprint, f"the fingerprint of {model}: trained on the "
                                                                     "hidden states of another LLM")
        expect_field(unit_generator, gen, "frame_rate", float(export_field(dur, "frame_rate")),
                     f"the unit rate of the duration predictor's frames, {duration}")
        if dur.get("speaker") is not None:
            expect_field(unit_generator, gen, "speaker", dur["speaker"], f"the speaker of {duration}")
        units = {k: gen[k] for k in ("num_units", "frame_rate", "units_fingerprint")}
        check_vocoder(vocoder, voc, units, str(unit_generator), gen.get("speaker"))

        dev = torch.device(device)
        keomni, tokenizer, meta = load_keomni(model, answers=True)
        dp, _ = load_duration(duration)
        ug, _ = load_unit_generator(unit_generator)
        voc_model, _ = load_chat_vocoder(vocoder, dev)
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
        duration, unit_gen = Timed(self.duration, clock, "duration"), Timed(self.generator, clock, "unit_generator")
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

        cache = KVCache(m.llm, len(prompt) + steps)
        try:
            with clock.part("llm"):
                x = m.llm.embed(torch.tensor([prompt], device=device))
                slots = torch.tensor([prompt], device=device) == tok.token_to_id(SPEECH_SLOT)
                x = x.masked_scatter(slots[..., None], frames[0, : int(lengths[0])].to(x.dtype))
                logits = cache.logits(cache.feed(prompt, x))
            for _ in range(steps):
                with clock.part("llm"):
                    nxt = next_token(logits, None, temperature, top_k, generator)
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
