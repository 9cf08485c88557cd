"""StoryCloze and spoken QA on tiny models: the right ending wins once a model has learnt it, length normalisation,
batched scoring, answer matching in both languages, the built-in sets, and both commands end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.toy_world import qa_items
from lit_keomni.checkpoints import lm_tokenizer, write_export
from lit_keomni.cli import main
from lit_keomni.configs import TransformerConfig, config_dict
from lit_keomni.eval.builtin import QA_FILE, STAMP, build_qa_set, build_storycloze_set
from lit_keomni.eval.cli import eval_command
from lit_keomni.eval.lm_scoring import sequence_logprobs
from lit_keomni.eval.spoken_qa import chance_level, is_correct
from lit_keomni.eval.storycloze import SETTINGS, ending_row, evaluate_setting, prefers_right
from lit_keomni.lm import masked_lm_loss
from lit_keomni.nn.audio import load_wav
from lit_keomni.nn.transformer import Transformer
from lit_keomni.text.templates import pad_batch

REPO = Path(__file__).resolve().parents[1]
TINY_LM = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate_size": 172, "block_size": 512}


def tiny_lm(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig.from_name("tiny", **TINY_LM, vocab_size=vocab_size))


def write_speech_lm(out, stage1_export, seed, **extra):
    tok, meta = lm_tokenizer(stage1_export)
    model = tiny_lm(tok.vocab_size, seed)
    return write_export(out, kind="speech_lm", config=config_dict(model.config), state_dict=model.state_dict(),
                        extra={"speech_tokenizer": {"frame_rate_hz": meta["frame_rate_hz"],
                                                    "codebook_size": meta["codebook_size"],
                                                    "export": str(stage1_export.resolve())}, **extra},
                        files={"tokenizer": tok.save})


def write_keomni(out, stage1_export):
    """A random tiny KE-Omni export (speech encoder + adapter + LLM) on the speech-extended vocabulary."""
    from lit_keomni.configs import SpeechTokenizerConfig
    from lit_keomni.nn.adapter import SpeechAdapter
    from lit_keomni.nn.keomni import KeOmni
    from lit_keomni.nn.whisper import SpeechEncoder

    tok, _ = lm_tokenizer(stage1_export)
    torch.manual_seed(4)
    encoder = SpeechEncoder(SpeechTokenizerConfig(d_model=32, n_head=4, ffn_dim=64, encoder_layers=2, vq_position=2,
                                                  decoder_layers=0, pool=4, max_source_positions=1500, vq=False))
    model = KeOmni(encoder, SpeechAdapter(32, 64, stack=5, hidden=48), tiny_lm(tok.vocab_size, 4))
    return write_export(out, kind="keomni_lm", config=model.config_dict(), state_dict=model.state_dict(),
                        extra={"stage": "sft"}, files={"tokenizer": tok.save})


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-sets")
    return build_storycloze_set(root / "storycloze", 2, 1234), build_qa_set(root / "qa", 2, 1234)


@pytest.fixture(scope="module")
def exports(stage1_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("speech-lm")
    return {"pretrain": write_speech_lm(root / "pretrain", stage1_export, 1, stage="pretrain"),
            "text_guided": write_speech_lm(root / "sft_tg", stage1_export, 2, stage="sft", template="text_guided"),
            "direct": write_speech_lm(root / "sft_direct", stage1_export, 3, stage="sft", template="direct"),
            "streaming": write_speech_lm(root / "sft_streaming", stage1_export, 4, stage="sft", template="streaming"),
            "keomni": write_keomni(root / "keomni", stage1_export)}


# ------------------------------------------------------------------------------------------------ StoryCloze
def _story_items(tok, swap=False):
    """Four stories (toy-world texts, random speech tokens) with every field each setting needs."""
    from datamodules.toy_world import storycloze_items

    g = torch.Generator().manual_seed(0)
    codes = lambda: torch.randint(0, tok.num_audio_tokens, (int(torch.randint(5, 9, (1,), generator=g)),),  # noqa: E731
                                  generator=g).tolist()
    items = []
    for lang in ("en", "zh"):
        for k, s in enumerate(storycloze_items(1234, 2, lang)):
            right, wrong = ("wrong", "right") if swap else ("right", "wrong")
            items.append({"id": f"{lang}{k}", "language": lang, "context_text": s["context"],
                          "context_codes": codes(), f"{right}_text": s["right"], f"{wrong}_text": s["wrong"],
                          f"{right}_codes": codes(), f"{wrong}_codes": codes()})
    return items


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and a busy machine makes two threads many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_storycloze_picks_the_ending_the_model_learnt(stage1_export, one_thread):
    tok, _ = lm_tokenizer(stage1_export)
    items = _story_items(tok)
    rows = [ending_row(tok, s, it["context_text"], it["context_codes"], it["right_text"], it["right_codes"])
            for s in SETTINGS for it in items]
    idx, tgt = pad_batch(rows, tok.pad_id)
    model = tiny_lm(tok.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss, _ = masked_lm_loss(*model(idx, targets=tgt), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.1
    swapped = [{**it, "right_text": it["wrong_text"], "wrong_text": it["right_text"], "right_codes": it["wrong_codes"],
                "wrong_codes": it["right_codes"]} for it in items]
    for setting in SETTINGS:
        results = evaluate_setting(model, tok, setting, items, batch_size=3)
        assert all(r["correct"] for r in results), (setting, results)
        assert not any(r["correct"] for r in evaluate_setting(model, tok, setting, swapped, batch_size=3)), setting
    # The end marker is scored with the ending: speech endings count len(codes) + 1 tokens.
    s = evaluate_setting(model, tok, "S", items[:1])[0]
    assert s["right_tokens"] == len(items[0]["right_codes"]) + 1
    assert s["wrong_tokens"] == len(items[0]["wrong_codes"]) + 1


def test_length_normalisation_decides():
    long_right, short_wrong = (-6.0, 6), (-3.0, 1)  # sum prefers the short ending, the mean per token the long one
    assert long_right[0] < short_wrong[0]
    assert prefers_right(long_right, short_wrong)
    assert not prefers_right(short_wrong, long_right)
    assert not prefers_right((-2.0, 2), (-1.0, 1))  # a tie is not a win


def test_batched_scoring_equals_one_sequence_at_a_time():
    model = tiny_lm(50).eval()
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (5, 9, 3, 12, 7):
        ids = torch.randint(0, 50, (n,), generator=g).tolist()
        rows.append((ids, [k >= n // 2 for k in range(n)]))
    batched = sequence_logprobs(model, rows, pad_id=0, batch_size=2)
    for (ids, mask), (total, count) in zip(rows, batched):
        logp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1, :50].float(), -1)
        want = sum(float(logp[t - 1, ids[t]].detach()) for t in range(1, len(ids)) if mask[t])
        assert count == sum(mask[1:])
        assert total == pytest.approx(want, abs=1e-4)


# ------------------------------------------------------------------------------------------------ spoken QA
@pytest.mark.parametrize("response, answers, language, correct", [
    ("The answer is Red.", ["red"], "en", True),
    ("It is reddish.", ["red"], "en", False),  # whole words only
    ("TOM IS TWELVE YEARS OLD", ["twelve"], "en", True),
    ("He is 12.", ["twelve"], "en", True),  # both sides normalised: twelve -> 12
    ("twenty one", ["twenty"], "en", False),
    ("She has two dogs", ["dog", "dogs"], "en", True),
    ("My favourite colour is grey", ["gray"], "en", True),
    ("the capital is Silverton", ["Ostrav"], "en", False),
    ("小明最喜欢红色。", ["红色"], "zh", True),
    ("小明最喜欢红色", ["蓝色"], "zh", False),
    ("她今年十五岁", ["十五"], "zh", True),
    ("她今年十五岁", ["十"], "zh", False),  # a number does not run on into more numerals
    ("她今年十五岁", ["五"], "zh", False),
    ("答案是 12", ["十二"], "zh", True),  # digits read as Chinese numerals
    ("马兰养了一只小猫", ["一匹马", "匹马"], "zh", False),
])
def test_answer_matching(response, answers, language, correct):
    assert is_correct(response, answers, language) is correct


def test_chance_level():
    assert chance_level([["a", "b", "c", "d"], list("abcdefghij")]) == pytest.approx((1 / 4 + 1 / 10) / 2)
    with pytest.raises(ValueError):
        chance_level([[]])


def test_qa_items_are_answered_by_the_corpus_sentences():
    for lang in ("en", "zh"):
        items = qa_items(1234, 60, lang)
        assert items == qa_items(1234, 60, lang)
        assert len({it["question"] for it in items}) > 50
        assert {it["topic"] for it in items} >= {"plus", "capital", "colour", "age", "pet"}
        for it in items:
            assert it["answers"][0] in it["candidates"]
            assert is_correct(it["reference"], it["answers"], lang), it
            for other in it["candidates"]:
                if other != it["answers"][0]:
                    assert not is_correct(other, it["answers"], lang), (other, it)


# ------------------------------------------------------------------------------------------------ built-in sets
def test_builtin_sets_build_offline_with_audio(sets, tmp_path):
    storycloze, qa = sets
    stories = [json.loads(line) for line in storycloze.read_text().splitlines()]
    questions = [json.loads(line) for line in qa.read_text().splitlines()]
    assert [r["language"] for r in stories] == ["en", "en", "zh", "zh"] == [r["language"] for r in questions]
    for r in stories:
        assert r["right_text"] != r["wrong_text"]
        for part in ("context", "right", "wrong"):
            wav, sr = load_wav(storycloze.parent / r[f"{part}_audio"])
            assert sr == 16000 and len(wav) > 0.5 * sr and abs(wav).max() > 0.05
    for r in questions:
        wav, sr = load_wav(qa.parent / r["question_audio"])
        assert sr == 16000 and len(wav) > 0.5 * sr
        assert r["answers"] and len(r["candidates"]) > 1 and r["question_text"]
    # Reused when the stamp matches; same arguments, same bytes.
    stamp_time = (qa.parent / STAMP).stat().st_mtime_ns
    assert build_qa_set(qa.parent, 2, 1234) == qa and (qa.parent / STAMP).stat().st_mtime_ns == stamp_time
    again = build_qa_set(tmp_path / "qa", 2, 1234)
    assert again.read_bytes() == qa.read_bytes()
    for r in questions:
        assert (again.parent / r["question_audio"]).read_bytes() == (qa.parent / r["question_audio"]).read_bytes()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a built-in evaluation set"):
        build_qa_set(tmp_path / "other", 1, 1234)


# ------------------------------------------------------------------------------------------------ commands
def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "lit_keomni", "eval", *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    return r


def test_storycloze_command_end_to_end(exports, sets, tmp_path):
    out = tmp_path / "report"
    _run("storycloze", "--model", exports["pretrain"], "--model", exports["text_guided"], "--data", sets[0],
         "--out", out, "--batch-size", 3, cwd=tmp_path)
    report = json.loads((out / "storycloze.json").read_text())
    rows = report["summary"]
    models = (exports["pretrain"], exports["text_guided"])
    assert [(r["model"], r["setting"]) for r in rows] == [(str(m), s) for m in models for s in SETTINGS]
    assert all(r["n"] == 4 and 0 <= r["accuracy"] <= 100 and {"en", "zh"} <= set(r) for r in rows)
    assert rows[0]["stage"] == "pretrain" and rows[3]["stage"] == "sft (text_guided)"
    assert len(report["items"]) == 4 * len(rows)
    md = (out / "storycloze.md").read_text()
    assert "| model | stage | setting | accuracy | en | zh | n |" in md and "T→S" in md


def test_spoken_qa_command_end_to_end(exports, tmp_path, one_thread):
    out = tmp_path / "report"
    models = [exports["pretrain"], exports["text_guided"], exports["direct"], exports["streaming"], exports["keomni"]]
    # in-process through the same entry point as `python -m lit_keomni` (the storycloze test pays the subprocess)
    main(["eval", "spoken-qa", *[str(a) for m in models for a in ("--model", m)], "--builtin", "--n-per-language", "1",
          "--out", str(out), "--max-new-tokens", "6", "--max-speech-seconds", "1.0"])
    assert (out / "builtin_spoken_qa" / QA_FILE).is_file()
    report = json.loads((out / "spoken-qa.json").read_text())
    rows = report["summary"]
    want = [(models[0], "S"), (models[0], "S→T"), (models[1], "S"), (models[1], "S→T"), (models[2], "S"),
            (models[3], "S"), (models[3], "S→T"), (models[4], "S→T")]
    assert [(r["model"], r["setting"]) for r in rows] == [(str(m), s) for m, s in want]
    chance = report["settings"]["chance"]
    assert 0 < chance < 1 and all(r["chance"] == pytest.approx(100 * chance) and r["n"] == 2 for r in rows)
    for it in report["items"]:
        assert isinstance(it["response"], str) and it["correct"] in (True, False)
        if it["setting"] == "S":  # 1 s at 12.5 Hz; an interleaved answer shares 6 + 13 tokens with its text
            assert 0 <= it["speech_tokens"] <= (19 if it["model"] == str(models[3]) else 13)
    md = (out / "spoken-qa.md").read_text()
    assert "| model | stage | setting | accuracy | en | zh | chance | n |" in md
    # a direct model cannot write text, a KE-Omni model cannot speak: reported as not supported
    assert f"{models[2]}: S→T" in md and f"{models[4]}: S" in md
    assert rows[-1]["stage"] == "sft (keomni)"


def test_bad_inputs_name_file_and_field(exports, sets, tmp_path):
    lines = sets[0].read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    rec = json.loads(lines[1])
    del rec["wrong_audio"]
    broken.write_text("\n".join([lines[0].replace("audio/", str(sets[0].parent / "audio") + "/"), json.dumps(rec)]))
    with pytest.raises(ValueError, match=r"broken.jsonl: record 'en0001': field 'wrong_audio' missing"):
        eval_command(["storycloze", "--model", str(exports["pretrain"]), "--data", str(broken), "--settings", "S",
                      "--out", str(tmp_path / "r")])
    qa = json.loads(sets[1].read_text().splitlines()[0])
    qa["question_audio"] = "audio/nothing.wav"
    (tmp_path / "qa.jsonl").write_text(json.dumps(qa))
    with pytest.raises(FileNotFoundError, match=r"qa.jsonl: record 'en0000': field 'question_audio'.*nothing.wav"):
        eval_command(["spoken-qa", "--model", str(exports["pretrain"]), "--data", str(tmp_path / "qa.jsonl"),
                      "--out", str(tmp_path / "r")])
    qa["question_audio"], qa["answers"] = str(sets[1].parent / "audio" / "en0000_question.wav"), ["?!"]
    (tmp_path / "qa.jsonl").write_text(json.dumps(qa))
    with pytest.raises(ValueError, match=r"record 'en0000': field 'answers'"):
        eval_command(["spoken-qa", "--model", str(exports["pretrain"]), "--data", str(tmp_path / "qa.jsonl"),
                      "--out", str(tmp_path / "r")])
    stage1 = json.loads((exports["pretrain"] / "config.json").read_text())["speech_tokenizer"]["export"]
    with pytest.raises(ValueError, match="field 'kind' is 'speech_tokenizer'"):
        eval_command(["storycloze", "--model", stage1, "--data", str(sets[0]), "--out", str(tmp_path / "r")])
