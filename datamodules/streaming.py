"""The one streaming data base every stage's DataModule derives from, and the ``prepare`` step that feeds it.

``prepare`` turns Ke-SpeechChat dialogues (the built-in espeak-ng corpus by default, or a user's folder / JSON list /
JSONL) into utterance-level litdata chunks, split into ``train`` and ``val`` by dialogue, plus a small bilingual BPE
``tokenizer.json`` trained on the training transcripts. Everything is validated first (one clear error naming file,
dialogue and field, or a counted report of skipped items with ``skip_invalid``) and written under temporary names,
so an interrupted run never leaves chunks that look finished.

``StreamingDataModule`` runs ``prepare`` if the chunks are missing, opens ``StreamingDataset``s and serves
``StreamingDataLoader``s; Lightning stores the train loader's state in every checkpoint, so a resumed run continues
at the same sample.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections import Counter
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset, optimize

from datamodules.kespeechchat import Utterance, collect_utterances
from datamodules.sources import FORMATS, SourceOptions, detect_format, gather, read_source, read_text, utterance_audio
from lit_keomni.atomic import remove_stale, staged_dir, write_json
from lit_keomni.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

STAMP = "prepared.json"
SPLITS = ("train", "val")


CLOUD_PREFIXES = ("s3://", "gs://", "gcs://", "azure://", "hf://", "r2://", "local:")
"""URL schemes litdata streams and caches (``local:`` is its stand-in for object storage, over a local folder)."""


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is an object-storage URL litdata streams (``s3://bucket/prepared``)."""
    return str(path).startswith(CLOUD_PREFIXES)


def _source_entry(entry: dict[str, Any], i: int) -> dict[str, Any]:
    """A checked ``data.sources`` entry: ``{path, weight[, source, format, language]}``."""
    where = f"data.sources[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping {{path, weight}}, got {type(entry).__name__} {entry!r}")
    unknown = set(entry) - {"path", "weight", "source", "format", "language"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected path, weight, source, format, language")
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        raise ValueError(f"{where}.path: missing (a prepared folder or cloud URL)")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise ValueError(f"{where}.weight: expected a positive number, got {weight!r}")
    return {**entry, "weight": float(weight), "name": f"{i}-{Path(entry['path'].rstrip('/')).name}"}


def chunks_dir(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / "chunks" / split


SPEECH_CHUNKS = "chunks16k"
"""Folder of the 16 kHz copy of a dialogue corpus's utterances, written beside ``chunks`` by ``prepare``."""


ORDERS = ("bucketed", "duration", "shuffled")
"""Orders ``prepare`` writes training items in."""
CHARACTERS = "characters"
"""Folder of the character tokenizer ``prepare`` trains beside ``tokenizer.json`` (one token per character)."""


def write_characters(data_dir: str | Path, texts: Iterable[str] | None = None) -> Path:
    """``data_dir/characters/tokenizer.json``: every character of the training transcripts as one token (word starts
    marked), the targets the tiny ASR recipe learns fastest from; ``texts`` default to the prepared training split's."""
    from lit_keomni.text.tokenizer import TextTokenizer

    path = Path(data_dir) / CHARACTERS / "tokenizer.json"
    if not path.is_file():
        if texts is None:
            ds = StreamingDataset(str(chunks_dir(data_dir, "train")))
            texts = [t for t in (ds[i]["text"] for i in range(len(ds))) if t]
        TextTokenizer.train(texts, vocab_size=1).save(path.parent)
    return path


def speech_chunks_dir(data_dir: str | Path, split: str) -> Path:
    """The utterances of ``split`` at 16 kHz: the copy ``prepare`` writes for a dialogue corpus (stored at 22,050 Hz
    for the vocoder stages), else the corpus's own chunks."""
    copy = Path(data_dir) / SPEECH_CHUNKS / split
    return copy if (copy / "index.json").is_file() else chunks_dir(data_dir, split)


def is_prepared(data_dir: str | Path) -> bool:
    return (Path(data_dir) / STAMP).is_file()


BUCKET_ITEMS = 32
"""Clips per training chunk in ``bucketed`` order: one batch of the recipes. litdata reads one chunk after another
in random order, so consecutive batches come from different lengths (a run of batches of one length, i.e. on a
templated corpus of one kind of sentence, learns slower: held-out ASR loss 0.96 with 32-clip chunks against 1.37 with
256-clip ones after 600 steps); a larger batch spans several chunks and pads more. ``BUCKETS`` chunks' worth of
shuffled clips are sorted by duration at a time."""
BUCKETS = 8


def bucketed(items: Sequence[Any], seed: int, *, duration: Callable[[Any], float] = lambda u: u.duration,
             chunk_items: int | None = None, buckets: int | None = None) -> list[list[Any]]:
    """Training chunks in ``bucketed`` order: items shuffled, each window of ``buckets * chunk_items`` sorted by
    duration and cut into chunks of ``chunk_items``. Every chunk holds clips of similar length (an eighth of the
    window's spread: little padding) drawn at random from the whole corpus (mixed content); litdata shuffles chunk
    order and items inside a chunk each epoch."""
    chunk_items, buckets = chunk_items or BUCKET_ITEMS, buckets or BUCKETS
    shuffled = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
    window = chunk_items * buckets
    chunks = []
    for start in range(0, len(shuffled), window):
        ordered = sorted(shuffled[start:start + window], key=duration)
        chunks += [ordered[i:i + chunk_items] for i in range(0, len(ordered), chunk_items)]
    return chunks


def in_order(items: Sequence[Any], order: str, seed: int) -> list[list[Any]]:
    """``items`` (sorted by duration) in one of ``ORDERS``, as the groups written one after another (a group of the
    bucketed order is one chunk)."""
    if order == "bucketed":
        return bucketed(items, seed)
    if order == "shuffled":
        return [[items[i] for i in np.random.default_rng(seed).permutation(len(items))]]
    return [list(items)]


def utterance_item(u: Utterance, sample_rate: int) -> dict[str, Any]:
    """One litdata item: the utterance's audio as int16 at ``sample_rate`` and its metadata.

    Module level because ``litdata.optimize`` runs it in spawned worker processes.
    """
    audio = utterance_audio(u, sample_rate)
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
    return {
        "id": u.id,
        "dialogue_id": u.dialogue_id,
        "turn": u.turn,
        "speaker": u.speaker,
        "role": u.role,
        "gender": u.gender,
        "language": u.language,
        "text": u.text,
        "words": json.dumps(u.words or [], ensure_ascii=False),
        "sample_rate": sample_rate,
        "audio": pcm,
    }


class _GroupFn:
    """``litdata.optimize`` fn: one group of utterances -> its items, in order (a bucketed chunk stays whole)."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate

    def __call__(self, group: list[Utterance]) -> Iterator[dict[str, Any]]:
        for u in group:
            yield utterance_item(u, self.sample_rate)


class _ItemFn:
    """Picklable ``fn`` for ``optimize`` carrying the sample rate."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate

    def __call__(self, u: Utterance) -> dict[str, Any]:
        return utterance_item(u, self.sample_rate)


def split_of(dialogue_id: str, val_fraction: float) -> str:
    """Deterministic split by dialogue (so no dialogue's sentences leak from train into val)."""
    return "val" if zlib.crc32(dialogue_id.encode("utf-8")) % 10_000 < val_fraction * 10_000 else "train"


def write_chunks(fn: Any, inputs: list[Any], out_dir: Path, *, workers: int, chunk_bytes: str | None = "64MB",
                 chunk_size: int | None = None) -> None:
    """``litdata.optimize`` into a temp folder renamed to ``out_dir`` when complete (atomic for readers)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cache = out_dir.parent / ".cache"
    os.environ.setdefault("DATA_OPTIMIZER_CACHE_FOLDER", str(cache / "chunks"))
    os.environ.setdefault("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(cache / "data"))
    remove_stale(out_dir)  # a killed earlier run's temp folder
    with staged_dir(out_dir) as tmp:
        optimize(fn=fn, inputs=inputs, output_dir=str(tmp),
                 **(dict(chunk_size=chunk_size) if chunk_size else dict(chunk_bytes=chunk_bytes)),
                 num_workers=max(1, min(workers, len(inputs))), mode="overwrite", verbose=False)


DIALOGUE_RATE = 22050
"""Rate of dialogue corpora (the built-in one, Ke-SpeechChat): the vocoder stages train at it."""


def prepare(
    out: str | Path,
    source: str | Path | None = None,
    *,
    format: str | None = None,
    options: SourceOptions | None = None,
    num_dialogues: int = 1200,
    seed: int = 1234,
    sample_rate: int | None = None,
    max_duration: float = 30.0,
    val_fraction: float = 0.06,
    skip_invalid: bool = False,
    tokenizer_vocab: int = 600,
    workers: int = 2,
    progress: bool = True,
    order: str = "bucketed",
) -> dict[str, Any]:
    """Validate a corpus and write ``out/chunks/{train,val}``, ``out/tokenizer.json`` and the ``out/prepared.json`` stamp.

    ``format`` is one of ``sources.FORMATS`` (None = detected from the layout); ``options`` its language and column
    names. Without ``source`` the built-in bilingual corpus is synthesised into ``out/corpus`` first, and a text corpus
    of the same toy world is written to ``out/text/toy_world.jsonl``. Audio is decoded and resampled once, here, to
    ``sample_rate`` (None = 22,050 Hz for dialogues, 16 kHz for the other speech formats); dialogues stored at
    another rate than 16 kHz get a 16 kHz copy of their utterances too (``SPEECH_CHUNKS``, read by stage 1, whose
    Whisper front end takes 16 kHz), so no loader resamples on every epoch. A ``text`` corpus becomes
    text chunks in ``out/text`` (stage 3's ``text_source``). Utterances without transcripts (unsupervised speech) are
    kept; the tokenizer is trained on those with one; a character tokenizer of the same transcripts goes to
    ``out/characters`` (``CHARACTERS``, the tiny ASR recipe's targets). ``order`` is the order training items are
    written in: "bucketed" (``bucketed``: batches of similar length but mixed content), "duration" (similar length and,
    on a templated corpus, similar content) or "shuffled" (mixed content, much padding); the 16 kHz copy of a dialogue
    corpus is always bucketed: stage 1 learns from mixed batches several times faster per step than from
    duration-sorted ones, and pads a batch of shuffled clips to 2.3x its audio (1.2x bucketed, on the built-in
    corpus). Returns the stamp (counts and settings).
    """
    if order not in ORDERS:
        raise ValueError(f"prepare: order={order!r}, expected one of {ORDERS}")
    from datamodules.corpus import build_corpus
    from datamodules.toy_world import write_text_corpus
    from lit_keomni.text.tokenizer import TextTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = options or SourceOptions()
    fmt = "kespeechchat" if source is None else format or detect_format(source)
    if fmt not in FORMATS:
        raise ValueError(f"prepare: unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt == "text":
        return prepare_text(out, Path(source), options)
    sample_rate = sample_rate or (DIALOGUE_RATE if fmt == "kespeechchat" else SAMPLE_RATE)
    if source is None:
        source = build_corpus(out / "corpus", num_dialogues=num_dialogues, seed=seed, sample_rate=sample_rate,
                              workers=workers, progress=progress)
        # the same toy world as text only, for `interleave` and the text share of stage 3
        write_text_corpus(out / "text" / "toy_world.jsonl", seed=seed, num_dialogues=num_dialogues)
    report = out / "rejected.jsonl"
    report.unlink(missing_ok=True)
    if fmt == "kespeechchat":
        utts = collect_utterances(source, sample_rate=sample_rate, max_duration=max_duration,
                                  skip_invalid=skip_invalid, report_path=report)
    else:
        utts = gather(read_source(source, fmt, options), source, max_duration=max_duration,
                      skip_invalid=skip_invalid, report_path=report)
    by_split: dict[str, list[Utterance]] = {s: [] for s in SPLITS}
    for u in utts:
        # a corpus's own splits are kept: its "train" trains, every other (validation, dev, test) validates
        own = None if u.split is None else "train" if u.split == "train" else "val"
        by_split[own or split_of(u.dialogue_id, val_fraction)].append(u)
    if not by_split["train"]:
        raise ValueError(f"{source}: no utterances left for training after the train/val split")
    if not by_split["val"]:  # tiny sources: hold out the last dialogue rather than validate on nothing
        last = by_split["train"][-1].dialogue_id
        by_split["val"] = [u for u in by_split["train"] if u.dialogue_id == last]
        by_split["train"] = [u for u in by_split["train"] if u.dialogue_id != last] or by_split["val"]
    (out / STAMP).unlink(missing_ok=True)
    for split, items in by_split.items():
        # litdata shuffles chunk order and items within a chunk: in order of duration (small chunks) a batch holds
        # clips of similar length and, on a templated corpus, one kind of sentence; bucketed, similar length and mixed
        # content; shuffled, mixed content and much padding.
        items = sorted(items, key=lambda u: (u.duration, u.id))
        copies = [(sample_rate, chunks_dir(out, split), order)]
        if fmt == "kespeechchat" and sample_rate != SAMPLE_RATE:
            copies.append((SAMPLE_RATE, Path(out) / SPEECH_CHUNKS / split, "bucketed"))
        for rate, where, kind in copies:
            kind = kind if split == "train" else "duration"  # validation is read in order
            groups = in_order(items, kind, seed)
            size = dict(chunk_size=BUCKET_ITEMS) if kind == "bucketed" else dict(chunk_bytes="8MB")
            if workers <= 1:  # in this process: a spawned litdata worker would only add its start-up
                write_items(map(_ItemFn(rate), (u for g in groups for u in g)), where, **size)
            elif kind == "bucketed":  # a worker's chunks start at its first group: each chunk is one group
                write_chunks(_GroupFn(rate), groups, where, workers=workers, **size)
            else:
                write_chunks(_ItemFn(rate), groups[0], where, workers=workers, **size)
    tok_path = out / "tokenizer.json"
    texts = [u.text for u in by_split["train"] if u.text]
    if not tok_path.is_file() and texts:
        TextTokenizer.train(texts, vocab_size=tokenizer_vocab).save(out)
    if texts:
        write_characters(out, texts)
    stamp = {
        "source": str(source),
        "format": fmt,
        "sample_rate": sample_rate,
        "order": order,
        **({"speech_chunks": {"dir": SPEECH_CHUNKS, "sample_rate": SAMPLE_RATE}}
           if fmt == "kespeechchat" and sample_rate != SAMPLE_RATE else {}),
        "transcribed": {s: sum(bool(u.text) for u in v) for s, v in by_split.items()},
        "max_duration": max_duration,
        "val_fraction": val_fraction,
        "utterances": {s: len(v) for s, v in by_split.items()},
        "hours": {s: round(sum(u.end - u.start for u in v) / 3600, 3) for s, v in by_split.items()},
        "rejected_report": str(report) if report.exists() else None,
        **({"source_splits": dict(sorted(Counter(u.split for u in utts if u.split).items()))}
           if any(u.split for u in utts) else {}),
    }
    write_json(out / STAMP, stamp)
    return stamp


def prepare_text(out: Path, source: Path, options: SourceOptions) -> dict[str, Any]:
    """Text documents of ``source`` (``sources.read_text``) as litdata chunks ``{id, text}`` in ``out/text``, read by
    ``interleave`` and stage 3 (``text_source: out/text``); returns the stamp."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such text corpus")
    n = write_items(({"id": str(i), "text": t} for i, t in read_text(source, options)), out / "text", chunk_bytes="16MB")
    stamp = {"source": str(source), "format": "text", "documents": n, "text_source": str(out / "text")}
    write_json(out / STAMP, stamp)
    return stamp


def pad_collate(examples: list[dict[str, Any]], pad_values: dict[str, float] | None = None) -> dict[str, Any]:
    """Batch dicts: arrays/tensors are right-padded along their first axis (with ``<key>_lengths``), numbers become
    tensors, anything else (ids, text) stays a list."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        first = values[0]
        if isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim >= 1:
            tensors = [torch.as_tensor(v) for v in values]
            lengths = torch.tensor([t.shape[0] for t in tensors])
            out = tensors[0].new_full((len(tensors), int(lengths.max()), *tensors[0].shape[1:]), (pad_values or {}).get(key, 0))
            for i, t in enumerate(tensors):
                out[i, : t.shape[0]] = t
            batch[key], batch[f"{key}_lengths"] = out, lengths
        elif isinstance(first, (int, float, np.integer, np.floating)) and not isinstance(first, bool):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class ResumableLoader(StreamingDataLoader):
    """``StreamingDataLoader`` whose resumed epoch is followed by a freshly shuffled one.

    litdata keeps ``restore`` set until an iteration runs to its natural end, but Lightning stops iterating after
    ``len(loader)`` batches; the epoch after a mid-epoch resume would then replay the restored position instead of
    starting a new epoch. Here a restored iteration that has yielded a batch clears ``restore`` for the next one.
    """

    _yielded_since_restore = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._yielded_since_restore = False

    def __iter__(self) -> Any:
        if self.restore and self._yielded_since_restore:
            self.restore = False
        for batch in super().__iter__():
            if self.restore:
                self._yielded_since_restore = True
            yield batch


class StreamingDataModule(L.LightningDataModule):
    """Base for every stage's DataModule: prepare-if-missing, ``StreamingDataset`` per split, ``StreamingDataLoader``.

    Subclasses set ``transform`` (one raw item -> one example) and ``collate`` (examples -> batch) to plain functions.
    """

    def __init__(
        self,
        data_dir: str = "data/builtin",
        source: str | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        seed: int = 1234,
        num_dialogues: int = 1200,
        sample_rate: int | None = None,
        max_duration: float = 30.0,
        val_fraction: float = 0.06,
        skip_invalid: bool = False,
        format: str | None = None,
        language: str = "en",
        sources: list[dict[str, Any]] | None = None,
    ) -> None:
        """
        Args:
            data_dir: Folder of prepared chunks (``chunks/train``, ``chunks/val``, ``tokenizer.json``); built if missing.
            source: A corpus to prepare into ``data_dir`` (see ``format``); None = built-in corpus.
            batch_size: Examples per batch and device.
            num_workers: Loader worker processes (``prepare`` uses every CPU core).
            seed: Seed of the built-in corpus and of the shuffling order.
            num_dialogues: Size of the built-in corpus.
            sample_rate: Sample rate audio is decoded to once, in ``prepare``; None = 22,050 Hz for dialogues,
                16 kHz for ASR/speech corpora.
            max_duration: Longest accepted clip in seconds; longer ones are an error (or a counted skip).
            val_fraction: Fraction of dialogues (recordings) held out for validation.
            skip_invalid: Skip invalid items, listing each with its reason in ``data_dir/rejected.jsonl``.
            format: Layout of ``source``: kespeechchat, lhotse, kaldi, hf, folder (None = detected).
            language: Language of ``source``'s items that do not name their own.
            sources: A weighted mixture of prepared corpora instead of ``data_dir``: ``[{path, weight}, ...]``, each
                ``path`` a prepared folder or cloud URL (``s3://...``); an entry with ``source`` (and optional
                ``format``, ``language``) is prepared into ``path`` when missing. Training draws items by weight;
                validation reads every source's val split.
        """
        super().__init__()
        self.data_dir = data_dir
        self.source = source
        self.format = format
        self.language = language
        self.mixture_sources = [_source_entry(e, i) for i, e in enumerate(sources or [])]
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.num_dialogues = num_dialogues
        self.sample_rate = sample_rate
        self.max_duration = max_duration
        self.val_fraction = val_fraction
        self.skip_invalid = skip_invalid
        self.datasets: dict[str, StreamingDataset] = {}

    def prepare_data(self) -> None:
        # Building data (which may construct models, e.g. for ``tokenize``) must not shift the training RNG:
        # a run that had to build its data and one that found it ready start from the same initial weights.
        with torch.random.fork_rng(devices=[]):
            self.build_missing()

    def build_missing(self) -> None:
        """Create whatever this module reads and is missing (run once, on local rank 0, by ``prepare_data``)."""
        corpora = self.mixture_sources or [{"path": self.data_dir, "source": self.source, "format": self.format,
                                            "language": self.language}]
        for c in corpora:
            if is_remote(c["path"]) or is_prepared(c["path"]):
                continue
            if self.mixture_sources and not c.get("source"):
                raise FileNotFoundError(f"{c['path']}: data.sources entry is not prepared (no {STAMP}); run "
                                        f"`python -m lit_keomni prepare --source CORPUS --out {c['path']}` or give it "
                                        f"a 'source'")
            prepare(c["path"], c.get("source"), format=c.get("format"),
                    options=SourceOptions(language=c.get("language") or self.language),
                    num_dialogues=self.num_dialogues, seed=self.seed, sample_rate=self.sample_rate,
                    max_duration=self.max_duration, val_fraction=self.val_fraction, skip_invalid=self.skip_invalid,
                    workers=os.cpu_count() or 1)

    # Plain module-level functions, not bound methods: loader workers may be spawned, and pickling a bound method
    # would drag the whole DataModule (and its Trainer) into every worker.
    transform: Callable[[dict[str, Any]], Any] | None = None
    """One raw chunk item -> one example (runs in the loader workers)."""
    collate: Callable[[list[Any]], Any] = staticmethod(pad_collate)
    """Examples -> batch."""

    def chunks_root(self) -> str:
        """Folder whose ``chunks/{train,val}`` this module reads (the prepared utterances by default)."""
        return self.data_dir

    def source_root(self, entry: dict[str, Any]) -> str:
        """Folder whose ``chunks/{train,val}`` this module reads for one ``sources`` entry (its prepared path)."""
        return entry["path"]

    def dataset(self, split: str, root: str | None = None) -> StreamingDataset:
        """The chunks of ``split`` under ``root`` (default ``chunks_root()``; a cloud URL is streamed and cached by
        litdata); train shuffled."""
        root = root or self.chunks_root()
        if is_remote(root):
            return StreamingDataset(f"{root.rstrip('/')}/chunks/{split}", shuffle=split == "train", seed=self.seed,
                                    transform=self.transform)
        path = chunks_dir(root, split)
        if not (path / "index.json").is_file():
            raise FileNotFoundError(f"{path}: no litdata chunks (index.json); run `python -m lit_keomni prepare --out {root}`")
        return StreamingDataset(str(path), shuffle=split == "train", seed=self.seed, transform=self.transform)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split in self.datasets:
                continue
            if not self.mixture_sources:
                self.datasets[split] = self.dataset(split)
                continue
            sets = [self.dataset(split, self.source_root(c)) for c in self.mixture_sources]
            if split == "train":
                self.datasets[split] = Mixture(sets, [c["weight"] for c in self.mixture_sources], self.seed)
            else:
                self.datasets[split] = CombinedStreamingDataset(sets, seed=self.seed, iterate_over_all=True)

    def _loader(self, split: str) -> StreamingDataLoader:
        return ResumableLoader(self.datasets[split], batch_size=self.batch_size, num_workers=self.num_workers,
                                   collate_fn=self.collate, drop_last=split == "train",
                                   persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> StreamingDataLoader:
        return self._loader("train")

    def val_dataloader(self) -> StreamingDataLoader:
        return self._loader("val")

    def test_dataloader(self) -> StreamingDataLoader:
        return self._loader("val")


class Mixture(CombinedStreamingDataset):
    """``CombinedStreamingDataset`` drawing rows of its sources by weight until one runs out, with two changes:

    - a new draw sequence every epoch (litdata seeds the source choices alike each epoch, so every epoch would take
      the same rows from each source and end at the same point);
    - a length: the expected rows of an epoch, ``min(rows of a source / its weight)``. Lightning pre-fetches one batch
      from loaders without a length, and that batch is then counted in the loader state saved in checkpoints, so a
      resumed run would skip it. An epoch still ends when a source runs out, or after this many rows.
    """

    def __init__(self, datasets: list[StreamingDataset], weights: Sequence[float], seed: int) -> None:
        super().__init__(datasets, seed=seed, weights=weights, iterate_over_all=False)
        self._base_seed = seed

    def set_epoch(self, current_epoch: int) -> None:
        super().set_epoch(current_epoch)
        self._seed = self._base_seed + current_epoch  # called before each epoch's iterator, also after a resume

    def get_len(self, num_workers: int, batch_size: int) -> int:
        super().get_len(num_workers, batch_size)
        return int(min(d.get_len(num_workers, batch_size) / w for d, w in zip(self._datasets, self._weights) if w))

    def __len__(self) -> int:
        return self.get_len(self.num_workers, self.batch_size)


def write_items(items: Iterable[dict[str, Any]], out_dir: Path, *, chunk_bytes: str | None = "64MB",
                chunk_size: int | None = None) -> int:
    """Write ready items as litdata chunks in this process (no worker processes, unlike ``write_chunks``), into a temp
    folder renamed to ``out_dir`` when complete; returns the number of items."""
    from litdata.streaming.writer import BinaryWriter

    n = 0
    remove_stale(out_dir)
    with staged_dir(out_dir) as tmp:
        writer = BinaryWriter(str(tmp), **(dict(chunk_size=chunk_size) if chunk_size else dict(chunk_bytes=chunk_bytes)))
        for n, item in enumerate(items, 1):
            writer[n - 1] = item
        if n == 0:  # litdata's merge would wait forever for an index that is never written
            raise ValueError(f"{out_dir}: no items to write")
        writer.done()
        writer.merge()
    return n
