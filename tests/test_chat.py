"""``chat`` on tiny random exports: both pipelines write audio of units x hop samples with a text answer and timings;
KE-Omni's streamed hidden states equal the teacher-forced ones stages 5/6 train on; streamed vocoding equals one
vocoder pass; exports that do not belong together and unusable input files fail with one clear error."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lit_keomni.chat import GlmChat, KeOmniChat, UnitStream, read_input
from lit_keomni.cli import main as cli
from lit_keomni.nn.keomni import answer_hidden_states
from tests.exports import tiny_exports

FRAMES_PER_TOKEN = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One request's tiny matrices: a second thread only adds OpenMP hand-offs (slow on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    return tiny_exports(tmp_path_factory.mktemp("chat") / "exports", frames_per_token=FRAMES_PER_TOKEN)


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> Path:
    """1.3 s of a stereo 22.05 kHz tone (resampled to 16 kHz mono on reading)."""
    sr = 22050
    t = np.arange(int(1.3 * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    path = tmp_path_factory.mktemp("question") / "q.wav"
    sf.write(path, np.stack([wav, 0.5 * wav], 1), sr)
    return path


@pytest.fixture(scope="module")
def keomni(exports) -> KeOmniChat:
    return KeOmniChat.load(exports["keomni"], exports["duration"], exports["unit_generator"], exports["vocoder"],
                           text_chunk=4)


@pytest.fixture(scope="module")
def glm(exports) -> GlmChat:
    return GlmChat.load(exports["glm"], exports["vocoder"], block=5, lookahead=0)


def edited(src: Path, dst: Path, **fields) -> Path:
    """A copy of the export ``src`` whose config.json has ``fields`` replaced (top level)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(fields)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_keomni_streams_the_teacher_forced_hidden_states(keomni, question):
    wav = read_input(question, keomni.max_samples)
    assert wav.shape == (int(1.3 * 16000),)
    r = keomni(wav, max_new_tokens=10)
    assert len(r.text_ids) == 10 and r.text
    # greedy, the text is KeOmni.respond's; the states fed to the speech decoder are the teacher-forced ones
    assert r.text == keomni.model.respond(keomni.tokenizer, [wav], max_new_tokens=10)[0].strip()
    expected = answer_hidden_states(keomni.model, keomni.tokenizer, [wav], [], r.text_ids)
    torch.testing.assert_close(r.hidden, expected, atol=1e-4, rtol=1e-4)
    # every token lasts FRAMES_PER_TOKEN units; audio is units x hop, streamed in several chunks
    assert len(r.units) == FRAMES_PER_TOKEN * len(r.text_ids)
    assert r.wav.numel() == len(r.units) * keomni.vocoder.hop and r.chunks > 1
    assert 0 < r.first_audio <= r.compute and r.rtf == r.compute / r.audio_seconds
    assert set(r.times) == set(KeOmniChat.components)


def test_streamed_vocoding_equals_one_pass(keomni):
    vocoder = keomni.vocoder
    units = torch.randint(0, vocoder.num_units, (23,))
    with torch.no_grad():
        whole = vocoder(units[None])[0]
    for lookahead in (0, vocoder.receptive_units):
        stream = UnitStream(vocoder, block=3, lookahead=lookahead)
        pieces = [p for a, b in ((0, 5), (5, 6), (6, 17), (17, 23)) for p in stream.push(units[a:b].tolist())]
        pieces += stream.flush()
        assert all(p.numel() % (3 * vocoder.hop) == 0 for p in pieces[:-1])
        audio = torch.cat(pieces)
        assert audio.numel() == 23 * vocoder.hop
        if lookahead:
            torch.testing.assert_close(audio, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("template", ["text_guided", "direct"])
def test_glm_writes_text_and_speech_in_blocks(glm, question, template):
    assert glm.template == "text_guided"  # the export's
    glm = GlmChat(glm.lm, glm.speech, glm.vocoder, template=template, block=5, lookahead=0)
    r = glm(read_input(question, glm.max_samples), max_new_tokens=6, max_speech_seconds=2.0)
    assert isinstance(r.text, str) and len(r.units) == 25
    assert r.wav.numel() == len(r.units) * glm.vocoder.hop
    assert r.chunks == -(-len(r.units) // 5) and r.first_audio is not None
    assert (len(r.text_ids) > 0) == (template == "text_guided")
    assert set(r.times) == set(GlmChat.components) and ("asr_text" in r.extra_times) == (template == "direct")


def test_glm_streaming_interleaves_text_and_speech(glm, question):
    """The released glm-4-voice-9b's template: one answer whose text and speech tokens come interleaved."""
    glm = GlmChat(glm.lm, glm.speech, glm.vocoder, template="streaming", block=5, lookahead=0)
    r = glm(read_input(question, glm.max_samples), max_new_tokens=6, max_speech_seconds=2.0)
    assert len(r.text_ids) + len(r.units) == 6 + 25 and r.units  # runs to its limit: <|user|> cannot win
    tok = glm.lm.tokenizer
    assert all(i < tok.audio_token_offset for i in r.text_ids) and max(r.units) < tok.num_audio_tokens
    assert r.wav.numel() == len(r.units) * glm.vocoder.hop and r.chunks == -(-len(r.units) // 5)


def test_command_writes_wavs_and_json(exports, question, tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "chat.json"
    cli(["chat", str(question), "--pipeline", "keomni", "--model", str(exports["keomni"]), "--duration",
         str(exports["duration"]), "--unit-generator", str(exports["unit_generator"]), "--vocoder",
         str(exports["vocoder"]), "--out", str(out), "--json", str(report), "--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    assert "first audio" in printed and "RTF" in printed and "ASR check" in printed
    data = json.loads(report.read_text())
    row = data["results"][0]
    audio, sr = sf.read(row["output"])
    assert sr == 16000 and len(audio) == row["units"] * 1280 == row["text_tokens"] * FRAMES_PER_TOKEN * 1280
    assert row["text"] and row["first_audio_s"] > 0 and row["rtf"] > 0 and "cer" in row and "asr_text" in row
    assert "units_cer" in row  # the units are the stage-1 export's codes: its ASR decoder reads them too
    assert set(row["times_s"]) == set(KeOmniChat.components)
    assert data["asr_export"] == str(exports["stage1"].resolve())


def test_exports_that_do_not_belong_together(exports, tmp_path):
    def keomni(**kw):
        paths = {k: exports[k] for k in ("keomni", "duration", "unit_generator", "vocoder")} | kw
        return KeOmniChat.load(paths["keomni"], paths["duration"], paths["unit_generator"], paths["vocoder"])

    bad = edited(exports["vocoder"], tmp_path / "v_units", num_units=32)
    with pytest.raises(ValueError, match=r"v_units/config.json: field 'num_units' is 32, expected 16"):
        keomni(vocoder=bad)
    bad = edited(exports["vocoder"], tmp_path / "v_speaker", speaker="agentMale")
    with pytest.raises(ValueError, match=r"v_speaker/config.json: field 'speaker' is 'agentMale', expected "
                                         r"'agentFemale' \(the speaker .*unit_generator was trained for\)"):
        keomni(vocoder=bad)
    bad = edited(exports["duration"], tmp_path / "d_llm", llm_fingerprint="0" * 64)
    with pytest.raises(ValueError, match=r"d_llm/config.json: field 'llm_fingerprint' is '0+', expected"):
        keomni(duration=bad)
    bad = edited(exports["unit_generator"], tmp_path / "g_hidden", hidden_size=128)
    with pytest.raises(ValueError, match=r"g_hidden/config.json: field 'hidden_size' is 128, expected 64 \(the LLM"):
        keomni(unit_generator=bad)
    bad = edited(exports["vocoder"], tmp_path / "v_glm", units_fingerprint="f" * 64)
    with pytest.raises(ValueError, match=r"v_glm/config.json: field 'units_fingerprint' is 'f+', expected"):
        GlmChat.load(exports["glm"], bad)
    with pytest.raises(ValueError, match=r"field 'kind' is 'speech_lm', expected 'keomni_lm'"):
        keomni(keomni=exports["glm"])


def test_unusable_inputs_name_the_file(exports, tmp_path, keomni):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
    with pytest.raises(ValueError, match=r"corrupt.wav: not a readable audio file"):
        read_input(corrupt, keomni.max_samples)
    short = tmp_path / "short" / "short.wav"
    short.parent.mkdir()
    sf.write(short, np.zeros(800, dtype=np.float32), 16000)  # 50 ms: less than one adapter frame (100 ms)
    args = ["chat", str(short.parent), "--model", str(exports["keomni"]), "--duration", str(exports["duration"]),
            "--unit-generator", str(exports["unit_generator"]), "--vocoder", str(exports["vocoder"]),
            "--out", str(tmp_path / "out"), "--no-asr"]
    with pytest.raises(SystemExit, match=r"short.wav: audio of 800 samples is shorter than one adapter frame"):
        cli(args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty: no .wav files in this folder"):
        cli(args[:1] + [str(tmp_path / "empty")] + args[2:])
