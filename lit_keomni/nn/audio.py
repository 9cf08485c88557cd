"""Audio front end: Whisper's log-mel features in torch and wav I/O (resampled on reading).

``LogMel`` reproduces ``whisper.log_mel_spectrogram`` (and ``transformers.WhisperFeatureExtractor``) for batches of
unequal lengths: 16 kHz, 25 ms Hann window (n_fft 400), 10 ms hop (100 frames/s), Slaney mel filters up to 8 kHz,
log10, a floor 8 decades below each utterance's loudest frame, then ``(x + 4) / 4``. Whisper always saw audio padded
with silence to 30 s, so here every utterance is treated as followed by silence, whatever the batch padding holds:
an utterance's valid frames are the same alone, in any batch, and in Whisper's 30 s window.

Files are read and written with soundfile and resampled with ``lit_keomni.audio.resample`` (soxr); nothing here
downloads anything. ``SAMPLE_RATE`` and ``resample`` are imported from ``lit_keomni.audio`` (their one home, which
needs no torch) for ``LogMel``'s default and ``load_wav``; import them from there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_keomni.atomic import staged_file
from lit_keomni.audio import SAMPLE_RATE, resample


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    mel = 3.0 * hz / 200.0
    log_region = hz >= 1000.0
    mel[log_region] = 15.0 + np.log(hz[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    hz = 200.0 * mel / 3.0
    log_region = mel >= 15.0
    hz[log_region] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel[log_region] - 15.0))
    return hz


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, f_max: float | None = None) -> np.ndarray:
    """Slaney-normalised triangular mel filters (n_mels, n_fft // 2 + 1), as ``librosa.filters.mel`` builds them.

    This is the matrix Whisper ships in ``mel_filters.npz``; computing it avoids shipping or downloading a file.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([f_max]))[0], n_mels + 2))
    # Triangle i rises from edges[i] to edges[i + 1] and falls to edges[i + 2].
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    weights = np.maximum(0.0, np.minimum(down, up))
    # Slaney area normalisation: each filter has about the same energy whatever its width.
    weights *= (2.0 / (edges[2:] - edges[:-2]))[None, :]
    return weights.T.astype(np.float32)


class LogMel(nn.Module):
    """Whisper log-mel spectrogram of a padded batch: (B, S) samples → (B, n_mels, S // hop) features.

    Args:
        n_mels: mel bands; 80 for Whisper up to large-v2, 128 for whisper-large-v3.
        sample_rate: expected input rate (Whisper: ``SAMPLE_RATE``, 16 kHz); resample before, this module does not.
        n_fft: FFT size and Hann window length (400 = 25 ms).
        hop_length: frame shift (160 = 10 ms, 100 frames/s).
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = 400,
                 hop_length: int = 160) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        # Not persistent: derived from the arguments, so checkpoints need not carry them.
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer(
            "filters", torch.from_numpy(mel_filters(sample_rate, n_fft, n_mels, f_max=8000.0)), persistent=False
        )

    def extra_repr(self) -> str:
        return f"n_mels={self.n_mels}, sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop={self.hop_length}"

    def forward(self, wav: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Features of ``wav`` (B, S) whose first ``lengths`` (B,) samples are valid (all S when None).

        Returns:
            (mel (B, n_mels, S // hop), mel_lengths (B,) = lengths // hop). Frames past an utterance's end hold the
            value of silence after the floor, as in Whisper's 30 s padding.
        """
        if wav.dim() != 2:
            raise ValueError(f"LogMel: wav must be (B, S), got shape {tuple(wav.shape)}")
        b, s = wav.shape
        if lengths is None:
            lengths = torch.full((b,), s, dtype=torch.long, device=wav.device)
        lengths = lengths.to(device=wav.device, dtype=torch.long)
        half = self.n_fft // 2
        # Spectra in float32 even under autocast: log10 of bf16 powers loses Whisper's parity.
        with torch.autocast(device_type=wav.device.type, enabled=False):
            x = wav.float()
            # Zero whatever the batch padding holds, then add half a window of silence at the end: each utterance is
            # followed by silence, like Whisper's 30 s padding. The start is reflected, like torch.stft(center=True).
            x = x * (torch.arange(s, device=x.device)[None, :] < lengths[:, None])
            x = F.pad(F.pad(x[:, None, :], (half, 0), mode="reflect"), (0, half))[:, 0]
            spec = torch.stft(
                x, self.n_fft, self.hop_length, window=self.window, center=False, return_complex=True
            )
            # stft yields 1 + S // hop frames; Whisper drops the last so that 30 s gives exactly 3000.
            power = spec[..., :-1].abs().pow(2)
            log_spec = torch.clamp(self.filters @ power, min=1e-10).log10()

        n_frames = log_spec.shape[-1]
        mel_lengths = lengths // self.hop_length
        valid = torch.arange(n_frames, device=wav.device)[None, :] < mel_lengths[:, None]  # (B, T)
        # The floor follows each utterance's own loudest valid frame, so padding or batch-mates cannot move it.
        peak = log_spec.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.full_like(peak, -10.0))  # empty utterance: silence
        floor = peak - 8.0
        # Padding frames get what pure silence (log10 of the 1e-10 clamp) becomes after the floor.
        log_spec = torch.where(valid[:, None, :], torch.maximum(log_spec, floor), floor.clamp_min(-10.0))
        return (log_spec + 4.0) / 4.0, mel_lengths


    def padded(self, wavs: list[Tensor], multiple: int, pad_to: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """Features of each utterance zero-padded to a multiple of ``multiple`` samples and measured whole, as
        ``WhisperFeatureExtractor(padding="longest", pad_to_multiple_of=multiple, return_attention_mask=True)`` gives
        them for the utterance alone (centred STFT with reflection at both ends, the floor from the loudest frame of
        the padded audio): GLM-4-Voice's ``extract_speech_token``. Utterances are computed one by one, so a batch
        gives each one's own features. ``pad_to`` (per utterance) pads to at least that many samples, as the
        extractor pads the pieces of one long recording to the longest of them.

        Returns:
            (mel (B, n_mels, T) with T the longest padded utterance's frames, mel_lengths (B,) = frames whose first
            sample is audio, ``ceil(len / hop)``, as the extractor's attention mask counts them).
        """
        if multiple % self.hop_length:
            raise ValueError(f"LogMel.padded: multiple={multiple} is not a multiple of hop_length={self.hop_length}")
        feats, lengths = [], []
        with torch.autocast(device_type=self.window.device.type, enabled=False):
            for i, w in enumerate(wavs):
                n = int(w.shape[-1])
                total = -(-max(n, 1, pad_to[i] if pad_to else 0) // multiple) * multiple
                x = F.pad(w.float().reshape(-1).to(self.window.device), (0, total - n))
                spec = torch.stft(x, self.n_fft, self.hop_length, window=self.window, center=True,
                                  pad_mode="reflect", return_complex=True)
                log_spec = torch.clamp(self.filters @ spec[..., :-1].abs().pow(2), min=1e-10).log10()
                log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
                feats.append((log_spec + 4.0) / 4.0)
                lengths.append(-(-n // self.hop_length))
        frames = max(f.shape[-1] for f in feats)
        # frames past an utterance's padded end are never valid and lie in pooling windows of their own
        mel = torch.stack([F.pad(f, (0, frames - f.shape[-1]), value=float(f.min())) for f in feats])
        return mel, torch.tensor(lengths, device=mel.device)


def load_wav(path: str | os.PathLike, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 mono in [-1, 1] (channels averaged), resampled to ``sample_rate`` if given.

    Returns:
        (samples (S,), sample rate).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_wav: no such audio file: {path}")
    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = wav.mean(axis=1)
    if sample_rate is not None and sample_rate != sr:
        wav, sr = resample(wav, sr, sample_rate), sample_rate
    return np.ascontiguousarray(wav, dtype=np.float32), int(sr)


def save_wav(path: str | os.PathLike, wav: np.ndarray | Tensor, sample_rate: int) -> None:
    """Write mono ``wav`` (S,) in [-1, 1] as 16-bit PCM WAV, atomically: a crash never leaves a half-written file.

    Samples are clipped to [-1, 1] first, since out-of-range floats would wrap around in 16-bit integers.
    """
    if isinstance(wav, Tensor):
        wav = wav.detach().float().cpu().numpy()
    wav = np.clip(np.asarray(wav, dtype=np.float32).reshape(-1), -1.0, 1.0)
    with staged_file(path, "wb") as f:
        sf.write(f, wav, sample_rate, subtype="PCM_16", format="WAV")


# A small perceptually ordered colormap (anchors sampled from matplotlib's "magma"): dark = quiet, bright = loud.
_COLORMAP = torch.tensor(
    [
        [0.001, 0.000, 0.014],
        [0.231, 0.059, 0.439],
        [0.549, 0.161, 0.506],
        [0.871, 0.288, 0.409],
        [0.996, 0.624, 0.427],
        [0.987, 0.991, 0.750],
    ]
)


def mel_spectrogram_image(mel: Tensor) -> Tensor:
    """Colour image (3, n_mels, T) in [0, 1] of a mel spectrogram (n_mels, T), low frequencies at the bottom.

    Values are min-max scaled per image and mapped through a small magma-like colormap; pass the result to
    TensorBoard's ``add_image`` (dataformats "CHW").
    """
    if mel.dim() != 2:
        raise ValueError(f"mel_spectrogram_image: mel must be (n_mels, T), got shape {tuple(mel.shape)}")
    m = mel.detach().float().cpu().flip(0)  # image row 0 is the top: put the highest band there
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)
    # Piecewise-linear interpolation between the colormap anchors.
    pos = m * (len(_COLORMAP) - 1)
    lo = pos.floor().long().clamp(max=len(_COLORMAP) - 2)
    frac = (pos - lo).unsqueeze(-1)
    rgb = _COLORMAP[lo] * (1 - frac) + _COLORMAP[lo + 1] * frac  # (n_mels, T, 3)
    return rgb.permute(2, 0, 1).clamp(0.0, 1.0).contiguous()
