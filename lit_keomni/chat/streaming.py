"""Streaming and timing shared by both chat pipelines: the per-request ``Clock``, ``UnitStream`` (units vocoded as
they arrive) and ``ChatResult`` (one answer with its timings).

- Vocoding (``UnitStream``): a block is synthesised once ``lookahead`` later units exist, with the vocoder's whole
  receptive field of earlier units as left context, and cropped; with ``lookahead >= receptive_units`` the streamed
  audio equals one ``UnitVocoder.forward`` over all units (``UnitVocoder.stream`` does the same for units known in
  advance). Each pipeline's audio is ``units x hop`` samples long.
- Timing: time to first audio is measured from the start of a request (after loading), compute time per component;
  the real-time factor is the request's wall-clock seconds / seconds of audio produced.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


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


class Timed:
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
