"""Stage-7 HiFT data: utterance waveforms of the prepared corpus for the mel vocoder (GLM-4-Voice's decoder, CosyVoice).

Reads the prepared utterance chunks (``data_dir/chunks/{train,val}``, built by ``prepare`` if missing; the built-in
corpus is prepared at 22,050 Hz, the vocoder's rate) and serves their audio only; the mel and the F0 target are
computed by the LightningModule (``nn.hift.MelFrontEnd``, ``nn.hift.f0_track``), on its device. Training examples are
random crops of ``segment_frames`` mel frames (``segment_frames · hop`` samples, CosyVoice: 96 frames = 24,576
samples) starting on a frame boundary, the offset drawn from the seed, the epoch and the utterance id, so a resumed
run draws the same crops; shorter utterances are zero-padded. Validation examples are whole utterances cut to
their first ``val_max_frames`` frames and to a whole number of frames.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset

from datamodules.streaming import StreamingDataModule, chunks_dir
from lit_keomni.nn.audio import resample


def _audio(item: dict[str, Any], sample_rate: int) -> np.ndarray:
    wav = item["audio"].astype(np.float32) / 32768.0
    return resample(wav, int(item["sample_rate"]), sample_rate) if int(item["sample_rate"]) != sample_rate else wav


class WholeUtterance:
    """Picklable transform: {id, audio (S,)} of an utterance, cut to ``max_frames · hop`` and to whole frames."""

    def __init__(self, max_frames: int, hop: int, sample_rate: int) -> None:
        self.max_frames, self.hop, self.sample_rate = max_frames, hop, sample_rate

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        wav = _audio(item, self.sample_rate)
        n = max(1, min(self.max_frames, len(wav) // self.hop)) * self.hop
        return {"id": item["id"], "audio": torch.from_numpy(np.pad(wav[:n], (0, max(0, n - len(wav)))))}


class AudioSegments(StreamingDataset):
    """Utterances as random ``segment_frames``-frame crops; the offset is a function of (seed, epoch, id)."""

    def __init__(self, path: str, *, segment_frames: int, hop: int, sample_rate: int, seed: int, **kwargs: Any) -> None:
        super().__init__(path, seed=seed, **kwargs)
        self.segment_frames, self.hop, self.rate, self.crop_seed = segment_frames, hop, sample_rate, seed

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        if not isinstance(item, dict):
            return item
        wav = _audio(item, self.rate)
        n = self.segment_frames * self.hop
        spare = len(wav) // self.hop - self.segment_frames
        rng = np.random.default_rng([self.crop_seed, int(self.current_epoch), zlib.crc32(item["id"].encode())])
        start = int(rng.integers(0, spare + 1)) * self.hop if spare > 0 else 0
        seg = wav[start : start + n]
        return {"id": item["id"], "audio": torch.from_numpy(np.pad(seg, (0, n - len(seg))))}


class MelVocoderDataModule(StreamingDataModule):
    """Waveforms for the HiFT mel vocoder: random segments for training, whole utterances for validation."""

    def __init__(self, audio_rate: int = 22050, hop: int = 256, segment_frames: int = 32, val_max_frames: int = 400,
                 **kwargs: Any) -> None:
        """
        Args:
            audio_rate: Sample rate the vocoder writes (the released HiFT: 22,050 Hz); other prepared rates are
                resampled as they are read.
            hop: Samples per mel frame (the vocoder's hop; the released HiFT: 256).
            segment_frames: Mel frames per training crop (CosyVoice: 96; audio ``segment_frames · hop`` samples).
            val_max_frames: Validation utterances are cut to their first this many frames.
            **kwargs: ``StreamingDataModule`` options (data_dir, batch_size, num_workers, seed, ...).
        """
        super().__init__(**kwargs)
        for name, value in (("audio_rate", audio_rate), ("hop", hop), ("segment_frames", segment_frames),
                            ("val_max_frames", val_max_frames)):
            if value < 1:
                raise ValueError(f"data.{name}: must be a positive integer, got {value}")
        self.audio_rate, self.hop, self.segment_frames, self.val_max_frames = audio_rate, hop, segment_frames, val_max_frames

    def dataset(self, split: str, root: str | None = None) -> StreamingDataset:
        path = chunks_dir(root or self.chunks_root(), split)
        if not (path / "index.json").is_file():
            raise FileNotFoundError(f"{path}: no litdata chunks (index.json); run prepare_data() (or `fit`) to build them")
        if split == "train":
            return AudioSegments(str(path), segment_frames=self.segment_frames, hop=self.hop, sample_rate=self.audio_rate,
                                 seed=self.seed, shuffle=True)
        return StreamingDataset(str(path), shuffle=False,
                                transform=WholeUtterance(self.val_max_frames, self.hop, self.audio_rate))
