"""Interleaved speech-text data (GLM-4-Voice, seeds/003 §2.2 "Interleaved Data Construction", Table 6).

A text document becomes a sequence in which some text spans are replaced by their speech tokens:
``... text <|begin_of_audio|> speech tokens of the span <|end_of_audio|> text ...``.

- ``span_corruption``: span lengths ~ Poisson(λ=10) are drawn until they cover the ratio η (0.3) of the document,
  then placed at uniformly random, non-overlapping positions;
- the span texts are turned into 12.5 Hz speech tokens by the stage-2 text-to-token model (batched KV-cache sampling,
  prompt ``span text ids + <|begin_of_audio|>``, stop at ``<|end_of_audio|>``);
- ``interleave`` (the ``python -m lit_keomni interleave`` command) reads a text corpus, writes litdata chunks
  ``{"id", "tokens", "n_text", "n_speech"}`` shard by shard (resumable), merges them into ``out/chunks`` and writes
  Table-6 statistics to ``out/stats.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.streaming import is_remote
from lit_keomni import checkpoints
from lit_keomni.atomic import staged_dir, write_json
from lit_keomni.generate import generate
from lit_keomni.nn.transformer import Transformer
from lit_keomni.text.tokenizer import TextTokenizer

BEGIN_AUDIO = "<|begin_of_audio|>"
END_AUDIO = "<|end_of_audio|>"

SPEECH_PER_TEXT_TOKEN = 4.0
"""Default ceiling on speech tokens per text token of a span. Measured on the built-in espeak-ng corpus (12.5 Hz,
BPE of 1,000 tokens, 120 utterances en + zh, leading/trailing silence included): mean 2.8, 95th percentile 3.9,
largest 4.5 speech tokens per text token; with the slack of ``SPEECH_SLACK`` tokens per span, 4.0 cuts none of them."""
SPEECH_SLACK = 8
"""Extra speech tokens allowed per span on top of ``ceil(n_text * max_speech_per_text)`` (short spans, pauses)."""

SHARD_META = "shard.json"
RUN_META = "interleave.json"


# ---------------------------------------------------------------------------------------------------- spans


def span_corruption(n_tokens: int, *, ratio: float = 0.3, mean_span: float = 10.0,
                    rng: np.random.Generator) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ``(start, end)`` token intervals covering about ``ratio`` of ``n_tokens``.

    Span lengths are drawn from Poisson(``mean_span``) (zeros re-drawn) until their total reaches ``ratio * n_tokens``,
    as the paper. The span that crosses the target is kept or dropped, whichever leaves the total nearer the target
    (a coin decides ties): clipping it instead would make the ratio exact per document but pull the mean span length
    down (on 100-400-token documents, by ~6 %), while always keeping it overshoots the ratio by ~λ/2 tokens per
    document. Keep-or-drop is unbiased to first order for both. A document too short for any span gets none.

    Placement: the spans (in random order) and the ``n - total`` unselected tokens are laid out as a uniformly random
    composition of those tokens into the ``k + 1`` gaps, with at least one text token between spans when the document
    has room (else, η near 1, spans may touch).
    """
    if n_tokens < 0:
        raise ValueError(f"span_corruption: n_tokens={n_tokens} must be >= 0")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"span_corruption: ratio={ratio} must lie in [0, 1]")
    if mean_span <= 0:
        raise ValueError(f"span_corruption: mean_span={mean_span} must be > 0")
    target = ratio * n_tokens
    lengths: list[int] = []
    total = 0
    while total < target:
        length = int(rng.poisson(mean_span))
        if length == 0:
            continue
        over, under = total + length - target, target - total
        if over > under or (over == under and rng.random() < 0.5):
            break
        lengths.append(length)
        total += length
    if not lengths:
        return []
    if total > n_tokens:  # only when η is near 1: the kept crossing span ran past the end
        lengths[-1] -= total - n_tokens
        total = n_tokens
    k = len(lengths)
    lens = rng.permutation(np.asarray(lengths, dtype=np.int64))
    min_gap = 1 if n_tokens - total >= k - 1 else 0
    free = n_tokens - total - min_gap * (k - 1)
    # Stars and bars: k span "bars" among free + k slots; free tokens before span i = bars[i] - i.
    bars = np.sort(rng.choice(free + k, size=k, replace=False))
    before = np.concatenate(([0], np.cumsum(lens)[:-1]))
    starts = bars - np.arange(k) + before + min_gap * np.arange(k)
    return [(int(s), int(s + n)) for s, n in zip(starts, lens)]


def build_interleaved(text_ids: Sequence[int], spans: Sequence[tuple[int, int]],
                      speech_for_span: Sequence[Sequence[int]], begin_audio: int, end_audio: int) -> list[int]:
    """``text_ids`` with every span replaced by ``begin_audio + its speech tokens + end_audio``."""
    if len(spans) != len(speech_for_span):
        raise ValueError(f"build_interleaved: {len(spans)} spans but {len(speech_for_span)} speech sequences")
    out: list[int] = []
    pos = 0
    for (start, end), speech in zip(spans, speech_for_span):
        if not pos <= start < end <= len(text_ids):
            raise ValueError(f"build_interleaved: span ({start}, {end}) is empty, out of order or outside the "
                             f"{len(text_ids)} text tokens")
        out.extend(text_ids[pos:start])
        out.append(begin_audio)
        out.extend(speech)
        out.append(end_audio)
        pos = end
    out.extend(text_ids[pos:])
    return out


def document_rng(seed: int, index: int) -> np.random.Generator:
    """The span RNG of document ``index``: independent of batching and sharding, so a resumed run draws the same."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))


def _shard_seed(seed: int, shard: int) -> int:
    return int(np.random.SeedSequence(seed, spawn_key=(1, shard)).generate_state(1, np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------------------------------- documents


def read_documents(source: str | Path) -> Iterator[tuple[str, str]]:
    """``(id, text)`` of every non-blank document of ``source``, in a fixed order.

    ``source`` is a plain text file (one document per line; id ``name:line``), a ``.jsonl`` file (field ``"text"``;
    id from ``"id"`` if present, else ``name:line``), a folder of such files (all files below it, sorted by path), or a
    folder of litdata chunks (``index.json``) whose items have a ``"text"`` field, read with ``litdata.StreamingDataset``.
    For corpora in the cloud (``s3://``, ``gs://``, ...) that last route is the way: ``litdata.optimize`` the text
    into chunks once and pass their URL; ``StreamingDataset`` streams them.
    """
    s = str(source)
    if is_remote(s):
        yield from _read_streaming(s)
        return
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"interleave: text source not found: {path}")
    if path.is_dir():
        if (path / "index.json").is_file():
            yield from _read_streaming(str(path))
            return
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        for f in files:
            yield from _read_file(f, f.relative_to(path).as_posix())
    else:
        yield from _read_file(path, path.name)


def _read_file(path: Path, name: str) -> Iterator[tuple[str, str]]:
    jsonl = path.suffix == ".jsonl"
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not jsonl:
                yield f"{name}:{lineno}", line.rstrip("\r\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {err}") from err
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field 'text' missing or not a string")
            if text.strip():
                yield str(record.get("id", f"{name}:{lineno}")), text


def _read_streaming(url: str) -> Iterator[tuple[str, str]]:
    from litdata import StreamingDataset

    ds = StreamingDataset(url)
    for i in range(len(ds)):
        item = ds[i]
        text = item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{url}: item {i}: field 'text' missing or not a string")
        if text.strip():
            yield str(item.get("id", i)), text


# ---------------------------------------------------------------------------------------------------- generation


def interleave_documents(
    model: Transformer,
    tokenizer: TextTokenizer,
    docs: Sequence[tuple[str, str]],
    *,
    first_index: int = 0,
    ratio: float = 0.3,
    mean_span: float = 10.0,
    seed: int = 0,
    batch_size: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    max_speech_per_text: float = SPEECH_PER_TEXT_TOKEN,
    generator: torch.Generator | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Interleaved items for ``docs`` (``(id, text)``; document ``first_index + j`` draws its spans from
    ``document_rng(seed, first_index + j)``) and their counts (summed over the documents).

    All spans of all documents are generated together, sorted by length into batches of ``batch_size`` prompts so
    that rows of a batch finish at similar steps.
    """
    boa, eoa = tokenizer.token_to_id(BEGIN_AUDIO), tokenizer.token_to_id(END_AUDIO)
    lo = tokenizer.audio_token_offset
    block = model.config.block_size
    texts = tokenizer.encode_batch([t for _, t in docs])
    spans = [span_corruption(len(ids), ratio=ratio, mean_span=mean_span, rng=document_rng(seed, first_index + j))
             for j, ids in enumerate(texts)]
    jobs = [(j, s, e) for j, doc_spans in enumerate(spans) for s, e in doc_spans]
    prompts = [texts[j][s:e] + [boa] for j, s, e in jobs]
    limits = []
    for p in prompts:
        if len(p) >= block:
            raise ValueError(f"interleave: a span of {len(p) - 1} text tokens leaves no room in TransformerConfig field "
                             f"'block_size' ({block})")
        limits.append(math.ceil((len(p) - 1) * max_speech_per_text) + SPEECH_SLACK)
    speech: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda n: (len(prompts[n]), n))
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        room = block - max(len(prompts[n]) for n in idx)  # one left-padded batch shares the context
        for n in idx:
            limits[n] = min(limits[n], room)  # the limit a span is counted against in spans_at_limit
        outs = generate(model, [prompts[n] for n in idx], max_new_tokens=[limits[n] for n in idx],
                        temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=(eoa,), pad_id=tokenizer.pad_id,
                        generator=generator, allowed_ids=(lo, lo + tokenizer.num_audio_tokens))
        for n, out in zip(idx, outs):
            speech[n] = out
    seconds = time.perf_counter() - start

    per_doc: list[list[list[int]]] = [[] for _ in docs]
    for (j, _, _), out in zip(jobs, speech):
        per_doc[j].append(out)
    items = []
    for (doc_id, _), ids, doc_spans, doc_speech in zip(docs, texts, spans, per_doc):
        seq = build_interleaved(ids, doc_spans, doc_speech, boa, eoa)
        n_speech = sum(len(s) for s in doc_speech)
        n_text = len(ids) - sum(e - s for s, e in doc_spans)
        items.append({"id": doc_id, "tokens": np.asarray(seq, dtype=np.int32), "n_text": n_text, "n_speech": n_speech})
    counts = {
        "documents": len(docs),
        "spans": len(prompts),
        "source_text_tokens": sum(len(ids) for ids in texts),
        "corrupted_text_tokens": sum(len(p) - 1 for p in prompts),
        "text_tokens": sum(it["n_text"] for it in items),
        "speech_tokens": sum(it["n_speech"] for it in items),
        "marker_tokens": 2 * len(prompts),
        "spans_at_limit": sum(len(s) >= m for s, m in zip(speech, limits)),
        "empty_spans": sum(len(s) == 0 for s in speech),
        "generation_seconds": seconds,
    }
    return items, counts


# ---------------------------------------------------------------------------------------------------- shards


def _write_shard(items: list[dict[str, Any]], counts: dict[str, float], folder: Path) -> None:
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(folder), chunk_bytes="64MB")
    for i, item in enumerate(items):
        writer[i] = item
    writer.done()
    writer.merge()
    write_json(folder / SHARD_META, counts)


def _merge_shards(shard_dirs: list[Path], out: Path) -> None:
    """Combine the shards' chunks into ``out/chunks`` (built in a temp folder, then renamed)."""
    from litdata import merge_datasets

    with staged_dir(out / "chunks") as tmp:
        if len(shard_dirs) == 1:  # merge_datasets wants two or more inputs
            index = json.loads((shard_dirs[0] / "index.json").read_text(encoding="utf-8"))
            for chunk in index["chunks"]:
                shutil.copy2(shard_dirs[0] / chunk["filename"], tmp / chunk["filename"])
            shutil.copy2(shard_dirs[0] / "index.json", tmp / "index.json")
        else:
            merge_datasets([str(d) for d in shard_dirs], str(tmp), max_workers=2)


def _check_run(out: Path, settings: dict[str, Any]) -> None:
    """Shards of one output folder must come from one set of settings; the first run records them."""
    path = out / RUN_META
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key, value in settings.items():
            if old.get(key) != value:
                raise ValueError(f"{path}: field '{key}' is {old.get(key)!r} but this run has {value!r}; finished "
                                 f"shards in {out / 'shards'} were made with the old value (use a new out folder)")
    else:
        write_json(path, settings)


def _batched(it: Iterable[tuple[str, str]], n: int) -> Iterator[list[tuple[str, str]]]:
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk


def interleave_corpus(
    model: Transformer,
    tokenizer: TextTokenizer,
    source: str | Path,
    out: str | Path,
    *,
    ratio: float = 0.3,
    mean_span: float = 10.0,
    seed: int = 0,
    batch_size: int = 64,
    shard_size: int = 1000,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    max_speech_per_text: float = SPEECH_PER_TEXT_TOKEN,
    limit: int | None = None,
    model_id: str | None = None,
) -> dict[str, Any]:
    """``interleave`` with the text-to-token model and tokenizer already loaded (see ``interleave``).

    ``model_id`` names the model in ``out/interleave.json`` (``interleave`` gives the export's fingerprint), so a run
    resumed with another model fails instead of mixing shards of both.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"interleave: shard_size={shard_size} and batch_size={batch_size} must be >= 1")
    out = Path(out)
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    where = str(source) if is_remote(source) else str(Path(source).resolve())
    settings = {"source": where, "ratio": ratio, "mean_span": mean_span, "seed": seed, "shard_size": shard_size,
                "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "max_speech_per_text": max_speech_per_text, "vocab_size": tokenizer.vocab_size, "model_id": model_id}
    _check_run(out, settings)
    for stale in (*shards.glob(".*"), *out.glob(".chunks.*")):  # temp folders of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    device = model.embed.weight.device
    model.eval()

    docs = read_documents(source)
    if limit is not None:
        docs = islice(docs, limit)
    totals: dict[str, float] = {}
    shard_dirs: list[Path] = []
    written = reused = 0
    for k, shard_docs in enumerate(_batched(docs, shard_size)):
        final = shards / f"{k:05d}"
        meta = final / SHARD_META
        counts = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else None
        if counts is not None and counts["documents"] == len(shard_docs):
            reused += 1
        else:  # missing, or cut short by an earlier run's `limit`
            generator = torch.Generator(device=device).manual_seed(_shard_seed(seed, k))
            items, counts = interleave_documents(
                model, tokenizer, shard_docs, first_index=k * shard_size, ratio=ratio, mean_span=mean_span, seed=seed,
                batch_size=batch_size, temperature=temperature, top_k=top_k, top_p=top_p,
                max_speech_per_text=max_speech_per_text, generator=generator)
            with staged_dir(final) as tmp:
                _write_shard(items, counts, tmp)
            written += 1
            rate = counts["speech_tokens"] / max(counts["generation_seconds"], 1e-9)
            print(f"interleave: shard {k:05d}: {len(shard_docs)} documents, {counts['spans']} spans, "
                  f"{rate:,.0f} speech tokens/s", flush=True)
        shard_dirs.append(final)
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    if not shard_dirs:
        raise ValueError(f"interleave: no documents in {source}")
    _merge_shards(shard_dirs, out)

    stats = summarize(totals)
    stats.update(target_ratio=ratio, mean_span_target=mean_span, shards=len(shard_dirs), shards_written=written,
                 shards_reused=reused, chunks=str(out / "chunks"))
    write_json(out / "stats.json", stats)
    print(format_stats(stats), flush=True)
    return stats


def summarize(totals: dict[str, float]) -> dict[str, Any]:
    """Table-6 statistics from summed counts: totals and ratios (markers counted in ``total_tokens``)."""
    t = {k: (int(v) if k != "generation_seconds" else float(v)) for k, v in totals.items()}
    total = t["text_tokens"] + t["speech_tokens"] + t["marker_tokens"]
    spans = t["spans"]
    return {
        **t,
        "total_tokens": total,
        "speech_ratio": t["speech_tokens"] / total if total else 0.0,
        "corruption_ratio": t["corrupted_text_tokens"] / t["source_text_tokens"] if t["source_text_tokens"] else 0.0,
        "mean_span_length": t["corrupted_text_tokens"] / spans if spans else 0.0,
        "speech_per_text_token": t["speech_tokens"] / t["corrupted_text_tokens"] if t["corrupted_text_tokens"] else 0.0,
        "speech_tokens_per_s": t["speech_tokens"] / t["generation_seconds"] if t["generation_seconds"] > 0 else 0.0,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """A small table in the layout of seed 003 Table 6 (token counts, not billions), plus span statistics."""
    head = ("corruption ratio (η / measured)", "text tokens", "speech tokens", "speech ratio", "total tokens")
    row = (f"{stats['target_ratio']:.2f} / {stats['corruption_ratio']:.3f}", f"{stats['text_tokens']:,}",
           f"{stats['speech_tokens']:,}", f"{stats['speech_ratio']:.3f}", f"{stats['total_tokens']:,}")
    widths = [max(len(h), len(r)) for h, r in zip(head, row)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths),
             " | ".join(r.rjust(w) for r, w in zip(row, widths))]
    lines.append(f"{stats['documents']:,} documents, {stats['spans']:,} spans, mean span {stats['mean_span_length']:.2f} "
                 f"text tokens (λ={stats['mean_span_target']}), {stats['speech_per_text_token']:.2f} speech tokens per "
                 f"span text token, {stats['spans_at_limit']:,} spans cut at the length limit, "
                 f"{stats['empty_spans']:,} empty; {stats['speech_tokens_per_s']:,.0f} speech tokens/s")
    return "\n".join(lines)


def interleave(
    export: str,
    source: str,
    out: str,
    *,
    ratio: float = 0.3,
    mean_span: float = 10.0,
    seed: int = 0,
    batch_size: int = 64,
    shard_size: int = 1000,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    max_speech_per_text: float = SPEECH_PER_TEXT_TOKEN,
    device: str = "cpu",
    limit: int | None = None,
) -> dict[str, Any]:
    """Build interleaved speech-text pre-training data from a text corpus (seeds/003 §2.2).

    Every document is tokenised with the stage-2 export's tokenizer; ``span_corruption`` picks spans; the
    text-to-token model samples each span's speech tokens; the sequence keeps the other text. Documents are processed
    in shards of ``shard_size``: shard k goes to ``out/shards/{k:05d}`` through a temp folder renamed when complete, so a
    killed run, started again with the same arguments, skips finished shards (a shard cut short by ``limit`` is
    redone when a later run covers more documents). Finally the shards are merged into ``out/chunks`` (one
    ``litdata.StreamingDataset``; items ``{"id", "tokens" (int32), "n_text", "n_speech"}``) and the statistics of
    Table 6 go to ``out/stats.json`` and stdout. The same seed gives the same spans, however the run was interrupted.

    Args:
        export: Stage-2 (text-to-token) export folder.
        source: Text file (a document per line), ``.jsonl`` (field "text"), a folder of these, or litdata chunks
            with a "text" field (local folder or cloud URL such as ``s3://bucket/text``, streamed by litdata).
        out: Output folder (``shards/``, ``chunks/``, ``stats.json``, ``interleave.json``).
        ratio: Span corruption ratio η: fraction of each document's text tokens turned into speech.
        mean_span: λ of the Poisson distribution of span lengths, in text tokens.
        seed: Seed of the span draws (per document) and of the sampling (per shard).
        batch_size: Spans generated together.
        shard_size: Documents per resumable shard.
        temperature: Sampling temperature of the text-to-token model (0 = greedy).
        top_k: Sample among the k most likely speech tokens (None = all).
        top_p: Nucleus sampling threshold (None = off).
        max_speech_per_text: At most ``ceil(n * max_speech_per_text) + 8`` speech tokens for a span of n text tokens.
        device: Where the model runs ("cpu", "cuda", ...).
        limit: Process only the first ``limit`` documents.

    Returns:
        The statistics written to ``out/stats.json``.
    """
    model, tokenizer, _ = checkpoints.load_text_to_token(export)
    model = model.to(device)
    return interleave_corpus(model, tokenizer, source, out, ratio=ratio, mean_span=mean_span, seed=seed,
                             batch_size=batch_size, shard_size=shard_size, temperature=temperature, top_k=top_k,
                             top_p=top_p, max_speech_per_text=max_speech_per_text, limit=limit,
                             model_id=checkpoints.export_fingerprint(export))
