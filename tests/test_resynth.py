"""``eval resynth`` on tiny random exports: every decoder kind resynthesises held-out utterances from their tokens (or
mel), the same ASR transcribes original and resynthesis, and tokens of another unit source are refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lit_keomni.audio import SAMPLE_RATE, resample
from lit_keomni.eval.asr import Transcriber
from lit_keomni.eval.cli import eval_command
from tests.exports import tiny_decoder, tiny_mel_vocoder, tiny_vocoder


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, stage1_export) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    hift = tiny_mel_vocoder(root / "hift")
    return {"mel_vocoder": hift, "flow_decoder": tiny_decoder(root / "flow", stage1_export, hift),
            "vocoder": tiny_vocoder(root / "vocoder", stage1_export)}


@pytest.mark.parametrize("kind", ["flow_decoder", "vocoder", "mel_vocoder"])
def test_resynthesis_is_transcribed_beside_the_original(kind, decoders, prepared, stage1_export, speech_tokens, tmp_path):
    out = tmp_path / "report"
    tokens = speech_tokens if kind != "mel_vocoder" else tmp_path / "none"  # copy synthesis reads no tokens
    result = eval_command(["resynth", "--decoder", str(decoders[kind]), "--asr", str(stage1_export), "--data",
                           str(prepared), "--tokens", str(tokens), "--limit", "3", "--ode-steps", "2",
                           "--save-audio", "--out", str(out)])
    report = json.loads((out / "resynth.json").read_text())
    assert report["settings"]["kind"] == kind and len(report["items"]) == 3
    assert {r["system"] for r in result["summary"]} == {"original", "resynthesis"}
    assert report["settings"]["real_time_factor"] > 0
    asr = Transcriber(stage1_export)
    codes = {}
    if kind != "mel_vocoder":
        from litdata import StreamingDataset

        ds = StreamingDataset(str(speech_tokens / "chunks" / "val"))
        codes = {it["id"]: len(it["codes"]) for it in (ds[i] for i in range(len(ds)))}
    wavs = []
    for item in report["items"]:
        wav, rate = sf.read(item["audio"], dtype="float32")
        original, _ = sf.read(item["original_audio"], dtype="float32")
        assert rate == (16000 if kind == "vocoder" else 22050) and np.isfinite(wav).all() and np.abs(wav).max() <= 1
        if kind == "vocoder":  # one hop of audio per unit
            assert len(wav) == codes[item["id"]] * rate / 12.5
        elif kind == "flow_decoder":  # the flow's frames of its tokens, a hop each
            assert len(wav) == int(codes[item["id"]] / 12.5 * 22050 / 256) * 256
        else:  # copy synthesis: the original's mel frames
            assert abs(len(wav) - len(original)) < 256
        wavs.append(torch.from_numpy(resample(wav, rate, SAMPLE_RATE)))
    # the report's transcripts are the ASR's of the audio it saved (written as float: read back exactly)
    assert asr(wavs)[0] == [item["resynthesis_transcript"] for item in report["items"]]
