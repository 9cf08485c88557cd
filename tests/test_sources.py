"""Corpora in their own layouts (lhotse, Kaldi, Hugging Face, audio folders, text) prepared into utterance chunks.

Each format is built in a temp dir with its own library where one exists (lhotse, ``datasets``), prepared, and read
back; each bad input gives one error naming the file and the item, or with ``skip_invalid`` a report.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from litdata import StreamingDataset

from datamodules.sources import SourceError, SourceOptions, detect_format, gather, read_source
from datamodules.streaming import chunks_dir, prepare

RATE = 22050
"""Rate the test audio is written at: prepare resamples it to 16 kHz once."""
WORDS = ["one two three", "four five six", "seven eight nine", "ten one two", "three four five", "six seven eight"]


def _tone(seconds: float, sr: int = RATE, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _wav(path: Path, seconds: float, sr: int = RATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, _tone(seconds, sr), sr)
    return path


def _items(out: Path, split: str) -> list[dict]:
    ds = StreamingDataset(str(chunks_dir(out, split)))
    return [ds[i] for i in range(len(ds))]


def _all_items(out: Path) -> dict[str, dict]:
    return {it["id"]: it for split in ("train", "val") for it in _items(out, split)}


def make_folder(root: Path, n: int = 6, transcripts: bool = True) -> Path:
    for i in range(n):
        wav = _wav(root / f"spk{i % 2}" / f"utt{i}.wav", 0.3 + 0.1 * i)
        if transcripts:
            wav.with_suffix(".txt" if i % 2 else ".lab").write_text(WORDS[i % len(WORDS)] + "\n", encoding="utf-8")
    return root


def make_kaldi(root: Path, piped: bool = False, past_end: bool = False) -> Path:
    """Two 2 s recordings cut into three segments each; utt2spk, text, utt2lang for one utterance."""
    root.mkdir(parents=True, exist_ok=True)
    scp, seg, text, spk = [], [], [], []
    for r in range(2):
        wav = _wav(root / "wav" / f"rec{r}.wav", 2.0)
        scp.append(f"rec{r} {wav}")
        for k in range(3):
            uid = f"rec{r}_{k}"
            end = 0.6 * k + 0.5 if not (past_end and r == 1 and k == 2) else 2.5
            seg.append(f"{uid} rec{r} {0.6 * k:.2f} {end:.2f}")
            text.append(f"{uid} {WORDS[3 * r + k]}")
            spk.append(f"{uid} spk{r}")
    if piped:
        scp[1] = "rec1 sox /data/rec1.flac -t wav - |"
    (root / "wav.scp").write_text("\n".join(scp) + "\n", encoding="utf-8")
    (root / "segments").write_text("\n".join(seg) + "\n", encoding="utf-8")
    (root / "text").write_text("\n".join(text) + "\n", encoding="utf-8")
    (root / "utt2spk").write_text("\n".join(spk) + "\n", encoding="utf-8")
    (root / "utt2lang").write_text("rec0_0 zh\n", encoding="utf-8")
    return root


def make_lhotse(root: Path, cuts: bool, past_end: bool = False) -> Path:
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    root.mkdir(parents=True, exist_ok=True)
    recs, sups = [], []
    for r in range(2):
        recs.append(Recording.from_file(str(_wav(root / "audio" / f"rec{r}.wav", 2.0)), recording_id=f"rec{r}"))
        for k in range(3):
            duration = 0.5 if not (past_end and r == 1 and k == 2) else 1.2  # 1.2 + 1.2 > 2.0 s
            sups.append(SupervisionSegment(id=f"rec{r}-s{k}", recording_id=f"rec{r}", start=0.6 * k,
                                           duration=duration, text=WORDS[3 * r + k], speaker=f"spk{r}",
                                           language="zh" if k == 0 else None))
    recordings, supervisions = RecordingSet.from_recordings(recs), SupervisionSet.from_segments(sups)
    if cuts:
        cut_set = CutSet.from_manifests(recordings=recordings, supervisions=supervisions).trim_to_supervisions()
        cut_set.to_file(root / "train_cuts.jsonl.gz")
    else:
        recordings.to_file(root / "train_recordings.jsonl.gz")
        supervisions.to_file(root / "train_supervisions.jsonl.gz")
    return root


def _wav_bytes(seconds: float) -> bytes:
    b = io.BytesIO()
    sf.write(b, _tone(seconds), RATE, format="WAV")
    return b.getvalue()


def make_hf(root: Path, kind: str, bad_row: int | None = None) -> Path:
    """A ``datasets`` dataset with an ``Audio`` column of embedded wav bytes and a ``sentence`` column, written with
    ``save_to_disk`` or ``to_parquet``."""
    import datasets

    audio = [{"bytes": _wav_bytes(0.3 + 0.1 * i), "path": None} for i in range(6)]
    if bad_row is not None:
        audio[bad_row] = {"bytes": b"not audio at all", "path": None}
    ds = datasets.Dataset.from_dict({"audio": audio, "sentence": WORDS, "lang": ["en"] * 5 + ["zh"]})
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    if kind == "disk":
        ds.save_to_disk(str(root))
    else:
        root.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "train-00000.parquet"))
    return root


HF = SourceOptions(text_column="sentence", language_column="lang")


def _prepare(src: Path, out: Path, fmt: str, options: SourceOptions | None = None, **kw) -> dict:
    return prepare(out, src, format=fmt, options=options, workers=1, tokenizer_vocab=60, val_fraction=0.3,
                   progress=False, **kw)


# ------------------------------------------------------------------------------------------------------- formats
def test_folder_with_transcripts_resampled_once_to_16k(tmp_path):
    src = make_folder(tmp_path / "corpus")
    assert detect_format(src) == "folder"
    stamp = _prepare(src, tmp_path / "out", "folder", SourceOptions(language="en"))
    assert stamp["sample_rate"] == 16000 and stamp["format"] == "folder"
    items = _all_items(tmp_path / "out")
    assert sorted(items) == [f"spk{i % 2}/utt{i}" for i in range(6)] or len(items) == 6
    it = items["spk1/utt3"]
    assert it["text"] == WORDS[3] and it["sample_rate"] == 16000 and it["language"] == "en"
    assert len(it["audio"]) == pytest.approx(0.6 * 16000, abs=2)
    assert it["speaker"] == "spk1"
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_folder_without_transcripts_is_unsupervised_speech(tmp_path):
    src = make_folder(tmp_path / "corpus", transcripts=False)
    stamp = _prepare(src, tmp_path / "out", "folder")
    assert sum(stamp["utterances"].values()) == 6 and sum(stamp["transcribed"].values()) == 0
    assert all(it["text"] == "" for it in _all_items(tmp_path / "out").values())
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def make_librispeech(root: Path) -> Path:
    """LibriSpeech's layout: speaker/chapter/ folders of ``spk-chap-NNNN.flac`` and one ``spk-chap.trans.txt``."""
    for spk, chap in (("84", "121123"), ("174", "50561")):
        folder = root / spk / chap
        lines = []
        for k in range(3):
            uid = f"{spk}-{chap}-{k:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            sf.write(folder / f"{uid}.flac", _tone(0.4 + 0.1 * k, 16000), 16000)
            lines.append(f"{uid} {WORDS[k].upper()}")
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_librispeech_chapter_transcripts(tmp_path):
    src = make_librispeech(tmp_path / "LibriSpeech" / "dev-clean")
    assert detect_format(src) == "folder"
    _prepare(src, tmp_path / "out", "folder")
    items = _all_items(tmp_path / "out")
    assert len(items) == 6
    it = items["174/50561/174-50561-0002"]
    assert it["text"] == WORDS[2].upper() and it["speaker"] == "174" and it["sample_rate"] == 16000
    assert len(it["audio"]) == pytest.approx(0.6 * 16000, abs=2)


def test_librispeech_bad_tables_name_file_line_and_item(tmp_path):
    src = make_librispeech(tmp_path / "ls")
    table = src / "84" / "121123" / "84-121123.trans.txt"
    table.write_text(table.read_text() + "84-121123-0009 NO SUCH FILE\n", encoding="utf-8")
    msg = _error(src, "folder")
    assert f"{table}:4" in msg and "'84/121123/84-121123-0009'" in msg and "transcript without audio" in msg
    table.write_text("84-121123-0000 ONE\n84-121123-0001 TWO\n", encoding="utf-8")  # 0002 is not listed
    msg = _error(src, "folder")
    assert "84-121123-0002.flac" in msg and "nor a line in a .trans.txt table" in msg


def test_kaldi_segments_cut_from_recordings(tmp_path):
    src = make_kaldi(tmp_path / "kaldi")
    assert detect_format(src) == "kaldi"
    _prepare(src, tmp_path / "out", "kaldi", SourceOptions(language="en"))
    items = _all_items(tmp_path / "out")
    assert len(items) == 6
    it = items["rec1_2"]
    assert it["text"] == WORDS[5] and it["speaker"] == "spk1" and it["dialogue_id"] == "rec1"
    assert len(it["audio"]) == pytest.approx(0.5 * 16000, abs=2)
    assert items["rec0_0"]["language"] == "zh" and items["rec0_1"]["language"] == "en"
    # recordings, not segments, are split: no recording's segments on both sides
    train = {it["dialogue_id"] for it in _items(tmp_path / "out", "train")}
    assert not train & {it["dialogue_id"] for it in _items(tmp_path / "out", "val")}


def test_kaldi_segment_audio_is_the_recordings_samples(tmp_path):
    """The chunk holds exactly the recording's samples from the segment's start (same rate: no resampling)."""
    root = tmp_path / "kaldi"
    root.mkdir()
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 32000).astype(np.float32)
    sf.write(root / "r.wav", x, 16000, subtype="PCM_16")
    (root / "wav.scp").write_text("r r.wav\n")
    (root / "segments").write_text("a r 0.5 1.0\nb r 1.25 -1\n")
    (root / "text").write_text("a one\nb two\n")
    utts = gather(read_source(root, "kaldi", SourceOptions()), root, max_duration=30)
    from datamodules.streaming import utterance_item
    a, b = (utterance_item(u, 16000)["audio"] for u in utts)
    ref = np.round(sf.read(root / "r.wav", dtype="float32")[0] * 32767).astype(np.int16)
    np.testing.assert_allclose(a, ref[8000:16000], atol=1)
    np.testing.assert_allclose(b, ref[20000:], atol=1)


@pytest.mark.parametrize("cuts", [True, False], ids=["cutset", "recordings+supervisions"])
def test_lhotse_supervisions_become_segments(tmp_path, cuts):
    src = make_lhotse(tmp_path / "lhotse", cuts)
    assert detect_format(src) == "lhotse"
    _prepare(src, tmp_path / "out", "lhotse", SourceOptions(language="en"))
    items = _all_items(tmp_path / "out")
    assert sorted(items) == sorted(f"rec{r}-s{k}" for r in range(2) for k in range(3))
    it = items["rec1-s2"]
    assert it["text"] == WORDS[5] and it["speaker"] == "spk1" and it["language"] == "en"
    assert len(it["audio"]) == pytest.approx(0.5 * 16000, abs=2)
    assert items["rec0-s0"]["language"] == "zh"


@pytest.mark.parametrize("kind", ["disk", "parquet"])
def test_hf_dataset_audio_bytes_and_columns(tmp_path, kind):
    src = make_hf(tmp_path / "hf", kind)
    assert detect_format(src) == "hf"
    _prepare(src, tmp_path / "out", "hf", HF)
    items = list(_all_items(tmp_path / "out").values())
    assert len(items) == 6
    by_text = {it["text"]: it for it in items}
    assert len(by_text[WORDS[4]]["audio"]) == pytest.approx(0.7 * 16000, abs=2)
    assert by_text[WORDS[5]]["language"] == "zh" and by_text[WORDS[0]]["language"] == "en"


@pytest.mark.parametrize("kind", ["disk", "parquet"])
def test_hf_dataset_keeps_its_own_splits(tmp_path, kind):
    """A DatasetDict (``save_to_disk``) or parquet files named by split: train rows train, the others validate."""
    import datasets

    def split(names: list[int]) -> datasets.Dataset:
        ds = datasets.Dataset.from_dict({"id": [f"u{i}" for i in names], "sentence": [WORDS[i % 6] for i in names],
                                         "audio": [{"bytes": _wav_bytes(0.3), "path": None} for _ in names]})
        return ds.cast_column("audio", datasets.Audio(decode=False))

    splits = {"train": split([0, 1, 2, 3, 4, 5, 6, 7]), "validation": split([8, 9]), "test": split([10])}
    src = tmp_path / "hf"
    if kind == "disk":
        datasets.DatasetDict(splits).save_to_disk(str(src))
    else:
        (src / "data").mkdir(parents=True)
        for name, ds in splits.items():
            ds.to_parquet(str(src / "data" / f"{name}-00000-of-00001.parquet"))
    stamp = _prepare(src, tmp_path / "out", "hf", SourceOptions(text_column="sentence"))
    assert sorted(it["id"] for it in _items(tmp_path / "out", "val")) == ["u10", "u8", "u9"]
    assert len(_items(tmp_path / "out", "train")) == 8
    assert stamp["source_splits"] == {"test": 1, "train": 8, "validation": 2}


def test_hf_audio_paths_relative_to_the_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "hf"
    for i in range(3):
        _wav(root / "clips" / f"c{i}.wav", 0.4)
    pq.write_table(pa.table({"path": [f"clips/c{i}.wav" for i in range(3)], "text": WORDS[:3]}), root / "t.parquet")
    utts = gather(read_source(root, "hf", SourceOptions(audio_column="path")), root, max_duration=30)
    assert [u.audio_path for u in utts] == [root / "clips" / f"c{i}.wav" for i in range(3)]


def test_text_corpus_jsonl_txt_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lit_keomni.interleave import read_documents

    src = tmp_path / "text"
    src.mkdir()
    (src / "a.txt").write_text("first line\n\nsecond line\n", encoding="utf-8")
    (src / "b.jsonl").write_text(json.dumps({"id": "x", "text": "a json document"}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"body": ["parquet one", "parquet two"]}), src / "c.parquet")
    stamp = prepare(tmp_path / "out", src, format="text", options=SourceOptions(text_column="body"))
    assert stamp["documents"] == 5
    docs = [t for _, t in read_documents(stamp["text_source"])]
    assert docs == ["first line", "second line", "a json document", "parquet one", "parquet two"]


# ------------------------------------------------------------------------------------------------------- bad input
def _error(src: Path, fmt: str, options: SourceOptions = SourceOptions()) -> str:
    with pytest.raises((SourceError, FileNotFoundError)) as e:
        gather(read_source(src, fmt, options), src, max_duration=30)
    return str(e.value)


def test_folder_transcript_without_audio_names_file_and_item(tmp_path):
    src = make_folder(tmp_path / "corpus")
    (src / "spk0" / "utt0.wav").unlink()
    msg = _error(src, "folder")
    assert str(src / "spk0" / "utt0.lab") in msg and "'spk0/utt0'" in msg and "transcript without audio" in msg


def test_folder_audio_without_transcript_names_it(tmp_path):
    src = make_folder(tmp_path / "corpus")
    (src / "spk1" / "utt1.txt").unlink()
    msg = _error(src, "folder")
    assert str(src / "spk1" / "utt1.wav") in msg and "'spk1/utt1'" in msg and "no transcript" in msg


def test_kaldi_piped_command_refused(tmp_path):
    src = make_kaldi(tmp_path / "kaldi", piped=True)
    msg = _error(src, "kaldi")
    assert f"{src / 'wav.scp'}:2" in msg and "'rec1'" in msg and "piped command" in msg


def test_kaldi_missing_audio_and_transcript_without_audio(tmp_path):
    src = make_kaldi(tmp_path / "kaldi")
    (src / "wav" / "rec0.wav").unlink()
    msg = _error(src, "kaldi")
    assert "'rec0_0'" in msg and "audio file not found" in msg and str(src / "segments") in msg
    src = make_kaldi(tmp_path / "kaldi2")
    with open(src / "text", "a", encoding="utf-8") as f:
        f.write("ghost hello there\n")
    msg = _error(src, "kaldi")
    assert f"{src / 'text'}:7" in msg and "'ghost'" in msg and "transcript without audio" in msg


def test_kaldi_segment_past_the_end(tmp_path):
    src = make_kaldi(tmp_path / "kaldi", past_end=True)
    msg = _error(src, "kaldi")
    assert f"{src / 'segments'}:6" in msg and "'rec1_2'" in msg and "past the end of its recording" in msg


@pytest.mark.parametrize("cuts", [True, False], ids=["cutset", "recordings+supervisions"])
def test_lhotse_supervision_past_the_end_of_its_recording(tmp_path, cuts):
    src = make_lhotse(tmp_path / "lhotse", cuts, past_end=True)
    msg = _error(src, "lhotse")
    assert "'rec1-s2'" in msg and "past the end of recording 'rec1'" in msg and ".jsonl.gz" in msg


def test_lhotse_bad_manifest_names_file(tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    (src / "x_cuts.jsonl").write_text('{"id": "c1", "start": 0\n', encoding="utf-8")
    msg = _error(src, "lhotse")
    assert str(src / "x_cuts.jsonl") in msg and "not a lhotse cuts manifest" in msg


def test_hf_unreadable_row_names_file_and_row(tmp_path):
    src = make_hf(tmp_path / "hf", "parquet", bad_row=2)
    msg = _error(src, "hf", HF)
    assert str(src / "train-00000.parquet") in msg and "'train-00000-2'" in msg and "unreadable audio" in msg
    assert "audio" in msg


def test_hf_unknown_column_names_the_columns(tmp_path):
    src = make_hf(tmp_path / "hf", "disk")
    msg = _error(src, "hf", SourceOptions(text_column="transcript"))
    assert "data-00000-of-00001.arrow" in msg and "unknown column 'transcript'" in msg and "'sentence'" in msg
    assert "--text-column" in msg


def test_skip_invalid_writes_a_report_and_keeps_the_rest(tmp_path):
    src = make_kaldi(tmp_path / "kaldi", past_end=True)
    out = tmp_path / "out"
    stamp = _prepare(src, out, "kaldi", skip_invalid=True)
    assert sum(stamp["utterances"].values()) == 5
    rows = [json.loads(line) for line in (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1 and rows[0]["dialogue_id"] == "rec1_2" and rows[0]["field"] == "end"
    assert "past the end" in rows[0]["reason"] and rows[0]["source"] == str(src / "segments")


def test_detect_refuses_ambiguous_layouts(tmp_path):
    src = make_kaldi(tmp_path / "both")
    make_lhotse(src, cuts=True)
    with pytest.raises(ValueError, match="cannot tell the corpus format.*kaldi.*--format"):
        detect_format(src)


def test_cli_prepare_folder_with_skip_invalid(tmp_path, capsys):
    from lit_keomni.cli import main

    src = make_folder(tmp_path / "corpus")
    (src / "spk0" / "utt2.wav").unlink()
    out = tmp_path / "out"
    main(["prepare", "--source", str(src), "--out", str(out), "--workers", "1", "--tokenizer-vocab", "60",
          "--skip-invalid"])
    printed = capsys.readouterr().out
    assert "folder utterances" in printed and "16000 Hz" in printed and "rejected.jsonl" in printed
    with pytest.raises(SystemExit, match="error: .*utt2.lab.*transcript without audio"):
        main(["prepare", "--source", str(src), "--out", str(tmp_path / "out2"), "--workers", "1"])


# ------------------------------------------------------------------------------------------------------- mixture
def test_stage1_trains_on_a_two_corpus_mixture(tmp_path):
    """An audio folder (prepared beforehand) and a Kaldi folder (prepared by ``prepare_data`` from its entry's
    ``source``, in spawned litdata workers) mixed 3:1; the tiny tokenizer trains and validates on both."""
    import lightning as L

    from datamodules.tokenizer import TokenizerDataModule
    from lit_keomni.checkpoints import Export
    from lit_keomni.stages.tokenizer import SpeechTokenizer
    from tests.conftest import STAGE1_TINY

    folder = tmp_path / "prepared_folder"
    _prepare(make_folder(tmp_path / "folder"), folder, "folder")
    kaldi = tmp_path / "prepared_kaldi"
    data = TokenizerDataModule(sources=[{"path": str(folder), "weight": 3},
                                        {"path": str(kaldi), "weight": 1, "source": str(make_kaldi(tmp_path / "kaldi")),
                                         "format": "kaldi", "language": "en"}],
                               batch_size=2, num_workers=0, val_fraction=0.3)
    data.prepare_data()
    data.setup()
    train_ids = [i for b in data.train_dataloader() for i in b["id"]]
    assert any("/" in i for i in train_ids) and any(i.startswith("rec") for i in train_ids)
    assert all(b["audio"].dtype.is_floating_point for b in data.val_dataloader())
    val_ids = {i for b in data.val_dataloader() for i in b["id"]}
    assert val_ids == {it["id"] for out in (folder, kaldi) for it in _items(out, "val")}

    L.seed_everything(3)
    model = SpeechTokenizer(config="tiny", overrides=STAGE1_TINY, tokenizer=str(folder / "tokenizer.json"),
                            warmup_steps=1, vq_start=0.5, kmeans_batches=1, export_dir=str(tmp_path / "export"))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        callbacks=[Export()], default_root_dir=str(tmp_path))
    trainer.fit(model, data)
    assert trainer.global_step == 3 and (tmp_path / "export" / "model.safetensors").is_file()
    assert np.isfinite(float(trainer.callback_metrics["val/loss"]))


def test_mixture_entries_are_checked(tmp_path):
    from datamodules.tokenizer import TokenizerDataModule

    with pytest.raises(ValueError, match=r"data.sources\[1\].weight: expected a positive number, got 0"):
        TokenizerDataModule(sources=[{"path": "a"}, {"path": "b", "weight": 0}])
    with pytest.raises(ValueError, match=r"data.sources\[0\]: unknown keys \['wieght'\]"):
        TokenizerDataModule(sources=[{"path": "a", "wieght": 1}])
    data = TokenizerDataModule(sources=[{"path": str(tmp_path / "nothing"), "weight": 1}])
    with pytest.raises(FileNotFoundError, match="nothing: data.sources entry is not prepared"):
        data.prepare_data()


def test_stage2_pairs_from_a_two_corpus_mixture(tmp_path, stage1_export):
    """Each corpus of ``data.sources`` is tokenized into its own folder under ``tokens_dir``; batches mix both."""
    from datamodules.text_to_token import TextToTokenDataModule

    corpora = {"folder": make_folder(tmp_path / "folder"), "kaldi": make_kaldi(tmp_path / "kaldi")}
    for fmt, src in corpora.items():
        _prepare(src, tmp_path / f"prepared_{fmt}", fmt)
    data = TextToTokenDataModule(speech_export=str(stage1_export), tokens_dir=str(tmp_path / "tokens"),
                                 sources=[{"path": str(tmp_path / "prepared_folder"), "weight": 1},
                                          {"path": str(tmp_path / "prepared_kaldi"), "weight": 1}],
                                 batch_size=2, num_workers=0)
    data.prepare_data()
    data.setup()
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == ["0-prepared_folder", "1-prepared_kaldi"]
    batches = list(data.train_dataloader())
    ids = [i for b in batches for i in b["id"]]
    assert any("/" in i for i in ids) and any(i.startswith("rec") for i in ids)
    assert all(b["input"].shape[0] in (1, 2) and (b["target"] != -100).any() for b in batches)  # a mixture's last
    # batch may be short (an epoch ends when a source runs out)

    unsupervised = tmp_path / "prepared_speech"
    _prepare(make_folder(tmp_path / "speech", transcripts=False), unsupervised, "folder")
    data = TextToTokenDataModule(speech_export=str(stage1_export), tokens_dir=str(tmp_path / "tokens2"),
                                 sources=[{"path": str(unsupervised), "weight": 1}])
    with pytest.raises(ValueError, match="prepared.json: field 'transcribed' is 0: stage 2"):
        data.prepare_data()


def test_prepared_chunks_streamed_from_object_storage(tmp_path):
    """A ``sources`` path that is a URL is streamed and cached by litdata (``local:`` stands in for ``s3://``)."""
    from datamodules.tokenizer import TokenizerDataModule

    out = tmp_path / "out"
    _prepare(make_folder(tmp_path / "folder"), out, "folder")
    data = TokenizerDataModule(sources=[{"path": f"local:{out}", "weight": 1}], batch_size=2, num_workers=0)
    data.prepare_data()  # nothing to build for a URL
    data.setup()
    ids = sorted(i for b in data.val_dataloader() for i in b["id"])
    assert ids == sorted(it["id"] for it in _items(out, "val"))
    assert next(iter(data.train_dataloader()))["audio"].shape[0] == 2


def test_stage3_unsupervised_speech_feeds_speech_rows_only(tmp_path, stage1_export):
    """Utterances without transcripts become speech documents; ASR and TTS documents skip (and count) them."""
    from datamodules.pretrain import Packing, _stream
    from lit_keomni.checkpoints import lm_tokenizer
    from lit_keomni.speech_tokens import tokenize

    prepared = tmp_path / "prepared"
    _prepare(make_folder(tmp_path / "speech", transcripts=False), prepared, "folder")
    tokenize(stage1_export, prepared, tmp_path / "tokens")
    tokenizer, _ = lm_tokenizer(str(stage1_export), None)
    items = list(_stream(chunks_dir(tmp_path / "tokens", "train")))
    speech = Packing("speech", tokenizer, 64)
    assert list(speech.rows(items)) and speech.counts["documents"] == len(items)
    asr = Packing("asr", tokenizer, 64)
    assert list(asr.rows(items)) == [] and asr.counts["untranscribed"] == len(items)


def test_detect_jsonl_dialogues_or_text(tmp_path):
    text = tmp_path / "docs.jsonl"
    text.write_text(json.dumps({"text": "a document"}) + "\n", encoding="utf-8")
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text(json.dumps({"id": "d1", "dialog": []}) + "\n", encoding="utf-8")
    assert (detect_format(text), detect_format(dialogues)) == ("text", "kespeechchat")


def test_stage3_mixes_speech_and_text_corpora_by_weight(tmp_path, stage1_export):
    """Stage 3 over three corpora: transcribed speech feeds speech, ASR and TTS rows, unsupervised speech feeds speech
    rows only, a text corpus the text rows; each part packed on its own, its share split by the corpus weights; a
    model trains two steps on it and validation reports each source."""
    import lightning as L

    from datamodules.pretrain import PretrainDataModule
    from lit_keomni.stages.pretrain import Pretrain

    _prepare(make_folder(tmp_path / "asr", n=12), tmp_path / "p_asr", "folder")
    _prepare(make_folder(tmp_path / "speech", n=12, transcripts=False), tmp_path / "p_speech", "folder")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": str(i), "text": f"document {i} " + WORDS[i % 6]}) + "\n"
                            for i in range(40)), encoding="utf-8")
    _prepare(docs, tmp_path / "p_text", "text")
    args = dict(speech_export=str(stage1_export), text_to_token_export=None, tokens_dir=str(tmp_path / "tokens"),
                packed_dir=str(tmp_path / "packed"), seq_len=32, batch_size=4, num_workers=0, text_fraction=0.25,
                mixture={"speech": 1.0, "asr": 1.0, "tts": 1.0},
                sources=[{"path": str(tmp_path / "p_asr"), "weight": 3}, {"path": str(tmp_path / "p_speech"), "weight": 1},
                         {"path": str(tmp_path / "p_text"), "weight": 1}])
    data = PretrainDataModule(**args)
    data.prepare_data()
    data.setup()
    weights = data.part_weights()
    assert sorted(weights) == ["asr/0-p_asr", "speech/0-p_asr", "speech/1-p_speech", "text/2-p_text", "tts/0-p_asr"]
    assert weights["text/2-p_text"] == pytest.approx(0.25) and sum(weights.values()) == pytest.approx(1.0)
    assert weights["speech/0-p_asr"] == pytest.approx(3 * weights["speech/1-p_speech"])
    assert weights["asr/0-p_asr"] == pytest.approx(0.25)  # the only transcribed corpus takes all of ASR's share
    stats = data.packed_stats()["sources"]
    assert stats["speech/1-p_speech"]["train"]["documents"] == len(_items(tmp_path / "p_speech", "train"))
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == ["0-p_asr", "1-p_speech"]
    seen = {i.split("/")[0] for b in data.train_dataloader() for i in b["id"]}
    assert seen == {"text", "speech", "asr", "tts"}
    assert data.rows_available()["speech"] == stats["speech/0-p_asr"]["train"]["rows"] + stats["speech/1-p_speech"]["train"]["rows"]

    L.seed_everything(5)
    model = Pretrain(config="tiny", overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1,
                                               "intermediate_size": 64, "block_size": 32},
                     speech_export=str(stage1_export), warmup_steps=1, export_dir=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        val_check_interval=2, check_val_every_n_epoch=None, default_root_dir=str(tmp_path))
    trainer.fit(model, PretrainDataModule(**args))
    assert {"val/loss_text", "val/loss_speech", "val/loss_asr", "val/loss_tts"} <= set(trainer.callback_metrics)

    only_speech = {**args, "sources": [{"path": str(tmp_path / "p_speech"), "weight": 1}],
                   "packed_dir": str(tmp_path / "packed2")}
    with pytest.raises(ValueError, match="'mixture' gives source 'asr' a weight, but no corpus of data.sources can "
                                         "feed it \\(none has transcripts"):
        PretrainDataModule(**only_speech).prepare_data()


def test_dialogue_corpus_gets_a_16k_copy_that_stage1_reads(prepared):
    """The built-in corpus is stored at 22,050 Hz (the vocoder rate) with a 16 kHz copy of the same utterances, which
    the stage-1 loader reads: no resampling per epoch."""
    import soxr

    from datamodules.streaming import SPEECH_CHUNKS, STAMP
    from datamodules.tokenizer import TokenizerDataModule

    stamp = json.loads((prepared / STAMP).read_text())
    assert stamp["sample_rate"] == 22050 and stamp["speech_chunks"] == {"dir": SPEECH_CHUNKS, "sample_rate": 16000}
    for split in ("train", "val"):
        full = {it["id"]: it for it in _items(prepared, split)}
        copy = StreamingDataset(str(prepared / SPEECH_CHUNKS / split))
        copy = {copy[i]["id"]: copy[i] for i in range(len(copy))}
        assert sorted(copy) == sorted(full)
        some = next(iter(copy))
        assert copy[some]["sample_rate"] == 16000 and copy[some]["text"] == full[some]["text"]
        again = soxr.resample(full[some]["audio"].astype(np.float32) / 32768, 22050, 16000)
        assert np.abs(copy[some]["audio"] / 32768 - again).max() < 2e-3  # one resampling of the same utterance
    data = TokenizerDataModule(data_dir=str(prepared), batch_size=2, num_workers=0)
    data.setup()
    assert Path(data.datasets["train"].input_dir.path) == prepared / SPEECH_CHUNKS / "train"


def test_bucketed_order_gives_chunks_of_similar_length_and_mixed_content(prepared, tmp_path, monkeypatch):
    """Stage 1's copy is written in bucketed order: every chunk is a run of similar durations drawn from a random window
    of the corpus (whole chunks, also when two workers write them), so a batch pads little yet mixes sentences."""
    import datamodules.streaming as st

    rng = np.random.default_rng(0)
    durations = rng.gamma(4.0, 0.6, size=1000)
    chunks = st.bucketed(list(range(1000)), seed=1, duration=lambda i: durations[i], chunk_items=32, buckets=8)
    assert sorted(i for c in chunks for i in c) == list(range(1000)) and {len(c) for c in chunks[:-1]} == {32}

    def padding(batches):  # padded audio over real audio
        return np.mean([durations[b].max() * len(b) / durations[b].sum() for b in batches])

    shuffled = rng.permutation(1000)
    assert padding(chunks) < 1.2 < 1.8 < padding([shuffled[i:i + 32] for i in range(0, 1000, 32)])
    by_length = np.argsort(durations)
    rank = np.empty(1000, int)
    rank[by_length] = np.arange(1000)
    assert np.mean([np.ptp(rank[c]) for c in chunks]) > 3 * 32  # not neighbours in length order: drawn at random

    monkeypatch.setattr(st, "BUCKET_ITEMS", 4)
    monkeypatch.setattr(st, "BUCKETS", 3)
    out = tmp_path / "bucketed"
    st.prepare(out, prepared / "corpus", workers=2, seed=7, val_fraction=0.2, progress=False)
    for where in (out / "chunks" / "train", out / st.SPEECH_CHUNKS / "train"):
        sizes = [c["chunk_size"] for c in json.loads((where / "index.json").read_text())["chunks"]]
        ds = StreamingDataset(str(where))
        lengths = [len(ds[i]["audio"]) for i in range(len(ds))]
        starts = np.cumsum([0] + sizes)
        assert sorted(sizes)[1:] == [4] * (len(sizes) - 1)  # one short chunk at most (the corpus's remainder)
        for a, b in zip(starts[:-1], starts[1:]):
            assert lengths[a:b] == sorted(lengths[a:b])  # one chunk = one group, in order of length
    assert len(ds) == len(_items(prepared, "train"))
