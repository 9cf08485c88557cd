"""The ``asr``, ``utmos`` and ``judge`` eval tasks end to end through ``python -m lit_keomni eval``: the ASR normaliser's
remaining cases, a stage-1 export transcribing prepared audio and the same audio as wav files, hand-computed error
rates of a pairs file, UTMOS with randomly initialised weights (no download), and the S2TIF judge against a local
OpenAI-compatible server."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lit_keomni.cli import main
from lit_keomni.eval.asr import error_rate, normalize


def _eval(*args: str) -> None:
    main(["eval", *map(str, args)])


def _report(out: Path, task: str) -> dict:
    assert (out / f"{task}.md").is_file()
    return json.loads((out / f"{task}.json").read_text())


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- normaliser


@pytest.mark.parametrize(("text", "language", "expected"), [
    ("我有３个苹果", "zh", "我有三个苹果"),  # full-width digit
    ("我用ｉＰｈｏｎｅ手机", "zh", "我用iphone手机"),  # full-width Latin letters, lower-cased
    ("你好,世界!", "zh", "你好世界"),  # half-width punctuation in Mandarin
    ("Ｉ ＣＡＮ'Ｔ", "en", "i can not"),  # full-width English, contraction expanded
    ("?!...", "en", ""),  # punctuation only
    ("……——·「」", "zh", ""),
    ("\t hello \n  world\u3000", "en", "hello world"),  # tabs, newlines, ideographic space
    ("hello\u00a0world", "en", "hello world"),  # no-break space
    ("你好\n世界\t", "zh", "你好世界"),
    ("HeLLo WoRLD", "en", "hello world"),  # case
    ("3.5", "zh", "三点五"),  # Chinese numerals from digits
    ("50%", "zh", "百分之五十"),
    ("２０２４年", "zh", "二零二四年"),
    ("1234", "zh", "一千二百三十四"),
    ("10万", "zh", "十万"),
    ("第二章", "zh", "第二章"),  # Chinese numerals are left as they are
    ("twenty one apples", "en", "21 apples"),
])
def test_normalize_cases(text: str, language: str, expected: str) -> None:
    assert normalize(text, language) == expected


def test_chinese_numerals_equal_digits_in_scoring() -> None:
    refs = ["水温是三点五度", "百分之五十的人", "二零二四年", "十万元"]
    hyps = ["水温是3.5度", "50%的人", "２０２４年", "100000元"]
    assert error_rate(refs, hyps, ["zh"] * 4)["cer_zh"] == 0
    assert error_rate(["Twenty-one Apples!"], ["21 apples"], ["en"])["wer_en"] == 0


# ---------------------------------------------------------------------------------------------------- asr task


def test_asr_pairs_hand_computed(tmp_path: Path) -> None:
    pairs = _jsonl(tmp_path / "pairs.jsonl", [
        {"id": "z1", "reference": "今天天气很好。", "hypothesis": "今天天汽很好", "language": "zh"},  # 1 sub / 6
        {"id": "z2", "ref": "我有三个苹果", "hyp": "我有3个苹果吗", "language": "cmn"},  # 1 insertion / 6
        {"id": "e1", "reference": "The cat sat down.", "hypothesis": "the cat sat", "language": "en"},  # 1 of 4 words
    ])
    _eval("asr", "--pairs", pairs, "--out", tmp_path / "out")
    report = _report(tmp_path / "out", "asr")
    rows = {r["language"]: r for r in report["summary"]}
    assert rows["zh"]["CER %"] == pytest.approx(100 * 2 / 12) and rows["zh"]["utterances"] == 2
    assert rows["en"]["WER %"] == pytest.approx(100 * 1 / 4)
    assert rows["en"]["CER %"] == pytest.approx(100 * 5 / 16)  # " down" deleted from 16 characters
    assert rows["all"]["CER %"] == pytest.approx(100 * 7 / 28)  # characters pooled: (2 + 5) / (12 + 16)
    assert rows["all"]["WER %"] == pytest.approx(100 * 3 / 16)  # 2 of 12 Han units + 1 of 4 words
    errors = {i["id"]: i["error"] for i in report["items"]}
    assert errors == pytest.approx({"z1": 1 / 6, "z2": 1 / 6, "e1": 1 / 4})
    assert "| pairs | zh | 2 | 16.67 |" in (tmp_path / "out" / "asr.md").read_text()


def test_asr_pairs_bad_input_names_file_line_field(tmp_path: Path) -> None:
    bad = _jsonl(tmp_path / "bad.jsonl", [{"reference": "a", "hypothesis": "a", "language": "en"},
                                          {"reference": "b", "language": "en"}])
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: missing field 'hypothesis' or 'hyp'"):
        _eval("asr", "--pairs", bad, "--out", tmp_path / "out")
    fr = _jsonl(tmp_path / "fr.jsonl", [{"id": "q7", "reference": "a", "hypothesis": "a", "language": "fr"}])
    with pytest.raises(SystemExit, match=r"fr\.jsonl item 'q7': field 'language'.*'fr'"):
        _eval("asr", "--pairs", fr, "--out", tmp_path / "out")
    with pytest.raises(SystemExit, match="--export"):
        _eval("asr", "--data", tmp_path, "--out", tmp_path / "out")


def test_asr_export_on_prepared_audio_and_as_wav_files(prepared: Path, stage1_export: Path, tmp_path: Path) -> None:
    from litdata import StreamingDataset

    from datamodules.tokenizer import asr_example
    from lit_keomni.eval.asr import Transcriber

    out = tmp_path / "out"
    _eval("asr", "--export", stage1_export, "--data", prepared, "--split", "val", "--limit", 5, "--batch-size", 3,
          "--max-tokens", 8, "--out", out)
    report = _report(out, "asr")
    items = report["items"]
    dataset = StreamingDataset(str(prepared / "chunks" / "val"))
    raw = [dataset[i] for i in range(5)]
    assert [i["id"] for i in items] == [r["id"] for r in raw] and [i["reference"] for i in items] == [r["text"] for r in raw]
    assert {r["system"] for r in report["summary"]} == {"attention", "ctc"}
    # The summary is the corpus-level score of the per-item transcripts, for both heads
    refs, langs = [i["reference"] for i in items], [i["language"] for i in items]
    for system, key in (("attention", "hypothesis"), ("ctc", "ctc")):
        expected = error_rate(refs, [i[key] for i in items], langs)
        assert report["settings"]["scores"][system] == pytest.approx(expected)
        row = next(r for r in report["summary"] if r["system"] == system and r["language"] == "all")
        assert row["CER %"] == pytest.approx(100 * expected["cer"]) and row["utterances"] == 5
    assert any(i["hypothesis"] for i in items)  # decoding produced text (bounded by --max-tokens)

    # Batching by length does not change a transcript: each clip alone gives the same text
    transcriber = Transcriber(stage1_export, batch_size=1, max_tokens=8)
    alone, alone_ctc = transcriber([asr_example(r)["audio"] for r in raw])
    assert alone == [i["hypothesis"] for i in items] and alone_ctc == [i["ctc"] for i in items]

    # The same audio as wav files at the corpus rate (resampled on reading) gives the same transcripts
    wav_dir = tmp_path / "wavs"
    wav_dir.mkdir()
    records = []
    for r in raw:
        sf.write(wav_dir / f"{r['id']}.wav", r["audio"], r["sample_rate"], subtype="PCM_16")
        records.append({"id": r["id"], "audio": f"wavs/{r['id']}.wav", "text": r["text"], "language": r["language"]})
    listing = _jsonl(tmp_path / "generated.jsonl", records)
    _eval("asr", "--export", stage1_export, "--audio-jsonl", listing, "--max-tokens", 8, "--no-ctc", "--out", tmp_path / "out2")
    again = _report(tmp_path / "out2", "asr")
    assert [i["hypothesis"] for i in again["items"]] == [i["hypothesis"] for i in items]
    assert {r["system"] for r in again["summary"]} == {"attention"}

    missing = _jsonl(tmp_path / "missing.jsonl", [{**records[0], "audio": "wavs/nothing.wav"}])
    with pytest.raises(SystemExit, match=r"missing\.jsonl:1: field 'audio': no such file .*nothing\.wav"):
        _eval("asr", "--export", stage1_export, "--audio-jsonl", missing, "--out", tmp_path / "out3")


# ---------------------------------------------------------------------------------------------------- utmos task


@pytest.fixture(scope="module")
def utmos_ckpt(tmp_path_factory) -> Path:
    """Randomly initialised UTMOS weights saved as the package's loader expects them (a plain state dict)."""
    import torch
    from utmos_pytorch.utmos_torch import UTMOSModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("utmos") / "utmos_state_dict.pt"
    torch.save(UTMOSModel().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def utmos_audio(tmp_path_factory) -> Path:
    """Three short clips at three rates: espeak-ng English (22.05 kHz), Mandarin, and a 8 kHz chirp."""
    from datamodules.corpus import AGENT_SPEAKERS, synthesize

    root = tmp_path_factory.mktemp("utmos-audio")
    en, _ = synthesize("Hello there.", "en", AGENT_SPEAKERS["agentFemale"])
    zh, _ = synthesize("你好。", "zh", AGENT_SPEAKERS["agentMale"])
    sf.write(root / "en.wav", en[: 22050 * 6 // 10], 22050, subtype="PCM_16")
    sf.write(root / "zh.wav", zh[: 22050 * 6 // 10], 22050, subtype="PCM_16")
    t = np.arange(4000) / 8000
    sf.write(root / "chirp.wav", 0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t), 8000, subtype="PCM_16")
    return root


def test_utmos_scores_and_report(utmos_ckpt: Path, utmos_audio: Path, tmp_path: Path, monkeypatch) -> None:
    import torch
    import utmos_pytorch.utmos_torch as package

    from lit_keomni.eval.utmos import audio_items, load_utmos, score_files

    monkeypatch.setattr(package, "download_utmos_ckpt", lambda: pytest.fail("UTMOS tried to download weights"))
    listing = _jsonl(tmp_path / "audio.jsonl", [{"id": "en", "audio": str(utmos_audio / "en.wav"), "language": "en"},
                                                 {"id": "zh", "audio": str(utmos_audio / "zh.wav"), "language": "zh"},
                                                 {"id": "chirp", "audio": str(utmos_audio / "chirp.wav"), "language": "en"}])
    _eval("utmos", "--audio", listing, "--utmos-ckpt", utmos_ckpt, "--out", tmp_path / "out")
    report = _report(tmp_path / "out", "utmos")
    scores = {i["id"]: i["utmos"] for i in report["items"]}
    assert set(scores) == {"en", "zh", "chirp"}
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores.values())
    assert len({round(s, 6) for s in scores.values()}) == 3  # different audio, different scores
    rows = {r["language"]: r for r in report["summary"]}
    assert rows["all"]["UTMOS"] == pytest.approx(sum(scores.values()) / 3) and rows["all"]["files"] == 3
    assert rows["en"]["UTMOS"] == pytest.approx((scores["en"] + scores["chirp"]) / 2)
    assert rows["all"]["std"] == pytest.approx(float(np.std(list(scores.values()))))
    assert [i["id"] for i in audio_items(utmos_audio)] == ["chirp.wav", "en.wav", "zh.wav"]

    # The checkpoint's weights are the ones used: raising the output bias by 0.5 raises every score by 2 × 0.5
    state = torch.load(utmos_ckpt, weights_only=True)
    state["output_layers.1.net.3.bias"] += 0.5
    shifted = tmp_path / "shifted.pt"
    torch.save(state, shifted)
    del state
    assert score_files(load_utmos(shifted), [utmos_audio / "zh.wav"]) == pytest.approx([scores["zh"] + 1.0], abs=1e-4)


def test_utmos_refuses_missing_or_wrong_weights(utmos_audio: Path, tmp_path: Path, monkeypatch) -> None:
    import torch
    import utmos_pytorch.utmos_torch as package

    monkeypatch.setattr(package, "download_utmos_ckpt", lambda: pytest.fail("UTMOS tried to download weights"))
    for ckpt in (["--utmos-ckpt", tmp_path / "nowhere.pt"], []):
        with pytest.raises(SystemExit, match=r"UTMOS weights not found \((no such file .*nowhere\.pt|--utmos-ckpt not "
                                             r"given)\)\. Nothing is downloaded.*utmos_state_dict\.pt.*Blinorot/UTMOS-PyTorch"):
            _eval("utmos", "--audio", utmos_audio, *ckpt, "--out", tmp_path / "out")
    torch.save({"linear.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"other\.pt: 224 of the model's 224 weights are missing"):
        _eval("utmos", "--audio", utmos_audio, "--utmos-ckpt", tmp_path / "other.pt", "--out", tmp_path / "out")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"text\.pt: not a UTMOS state dict"):
        _eval("utmos", "--audio", utmos_audio, "--utmos-ckpt", tmp_path / "text.pt", "--out", tmp_path / "out")
    with pytest.raises(SystemExit, match="no .wav files"):
        _eval("utmos", "--audio", tmp_path, "--utmos-ckpt", tmp_path / "other.pt", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- judge task


class _Judge:
    """A local OpenAI-compatible chat-completions server: records each request and answers with ``reply(request)``,
    after failing the first ``fail_first`` requests with ``fail_status``."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.fail_first, self.fail_status = 0, 503
        self.reply = lambda request: '{"content": 4, "style": 5}'
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    failing = len(judge.requests) <= judge.fail_first
                if failing:
                    status, payload = judge.fail_status, b'{"error": "busy"}'
                else:
                    status = 200
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": judge.reply(body)}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def judge_server():
    server = _Judge()
    yield server
    server.server.shutdown()
    server.server.server_close()


ANSWERS = {"Paris is the capital of France.": "```json\n{\"content\": 5, \"style\": 4}\n```",
           "Well, um, I think maybe it is Rome or so.": 'Scores: {"content": "2", "style": 3}',
           "北京是中国的首都。": '{"content": 4, "style": 5}'}


def test_judge_end_to_end(judge_server: _Judge, tmp_path: Path, monkeypatch) -> None:
    from lit_keomni.eval.judge import judge_prompt

    judge_server.reply = lambda body: next(a for r, a in ANSWERS.items() if r in body["messages"][0]["content"])
    judge_server.fail_first = 2  # two 503s: retried with backoff
    items = _jsonl(tmp_path / "responses.jsonl", [
        {"id": "a", "instruction": "What is the capital of France?", "response": "Paris is the capital of France."},
        {"id": "b", "instruction": "What is the capital of Italy?", "response": "Well, um, I think maybe it is Rome or so.",
         "language": "en"},
        {"id": "c", "instruction": "中国的首都是哪里？", "response": "北京是中国的首都。", "language": "zh"}])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    _eval("judge", "--input", items, "--judge-url", judge_server.url, "--judge-model", "judge-1", "--backoff", "0.01",
          "--workers", "2", "--out", tmp_path / "out")
    report = _report(tmp_path / "out", "judge")
    rows = {r["language"]: r for r in report["summary"]}
    assert rows["all"]["Content"] == pytest.approx((5 + 2 + 4) / 3) and rows["all"]["Style"] == pytest.approx(4)
    assert rows["all"]["Length"] == ""  # characters and words do not pool
    assert rows["en"]["Content"] == pytest.approx(3.5) and rows["en"]["Length"] == pytest.approx((6 + 10) / 2)
    assert rows["zh"]["Style"] == 5 and rows["zh"]["Length"] == 8  # 北京是中国的首都, the full stop not counted
    assert {i["id"]: (i["content"], i["style"]) for i in report["items"]} == {"a": (5, 4), "b": (2, 3), "c": (4, 5)}

    assert len(judge_server.requests) == 3 + 2
    seen = set()
    for request in judge_server.requests:
        body = request["body"]
        assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
        assert body["model"] == "judge-1" and body["temperature"] == 0 and len(body["messages"]) == 1
        prompt = body["messages"][0]["content"]
        seen.add(prompt)
        assert prompt.startswith("I'need your help to evaluate") and "{instruction}" not in prompt
        assert prompt.endswith('{"content": content score, "style": style score}.\nYou don’t need to provide any explanations.')
    assert seen == {judge_prompt("What is the capital of France?", "Paris is the capital of France."),
                    judge_prompt("What is the capital of Italy?", "Well, um, I think maybe it is Rome or so."),
                    judge_prompt("中国的首都是哪里？", "北京是中国的首都。")}
    assert ("### [Instruction]: 中国的首都是哪里？\n### [Reponse]: 北京是中国的首都。\nAfter evaluating" in
            judge_prompt("中国的首都是哪里？", "北京是中国的首都。"))


def test_judge_unusable_reply_names_the_item(judge_server: _Judge, tmp_path: Path) -> None:
    judge_server.reply = lambda body: "The response is fine." if "Rome" in body["messages"][0]["content"] else '{"content": 3, "style": 3}'
    items = _jsonl(tmp_path / "r.jsonl", [{"id": "ok", "instruction": "Hi", "response": "Hello."},
                                          {"id": "q2", "instruction": "Capital of Italy?", "response": "Rome."}])
    with pytest.raises(SystemExit, match=r"item 'q2' is unusable \(no JSON object\): 'The response is fine\.'"):
        _eval("judge", "--input", items, "--judge-url", judge_server.url, "--workers", "1", "--out", tmp_path / "out")
    judge_server.reply = lambda body: '{"content": 7, "style": 3}'
    with pytest.raises(SystemExit, match=r"item 'ok' is unusable \(field 'content' is 7"):
        _eval("judge", "--input", items, "--judge-url", judge_server.url, "--workers", "1", "--out", tmp_path / "out")
    judge_server.fail_first, judge_server.fail_status = 10, 401  # a client error is not retried
    n = len(judge_server.requests)
    with pytest.raises(SystemExit, match="HTTP 401"):
        _eval("judge", "--input", _jsonl(tmp_path / "one.jsonl", [{"instruction": "Hi", "response": "Hello."}]),
              "--judge-url", judge_server.url, "--out", tmp_path / "out")
    assert len(judge_server.requests) == n + 1
    with pytest.raises(SystemExit, match=r"r\.jsonl:1: missing field 'response'"):
        _eval("judge", "--input", _jsonl(tmp_path / "r.jsonl", [{"instruction": "x"}]), "--judge-url", judge_server.url)


def test_judge_unreachable_endpoint(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    items = _jsonl(tmp_path / "r.jsonl", [{"instruction": "Hi", "response": "Hello."}])
    with pytest.raises(SystemExit, match=rf"127\.0\.0\.1:{port}/v1/chat/completions: no reply after 3 tries"):
        _eval("judge", "--input", items, "--judge-url", f"http://127.0.0.1:{port}/v1", "--retries", 2, "--backoff", 0,
              "--out", tmp_path / "out")


def test_parse_scores_tolerance() -> None:
    from lit_keomni.eval.judge import parse_scores

    assert parse_scores('```json\n{"content": 4, "style": 5}\n```') == {"content": 4.0, "style": 5.0}
    assert parse_scores('```\n{"content": 4.5, "style": "3"}\n```') == {"content": 4.5, "style": 3.0}
    assert parse_scores('Here you go: {"content": 1, "style": 2} Hope it helps.') == {"content": 1.0, "style": 2.0}
    for bad, reason in (('{"content": 4}', "'style' is None"), ('{"content": true, "style": 3}', "'content' is True"),
                        ("{content: 4, style: 5}", "invalid JSON"), ("4 and 5", "no JSON object")):
        with pytest.raises(ValueError, match=re.escape(reason)):
            parse_scores(bad)
