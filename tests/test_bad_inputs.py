"""The bad-input matrix: every class of bad input gives one clear error naming the file and the field/reason, or, with
``skip_invalid``, a counted skip listed in the report — nothing is lost silently. tests/README.md lists each row with
the test that proves it, here or elsewhere (classes already covered elsewhere are referenced there, not repeated).
"""

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from litdata import StreamingDataset

from datamodules.kespeechchat import KeSpeechChatError, collect_utterances, write_dialogue
from lit_keomni.checkpoints import AtomicCheckpointIO, write_export
from tests.test_kespeechchat import SR, _assert_names, _corpus, _dialogue, _wav

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ dialogue/audio matrix
# A case damages dialogue "bad" (its dict and/or its files under the corpus root) beside an intact dialogue "good".
# It may return bytes that replace bad.json as written. Then: (field named in the error, reason, the dialogue id the
# error names or None, whether the whole dialogue is rejected (schema) or only that turn (audio)).
def _silence_wav(path: Path, seconds: float, sr: int) -> None:
    sf.write(path, np.zeros(int(seconds * sr), dtype=np.int16), sr, subtype="PCM_16")


def _nan_wav(root, d):
    x = np.full(SR // 2, 0.1, dtype=np.float32)
    x[100:110] = np.nan
    sf.write(root / "bad" / "bad_1.wav", x, SR, subtype="FLOAT")


def _non_utf8(root, d):
    return json.dumps(d).encode().replace(b"turn 0 text", b"turn 0 caf\xe9")  # Latin-1, not UTF-8


AUDIO_CASES = {  # id: (case, field, reason)
    "corrupt-wav": (lambda root, d: (root / "bad" / "bad_0.wav").write_bytes(b"RIFF\x00\x00junk" * 50),
                    "dialog[0].audio_path", "unreadable audio"),
    "zero-length-wav": (lambda root, d: sf.write(root / "bad" / "bad_1.wav", np.zeros(0, np.int16), SR),
                        "dialog[1].audio_path", "empty audio (0 frames)"),
    "nan-samples": (_nan_wav, "dialog[1].audio_path", "10 NaN/inf samples"),
    # 30 min of 8 kHz int16 silence (29 MB, written in well under a second): over the default max_duration of 30 s
    "30-minute-clip": (lambda root, d: _silence_wav(root / "bad" / "bad_0.wav", 1800, 8000),
                       "dialog[0].audio_path", "clip is 1800.00 s, longer than max_duration 30.0 s"),
    "missing-wav": (lambda root, d: (root / "bad" / "bad_1.wav").unlink(), "dialog[1].audio_path", "audio file not found"),
}
SCHEMA_CASES = {
    "empty-text": (lambda root, d: d["dialog"][1].update(text=" \t"), "dialog[1].text", "empty text"),
    "punctuation-only-text": (lambda root, d: d["dialog"][0].update(text="…?!。，"), "dialog[0].text",
                              "no letters or digits"),
    # one channel is one speaker's track: a turn may not start before the previous turn of its channel ends
    "overlapping-turns": (lambda root, d: d["dialog"].append(dict(d["dialog"][0], start=0.2, end=0.7)),
                          "dialog[2].start", "0.2 is before the end 0.5 of dialog[0] on the same channel 0"),
    "turns-out-of-order": (lambda root, d: d["dialog"].insert(0, dict(d["dialog"][0], start=2.0, end=2.5)),
                           "dialog[1].start", "0.0 is before the end 2.5 of dialog[0] on the same channel 0"),
    "non-utf8-json": (_non_utf8, "", "cannot read file ('utf-8' codec can't decode byte 0xe9"),
    "invalid-json": (lambda root, d: b'{"id": "bad", "speaker": ', "", "invalid JSON"),
}
REQUIRED = ["id", "speaker", "audio", "channel", "dialog",
            "speaker['spkA'].role", "speaker['spkA'].gender",
            "audio.channel", "audio.duration", "audio.sample_rate",
            "channel[0].channel_index", "channel[0].language",
            *(f"dialog[1].{k}" for k in ("channel", "speaker", "text", "start", "end", "audio_path")),
            *(f"dialog[0].words[0].{k}" for k in ("word", "start", "end"))]


def _drop(path: str):
    """A case removing the field at ``path`` (``a.b``, ``a[0].b``, ``speaker['x'].y``)."""
    parts = path.replace("[", ".").replace("]", "").split(".")
    keys = [int(k) if k.isdigit() else k.strip("'") for k in parts]

    def case(root, d):
        obj = d
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]
    return case


CASES = {
    **{k: (*v, "turn") for k, v in AUDIO_CASES.items()},
    **{k: (*v, "dialogue") for k, v in SCHEMA_CASES.items()},
    **{f"missing-{p}": (_drop(p), p, "missing field", "dialogue") for p in REQUIRED},
}


def _build(tmp_path: Path, case) -> Path:
    good, bad = _dialogue("good"), _dialogue("bad")
    root = _corpus(tmp_path / "data", [good, bad])
    raw = case(root, bad)
    if isinstance(raw, bytes):
        (root / "bad.json").write_bytes(raw)
    else:
        write_dialogue(bad, root / "bad.json")
    return root


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_error(tmp_path, name):
    case, field, reason, _ = CASES[name]
    root = _build(tmp_path, case)
    with pytest.raises(KeSpeechChatError) as e:
        collect_utterances(root, sample_rate=SR)
    _assert_names(e.value, str(root / "bad.json"), field, reason)
    assert e.value.field == field
    if name not in ("missing-id", "non-utf8-json", "invalid-json"):  # no id known yet / file-level
        _assert_names(e.value, "dialogue 'bad'")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_counted_skip_with_skip_invalid(tmp_path, name, caplog):
    case, field, reason, scope = CASES[name]
    root = _build(tmp_path, case)
    report = tmp_path / "rejected.jsonl"
    with caplog.at_level(logging.WARNING):
        utts = collect_utterances(root, sample_rate=SR, skip_invalid=True, report_path=report)
    rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1 and rows[0]["field"] == field and reason in rows[0]["reason"], rows
    assert rows[0]["source"] == str(root / "bad.json")
    kept = {u.id for u in utts}
    if scope == "turn":  # only the bad turn goes; the good turn of the same dialogue stays
        bad_turn = int(field.split("[")[1].split("]")[0])
        assert kept == {"good_0", "good_1", f"bad_{1 - bad_turn}"}
        assert "skipped 1 of 4 utterances and 0 invalid dialogues" in caplog.text
    else:
        assert kept == {"good_0", "good_1"}
        assert "skipped 0 of 2 utterances and 1 invalid dialogues" in caplog.text
    assert str(report) in caplog.text


def test_other_rates_and_stereo_are_resampled_and_downmixed(tmp_path):
    """Accepted, not errors: 8 kHz, 48 kHz and stereo clips come out of ``prepare`` mono at the chosen rate."""
    from datamodules.streaming import prepare

    d = _dialogue("mix", 4)
    root = _corpus(tmp_path / "src", [d])
    _wav(root / "mix" / "mix_0.wav", seconds=0.5, sr=8000)
    _wav(root / "mix" / "mix_1.wav", seconds=0.5, sr=48000)
    sf.write(root / "mix" / "mix_2.wav", np.stack([np.full(8000, 0.5), np.full(8000, -0.1)], axis=1), SR)  # L/R
    _wav(root / "mix" / "mix_3.wav", seconds=0.5, sr=22050)
    prepare(tmp_path / "out", root, sample_rate=22050, workers=1, tokenizer_vocab=60, progress=False)
    items = {}
    for split in ("train", "val"):
        ds = StreamingDataset(str(tmp_path / "out" / "chunks" / split))
        items.update({ds[i]["id"]: ds[i] for i in range(len(ds))})
    assert sorted(items) == ["mix_0", "mix_1", "mix_2", "mix_3"]
    for item in items.values():
        assert item["sample_rate"] == 22050 and item["audio"].ndim == 1 and item["audio"].dtype == np.int16
        assert abs(len(item["audio"]) - 0.5 * 22050) <= 2, (item["id"], len(item["audio"]))
    mid = items["mix_2"]["audio"][2000:9000]
    assert abs(np.median(mid) / 32767 - 0.2) < 2e-3  # (0.5 + -0.1) / 2


# ------------------------------------------------------------------------------------------------ CLI inputs
def test_missing_export_folder_is_one_line_error(prepared, tmp_path):
    """Stage 2 started before stage 1: ``fit`` says which export folder is missing, without a traceback."""
    missing = tmp_path / "stage1" / "export"
    r = subprocess.run([sys.executable, "-m", "lit_keomni", "fit", "--config", str(ROOT / "recipes" / "stage2.yaml"),
                        "--model.speech_export", str(missing), "--data.speech_export", str(missing),
                        "--data.data_dir", str(prepared), "--data.tokens_dir", str(tmp_path / "tokens"),
                        "--data.num_workers", "0", "--trainer.logger", "false",
                        "--trainer.default_root_dir", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"error: {missing}: export folder not found" in r.stderr


# --------------------------------------------------------------------------------------------------- disk full
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("where", ["safetensors.save_file", "os.replace"])
def test_disk_full_during_export_keeps_the_previous_export(tmp_path, monkeypatch, where):
    out = tmp_path / "export"
    write_export(out, kind="speech_tokenizer", config={"d": 1}, state_dict={"w": torch.zeros(3)})
    before = _snapshot(out)
    if where == "safetensors.save_file":
        monkeypatch.setattr("lit_keomni.checkpoints.save_file", _enospc)
    else:  # the final rename of the new folder over the old one (after the old one was moved aside)
        real = os.replace

        def replace(src, dst):
            if Path(dst) == out and not Path(src).name.endswith(".old"):
                _enospc()
            return real(src, dst)
        monkeypatch.setattr("lit_keomni.atomic.os.replace", replace)
    with pytest.raises(OSError) as e:
        write_export(out, kind="speech_tokenizer", config={"d": 2}, state_dict={"w": torch.ones(3)})
    assert e.value.errno == errno.ENOSPC
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or .old folder left


def test_disk_full_during_chunk_writes_keeps_the_previous_chunks(tmp_path, monkeypatch):
    from datamodules import streaming

    out = tmp_path / "chunks" / "train"
    out.mkdir(parents=True)
    (out / "index.json").write_text('{"chunks": ["previous"]}')

    def optimize(*, output_dir, **kwargs):
        (Path(output_dir) / "chunk-0-0.bin").write_bytes(b"half")
        _enospc()
    monkeypatch.setattr(streaming, "optimize", optimize)
    with pytest.raises(OSError, match="No space left"):
        streaming.write_chunks(len, ["a", "b"], out, workers=1)
    assert _snapshot(out) == {"index.json": b'{"chunks": ["previous"]}'}
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".cache")) == ["train"]


def test_disk_full_during_checkpoint_write_keeps_last_ckpt(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 4}, last)
    monkeypatch.setattr("lit_keomni.checkpoints.torch.save", _enospc)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 6}, last)
    assert io.load_checkpoint(last)["global_step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temp file was removed


# ------------------------------------------------------------------------------------------------ stale data
def test_tokens_of_another_export_are_not_current(tmp_path):
    """Speech tokens made with one stage-1 export are not reused after a re-export (stage 2 re-tokenizes)."""
    from lit_keomni.checkpoints import export_fingerprint
    from lit_keomni.speech_tokens import STAMP, tokens_are_current

    old = write_export(tmp_path / "old", kind="speech_tokenizer", config={"d": 1}, state_dict={"w": torch.zeros(3)})
    new = write_export(tmp_path / "new", kind="speech_tokenizer", config={"d": 1}, state_dict={"w": torch.ones(3)})
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / STAMP).write_text(json.dumps({"fingerprint": export_fingerprint(old), "splits": {"train": 3, "val": 1}}))
    assert tokens_are_current(tokens, old) and not tokens_are_current(tokens, new)
    assert not tokens_are_current(tmp_path / "no-tokens", old)


def test_chunk_writes_clear_temp_folders_of_a_killed_run(tmp_path):
    """A SIGKILL mid-write skips every cleanup: the next write of the same chunks removes the dead temp folder."""
    from litdata import StreamingDataset

    from datamodules.streaming import write_items

    out = tmp_path / "chunks" / "train"
    dead = tmp_path / "chunks" / ".train.abc123"
    dead.mkdir(parents=True)
    (dead / "chunk-0-0.bin").write_bytes(b"half")
    assert write_items(({"id": str(i), "x": i} for i in range(5)), out) == 5
    assert not dead.exists() and len(StreamingDataset(str(out))) == 5
