"""``python -m lit_keomni tokenize``: run a stage-1 export over prepared utterances and write speech tokens as chunks.

Input: a prepared data folder (``chunks/train``, ``chunks/val`` of utterances). Output: ``OUT/chunks/{train,val}`` with
every utterance's metadata plus ``codes`` (int32, one token per 1/frame_rate s) and ``OUT/tokens.json`` naming the
export, its frame rate and codebook size, which later stages check. Work is split into batches of utterances spread
over worker processes (or run in this process with one worker); each split is written under a temporary name, so a
killed run redoes only unfinished splits. ``encode_splits`` is the writer: ``units apply`` uses it for HuBERT units.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from litdata import StreamingDataset

from datamodules.streaming import SPLITS, chunks_dir, write_chunks, write_items
from datamodules.tokenizer import asr_example
from lit_keomni.atomic import write_json
from lit_keomni.checkpoints import export_fingerprint, load_speech_tokenizer
from lit_keomni.nn.audio import LogMel

STAMP = "tokens.json"


PAD_MULTIPLE = 8000
"""A batch's padded length in samples is rounded up to a multiple of this (0.5 s at 16 kHz): CPU convolutions cache
one oneDNN primitive per input shape (up to 1,024), so unrounded lengths would grow memory with the corpus size."""


class SpeechTokenEncoder:
    """Audio (16 kHz) -> speech tokens with a stage-1 export; batches padded clips, runs encoder layers up to the VQ."""

    def __init__(self, export: str | Path, device: str = "cpu") -> None:
        self.model, self.text_tokenizer, self.meta = load_speech_tokenizer(export)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.logmel = LogMel(n_mels=self.model.config.n_mels).to(self.device)

    @torch.no_grad()
    def __call__(self, wavs: list[torch.Tensor]) -> list[np.ndarray]:
        """Codes of each utterance. One longer than the encoder's window (30 s) is cut into windows encoded on their
        own and concatenated, as GLM-4-Voice's ``extract_speech_token`` does."""
        window = self.model.config.max_source_positions * 2 * self.logmel.hop_length
        pieces, owner, pad_to = [], [], []
        for i, w in enumerate(wavs):
            starts = range(0, max(len(w), 1), window)
            for start in starts:
                pieces.append(w[start : start + window])
                owner.append(i)
                pad_to.append(window if len(starts) > 1 else 0)  # the pieces of one recording: padded to the longest
        codes = self._encode(pieces, pad_to)
        out: list[list[np.ndarray]] = [[] for _ in wavs]
        for i, c in zip(owner, codes):
            out[i].append(c)
        return [np.concatenate(c) for c in out]

    def _encode(self, wavs: list[torch.Tensor], pad_to: list[int]) -> list[np.ndarray]:
        multiple = self.model.config.feature_pad_multiple
        if multiple:
            mel, mel_lengths = self.logmel.padded(wavs, multiple, pad_to)
            frames = -(-mel.shape[-1] // (PAD_MULTIPLE // self.logmel.hop_length)) * (PAD_MULTIPLE // self.logmel.hop_length)
            mel = F.pad(mel, (0, frames - mel.shape[-1]), value=float(mel.min()))
        else:
            lengths = torch.tensor([len(w) for w in wavs])
            audio = torch.zeros(len(wavs), -(-int(lengths.max()) // PAD_MULTIPLE) * PAD_MULTIPLE)
            for i, w in enumerate(wavs):
                audio[i, : len(w)] = w
            mel, mel_lengths = self.logmel(audio.to(self.device), lengths.to(self.device))
        codes, code_lengths = self.model.encode_tokens(mel, mel_lengths)
        return [c[:n].to(torch.int32).cpu().numpy() for c, n in zip(codes, code_lengths.tolist())]


class EncodeJob:
    """Picklable ``optimize`` fn: one job = a range of input indices of ``input_dir``, encoded in one batch by the encoder
    ``make_encoder()`` builds once per worker (list of 16 kHz float tensors -> list of int32 code arrays)."""

    def __init__(self, make_encoder: Callable[[], Callable[[list[torch.Tensor]], list[np.ndarray]]], input_dir: str) -> None:
        self.make_encoder, self.input_dir = make_encoder, input_dir
        self._encoder: Callable[[list[torch.Tensor]], list[np.ndarray]] | None = None
        self._dataset: StreamingDataset | None = None

    def __call__(self, job: tuple[int, int]) -> Iterator[dict[str, Any]]:
        if self._encoder is None:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
            self._encoder = self.make_encoder()
            self._dataset = StreamingDataset(self.input_dir)
        items = [self._dataset[i] for i in range(*job)]
        codes = self._encoder([asr_example(it)["audio"] for it in items])
        for it, c in zip(items, codes):
            out = {k: v for k, v in it.items() if k != "audio"}
            out["codes"] = c
            yield out


def tokens_are_current(out: str | Path, export: str | Path) -> bool:
    """True when ``out`` holds finished tokens of exactly this export (same weights)."""
    stamp = Path(out) / STAMP
    if not stamp.is_file() or not (Path(export) / "model.safetensors").is_file():
        return False
    done = json.loads(stamp.read_text())
    return done.get("fingerprint") == export_fingerprint(export) and set(done.get("splits", {})) == set(SPLITS)


def tokenize(export: str | Path, data: str | Path, out: str | Path, *, batch_size: int = 32, workers: int = 1,
             device: str = "cpu") -> dict[str, Any]:
    """Encode every prepared split of ``data`` with ``export``; returns the ``tokens.json`` stamp."""
    _, _, meta = load_speech_tokenizer(export)  # fail early, in this process, on a bad export
    stamp = {"export": str(Path(export).resolve()), "fingerprint": export_fingerprint(export),
             "frame_rate_hz": meta["frame_rate_hz"], "codebook_size": meta["codebook_size"], "data": str(data)}
    return encode_splits(partial(SpeechTokenEncoder, str(Path(export).resolve()), device), data, out, stamp,
                         batch_size=batch_size, workers=workers)


def encode_splits(make_encoder: Callable[[], Callable[[list[torch.Tensor]], list[np.ndarray]]], data: str | Path,
                  out: str | Path, stamp: dict[str, Any], *, batch_size: int = 32, workers: int = 1) -> dict[str, Any]:
    """Write ``out/chunks/{train,val}`` (every prepared item of ``data`` without its audio, plus ``codes`` from
    ``make_encoder()``) and ``out/tokens.json`` (``stamp`` plus the finished splits; its ``fingerprint`` names the unit
    source). Splits finished by an earlier run of the same source are kept; another source redoes everything."""
    out = Path(out)
    stamp_path = out / STAMP
    old = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    done = old.get("splits", {}) if old.get("fingerprint") == stamp["fingerprint"] else {}
    stamp = {**stamp, "splits": dict(done)}
    for split in SPLITS:
        src = chunks_dir(data, split)
        if not (src / "index.json").is_file():
            raise FileNotFoundError(f"{src}: no prepared chunks (run `python -m lit_keomni prepare --out {data}`)")
        if split in stamp["splits"] and (chunks_dir(out, split) / "index.json").is_file():
            continue  # finished by an earlier run
        n = len(StreamingDataset(str(src)))
        jobs = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        job = EncodeJob(make_encoder, str(src.resolve()))
        if workers <= 1:  # in this process: no worker process to start
            threads = torch.get_num_threads()
            try:
                write_items((item for j in jobs for item in job(j)), chunks_dir(out, split))
            finally:
                torch.set_num_threads(threads)
        else:
            write_chunks(job, jobs, chunks_dir(out, split), workers=workers)
        stamp["splits"][split] = n
        out.mkdir(parents=True, exist_ok=True)
        write_json(stamp_path, stamp)
    return stamp
