"""Stage-7 data: one agent speaker's (units, waveform) pairs for the unit HiFi-GAN vocoder (KE-Omni §4.3, §5.1).

``prepare_data`` chains what is missing: the prepared utterances (``data_dir``), their units (``tokens_dir``, written by
``tokenize`` for a stage-1 unit source), then this speaker's pairs in ``out_dir/<speaker>/chunks/{train,val}``: the
units of every ``role == "agent"`` utterance of ``speaker`` joined by ``id`` with its prepared audio, resampled to the
unit source's sample rate and cut or zero-padded to exactly ``len(units) · hop`` samples. Training examples are random
crops of ``segment_units`` units (offsets drawn from the seed, the epoch and the utterance id, so a resumed run draws
the same crops); validation examples are whole utterances of at most ``val_max_units`` units.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset

from datamodules.streaming import SPLITS, StreamingDataModule, chunks_dir, write_items
from lit_keomni.atomic import write_json
from lit_keomni.audio import resample
from lit_keomni.checkpoints import unit_meta
from lit_keomni.speech_tokens import STAMP as TOKENS_STAMP
from lit_keomni.speech_tokens import tokenize, tokens_are_current

STAMP = "vocoder.json"
AGENT_ROLE = "agent"


def agent_speakers(tokens_dir: str | Path, split: str = "train") -> dict[str, int]:
    """Agent speakers of a tokens folder and their utterance counts."""
    ds = StreamingDataset(str(chunks_dir(tokens_dir, split)))
    counts: dict[str, int] = {}
    for i in range(len(ds)):
        item = ds[i]
        if item["role"] == AGENT_ROLE:
            counts[item["speaker"]] = counts.get(item["speaker"], 0) + 1
    return counts


def _pairs(tokens_dir: str, data_dir: str, split: str, speaker: str, sample_rate: int, hop: int):
    """Items {id, text, language, units int32 (F,), audio int16 (F·hop,)} of ``speaker``'s agent utterances."""
    tokens = StreamingDataset(str(chunks_dir(tokens_dir, split)))
    units: dict[str, dict[str, Any]] = {}
    for i in range(len(tokens)):
        item = tokens[i]
        if item["role"] == AGENT_ROLE and item["speaker"] == speaker and len(item["codes"]) > 0:
            units[item["id"]] = item
    audio = StreamingDataset(str(chunks_dir(data_dir, split)))
    for i in range(len(audio)):
        item = audio[i]
        tok = units.get(item["id"])
        if tok is None:
            continue
        wav = resample(item["audio"].astype(np.float32) / 32768.0, int(item["sample_rate"]), sample_rate)
        n = len(tok["codes"]) * hop
        wav = np.pad(wav[:n], (0, max(0, n - len(wav))))
        yield {"id": item["id"], "text": tok["text"], "language": tok["language"],
               "units": np.asarray(tok["codes"], dtype=np.int32),
               "audio": np.clip(np.round(wav * 32767.0), -32768, 32767).astype(np.int16)}


def _example(item: dict[str, Any], start: int, n_units: int, hop: int) -> dict[str, Any]:
    units = torch.as_tensor(item["units"][start : start + n_units], dtype=torch.long)
    audio = torch.as_tensor(item["audio"][start * hop : (start + n_units) * hop].astype(np.float32) / 32768.0)
    if len(units) < n_units:  # shorter than a segment: repeat the last unit, pad the audio with silence
        units = torch.cat([units, units[-1:].expand(n_units - len(units))])
        audio = torch.nn.functional.pad(audio, (0, n_units * hop - len(audio)))
    return {"id": item["id"], "units": units, "audio": audio}


def ensure_units(dm: Any) -> None:
    """Make the units a vocoder DataModule pairs with audio (``dm.units`` of ``dm.units_from`` in ``dm.tokens_dir``):
    tokenized with a stage-1 export when missing or from another export; a HuBERT k-means's units must have been
    written (``units apply``)."""
    if dm.units["kind"] == "speech_tokenizer":
        if not tokens_are_current(dm.tokens_dir, dm.units_from):
            tokenize(dm.units_from, dm.data_dir, dm.tokens_dir, workers=dm.tokenize_workers)
    elif not (Path(dm.tokens_dir) / TOKENS_STAMP).is_file():
        raise FileNotFoundError(f"{Path(dm.tokens_dir) / TOKENS_STAMP}: missing; write the units of {dm.data_dir} "
                                f"with `python -m lit_keomni units apply` for {dm.units_from}")


def stamp_is(path: Path, stamp: dict[str, Any]) -> bool:
    """Whether the JSON stamp at ``path`` exists and equals ``stamp`` (built pairs that are still current)."""
    return path.is_file() and json.loads(path.read_text()) == stamp

class ValExample:
    """Picklable transform: a whole utterance, cut to its first ``max_units`` units."""

    def __init__(self, max_units: int, hop: int) -> None:
        self.max_units, self.hop = max_units, hop

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        return _example(item, 0, min(self.max_units, len(item["units"])), self.hop)


def crop_start(seed: int, epoch: int, item_id: str, spare: int) -> int:
    """Offset of a random training crop with ``spare`` positions to choose from: a function of (seed, epoch, item id),
    so a resumed run crops as the uninterrupted one."""
    if spare <= 0:
        return 0
    return int(np.random.default_rng([seed, int(epoch), zlib.crc32(item_id.encode())]).integers(0, spare + 1))


class SegmentDataset(StreamingDataset):
    """Training pairs as random ``segment_units`` crops; the offset is a function of (seed, epoch, id)."""

    def __init__(self, path: str, *, segment_units: int, hop: int, seed: int, **kwargs: Any) -> None:
        super().__init__(path, seed=seed, **kwargs)
        self.segment_units, self.hop, self.crop_seed = segment_units, hop, seed

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        if not isinstance(item, dict):
            return item
        spare = len(item["units"]) - self.segment_units
        start = crop_start(self.crop_seed, self.current_epoch, item["id"], spare)
        return _example(item, start, self.segment_units, self.hop)


class VocoderDataModule(StreamingDataModule):
    """(units, waveform) pairs of one agent speaker; random segments for training, whole utterances for validation."""

    def __init__(self, units_from: str = "checkpoints/stage1/export", tokens_dir: str = "data/tokens",
                 speaker: str = "agentFemale", out_dir: str = "data/vocoder", segment_units: int = 6,
                 val_max_units: int = 80, tokenize_workers: int = 1, **kwargs: Any) -> None:
        """
        Args:
            units_from: Unit source: the stage-1 export (its VQ codes) or a ``units`` export; gives the unit rate and
                the sample rate the vocoder writes.
            tokens_dir: Unit sequences of ``data_dir`` (data/tokens layout); made by ``tokenize`` if missing and the
                unit source is a stage-1 export.
            speaker: The agent speaker whose voice is learnt (built-in corpus: "agentFemale" or "agentMale").
            out_dir: This module's pairs go to ``out_dir/<speaker>/chunks/{train,val}``.
            segment_units: Units per training crop (audio: ``segment_units · hop`` samples).
            val_max_units: Validation utterances are cut to their first this many units.
            tokenize_workers: Processes for a ``tokenize`` run.
            **kwargs: ``StreamingDataModule`` options (data_dir, batch_size, num_workers, ...).
        """
        super().__init__(**kwargs)
        self.units_from, self.tokens_dir, self.speaker, self.out_dir = units_from, tokens_dir, speaker, out_dir
        self.segment_units, self.val_max_units, self.tokenize_workers = segment_units, val_max_units, tokenize_workers
        self._meta: dict[str, Any] | None = None

    @property
    def units(self) -> dict[str, Any]:
        """``checkpoints.unit_meta`` of the unit source, plus ``hop`` (samples per unit)."""
        if self._meta is None:
            meta = unit_meta(self.units_from)
            hop = meta["sample_rate"] / meta["frame_rate"]
            if hop != int(hop):
                raise ValueError(f"{Path(self.units_from) / 'config.json'}: frame_rate {meta['frame_rate']} does not "
                                 f"divide sample_rate {meta['sample_rate']} into whole samples per unit")
            self._meta = {**meta, "hop": int(hop)}
        return self._meta

    def chunks_root(self) -> str:
        return str(Path(self.out_dir) / self.speaker)

    def _stamp(self) -> dict[str, Any]:
        tokens = json.loads((Path(self.tokens_dir) / TOKENS_STAMP).read_text())
        m = self.units
        return {"speaker": self.speaker, "tokens_fingerprint": tokens.get("fingerprint"), "units_fingerprint": m["fingerprint"],
                "sample_rate": m["sample_rate"], "hop": m["hop"], "tokens_dir": str(self.tokens_dir), "data_dir": str(self.data_dir)}

    def build_missing(self) -> None:
        super().build_missing()
        ensure_units(self)
        m, root, stamp = self.units, Path(self.chunks_root()), self._stamp()
        if stamp_is(root / STAMP, stamp):
            return
        speakers = agent_speakers(self.tokens_dir)
        if self.speaker not in speakers:
            raise ValueError(f"{chunks_dir(self.tokens_dir, 'train')}: no utterances with field 'role' == "
                             f"{AGENT_ROLE!r} and field 'speaker' == {self.speaker!r} (data.speaker); agent speakers: "
                             f"{sorted(speakers)}")
        (root / STAMP).unlink(missing_ok=True)
        items = {s: list(_pairs(self.tokens_dir, self.data_dir, s, self.speaker, m["sample_rate"], m["hop"])) for s in SPLITS}
        if not items["val"]:  # a tiny corpus whose held-out dialogues lack this speaker: validate on two train items
            items["val"] = items["train"][-2:]
        counts = {s: write_items(items[s], chunks_dir(root, s), chunk_bytes="16MB") for s in SPLITS}
        write_json(root / STAMP, {**stamp, "utterances": counts})

    def dataset(self, split: str) -> StreamingDataset:
        path = chunks_dir(self.chunks_root(), split)
        if not (path / "index.json").is_file():
            raise FileNotFoundError(f"{path}: no litdata chunks (index.json); run prepare_data() (or `fit`) to build them")
        if split == "train":
            return SegmentDataset(str(path), segment_units=self.segment_units, hop=self.units["hop"], seed=self.seed, shuffle=True)
        return StreamingDataset(str(path), shuffle=False, transform=ValExample(self.val_max_units, self.units["hop"]))
