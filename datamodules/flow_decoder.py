"""Stage-7 flow data: (speech tokens, 22,050 Hz log-mel) pairs of the same utterances for GLM-4-Voice's flow decoder.

``prepare_data`` chains what is missing: the prepared utterances (``data_dir``), their speech tokens (``tokens_dir``,
written by ``tokenize`` for a stage-1 export, also the imported glm-4-voice-tokenizer), then the pairs in
``out_dir/chunks/{train,val}``: each utterance's ``codes`` joined by ``id`` with its prepared audio, resampled to
``audio_rate``, turned into the mel the vocoder reads (``nn.hift.MelFrontEnd``: n_fft 1024, hop 256, 80 bins,
0-8 kHz) and cut or padded (with the log floor, silence) to the flow's frame count of its tokens,
``int(T / frame_rate · audio_rate / hop)``. The mel is stored (frames, bins) as float16; validation items keep their
audio too (int16), for the resynthesis CER and TensorBoard. ``speaker`` keeps one speaker's utterances only (the
paper trains on many speakers without speaker embeddings: None, every utterance).
Training examples are random crops of ``crop_tokens`` tokens with their frames (token offset drawn from the seed, the
epoch and the utterance id, so a resumed run draws the same crops; shorter utterances are taken whole); validation
examples are whole utterances cut to their first ``val_max_tokens`` tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset

from datamodules.streaming import SPLITS, StreamingDataModule, chunks_dir, pad_collate, write_items
from datamodules.vocoder import crop_start, ensure_units, stamp_is
from lit_keomni.atomic import write_json
from lit_keomni.audio import resample
from lit_keomni.checkpoints import unit_meta
from lit_keomni.speech_tokens import STAMP as TOKENS_STAMP

STAMP = "flow_decoder.json"
LOG_FLOOR = math.log(1e-5)
"""The mel's value for silence (``MelFrontEnd``'s ln(max(·, 1e-5))): what a short recording is padded with."""


def token_frames(n_tokens: int, frame_rate: float, sample_rate: int, hop: int) -> int:
    """Mel frames of ``n_tokens`` speech tokens, the rule ``FlowDecoder.mel_frames`` applies (float32 arithmetic)."""
    return int(torch.tensor([n_tokens], dtype=torch.int32).div(frame_rate).mul(sample_rate).div(hop).int()[0])


def _pairs(tokens_dir: str, data_dir: str, split: str, speaker: str | None, frame_rate: float, audio_rate: int,
           mel: Any, keep_audio: bool):
    """Items {id, text, language, speaker, codes int32 (T,), mel float16 (F, n_mels)[, audio int16 (F·hop,)]}."""
    tokens = StreamingDataset(str(chunks_dir(tokens_dir, split)))
    by_id: dict[str, dict[str, Any]] = {}
    for i in range(len(tokens)):
        item = tokens[i]
        if len(item["codes"]) > 0 and (speaker is None or item.get("speaker") == speaker):
            by_id[item["id"]] = item
    audio = StreamingDataset(str(chunks_dir(data_dir, split)))
    hop = mel.hop_length
    for i in range(len(audio)):
        item = audio[i]
        tok = by_id.get(item["id"])
        if tok is None:
            continue
        wav = resample(item["audio"].astype(np.float32) / 32768.0, int(item["sample_rate"]), audio_rate)
        n = token_frames(len(tok["codes"]), frame_rate, audio_rate, hop)
        with torch.no_grad():
            m = mel(torch.from_numpy(wav)[None])[0].T  # (frames, n_mels)
        m = torch.nn.functional.pad(m[:n], (0, 0, 0, max(0, n - m.shape[0])), value=LOG_FLOOR)
        out = {"id": item["id"], "text": tok.get("text", ""), "language": tok.get("language", "en"),
               "speaker": tok.get("speaker", ""), "codes": np.asarray(tok["codes"], dtype=np.int32),
               "mel": m.numpy().astype(np.float16)}
        if keep_audio:
            wav = np.pad(wav[: n * hop], (0, max(0, n * hop - len(wav))))
            out["audio"] = np.clip(np.round(wav * 32767.0), -32768, 32767).astype(np.int16)
        yield out


def _example(item: dict[str, Any], start: int, n_tokens: int, frames: Any) -> dict[str, Any]:
    """Tokens ``start`` to ``start + n_tokens`` and their mel frames (by the flow's rule ``frames``)."""
    f0, f = frames(start), frames(n_tokens)
    mel = torch.from_numpy(item["mel"][f0: f0 + f].astype(np.float32))
    if mel.shape[0] < f:  # rounding at the utterance's end: repeat the last frame
        mel = torch.cat([mel, mel[-1:].expand(f - mel.shape[0], -1)])
    return {"id": item["id"], "codes": torch.as_tensor(item["codes"][start: start + n_tokens], dtype=torch.long),
            "mel": mel}


class Frames:
    """Picklable ``token_frames`` of one decoder's rates."""

    def __init__(self, frame_rate: float, sample_rate: int, hop: int) -> None:
        self.frame_rate, self.sample_rate, self.hop = frame_rate, sample_rate, hop

    def __call__(self, n_tokens: int) -> int:
        return token_frames(n_tokens, self.frame_rate, self.sample_rate, self.hop)


class WholeUtterance:
    """Picklable transform: an utterance's first ``max_tokens`` tokens, their mel, audio, text and language."""

    def __init__(self, max_tokens: int, frames: Frames) -> None:
        self.max_tokens, self.frames = max_tokens, frames

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        n = min(self.max_tokens, len(item["codes"]))
        out = _example(item, 0, n, self.frames)
        samples = self.frames(n) * self.frames.hop
        audio = item["audio"][:samples].astype(np.float32) / 32768.0
        out["audio"] = torch.from_numpy(np.pad(audio, (0, samples - len(audio))))
        return {**out, "text": item["text"], "language": item["language"]}


class TokenCrops(StreamingDataset):
    """Training pairs as random ``crop_tokens`` crops; the token offset is a function of (seed, epoch, id)."""

    def __init__(self, path: str, *, crop_tokens: int, frames: Frames, seed: int, **kwargs: Any) -> None:
        super().__init__(path, seed=seed, **kwargs)
        self.crop_tokens, self.frames, self.crop_seed = crop_tokens, frames, seed

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        if not isinstance(item, dict):
            return item
        n = min(self.crop_tokens, len(item["codes"]))
        spare = len(item["codes"]) - n
        return _example(item, crop_start(self.crop_seed, self.current_epoch, item["id"], spare), n, self.frames)


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """``pad_collate`` with codes padded by -1 (the flow reads ``codes_lengths``, ``mel_lengths``)."""
    return pad_collate(examples, {"codes": -1})


class FlowDecoderDataModule(StreamingDataModule):
    """(speech tokens, log-mel) pairs: random token crops for training, whole utterances (with audio) for validation."""

    collate = staticmethod(collate)

    def __init__(self, units_from: str = "checkpoints/stage1/export", tokens_dir: str = "data/tokens",
                 out_dir: str = "data/flow_decoder", speaker: str | None = None, crop_tokens: int = 50,
                 val_max_tokens: int = 100, audio_rate: int = 22050, hop: int = 256, n_mels: int = 80,
                 f_max: float = 8000.0, tokenize_workers: int = 1, **kwargs: Any) -> None:
        """
        Args:
            units_from: Stage-1 export (our tokenizer or the imported glm-4-voice-tokenizer) whose speech tokens the
                decoder reads; gives their rate.
            tokens_dir: Speech tokens of ``data_dir`` (data/tokens layout); made by ``tokenize`` if missing.
            out_dir: This module's pairs go to ``out_dir/chunks/{train,val}``.
            speaker: Only this speaker's utterances (field 'speaker' of the prepared items); None = every utterance.
            crop_tokens: Tokens per training crop (4 s at 12.5 Hz; CosyVoice trains on whole utterances).
            val_max_tokens: Validation utterances are cut to their first this many tokens.
            audio_rate: Sample rate of the mel's audio (the released decoder: 22,050 Hz).
            hop: Audio samples per mel frame (released: 256).
            n_mels: Mel bins (released: 80).
            f_max: Highest mel filter frequency (released: 8 kHz).
            tokenize_workers: Processes for a ``tokenize`` run.
            **kwargs: ``StreamingDataModule`` options (data_dir, batch_size, num_workers, seed, ...).
        """
        super().__init__(**kwargs)
        if self.mixture_sources:
            raise ValueError("data.sources: the flow decoder's pairs are built from one prepared corpus (data.data_dir); "
                             "prepare your corpora into one folder")
        for name, value in (("crop_tokens", crop_tokens), ("val_max_tokens", val_max_tokens),
                            ("audio_rate", audio_rate), ("hop", hop), ("n_mels", n_mels)):
            if value < 1:
                raise ValueError(f"data.{name}: must be a positive integer, got {value}")
        self.units_from, self.tokens_dir, self.out_dir, self.speaker = units_from, tokens_dir, out_dir, speaker
        self.crop_tokens, self.val_max_tokens, self.tokenize_workers = crop_tokens, val_max_tokens, tokenize_workers
        self.audio_rate, self.hop, self.n_mels, self.f_max = audio_rate, hop, n_mels, f_max
        self._meta: dict[str, Any] | None = None

    @property
    def units(self) -> dict[str, Any]:
        """``checkpoints.unit_meta`` of ``units_from``."""
        if self._meta is None:
            self._meta = unit_meta(self.units_from)
        return self._meta

    def mel(self) -> Any:
        from lit_keomni.nn.hift import MelFrontEnd

        return MelFrontEnd(self.audio_rate, 1024, self.hop, self.n_mels, self.f_max)

    @property
    def frames(self) -> Frames:
        return Frames(self.units["frame_rate"], self.audio_rate, self.hop)

    def chunks_root(self) -> str:
        return self.out_dir

    def _stamp(self) -> dict[str, Any]:
        tokens = json.loads((Path(self.tokens_dir) / TOKENS_STAMP).read_text())
        return {"tokens_fingerprint": tokens.get("fingerprint"), "units_fingerprint": self.units["fingerprint"],
                "speaker": self.speaker, "mel": self.mel().settings(), "tokens_dir": str(self.tokens_dir),
                "data_dir": str(self.data_dir)}

    def build_missing(self) -> None:
        super().build_missing()
        ensure_units(self)
        m, root, stamp = self.units, Path(self.chunks_root()), self._stamp()
        if stamp_is(root / STAMP, stamp):
            return
        (root / STAMP).unlink(missing_ok=True)
        mel = self.mel()
        items = {s: list(_pairs(self.tokens_dir, self.data_dir, s, self.speaker, m["frame_rate"], self.audio_rate,
                                mel, keep_audio=s == "val")) for s in SPLITS}
        if not items["train"]:
            raise ValueError(f"{chunks_dir(self.tokens_dir, 'train')}: no utterances with speech tokens"
                             + (f" and field 'speaker' == {self.speaker!r} (data.speaker)" if self.speaker else ""))
        if not items["val"]:  # a tiny corpus without this speaker in its held-out dialogues: two train items
            items["val"] = list(_pairs(self.tokens_dir, self.data_dir, "train", self.speaker, m["frame_rate"],
                                       self.audio_rate, mel, keep_audio=True))[-2:]
        counts = {s: write_items(items[s], chunks_dir(root, s), chunk_bytes="16MB") for s in SPLITS}
        write_json(root / STAMP, {**stamp, "utterances": counts})

    def dataset(self, split: str, root: str | None = None) -> StreamingDataset:
        path = chunks_dir(root or self.chunks_root(), split)
        if not (path / "index.json").is_file():
            raise FileNotFoundError(f"{path}: no litdata chunks (index.json); run prepare_data() (or `fit`) to build them")
        if split == "train":
            return TokenCrops(str(path), crop_tokens=self.crop_tokens, frames=self.frames, seed=self.seed, shuffle=True)
        return StreamingDataset(str(path), shuffle=False, transform=WholeUtterance(self.val_max_tokens, self.frames))
