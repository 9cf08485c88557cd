"""Stage-1 data loading: samples/s of our litdata path beside a naive per-item loader, same items, in one process.

    python benchmarks/data.py [--data data/builtin --data16 DIR --items 512 --batch 16 --workers 2 --repeats 3 --threads N]

With ``--data16`` (the same corpus prepared at 16 kHz: ``python -m lit_keomni prepare --source DATA/corpus --format
kespeechchat --sample-rate 16000 --out DIR``) a third loader reads chunks resampled once, at prepare time, so the
loader only converts int16 to float; beside it, ``ours`` resamples 22,050 Hz to 16 kHz on every item of every epoch.

ours   ``StreamingDataset`` over the prepared chunks (``data/builtin/chunks/train``: int16 audio + metadata, written
       once by ``prepare``) with stage 1's transform (``datamodules.tokenizer.asr_example``: int16 → float, resample
       to 16 kHz) and ``StreamingDataLoader`` with ``pad_collate``, exactly as ``TokenizerDataModule`` serves them.
naive  a map-style ``torch.utils.data.Dataset`` over the corpus in its Ke-SpeechChat layout (``data/builtin/corpus``):
       per item, open and parse the dialogue's JSON, take the turn, read its wav with soundfile (float32), resample to
       16 kHz with the same ``resample`` (soxr), and ``DataLoader`` with the same ``pad_collate``.
Both: the same ``--items`` utterances (the ids our loader yields first, handed to the naive loader), the same batch
size and number of worker processes. Two measurements per loader: "loader" = padded 16 kHz batches as the training
step receives them; "+ log-mel" = also the feature computation of stage 1 on every batch in the main process (the
Whisper log-mel, ``lit_keomni.nn.audio.LogMel``, 80 bands, batched, as the model runs it — on a GPU it runs there).
One pass = start the loader's workers, iterate every batch (and compute its log-mel); samples/s = items / pass wall
time, median over ``--repeats`` alternating passes after one warm-up pass of each (which also warms the page cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset

from common import machine_line

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datamodules.kespeechchat import collect_utterances  # noqa: E402
from datamodules.streaming import ResumableLoader, chunks_dir, pad_collate  # noqa: E402
from datamodules.tokenizer import asr_example  # noqa: E402
from lit_keomni.audio import SAMPLE_RATE, resample  # noqa: E402
from lit_keomni.nn.audio import LogMel  # noqa: E402


class NaiveUtterances(Dataset):
    """One utterance per index from the Ke-SpeechChat layout: dialogue JSON + wav read per item."""

    def __init__(self, refs: list[tuple[str, int]]) -> None:
        self.refs = refs  # (dialogue JSON path, turn index)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, turn = self.refs[i]
        with open(path, encoding="utf-8") as f:
            dialogue = json.load(f)
        t = dialogue["dialog"][turn]
        language = next(c["language"] for c in dialogue["channel"] if c["channel_index"] == t["channel"])
        audio, rate = sf.read(str(Path(path).parent / t["audio_path"]), dtype="float32", always_2d=True)
        audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
        audio = resample(audio, rate, SAMPLE_RATE)
        return {"id": f"{dialogue['id']}_{turn}", "audio": torch.from_numpy(np.ascontiguousarray(audio)),
                "text": t["text"], "language": language}


def run_pass(loader: Any, logmel: LogMel | None, items: int) -> tuple[float, list[str], float]:
    """(wall seconds, ids in order, audio seconds) of one pass over the first ``items`` examples of ``loader``,
    computing each batch's log-mel when ``logmel`` is given."""
    ids: list[str] = []
    audio_s = 0.0
    t0 = time.perf_counter()
    for batch in loader:
        if logmel is not None:
            logmel(batch["audio"], batch["audio_lengths"])
        ids += batch["id"]
        audio_s += float(batch["audio_lengths"].sum()) / SAMPLE_RATE
        if len(ids) >= items:
            break
    return time.perf_counter() - t0, ids[:items], audio_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/builtin", help="prepared folder (chunks/train) whose source is --corpus")
    p.add_argument("--corpus", default=None, help="Ke-SpeechChat folder of the same utterances (default: DATA/corpus)")
    p.add_argument("--data16", default=None, help="the same corpus prepared at 16 kHz (resampled at prepare time)")
    p.add_argument("--items", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = Path(a.data)
    corpus = Path(a.corpus) if a.corpus else data / "corpus"
    chunks = chunks_dir(data, "train")
    if not (chunks / "index.json").is_file():
        raise SystemExit(f"{chunks}: no litdata chunks; run `python -m lit_keomni prepare --out {data}` first")
    if not corpus.is_dir():
        raise SystemExit(f"{corpus}: no Ke-SpeechChat corpus folder (set --corpus)")
    if a.items % a.batch:
        raise SystemExit("--items must be a multiple of --batch (whole batches for both loaders)")
    from litdata import StreamingDataset

    logmel = LogMel(n_mels=80)

    def streaming(path: Path) -> ResumableLoader:
        ds = StreamingDataset(str(path), shuffle=False, transform=asr_example)
        return ResumableLoader(ds, batch_size=a.batch, num_workers=a.workers, collate_fn=pad_collate, drop_last=True)

    def ours() -> ResumableLoader:
        return streaming(chunks)

    # Warm-up of ours: fixes the item set (the ids it yields first) and warms the page cache.
    _, ids, audio_s = run_pass(ours(), None, a.items)
    t = time.perf_counter()
    where = {u.id: (str(u.source), u.turn) for u in collect_utterances(corpus, sample_rate=SAMPLE_RATE)}
    index_s = time.perf_counter() - t
    missing = [i for i in ids if i not in where]
    if missing:
        raise SystemExit(f"{corpus}: {len(missing)} utterance ids of {chunks} not found (first: {missing[0]})")

    def naive() -> DataLoader:
        return DataLoader(NaiveUtterances([where[i] for i in ids]), batch_size=a.batch, num_workers=a.workers,
                          collate_fn=pad_collate, shuffle=False)

    _, naive_ids, _ = run_pass(naive(), None, a.items)
    if sorted(naive_ids) != sorted(ids):
        raise SystemExit("the two loaders yielded different utterances")
    make = {"ours": ours, "naive": naive}
    if a.data16:
        chunks16 = chunks_dir(a.data16, "train")
        rate16 = StreamingDataset(str(chunks16))[0]["sample_rate"]
        if rate16 != SAMPLE_RATE:
            raise SystemExit(f"{chunks16}: stored at {rate16} Hz, not {SAMPLE_RATE} (prepare --sample-rate 16000)")
        make["ours16"] = lambda: streaming(chunks16)
        if sorted(run_pass(make["ours16"](), None, a.items)[1]) != sorted(ids):
            raise SystemExit(f"{chunks16}: its first {a.items} utterances are not those of {chunks} (the two "
                             f"prepares wrote chunks in another order: give --items the size of the train split)")
    times: dict[tuple[str, bool], list[float]] = {(k, f): [] for k in make for f in (False, True)}
    for _ in range(a.repeats):
        for features in (False, True):
            for name, loader in make.items():
                times[name, features].append(run_pass(loader(), logmel if features else None, a.items)[0])
    t = {k: statistics.median(v) for k, v in times.items()}

    print(machine_line(torch.device("cpu")))
    print(f"{a.items} utterances ({audio_s / 60:.1f} min of audio, the same ids for both), batch {a.batch}, "
          f"{a.workers} worker processes; per pass: start workers, load, resample to 16 kHz, pad (+ 80-band log-mel "
          f"per batch in the main process); median of {a.repeats} alternating passes after 1 warm-up each")
    print(f"ours: {chunks}  |  naive: {corpus} (per-item JSON + wav; id → file index built once, "
          f"{index_s:.1f} s, not timed)\n")
    print(f"{'':<22}{'ours samples/s':>16}{'naive samples/s':>17}{'ours/naive':>12}"
          + (f"{'ours16 samples/s':>18}{'ours16/ours':>13}" if a.data16 else ""))
    for features, what in ((False, "loader"), (True, "loader + log-mel")):
        so, sn = a.items / t["ours", features], a.items / t["naive", features]
        row = f"{what:<22}{so:>16.1f}{sn:>17.1f}{so / sn:>11.2f}×"
        if a.data16:
            s16 = a.items / t["ours16", features]
            row += f"{s16:>18.1f}{s16 / so:>12.2f}×"
        print(row)
    print(f"\naudio seconds per second, loader only: ours {audio_s / t['ours', False]:.0f}, "
          f"naive {audio_s / t['naive', False]:.0f}"
          + (f", ours16 (resampled at prepare) {audio_s / t['ours16', False]:.0f}" if a.data16 else ""))


if __name__ == "__main__":
    main()
