"""Log-mel parity with transformers' WhisperFeatureExtractor, padding invariance, resampling and wav I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_keomni.audio import resample
from lit_keomni.nn.audio import LogMel, load_wav, mel_spectrogram_image, save_wav

SR = 16000


def _speechlike(n: int, seed: int) -> np.ndarray:
    """A tone with vibrato plus noise and a loud burst, so the per-utterance floor actually clamps frames."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    wav = 0.3 * np.sin(2 * np.pi * (300 + 50 * np.sin(2 * np.pi * 3 * t)) * t) + 0.02 * rng.standard_normal(n)
    wav[n // 3 : n // 3 + 800] += 0.5 * rng.standard_normal(800)
    wav[: n // 10] *= 1e-4  # near-silent lead-in: below the floor
    return wav.astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("n_samples", [SR + 77, 2 * SR, 12345])
def test_logmel_matches_whisper_feature_extractor(n_mels: int, n_samples: int) -> None:
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    wav = _speechlike(n_samples, seed=n_samples)
    # The extractor's default pads with silence to 30 s, the way Whisper was trained; LogMel mirrors exactly that.
    ref = fe(wav, sampling_rate=SR, return_tensors="np")["input_features"][0]
    mel, mel_len = LogMel(n_mels)(torch.from_numpy(wav)[None])
    assert mel.shape == (1, n_mels, n_samples // 160)
    assert int(mel_len[0]) == n_samples // 160
    # Floor really engaged (otherwise the dynamic-range part would be untested).
    assert (ref[:, : mel.shape[-1]] == ref.max() - 2.0).any()
    torch.testing.assert_close(mel[0], torch.from_numpy(ref[:, : mel.shape[-1]]), atol=1e-5, rtol=1e-5)


def test_logmel_batch_padding_gives_the_same_valid_frames() -> None:
    lengths = [SR + 500, 7000, 2 * SR]
    wavs = [torch.from_numpy(_speechlike(n, seed=i)) for i, n in enumerate(lengths)]
    batch = torch.zeros(len(wavs), max(lengths) + 1234)
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = w
        batch[i, len(w) :] = 0.7  # garbage in the padding must not leak into valid frames or the floor
    logmel = LogMel()
    mel, mel_len = logmel(batch, torch.tensor(lengths))
    assert mel_len.tolist() == [n // 160 for n in lengths]
    for i, w in enumerate(wavs):
        alone, _ = logmel(w[None])
        torch.testing.assert_close(mel[i, :, : mel_len[i]], alone[0], atol=1e-5, rtol=1e-5)
        # Padding frames hold the silence value after the floor: never above the utterance's values.
        assert mel[i, :, mel_len[i] :].max() <= alone.min() + 1e-6


def test_resample_length() -> None:
    wav = _speechlike(24000, seed=0)
    out = resample(wav, 24000, 16000)
    assert out.dtype == np.float32 and abs(len(out) - 16000) <= 1
    assert resample(wav, 16000, 16000) is not None and len(resample(wav, 16000, 16000)) == 24000


def test_save_load_round_trip(tmp_path) -> None:
    wav = _speechlike(8000, seed=1)
    path = tmp_path / "sub" / "a.wav"
    save_wav(path, torch.from_numpy(wav), SR)
    assert [p.name for p in path.parent.iterdir()] == ["a.wav"]  # no temp file left behind
    back, sr = load_wav(path)
    assert sr == SR and back.dtype == np.float32 and back.shape == wav.shape
    np.testing.assert_allclose(back, np.clip(wav, -1, 1), atol=1.0 / 32768 + 1e-6)
    up, sr2 = load_wav(path, sample_rate=24000)
    assert sr2 == 24000 and abs(len(up) - 12000) <= 1
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_wav(tmp_path / "missing.wav")


def test_mel_spectrogram_image() -> None:
    mel, _ = LogMel()(torch.from_numpy(_speechlike(SR, seed=2))[None])
    img = mel_spectrogram_image(mel[0])
    assert img.shape == (3, 80, 100)
    assert img.min() >= 0.0 and img.max() <= 1.0 and img.std() > 0.05
