"""The ASR check of a chat answer: the stage-1 ASR model transcribes the produced audio (and, when the units are its
own speech tokens, reads the units too); CER against the printed text answer. Timed apart from the answer and not
counted in its compute."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lit_keomni.audio import SAMPLE_RATE, resample
from lit_keomni.chat.streaming import ChatResult
from lit_keomni.checkpoints import export_fingerprint


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
