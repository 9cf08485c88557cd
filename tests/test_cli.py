"""The command line as a user meets it: one clear line per bad input, no traceback; skip-invalid reports and counts."""

import json
import os
import subprocess
import sys

from tests.test_kespeechchat import _corpus, _dialogue


def run(*args, cwd, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lit_keomni", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_prepare_bad_field_is_one_line_error(tmp_path):
    bad = _dialogue("d7")
    bad["dialog"][1]["start"] = 9.0
    src = _corpus(tmp_path / "src", [bad])
    r = run("prepare", "--source", str(src), "--out", str(tmp_path / "out"), "--workers", "1", cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "d7.json" in r.stderr and "'d7'" in r.stderr and "dialog[1].start" in r.stderr


def test_prepare_missing_source(tmp_path):
    r = run("prepare", "--source", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nothing" in r.stderr


def test_prepare_skip_invalid_reports_and_keeps_the_rest(tmp_path):
    good = [_dialogue(f"g{i}") for i in range(3)]
    bad = _dialogue("b1")
    del bad["dialog"][0]["text"]
    src = _corpus(tmp_path / "src", [*good, bad])
    out = tmp_path / "out"
    r = run("prepare", "--source", str(src), "--out", str(out), "--workers", "1", "--skip-invalid", cwd=tmp_path,
            env_extra={"DATA_OPTIMIZER_CACHE_FOLDER": str(tmp_path / "c1"), "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(tmp_path / "c2")})
    assert r.returncode == 0, r.stderr
    report = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(report) == 1 and report[0]["dialogue_id"] == "b1" and "text" in report[0]["field"]
    stamp = json.loads((out / "prepared.json").read_text())
    assert sum(stamp["utterances"].values()) == 6  # 3 good dialogues x 2 turns, nothing else lost
    assert (out / "tokenizer.json").is_file()


def test_tokenize_missing_export(tmp_path):
    r = run("tokenize", "--export", str(tmp_path / "noexport"), "--out", str(tmp_path / "t"), cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "noexport" in r.stderr
