"""interleave.py: span statistics, interleaved sequences, and a resumable end-to-end run with a tiny random model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_keomni import checkpoints
from lit_keomni.configs import TransformerConfig
from lit_keomni.interleave import (
    BEGIN_AUDIO,
    END_AUDIO,
    build_interleaved,
    document_rng,
    interleave,
    interleave_corpus,
    read_documents,
    span_corruption,
)
from lit_keomni.nn.transformer import Transformer
from lit_keomni.text.tokenizer import TextTokenizer

STATS_FIELDS = ("documents", "spans", "text_tokens", "speech_tokens", "total_tokens", "speech_ratio", "corruption_ratio",
                "mean_span_length", "speech_tokens_per_s", "source_text_tokens", "corrupted_text_tokens")


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_span_statistics_match_ratio_and_poisson_mean(ratio):
    rng = np.random.default_rng(0)
    total = covered = n_spans = 0
    for _ in range(3000):
        n = int(rng.integers(100, 401))
        spans = span_corruption(n, ratio=ratio, mean_span=10.0, rng=rng)
        assert all(0 <= s < e <= n for s, e in spans)
        assert all(e1 < s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), "sorted, non-overlapping, text between"
        total += n
        covered += sum(e - s for s, e in spans)
        n_spans += len(spans)
    assert abs(covered / total - ratio) < 0.05
    assert abs(covered / n_spans - 10.0) < 1.0


def test_span_placement_is_uniform_and_edge_cases():
    rng = np.random.default_rng(1)
    # one span of a fixed length on a 40-token document: every start position is about equally likely
    starts = np.zeros(40, int)
    for _ in range(4000):
        for s, _ in span_corruption(40, ratio=0.25, mean_span=10.0, rng=rng):
            starts[s] += 1
    used = starts[starts > 0]
    assert len(used) >= 30 and used.max() < 3 * used.mean()
    assert span_corruption(0, rng=rng) == []
    assert span_corruption(3, ratio=0.3, rng=rng) == []  # too short: the first span would overshoot by more than it adds
    assert span_corruption(200, ratio=0.0, rng=rng) == []
    full = span_corruption(200, ratio=1.0, rng=rng)
    assert sum(e - s for s, e in full) >= 190 and full[-1][1] <= 200
    with pytest.raises(ValueError, match="ratio"):
        span_corruption(10, ratio=1.5, rng=rng)
    # deterministic per document index
    assert span_corruption(300, rng=document_rng(7, 12)) == span_corruption(300, rng=document_rng(7, 12))


def test_build_interleaved_marks_spans_and_keeps_text():
    text = list(range(100, 120))
    spans = [(2, 5), (9, 10), (15, 20)]
    speech = [[1, 2], [3], [4, 5, 6]]
    seq = build_interleaved(text, spans, speech, begin_audio=90, end_audio=91)
    assert seq == [100, 101, 90, 1, 2, 91, 105, 106, 107, 108, 90, 3, 91, 110, 111, 112, 113, 114, 90, 4, 5, 6, 91]
    assert [t for t in seq if t >= 100] == [t for i, t in enumerate(text) if not any(s <= i < e for s, e in spans)]
    with pytest.raises(ValueError, match="out of order"):
        build_interleaved(text, [(5, 8), (6, 9)], [[1], [2]], 90, 91)


def test_read_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\n  \nsecond doc\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "third", "id": "x"}\n{"text": "fourth"}\n', encoding="utf-8")
    assert list(read_documents(tmp_path)) == [("a.txt:1", "first doc"), ("a.txt:4", "second doc"), ("x", "third"),
                                              ("b.jsonl:2", "fourth")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "oops"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'text'"):
        list(read_documents(bad))
    with pytest.raises(FileNotFoundError, match="missing"):
        list(read_documents(tmp_path / "missing"))

    from litdata.streaming.writer import BinaryWriter  # litdata chunks with a "text" field (the cloud route, locally)

    writer = BinaryWriter(str(tmp_path / "chunks"), chunk_bytes="1MB")
    for i, text in enumerate(["一只猫。", "", "a dog."]):
        writer[i] = {"text": text}
    writer.done()
    writer.merge()
    assert list(read_documents(tmp_path / "chunks")) == [("0", "一只猫。"), ("2", "a dog.")]


# ---------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def corpus():
    from datamodules.toy_world import toy_world_texts

    # One thread: a tiny model's matmuls only lose to thread hand-offs on shared cores (about 3x faster here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    sentences = toy_world_texts(3, 240)
    tokenizer = TextTokenizer.train(sentences, vocab_size=400)
    tokenizer.add_speech_tokens(16)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)).eval()
    docs = [" ".join(sentences[i: i + 12]) for i in range(0, 240, 12)]  # 20 documents of ~100-200 tokens
    yield model, tokenizer, docs
    torch.set_num_threads(threads)


def read_chunks(path: Path) -> dict[str, dict]:
    from litdata import StreamingDataset

    ds = StreamingDataset(str(path))
    items = [ds[i] for i in range(len(ds))]
    ids = [it["id"] for it in items]
    assert len(ids) == len(set(ids)), "a document appears twice"
    return {it["id"]: it for it in items}


def check_item(item, tokenizer, text_ids, spans):
    tokens = np.asarray(item["tokens"])
    assert tokens.dtype == np.int32
    boa, eoa = tokenizer.token_to_id(BEGIN_AUDIO), tokenizer.token_to_id(END_AUDIO)
    lo, hi = tokenizer.audio_token_offset, tokenizer.audio_token_offset + tokenizer.num_audio_tokens
    text, speech, n_segments, inside = [], 0, 0, False
    for t in tokens.tolist():
        if t == boa:
            assert not inside
            inside, n_segments = True, n_segments + 1
        elif t == eoa:
            assert inside
            inside = False
        elif inside:
            assert lo <= t < hi, "only speech tokens between the audio markers"
            speech += 1
        else:
            assert t < tokenizer.audio_token_offset and t not in (boa, eoa), "only text tokens outside them"
            text.append(t)
    assert not inside and n_segments == len(spans)
    assert text == [t for i, t in enumerate(text_ids) if not any(s <= i < e for s, e in spans)]
    assert (item["n_text"], item["n_speech"]) == (len(text), speech)


def test_end_to_end_resumable(corpus, tmp_path):
    model, tokenizer, docs = corpus
    export = tmp_path / "stage2-export"
    checkpoints.write_export(export, kind="text_to_token", config=model.config.to_dict(), state_dict=model.state_dict(),
                             extra={"speech_tokenizer": {"frame_rate_hz": 12.5, "codebook_size": 16}},
                             files={"tokenizer": tokenizer.save})
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(docs) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    kw = dict(ratio=0.3, mean_span=10.0, seed=5, batch_size=32, shard_size=8, temperature=1.0)

    # Run 1 through the command function (from the export): 12 documents = one full shard and a partial one.
    stats = interleave(str(export), str(src), str(out), limit=12, **kw)
    assert (stats["documents"], stats["shards_written"]) == (12, 2)
    assert len(read_chunks(out / "chunks")) == 12
    shard0 = {p: p.stat().st_mtime_ns for p in (out / "shards" / "00000").iterdir()}

    # Run 2, whole corpus: shard 0 is kept, the partial shard 1 is redone, shard 2 is new.
    kw["model_id"] = checkpoints.export_fingerprint(export)
    with pytest.raises(ValueError, match="field 'model_id'"):  # another model may not add shards
        interleave_corpus(model, tokenizer, src, out, **{**kw, "model_id": "another export"})
    stats = interleave_corpus(model, tokenizer, src, out, **kw)
    assert (stats["shards"], stats["shards_reused"], stats["shards_written"]) == (3, 1, 2)
    assert {p: p.stat().st_mtime_ns for p in (out / "shards" / "00000").iterdir()} == shard0
    items = read_chunks(out / "chunks")
    assert sorted(items) == sorted(f"docs.txt:{i + 1}" for i in range(20))
    for i, doc in enumerate(docs):
        ids = tokenizer.encode(doc)
        check_item(items[f"docs.txt:{i + 1}"], tokenizer, ids, span_corruption(len(ids), rng=document_rng(5, i)))

    saved = json.loads((out / "stats.json").read_text())
    assert all(f in saved for f in STATS_FIELDS)
    assert saved["documents"] == 20 and saved["spans"] > 20
    assert saved["text_tokens"] + saved["corrupted_text_tokens"] == saved["source_text_tokens"]
    assert saved["speech_tokens"] == sum(int(it["n_speech"]) for it in items.values())
    assert 0.2 < saved["corruption_ratio"] < 0.4 and 0 < saved["speech_ratio"] < 1

    # A killed run: the merge and shard 1 are gone, a half-written temp shard is left. The rerun redoes only shard 1,
    # with the same spans and samples as before.
    import shutil

    shutil.rmtree(out / "chunks")
    shutil.rmtree(out / "shards" / "00001")
    (out / "shards" / ".00001.half").mkdir()
    stats = interleave_corpus(model, tokenizer, src, out, **kw)
    assert (stats["shards_reused"], stats["shards_written"]) == (2, 1)
    assert not (out / "shards" / ".00001.half").exists()
    again = read_chunks(out / "chunks")
    assert sorted(again) == sorted(items)
    assert all(np.array_equal(again[k]["tokens"], items[k]["tokens"]) for k in items)

    with pytest.raises(ValueError, match="field 'ratio'"):
        interleave_corpus(model, tokenizer, src, out, **{**kw, "ratio": 0.5})
