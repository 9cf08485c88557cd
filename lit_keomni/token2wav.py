"""GLM-4-Voice's speech decoder at inference (seed 003 §2.1, §2.4): speech tokens -> flow-matching mel -> HiFT waveform,
whole (``offline``) or block by block while the LM is still writing tokens (``stream``, ``SpeechStream``).

Streaming, per block of new tokens (the contract of the reference's ``flow_inference.py`` / ``web_demo.py``):
- the flow decodes the block after a prompt of every earlier token and the mel already produced for them, and
  returns only the new frames (``FlowDecoder.inference``);
- the mel of the block's last ``overlap_tokens`` tokens (34 frames for 5 tokens) is held back; the next block
  regenerates those frames (its prompt mel stops before them) and cross-fades them with the held-back ones under a
  Hamming window of twice that length (new rising, old falling, the reference's ``fade_in_out``);
- the vocoder turns the rest into audio with its last mel frame and that frame's 256 excitation samples kept as a
  cache: the frame's audio is withheld, and the next block's vocoder call starts with that frame and the cached
  excitation, so the chunks join without a glitch; the last block (``finalize``) keeps nothing back.
Block sizes follow a schedule (web_demo: 25 tokens first, for a short time to first audio, then 50, 100, 150, 200).
Every block's audio is exactly its new frames × hop samples, so the streamed audio has the offline length.
Two choices where the reference leaves the result to chance or misaligns it:
- the flow's starting noise of mel frame f is fixed per frame (``frame_noise``: blocks of 16 frames, each from a
  generator seeded by (seed, block)), not redrawn per call, so a frame starts from the same noise streamed or offline;
  the vocoder's random excitation phases come from a generator seeded with ``seed`` at every call;
- the prompt mel is exactly the frames produced so far (the reference's prompt also holds the vocoder's cache frame
  once more per block, one frame of misalignment per block).
With one block, streaming is the offline synthesis exactly; with several, the flow's non-causal estimator and length
regulator see a shorter utterance, and ``stream_difference`` measures what that changes.

``load_token2wav`` reads our "flow_decoder" export (its ``mel_vocoder`` subfolder, or another "mel_vocoder" export)
or the released glm-4-voice-decoder folder (config.yaml, flow.pt, hift.pt); ``import_glm4voice_decoder`` turns the
released folder into our export.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_keomni.checkpoints import CONFIG_FILE, read_export_meta, write_export

EXPORT_KIND = "flow_decoder"
VOCODER_DIR = "mel_vocoder"
"""Subfolder of a "flow_decoder" export holding the "mel_vocoder" export it speaks with."""
BLOCKS = (25, 50, 100, 150, 200)
"""Tokens per streamed block (web_demo.py): the first short, for an early first audio; the last repeats."""
OVERLAP_TOKENS = 5
"""Tokens whose mel is held back at the end of a block and cross-faded with its regeneration (the reference's 5)."""
NOISE_BLOCK = 16
"""Mel frames per independently seeded block of the flow's starting noise (``frame_noise``)."""


def frame_noise(start: int, stop: int, n_mels: int, seed: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """(1, n_mels, stop - start) standard normal noise of mel frames ``start`` to ``stop``: the same values for a
    frame whatever range it is drawn in (blocks of ``NOISE_BLOCK`` frames, each from its own seeded generator)."""
    if stop <= start:
        return torch.zeros(1, n_mels, 0, device=device)
    first, last = start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK
    blocks = [torch.randn(n_mels, NOISE_BLOCK, generator=torch.Generator().manual_seed(seed * 1_000_003 + k))
              for k in range(first, last + 1)]
    noise = torch.cat(blocks, dim=1)[:, start - first * NOISE_BLOCK: stop - first * NOISE_BLOCK]
    return noise[None].to(device)


def hamming(n: int) -> Tensor:
    """The symmetric Hamming window of ``n`` points (numpy's ``np.hamming``)."""
    return torch.from_numpy(np.hamming(n)).float()


def cross_fade(new: Tensor, old: Tensor) -> Tensor:
    """``new`` (..., F) with its first L = old's frames replaced by new · w[:L] + old · w[L:], w = hamming(2L)."""
    n = old.shape[-1]
    if n == 0:
        return new
    w = hamming(2 * n).to(new)
    out = new.clone()
    out[..., :n] = new[..., :n] * w[:n] + old * w[n:]
    return out


class Token2Wav:
    """Flow decoder + mel vocoder: speech tokens (at ``frame_rate``) -> waveform at ``sample_rate``.

    ``flow``: an ``nn.flow.FlowDecoder``; ``vocoder``: an ``nn.hift.HiFTGenerator`` (what ``load_mel_vocoder`` and
    ``load_released_hift`` give). ``n_timesteps``, ``cfg_rate`` (None = the flow config's) and ``solver`` set the flow's
    ODE; ``overlap_tokens`` the held-back tokens of a streamed block; ``seed`` the flow noise and vocoder phases.
    """

    def __init__(self, flow: Any, vocoder: Any, *, n_timesteps: int = 10, cfg_rate: float | None = None,
                 solver: str = "euler", overlap_tokens: int = OVERLAP_TOKENS, seed: int = 0,
                 meta: dict[str, Any] | None = None) -> None:
        fc, vc = flow.config, vocoder.config
        if fc.n_mels != vc.in_channels or fc.sample_rate != vc.sampling_rate or fc.hop_length != vc.hop:
            raise ValueError(f"Token2Wav: the flow writes {fc.n_mels}-bin mels at {fc.sample_rate} Hz / hop "
                             f"{fc.hop_length}, the vocoder reads {vc.in_channels} bins at {vc.sampling_rate} Hz / hop "
                             f"{vc.hop}")
        if overlap_tokens < 0 or n_timesteps < 1:
            raise ValueError(f"Token2Wav: overlap_tokens {overlap_tokens} must be >= 0, n_timesteps {n_timesteps} >= 1")
        self.flow, self.vocoder = flow.eval(), vocoder.eval()
        self.n_timesteps, self.cfg_rate, self.solver, self.seed = n_timesteps, cfg_rate, solver, seed
        self.overlap_tokens = overlap_tokens
        self.meta = dict(meta or {})
        self.sample_rate, self.hop, self.frame_rate = int(fc.sample_rate), int(fc.hop_length), float(fc.frame_rate)
        self.num_tokens = int(fc.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.flow.token_embed.weight.device

    def to(self, device: torch.device | str) -> Token2Wav:
        self.flow.to(device)
        self.vocoder.to(device)
        return self

    def frames(self, n_tokens: int) -> int:
        """Mel frames (= hops of audio) of ``n_tokens`` tokens (the flow's rule)."""
        return int(self.flow.mel_frames(torch.tensor([n_tokens]))[0])

    @property
    def overlap_frames(self) -> int:
        """Mel frames held back at the end of a streamed block: int(overlap_tokens / frame_rate · sample_rate / hop)."""
        return int(self.overlap_tokens / self.frame_rate * self.sample_rate / self.hop)

    def _tokens(self, tokens: Sequence[int] | Tensor) -> Tensor:
        t = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_tokens):
            raise ValueError(f"Token2Wav: speech token {int(t.min()) if int(t.min()) < 0 else int(t.max())} is outside "
                             f"the decoder's vocabulary of {self.num_tokens}")
        return t.to(self.device)

    @torch.no_grad()
    def mel(self, tokens: Sequence[int] | Tensor, prompt_tokens: Sequence[int] | Tensor | None = None,
            prompt_mel: Tensor | None = None) -> Tensor:
        """Mel (1, n_mels, F) of ``tokens`` after an optional prompt (earlier tokens and their mel (1, n_mels, F_p),
        given together); F = frames(prompt + tokens) - F_p, each frame from its own ``frame_noise``."""
        if (prompt_tokens is None) != (prompt_mel is None):
            raise ValueError("Token2Wav.mel: prompt_tokens and prompt_mel go together (the mel of those tokens); "
                             f"got only {'prompt_tokens' if prompt_mel is None else 'prompt_mel'}")
        tok = self._tokens(tokens)
        p = self._tokens(prompt_tokens) if prompt_tokens is not None else tok[:, :0]
        pm = prompt_mel.to(self.device) if prompt_mel is not None else None
        skip = 0 if pm is None else pm.shape[-1]
        total = self.frames(p.shape[1] + tok.shape[1])
        if skip > total:
            raise ValueError(f"Token2Wav.mel: the prompt mel has {skip} frames, more than the {total} of prompt and "
                             f"tokens together")
        noise = frame_noise(0, total, self.flow.config.n_mels, self.seed, self.device)
        return self.flow.inference(tok, prompt_tokens=p, prompt_mel=pm, n_timesteps=self.n_timesteps,
                                   cfg_rate=self.cfg_rate, solver=self.solver, noise=noise)

    @torch.no_grad()
    def vocode(self, mel: Tensor, cache_source: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(waveform (S,), excitation (1, 1, S)) of mel (1, n_mels, F), the excitation starting with ``cache_source``."""
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        wav, source = self.vocoder.inference(mel.to(self.device), cache_source=cache_source, generator=g)
        return wav[0], source

    def offline(self, tokens: Sequence[int] | Tensor) -> Tensor:
        """Waveform (frames(len(tokens)) · hop,) of all ``tokens`` at once, float32 on the CPU."""
        return self.vocode(self.mel(tokens))[0].float().cpu()

    def stream(self, blocks: Iterable[Sequence[int]]) -> Iterator[Tensor]:
        """Audio chunks of ``blocks`` of tokens (each block decoded once it is given; the last one finalises)."""
        s = SpeechStream(self, blocks=(1,))
        items = iter(blocks)
        block = next(items, None)
        while block is not None:
            nxt = next(items, None)
            yield s.decode(list(block), finalize=nxt is None)
            block = nxt

    def streamer(self, blocks: Sequence[int] = BLOCKS, clock: Any = None) -> SpeechStream:
        """A ``SpeechStream`` over this decoder (tokens pushed as the LM writes them)."""
        return SpeechStream(self, blocks, clock)


class SpeechStream:
    """Incremental decoding of speech tokens that arrive in pieces, the chat's counterpart of ``UnitStream``:
    ``push`` decodes a block as soon as the schedule ``blocks`` has that many new tokens (25, then 50, 100, ... the
    last size repeating), ``flush`` the rest (finalising); audio chunks collect in ``chunks``. With a ``clock`` the
    work counts as "flow" and "vocoder" and the first chunk marks the time to first audio."""

    def __init__(self, decoder: Token2Wav, blocks: Sequence[int] = BLOCKS, clock: Any = None) -> None:
        if not blocks or any(int(b) < 1 for b in blocks):
            raise ValueError(f"SpeechStream: block sizes {list(blocks)} must be positive")
        self.decoder, self.blocks, self.clock = decoder, [int(b) for b in blocks], clock
        self.units: list[int] = []
        self.chunks: list[Tensor] = []
        self.done = 0
        self.prompt_mel: Tensor | None = None
        self.overlap: Tensor | None = None
        self.cache_mel: Tensor | None = None
        self.cache_source: Tensor | None = None

    def _part(self, name: str) -> Any:
        return self.clock.part(name) if self.clock else contextlib.nullcontext()

    def _next_block(self) -> int:
        return self.blocks[min(len(self.chunks), len(self.blocks) - 1)]

    def push(self, units: Sequence[int]) -> list[Tensor]:
        """Add tokens; the audio chunks this made ready."""
        self.units.extend(int(u) for u in units)
        out = []
        while len(self.units) - self.done >= self._next_block():
            out.append(self.decode(self.units[self.done: self.done + self._next_block()], finalize=False,
                                   pushed=True))
        return out

    def flush(self) -> list[Tensor]:
        """Decode every token not yet decoded and finalise (the last audio, nothing held back)."""
        if self.done < len(self.units) or self.overlap is not None:
            return [self.decode(self.units[self.done:], finalize=True, pushed=True)]
        return []

    def audio(self) -> Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.zeros(0)

    @torch.no_grad()
    def decode(self, block: Sequence[int], *, finalize: bool, pushed: bool = False) -> Tensor:
        """Audio of the next ``block`` of tokens (see the module docstring); ``finalize`` for the last one."""
        d = self.decoder
        if not pushed:
            self.units.extend(int(u) for u in block)
        prompt = self.units[: self.done]
        with self._part("flow"):
            if prompt:
                mel = d.mel(block, prompt, self.prompt_mel)
            else:
                mel = d.mel(block)
            if self.overlap is not None:
                mel = cross_fade(mel, self.overlap[..., : mel.shape[-1]])
            keep = 0 if finalize else min(d.overlap_frames, mel.shape[-1])
            self.overlap = mel[..., mel.shape[-1] - keep:] if keep else None
            mel = mel[..., : mel.shape[-1] - keep]
            self.prompt_mel = mel if self.prompt_mel is None else torch.cat([self.prompt_mel, mel], dim=-1)
        with self._part("vocoder"):
            voc_in = mel if self.cache_mel is None else torch.cat([self.cache_mel, mel], dim=-1)
            wav, source = d.vocode(voc_in, self.cache_source) if voc_in.shape[-1] else (torch.zeros(0), None)
            if not finalize and voc_in.shape[-1]:
                self.cache_mel, self.cache_source = voc_in[..., -1:], source[..., -d.hop:]
                wav = wav[: wav.shape[-1] - d.hop]
            chunk = wav.float().cpu()
        self.done += len(block)
        if self.clock:
            self.clock.audio(chunk)
        self.chunks.append(chunk)
        return chunk


def stream_difference(decoder: Token2Wav, tokens: Sequence[int], blocks: Sequence[int]) -> dict[str, float]:
    """Streamed (``tokens`` cut into ``blocks`` sizes, the last repeating) vs offline audio of the same tokens:
    ``max_abs`` difference, ``snr_db`` (offline power / difference power; inf when equal) and ``samples``."""
    tokens = [int(t) for t in tokens]
    pieces, i, k = [], 0, 0
    while i < len(tokens):
        n = blocks[min(k, len(blocks) - 1)]
        pieces.append(tokens[i: i + n])
        i, k = i + n, k + 1
    streamed = torch.cat(list(decoder.stream(pieces)))
    whole = decoder.offline(tokens)
    if streamed.shape != whole.shape:
        raise AssertionError(f"stream_difference: streamed {tuple(streamed.shape)} vs offline {tuple(whole.shape)}")
    diff = (streamed - whole).double()
    noise = float(diff.pow(2).mean()) if diff.numel() else 0.0
    power = float(whole.double().pow(2).mean()) if whole.numel() else 0.0
    return {"max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
            "snr_db": math.inf if noise == 0 else 10 * math.log10(max(power, 1e-30) / noise),
            "samples": int(whole.numel())}


# ---------------------------------------------------------------------------------------------------- loading

RELEASED_FILES = ("config.yaml", "flow.pt", "hift.pt")


def is_released_decoder(path: str | Path) -> bool:
    """Whether ``path`` is a released glm-4-voice-decoder folder (config.yaml and flow.pt, no config.json)."""
    p = Path(path)
    return (p / "config.yaml").is_file() and (p / "flow.pt").is_file() and not (p / CONFIG_FILE).is_file()


def load_released_decoder(folder: str | Path) -> tuple[Any, Any]:
    """(``FlowDecoder``, ``HiFTGenerator`` with weight norm) of a released glm-4-voice-decoder folder, in eval mode."""
    from lit_keomni.layouts.glm4voice_decoder import read_decoder_config, load_released_flow
    from lit_keomni.nn.hift import from_released, load_released_hift

    folder = Path(folder)
    for name in RELEASED_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing (a released GLM-4-Voice decoder folder holds "
                                    f"{', '.join(RELEASED_FILES)})")
    hift_config = from_released(read_decoder_config(folder)["hift"], source=str(folder / "config.yaml"))
    flow = load_released_flow(folder)
    if flow.config.n_mels != hift_config.in_channels:
        raise ValueError(f"{folder / 'config.yaml'}: field 'flow.output_size' is {flow.config.n_mels}, but "
                         f"'hift.in_channels' is {hift_config.in_channels}: the vocoder cannot read the flow's mel")
    return flow, load_released_hift(folder / "hift.pt", hift_config)


def decoder_meta(path: str | Path) -> dict[str, Any]:
    """The handoff fields of a "flow_decoder" export's config.json, or of a released decoder folder's config.yaml
    (``codebook_size``, ``frame_rate_hz``; no ``units_fingerprint``), read without loading weights."""
    if is_released_decoder(path):
        from lit_keomni.layouts.glm4voice_decoder import flow_config_from_released, read_decoder_config

        cfg = Path(path) / "config.yaml"
        c = flow_config_from_released(read_decoder_config(cfg)["flow"], source=str(cfg))
        return {"codebook_size": c.vocab_size, "frame_rate_hz": float(c.frame_rate), "units_fingerprint": None,
                "source": str(path)}
    return read_export_meta(path, EXPORT_KIND)


def check_decoder_vocoder(decoder: str | Path, decoder_meta: dict[str, Any], vocoder: str | Path,
                          vocoder_meta: dict[str, Any]) -> None:
    """Raise, naming both config.json files and the field, unless the mel vocoder reads the mel the flow writes."""
    for field in ("sample_rate", "n_mels", "hop", "mel"):
        if decoder_meta.get(field) != vocoder_meta.get(field):
            raise ValueError(f"{Path(vocoder) / CONFIG_FILE}: field '{field}' is {vocoder_meta.get(field)!r}, but "
                             f"{Path(decoder) / CONFIG_FILE} field '{field}' is {decoder_meta.get(field)!r}: this mel "
                             f"vocoder does not read the mel this flow decoder writes")


def load_token2wav(path: str | Path, vocoder: str | Path | None = None, device: str | torch.device = "cpu",
                   **options: Any) -> Token2Wav:
    """``Token2Wav`` of a "flow_decoder" export (speaking with ``vocoder``, a "mel_vocoder" export, or else the
    export's own ``mel_vocoder`` subfolder) or of a released glm-4-voice-decoder folder (config.yaml, flow.pt,
    hift.pt); ``options`` go to ``Token2Wav`` (n_timesteps, cfg_rate, solver, overlap_tokens, seed)."""
    from lit_keomni.checkpoints import load_flow_decoder, load_mel_vocoder

    path = Path(path)
    if is_released_decoder(path):
        if vocoder is not None:
            raise ValueError(f"{path}: a released decoder folder speaks with its own hift.pt; import it "
                             f"(`python -m lit_keomni import glm4voice-decoder`) to pair it with another vocoder")
        flow, hift = load_released_decoder(path)
        return Token2Wav(flow, hift.remove_weight_norm(), meta=decoder_meta(path), **options).to(device)
    flow, meta = load_flow_decoder(path)
    voc_path = Path(vocoder) if vocoder is not None else path / VOCODER_DIR
    if vocoder is None and not (voc_path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{voc_path}: missing; the flow decoder export {path} holds no mel vocoder: give one "
                                f"(a 'mel_vocoder' export, e.g. checkpoints/stage7_hift/export)")
    check_decoder_vocoder(path, meta, voc_path, read_export_meta(voc_path, "mel_vocoder"))
    hift, _ = load_mel_vocoder(voc_path)
    return Token2Wav(flow, hift, meta=meta, **options).to(device)


def copy_vocoder(vocoder: str | Path) -> Any:
    """A ``write_export`` files entry that copies the "mel_vocoder" export ``vocoder`` into the export's subfolder."""
    def write(tmp: Path) -> None:
        shutil.copytree(vocoder, tmp / VOCODER_DIR)

    return write


def import_glm4voice_decoder(folder: str | Path, out: str | Path, speech_export: str | Path | None = None) -> Path:
    """The released glm-4-voice-decoder folder -> our "flow_decoder" export at ``out``, its HiFT as the "mel_vocoder"
    export in ``out/mel_vocoder``. ``speech_export``: the stage-1 export of the speech tokens it decodes (the
    imported glm-4-voice-tokenizer), recorded so that chat can check the LM writes those tokens; its codebook must
    have the decoder's vocabulary size."""
    from lit_keomni.configs import config_dict
    from lit_keomni.nn.hift import MelFrontEnd

    flow, hift = load_released_decoder(folder)
    c, hc = flow.config, hift.config
    units: dict[str, Any] = {"units_fingerprint": None, "units_from": None, "units_kind": None}
    if speech_export is not None:
        from lit_keomni.checkpoints import unit_meta

        u = unit_meta(speech_export)
        if u["num_units"] != c.vocab_size:
            raise ValueError(f"{Path(speech_export) / CONFIG_FILE}: field 'codebook_size' is {u['num_units']}, but "
                             f"{Path(folder) / 'config.yaml'} field 'flow.vocab_size' is {c.vocab_size}")
        units = {"units_fingerprint": u["fingerprint"], "units_from": str(Path(speech_export).resolve()),
                 "units_kind": u["kind"]}
    mel = MelFrontEnd.of(hc).settings()
    out = Path(out)
    tmp_vocoder = out.parent / f".{out.name}.mel_vocoder"
    write_export(tmp_vocoder, kind="mel_vocoder", config=config_dict(hc), state_dict=hift.state_dict(),
                 extra={"sample_rate": hc.sampling_rate, "n_mels": hc.in_channels, "hop": hc.hop, "mel": mel,
                        "source": str(Path(folder).resolve())})
    try:
        write_export(out, kind=EXPORT_KIND, config=config_dict(c), state_dict=flow.state_dict(),
                     extra=flow_export_meta(c, mel, units, source=str(Path(folder).resolve())),
                     files={"mel_vocoder": copy_vocoder(tmp_vocoder)})
    finally:
        shutil.rmtree(tmp_vocoder, ignore_errors=True)
    return out


def flow_export_meta(config: Any, mel: dict[str, Any], units: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The fields of a "flow_decoder" export's config.json besides its config: what its users check."""
    return {"codebook_size": int(config.vocab_size), "frame_rate_hz": float(config.frame_rate),
            "sample_rate": int(config.sample_rate), "hop": int(config.hop_length), "n_mels": int(config.n_mels),
            "block_size": int(config.block_size), "mel": dict(mel), **units, **extra}


__all__ = ["BLOCKS", "EXPORT_KIND", "OVERLAP_TOKENS", "SpeechStream", "Token2Wav", "cross_fade", "frame_noise",
           "import_glm4voice_decoder", "load_token2wav", "stream_difference"]
