"""Stage-3 data: the speech-text pre-training mixture of GLM-4-Voice (seed 003 §2.3.1, §3.1, Appendix A).

Five sources, each turned into documents by ``text.templates`` and packed into rows of exactly ``seq_len + 1`` tokens:

| source | document | trained |
|---|---|---|
| ``text`` | a text-corpus document + ``<|eos|>`` | every token |
| ``interleaved`` | an ``interleave`` item (text with speech spans) + ``<|eos|>`` | every token |
| ``speech`` | ``<|begin_of_audio|> speech <|end_of_audio|>`` of an utterance | every token |
| ``asr`` | ``<|begin_of_audio|> speech <|end_of_audio|> text <|eos|>`` | the text and ``<|eos|>`` |
| ``tts`` | ``text <|begin_of_audio|> speech <|end_of_audio|>`` | the speech and ``<|end_of_audio|>`` |

``prepare_data`` chains what is missing: the prepared utterances (``data_dir``), their speech tokens (``tokenize`` with
the stage-1 export into ``tokens_dir``), the interleaved data (``interleave`` with the stage-2 export over the text
corpus into ``interleaved_dir``), then the packed rows (``packed_dir/<source>/chunks/{train,val}`` and
``packed_dir/packed.json``: counts per source and the fingerprints of the inputs; a source is re-packed when its inputs
change). Packing streams a source's documents in their stored order, concatenates them and cuts the stream into rows
(only the last row is padded; the loader shuffles rows), so a document may continue in the next row. Each row carries
per-position document ids (restarting at 0 in every row, -1 on padding), so that attention never crosses documents and
positions restart, and a loss mask in which the first token of every document piece is untrained (nothing before it
in the row predicts it).

Training draws rows with ``Mixture`` (a ``CombinedStreamingDataset``): text at ``text_fraction`` (paper: 30 %) of the
rows, the other sources share the rest in the ratio of ``mixture``. Rows hold equally many tokens, so row shares are
token shares. An epoch ends when one source runs out; the next epoch reshuffles every source and draws anew.
Validation has one loader per source, so the loss is reported per source.

Several corpora (``data.sources: [{path, weight}, ...]``, each a prepared folder): every speech corpus is tokenized
into ``tokens_dir/<index>-<name>`` and feeds the speech source, and the ASR and TTS sources when it has transcripts
(unsupervised speech feeds speech rows only); every text corpus (``prepare --format text``) feeds the text source.
Each (source, corpus) part is packed on its own (``packed_dir/<source>/<index>-<name>``); a source's share of rows is
split between its corpora by their weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset

from datamodules.streaming import (SPLITS, STAMP, Mixture, ResumableLoader, StreamingDataModule, chunks_dir,
                                   is_remote, split_of, write_items)
from datamodules.sft import vocabulary_digest
from lit_keomni.atomic import write_json
from lit_keomni.checkpoints import export_fingerprint, lm_tokenizer
from lit_keomni.interleave import read_documents
from lit_keomni.speech_tokens import STAMP as TOKENS_STAMP
from lit_keomni.speech_tokens import tokenize, tokens_are_current
from lit_keomni.text.templates import asr, build, speech_document, text_document, tts
from lit_keomni.text.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

SOURCES = ("text", "interleaved", "speech", "asr", "tts")
"""The data sources, in the order of the ``source`` index every row carries."""
SPEECH_SOURCES = ("speech", "asr", "tts")
"""The sources made from a speech corpus's tokens (the others from text)."""
DEFAULT_MIXTURE = {"interleaved": 0.3, "speech": 0.1, "asr": 0.15, "tts": 0.15}
"""Relative weights of the non-text sources; they fill the ``1 - text_fraction`` of rows left by text."""
PACKED_STAMP = "packed.json"
PAD_DOCUMENT = -1
"""Document id of padding positions."""


# ---------------------------------------------------------------------------------------------------- documents


def document(source: str, tokenizer: TextTokenizer, item: dict[str, Any]) -> tuple[list[int], list[bool]]:
    """The training sequence and loss mask of one item of ``source`` (see the module docstring's table).

    ``item``: ``{"text"}`` for text, ``{"tokens"}`` for interleaved, ``{"codes", "text"}`` for speech/asr/tts.
    """
    if source == "text":
        return text_document(tokenizer, item["text"])
    if source == "interleaved":
        return build([([*np.asarray(item["tokens"]).tolist(), tokenizer.eos_id], True)])
    codes = np.asarray(item["codes"]).tolist()
    if source == "speech":
        return speech_document(tokenizer, codes)
    if source == "asr":
        return asr(tokenizer, codes, item["text"])
    if source == "tts":
        return tts(tokenizer, item["text"], codes)
    raise ValueError(f"document: unknown source {source!r}; expected one of {SOURCES}")


def pack(documents: Iterable[tuple[Sequence[int], Sequence[bool]]], row_len: int,
         pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """Greedy packing: concatenate the documents and cut the stream into rows of exactly ``row_len`` tokens.

    Yields ``{"tokens" (int32), "document" (int32), "mask" (uint8)}`` per row: document ids count the document pieces
    of the row from 0 (-1 on the padding that fills the last row); ``mask[t]`` says whether predicting ``tokens[t]``
    from ``tokens[:t]`` is trained: the document's own mask, except on the first token of each piece (its predecessor
    in the row belongs to another document, or there is none) and on padding. Streams: memory holds one row.
    """
    if row_len < 2:
        raise ValueError(f"pack: row_len={row_len} must be >= 2")

    def empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.full(row_len, pad_id, dtype=np.int32), np.full(row_len, PAD_DOCUMENT, dtype=np.int32),
                np.zeros(row_len, dtype=np.uint8))

    tokens, doc, mask = empty()
    fill = n_docs = 0
    for ids, trained in documents:
        if len(ids) != len(trained):
            raise ValueError(f"pack: a document has {len(ids)} tokens but {len(trained)} mask entries")
        ids, trained = np.asarray(ids, dtype=np.int32), np.asarray(trained, dtype=np.uint8)
        pos = 0
        while pos < len(ids):
            take = min(row_len - fill, len(ids) - pos)
            tokens[fill: fill + take] = ids[pos: pos + take]
            doc[fill: fill + take] = n_docs
            mask[fill: fill + take] = trained[pos: pos + take]
            mask[fill] = 0
            fill, pos, n_docs = fill + take, pos + take, n_docs + 1
            if fill == row_len:
                yield {"tokens": tokens, "document": doc, "mask": mask}
                tokens, doc, mask = empty()
                fill = n_docs = 0
    if fill:
        yield {"tokens": tokens, "document": doc, "mask": mask}


def pretrain_collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Packed rows -> ``{"input", "target" (-100 where untrained), "document_ids", "source", "n_tokens", "id"}``;
    input, target and document ids are (B, seq_len), source is (B,), id names each row ("asr/17")."""
    tokens = torch.from_numpy(np.stack([r["tokens"] for r in rows])).long()
    doc = torch.from_numpy(np.stack([r["document"] for r in rows])).long()
    mask = torch.from_numpy(np.stack([r["mask"] for r in rows])).bool()
    target = torch.where(mask[:, 1:], tokens[:, 1:], torch.full_like(tokens[:, 1:], -100))
    document_ids = doc[:, :-1]
    return {"input": tokens[:, :-1], "target": target, "document_ids": document_ids,
            "source": torch.tensor([int(r["source"]) for r in rows]),
            "n_tokens": int((document_ids != PAD_DOCUMENT).sum()),
            "id": [f"{SOURCES[int(r['source'])]}/{int(r['row'])}" for r in rows]}


def mixture_weights(text_fraction: float, mixture: dict[str, float] | None) -> dict[str, float]:
    """Normalised row weights of all ``SOURCES``: text gets ``text_fraction``, the others share the rest in the
    ratio of ``mixture`` (missing keys weigh 0)."""
    mixture = dict(DEFAULT_MIXTURE if mixture is None else mixture)
    unknown = set(mixture) - set(SOURCES[1:])
    if unknown:
        raise ValueError(f"PretrainDataModule: field 'mixture' has unknown sources {sorted(unknown)}; "
                         f"expected some of {SOURCES[1:]} (text is set by 'text_fraction')")
    if not 0.0 <= text_fraction <= 1.0:
        raise ValueError(f"PretrainDataModule: field 'text_fraction' is {text_fraction}, expected a value in [0, 1]")
    if any(w < 0 for w in mixture.values()):
        raise ValueError(f"PretrainDataModule: field 'mixture' has a negative weight: {mixture}")
    rest = sum(mixture.values())
    if rest <= 0 and text_fraction < 1.0:
        raise ValueError(f"PretrainDataModule: field 'mixture' weighs nothing ({mixture}) but text_fraction "
                         f"{text_fraction} leaves {1 - text_fraction:.2f} of the rows to it")
    out = {"text": float(text_fraction)}
    for s in SOURCES[1:]:
        out[s] = (1.0 - text_fraction) * mixture.get(s, 0.0) / rest if rest > 0 else 0.0
    return out


# ---------------------------------------------------------------------------------------------------- building


def _digest(path: Path) -> str:
    """SHA-256 of a file, or of the names, sizes and modification times of a folder's files."""
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        h.update(str(path).encode())  # a cloud URL: its name is all we can fingerprint
    return h.hexdigest()


@dataclass(frozen=True)
class Part:
    """One packed stream of rows: the documents of one source made from one corpus."""

    source: str
    """One of ``SOURCES``."""
    corpus: str | None
    """The ``data.sources`` entry's name (``<index>-<folder>``); None for ``data_dir`` / ``text_source``."""
    weight: float
    """The corpus's weight among the corpora of its source."""
    root: str
    """Speech-token folder (speech, asr, tts), text corpus (text) or interleaved folder (interleaved)."""

    @property
    def key(self) -> str:
        """Name in ``packed.json`` and folder under ``packed_dir``: ``asr`` or ``asr/0-librispeech``."""
        return self.source if self.corpus is None else f"{self.source}/{self.corpus}"


def _stream(chunks: Path) -> Iterator[dict[str, Any]]:
    """Every item of a litdata chunks folder, in stored order."""
    ds = StreamingDataset(str(chunks))
    for i in range(len(ds)):
        yield ds[i]


class Packing:
    """Packs one source's split into rows, counting documents, rows, real tokens and trained tokens as it goes."""

    def __init__(self, source: str, tokenizer: TextTokenizer, seq_len: int) -> None:
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.counts = {"documents": 0, "rows": 0, "tokens": 0, "trained_tokens": 0}

    def _documents(self, items: Iterable[dict[str, Any]]) -> Iterator[tuple[list[int], list[bool]]]:
        for item in items:
            if self.source in ("asr", "tts") and not item["text"]:
                # unsupervised speech (a corpus prepared without transcripts) feeds the speech source only
                self.counts["untranscribed"] = self.counts.get("untranscribed", 0) + 1
                continue
            self.counts["documents"] += 1
            yield document(self.source, self.tokenizer, item)

    def rows(self, items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Rows of ``items`` with their ``source`` index and ``row`` number."""
        index = SOURCES.index(self.source)
        for k, row in enumerate(pack(self._documents(items), self.seq_len + 1, self.tokenizer.pad_id)):
            row["source"], row["row"] = index, k
            self.counts["rows"] += 1
            self.counts["tokens"] += int((row["document"] != PAD_DOCUMENT).sum())
            self.counts["trained_tokens"] += int(row["mask"].sum())
            yield row


def pack_source(source: str, items: Iterable[dict[str, Any]], tokenizer: TextTokenizer,
                seq_len: int) -> list[dict[str, Any]]:
    """All rows of ``items`` of ``source`` (in memory; ``PretrainDataModule`` streams them to disk instead)."""
    return list(Packing(source, tokenizer, seq_len).rows(items))


# ---------------------------------------------------------------------------------------------------- module


class PretrainDataModule(StreamingDataModule):
    """The stage-3 mixture: packed rows of text, interleaved, speech, ASR and TTS data (see the module docstring)."""

    def __init__(
        self,
        speech_export: str = "checkpoints/stage1/export",
        text_to_token_export: str | None = "checkpoints/stage2/export",
        tokens_dir: str = "data/tokens",
        interleaved_dir: str = "data/interleaved",
        packed_dir: str = "data/pretrain",
        text_source: str | None = None,
        seq_len: int = 512,
        text_fraction: float = 0.3,
        mixture: dict[str, float] | None = None,
        text_val_fraction: float = 0.05,
        interleave_documents: int | None = 1000,
        interleave_batch_size: int = 64,
        tokenize_workers: int = 1,
        tokenizer: str | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            speech_export: Stage-1 export: its tokenizer (extended with speech tokens) is the LM's vocabulary, its
                speech tokens those of ``tokens_dir``.
            text_to_token_export: Stage-2 export that ``interleave`` uses when ``interleaved_dir`` has no data yet.
            tokens_dir: Speech tokens of ``data_dir`` (made by ``tokenize`` if missing or from another export): the
                speech, ASR and TTS sources.
            interleaved_dir: Output of ``python -m lit_keomni interleave`` (made if its ``stats.json`` is missing).
            packed_dir: Packed rows per source and split, and ``packed.json``.
            text_source: Text corpus (``.jsonl`` with "text", ``.txt``, a folder of those, or litdata chunks) for the
                text source and for ``interleave``; None = ``data_dir/text/toy_world.jsonl``. When ``sources`` holds
                text corpora, the text source reads those, and ``interleave`` this or else the first of them.
            seq_len: Tokens per training row (rows store ``seq_len + 1`` for the shifted target).
            text_fraction: Share of rows drawn from text (paper: 0.3).
            mixture: Relative weights of interleaved, speech, asr and tts filling the rest (0 leaves a source out).
            text_val_fraction: Share of text and interleaved documents (by id) held out for validation.
            interleave_documents: Documents of the text corpus that ``interleave`` turns into interleaved data (None = all).
            interleave_batch_size: Speech spans generated together by ``interleave``.
            tokenize_workers: Processes for ``tokenize``.
            tokenizer: The LM's own vocabulary (a released LM folder with ``tokenizer.json`` or GLM-4's
                ``tokenizer.model``) instead of the stage-1 export's text tokenizer; the model must name the same.
            **kwargs: ``StreamingDataModule`` options (data_dir, batch_size, num_workers, seed, sources, ...); with
                ``sources``, speech and text corpora are mixed by weight within each source (module docstring).
        """
        super().__init__(**kwargs)
        self.speech_export = speech_export
        self.text_to_token_export = text_to_token_export
        self.tokens_dir = tokens_dir
        self.interleaved_dir = interleaved_dir
        self.packed_dir = packed_dir
        self.text_source_given = text_source
        self.text_source = text_source or str(Path(self.data_dir) / "text" / "toy_world.jsonl")
        self.seq_len = seq_len
        self.text_fraction = text_fraction
        self.mixture = mixture
        self.weights = mixture_weights(text_fraction, mixture)
        self.text_val_fraction = text_val_fraction
        self.interleave_documents = interleave_documents
        self.interleave_batch_size = interleave_batch_size
        self.tokenize_workers = tokenize_workers
        self.tokenizer_file = tokenizer
        self._tokenizer: TextTokenizer | None = None
        self.sources = SOURCES
        self.active = tuple(s for s in SOURCES if self.weights[s] > 0)
        self.train_sets: dict[str, StreamingDataset] = {}
        self.val_sets: dict[str, StreamingDataset] = {}
        self._rows: dict[str, dict[str, int]] = {}
        self._parts: list[Part] | None = None

    @property
    def tokenizer(self) -> TextTokenizer:
        """The LM vocabulary the rows are written in (``lm_tokenizer`` of ``speech_export`` and ``tokenizer``)."""
        if self._tokenizer is None:
            self._tokenizer, _ = lm_tokenizer(self.speech_export, self.tokenizer_file)
        return self._tokenizer

    # ------------------------------------------------------------------ building
    # ------------------------------------------------------------------ corpora
    def _corpus_stamp(self, entry: dict[str, Any]) -> dict[str, Any]:
        path = entry["path"]
        if is_remote(path):
            raise ValueError(f"{path}: stage 3 tokenizes each corpus into tokens_dir and packs it locally; give this "
                             f"data.sources entry a local prepared folder")
        return json.loads((Path(path) / STAMP).read_text(encoding="utf-8"))

    def parts(self) -> list[Part]:
        """The packed streams, per active source one per corpus (one in all without ``sources``)."""
        if self._parts is not None:
            return self._parts
        if not self.mixture_sources:
            roots = {"text": self.text_source, "interleaved": self.interleaved_dir}
            self._parts = [Part(s, None, 1.0, roots.get(s, self.tokens_dir)) for s in self.active]
            return self._parts
        stamps = {e["name"]: self._corpus_stamp(e) for e in self.mixture_sources}
        text = [e for e in self.mixture_sources if stamps[e["name"]].get("format") == "text"]
        speech = [e for e in self.mixture_sources if e not in text]
        parts: list[Part] = []
        for s in self.active:
            if s == "text" and text:
                parts += [Part(s, e["name"], e["weight"], stamps[e["name"]].get("text_source") or
                               str(Path(e["path"]) / "text")) for e in text]
            elif s in ("text", "interleaved"):
                parts.append(Part(s, None, 1.0, self.text_source if s == "text" else self.interleaved_dir))
            else:
                usable = [e for e in speech
                          if s == "speech" or stamps[e["name"]].get("transcribed", {"train": 1}).get("train", 1)]
                if not usable:
                    raise ValueError(f"PretrainDataModule: field 'mixture' gives source '{s}' a weight, but no corpus "
                                     f"of data.sources can feed it ({'no speech corpus' if not speech else 'none has transcripts'}: "
                                     f"{[e['path'] for e in self.mixture_sources]}); give '{s}' a weight of 0")
                parts += [Part(s, e["name"], e["weight"], str(Path(self.tokens_dir) / e["name"])) for e in usable]
        self._parts = parts
        return parts

    def part_weights(self) -> dict[str, float]:
        """Row weight of every part: its source's weight split between the source's corpora by their weights."""
        parts = self.parts()
        total = {s: sum(p.weight for p in parts if p.source == s) for s in self.active}
        return {p.key: self.weights[p.source] * p.weight / total[p.source] for p in parts}

    def _speech_corpora(self) -> list[tuple[str, str]]:
        """(prepared folder, speech-token folder) of every speech corpus read."""
        if not self.mixture_sources:
            return [(self.data_dir, self.tokens_dir)]
        return [(e["path"], str(Path(self.tokens_dir) / e["name"])) for e in self.mixture_sources
                if self._corpus_stamp(e).get("format") != "text"]

    def _inputs(self, part: Part) -> dict[str, Any]:
        """What the packed rows of ``part`` are made from; a change re-packs it."""
        inputs: dict[str, Any] = {"speech_export": export_fingerprint(self.speech_export), "seq_len": self.seq_len}
        if self.tokenizer_file:  # rows are ids: another vocabulary re-packs every source
            inputs["tokenizer"] = vocabulary_digest(self.tokenizer)
        if part.source == "text":
            inputs.update(text=_digest(Path(part.root)), val_fraction=self.text_val_fraction)
        elif part.source == "interleaved":
            inputs.update(interleaved=_digest(Path(part.root) / "stats.json"), val_fraction=self.text_val_fraction)
        else:
            stamp = json.loads((Path(part.root) / TOKENS_STAMP).read_text(encoding="utf-8"))
            inputs.update(tokens=stamp.get("fingerprint"), splits=stamp.get("splits"))
        return inputs

    def _check_interleaved(self, tokenizer: TextTokenizer) -> None:
        meta_path = Path(self.interleaved_dir) / "interleave.json"
        if not meta_path.is_file():
            return
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("vocab_size") not in (None, tokenizer.vocab_size):
            raise ValueError(f"{meta_path}: field 'vocab_size' is {meta['vocab_size']}, but the LM tokenizer of "
                             f"{self.speech_export} has {tokenizer.vocab_size} tokens: the interleaved data was made "
                             f"with another tokenizer (use a new interleaved_dir)")
        if self.text_to_token_export and (Path(self.text_to_token_export) / "model.safetensors").is_file():
            if meta.get("model_id") not in (None, export_fingerprint(self.text_to_token_export)):
                log.warning("%s: made with another text-to-token model than %s; using it as it is",
                            self.interleaved_dir, self.text_to_token_export)

    def build_missing(self) -> None:
        super().build_missing()
        self._parts = None
        if self.mixture_sources and not self.text_source_given:
            texts = [self._corpus_stamp(e) for e in self.mixture_sources]
            texts = [t.get("text_source") for t in texts if t.get("format") == "text"]
            self.text_source = texts[0] if texts else self.text_source
        if any(s in self.active for s in SPEECH_SOURCES):
            for data, tokens in self._speech_corpora():
                if not tokens_are_current(tokens, self.speech_export):
                    tokenize(self.speech_export, data, tokens, workers=self.tokenize_workers)
        if "interleaved" in self.active and not (Path(self.interleaved_dir) / "stats.json").is_file():
            if not self.text_to_token_export:
                raise FileNotFoundError(f"{Path(self.interleaved_dir) / 'stats.json'}: no interleaved data, and "
                                        f"text_to_token_export is not set to make it")
            from lit_keomni.interleave import interleave

            interleave(self.text_to_token_export, self.text_source, self.interleaved_dir,
                       limit=self.interleave_documents, batch_size=self.interleave_batch_size)
        self.pack_missing()

    def pack_missing(self) -> dict[str, Any]:
        """Pack every active source whose rows are missing or were made from other inputs; returns the stamp."""
        tokenizer = self.tokenizer
        if "interleaved" in self.active:
            self._check_interleaved(tokenizer)
        stamp_path = Path(self.packed_dir) / PACKED_STAMP
        stamp = json.loads(stamp_path.read_text(encoding="utf-8")) if stamp_path.is_file() else {}
        stamp.setdefault("sources", {})
        for part in self.parts():
            inputs = self._inputs(part)
            done = stamp["sources"].get(part.key, {})
            ready = all((chunks_dir(Path(self.packed_dir) / part.key, s) / "index.json").is_file() for s in SPLITS)
            if ready and done.get("inputs") == inputs:
                continue
            entry: dict[str, Any] = {"inputs": inputs}
            for split, items in self._split_items(part).items():
                packing = Packing(part.source, tokenizer, self.seq_len)
                out = chunks_dir(Path(self.packed_dir) / part.key, split)
                try:
                    write_items(packing.rows(items()), out)
                except ValueError as e:
                    if packing.counts["rows"]:
                        raise
                    raise ValueError(f"{out}: source '{part.key}' has no {split} documents") from e
                entry[split] = packing.counts
            stamp["sources"][part.key] = entry
            stamp["seq_len"] = self.seq_len
            write_json(stamp_path, stamp)
            log.info("packed %s: %s", part.key, {s: entry[s] for s in SPLITS})
        return stamp

    def _split_items(self, part: Part) -> dict[str, Callable[[], Iterator[dict[str, Any]]]]:
        """Per split, a function that streams the raw items of ``part``. Speech, ASR and TTS follow the split of
        the speech tokens; text and interleaved documents go to val by a hash of their id (``streaming.split_of``),
        and when that leaves val empty, the last document goes there."""
        source, where = part.source, part.root
        if source in SPEECH_SOURCES:
            return {split: (lambda split=split: _stream(chunks_dir(where, split))) for split in SPLITS}
        if source == "text":
            def read() -> Iterator[dict[str, Any]]:
                return ({"id": i, "text": t} for i, t in read_documents(where))
        else:
            def read() -> Iterator[dict[str, Any]]:
                return _stream(Path(where) / "chunks")
        fraction = self.text_val_fraction
        held_out: set[str] = set()
        everything = False  # a single document is both the training and the validation set
        if not any(split_of(str(it["id"]), fraction) == "val" for it in read()):
            ids = [str(it["id"]) for it in read()]
            if not ids:
                raise ValueError(f"{where}: no {source} documents")
            held_out, everything = {ids[-1]}, len(ids) == 1

        def is_val(item: dict[str, Any]) -> bool:
            return str(item["id"]) in held_out or split_of(str(item["id"]), fraction) == "val"

        return {"train": lambda: (it for it in read() if everything or not is_val(it)),
                "val": lambda: (it for it in read() if is_val(it))}

    # ------------------------------------------------------------------ reading
    def packed_stats(self) -> dict[str, Any]:
        """``packed.json``: per source and split, documents, rows, tokens and trained tokens."""
        return json.loads((Path(self.packed_dir) / PACKED_STAMP).read_text(encoding="utf-8"))

    def rows_available(self, split: str = "train") -> dict[str, int]:
        """Rows of each active source in ``split``, summed over its corpora (read once per split after ``setup``)."""
        if split not in self._rows:
            stats = self.packed_stats()["sources"]
            rows = dict.fromkeys(self.active, 0)
            for p in self.parts():
                rows[p.source] += int(stats[p.key][split]["rows"])
            self._rows[split] = rows
        return self._rows[split]

    def _dataset(self, key: str, split: str) -> StreamingDataset:
        path = chunks_dir(Path(self.packed_dir) / key, split)
        if not (path / "index.json").is_file():
            raise FileNotFoundError(f"{path}: no packed rows (index.json); run prepare_data() or "
                                    f"`python -m lit_keomni fit` with this data module to build them")
        return StreamingDataset(str(path), shuffle=split == "train", seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        self._rows = {}
        for part in self.parts():
            if part.key not in self.train_sets:
                self.train_sets[part.key] = self._dataset(part.key, "train")
                self.val_sets[part.key] = self._dataset(part.key, "val")

    def train_dataloader(self) -> StreamingDataLoader:
        """Rows of all active sources (and corpora) mixed by weight. Workers are not persistent: litdata reshuffles
        the sources of a combined dataset only in fresh workers. The last batch of an epoch may be short."""
        parts, weights = self.parts(), self.part_weights()
        for part in parts:
            if self.train_sets[part.key].get_len(self.num_workers, self.batch_size) == 0:
                rows = self.packed_stats()["sources"][part.key]["train"]["rows"]
                raise ValueError(f"{chunks_dir(Path(self.packed_dir) / part.key, 'train')}: source '{part.key}' has no "
                                 f"training rows for this process (it has {rows} rows, split over ranks and loader "
                                 f"workers in whole batches of {self.batch_size}); give it a weight of 0 in "
                                 f"'mixture', or more data")
        mixture = Mixture([self.train_sets[p.key] for p in parts], [weights[p.key] for p in parts], self.seed)
        return ResumableLoader(mixture, batch_size=self.batch_size, num_workers=self.num_workers,
                                   collate_fn=pretrain_collate)

    def _val_loaders(self) -> list[StreamingDataLoader]:
        return [StreamingDataLoader(self.val_sets[p.key], batch_size=self.batch_size, num_workers=self.num_workers,
                                    collate_fn=pretrain_collate) for p in self.parts()]

    def val_dataloader(self) -> list[StreamingDataLoader]:
        """One loader per part (per active source, and per corpus of a mixture), in the order of ``parts()``; the
        stage adds the losses up per source."""
        return self._val_loaders()

    def test_dataloader(self) -> list[StreamingDataLoader]:
        return self._val_loaders()

    collate: Callable[[list[Any]], Any] = staticmethod(pretrain_collate)
