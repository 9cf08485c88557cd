"""Vocos (Siuzdak 2023, "Vocos: closing the gap between time-domain and Fourier-based neural vocoders"): log-mel ->
waveform by predicting the STFT at the mel frame rate, a mel vocoder for the GLM-4-Voice decoder beside HiFT.

Notable features:
- ``VocosGenerator``: a 7-wide input convolution and LayerNorm, ConvNeXt blocks (depthwise 7-wide convolution,
  LayerNorm, pointwise MLP with GELU, layer scale, residual), a final LayerNorm, and the iSTFT head: a linear layer
  gives log-magnitude and phase of every STFT bin per mel frame, ``istft_same`` turns them into ``hop`` samples per
  frame. No upsampling: every layer runs at the frame rate (86 frames/s at 22,050 Hz / hop 256), which is why it
  trains and runs several times cheaper than HiFi-GAN-type generators that run at the sample rate.
- ``istft_same``: Vocos's "same"-padded inverse STFT (windowed overlap-add divided by the window envelope, the
  ``(n_fft - hop) / 2`` samples of each edge cropped), so T frames give exactly T · hop samples, frame t centred where
  ``nn.hift.MelFrontEnd`` (reflect padding of (n_fft - hop) / 2, no centring) read it.
- The same contract as ``nn.hift.HiFTGenerator`` (``forward(mel, generator)``, ``inference(mel, cache_source,
  generator)``, ``remove_weight_norm``, ``config.in_channels / sampling_rate / hop``), so ``Token2Wav``,
  ``eval resynth`` and the stage-7 mel-vocoder stage take either; it has no excitation, so its ``cache_source`` is
  empty, and streamed chunks are joined by ``Token2Wav``'s cross-fade alone.
- Trained by ``stages.mel_vocoder.MelVocoder`` against the same discriminators as HiFT (multi-period and
  multi-resolution spectrogram, as Vocos), with the full-band mel L1.
- ``UnitVocos``: the same generator behind a unit embedding (each 12.5 Hz unit repeated to 5 frames of hop 256 at
  16 kHz), a stage-7 unit vocoder beside KE-Omni's unit HiFi-GAN (``VocoderConfig.generator`` "vocos", preset
  "vocos-tiny"), trained by ``stages.vocoder.Vocoder`` with HiFi-GAN's discriminators and losses.
Presets: "vocos-tiny" (CPU, 1.7 M parameters) and "vocos" (the published mel-Vocos size: dim 512, 1,536 hidden,
8 blocks, 13.5 M parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_keomni.configs import _Registered
from lit_keomni.nn.hifigan import UnitInput, UnitVocoder, VocoderConfig
from lit_keomni.nn.hift import HiFTConfig, HiFTGenerator, MelVocoderFields


@dataclass
class VocosConfig(MelVocoderFields, _Registered):
    """Vocos generator (``nn/vocos.py``); the mel it reads and its discriminators are ``MelVocoderFields``."""

    in_channels: int = 80
    """Mel bins of the input."""
    dim: int = 512
    """Width of the ConvNeXt blocks."""
    intermediate_dim: int = 1536
    """Hidden size of every block's pointwise MLP."""
    num_layers: int = 8
    """ConvNeXt blocks."""
    kernel_size: int = 7
    """Width of the input and the depthwise convolutions (odd)."""
    layer_scale_init: float | None = None
    """Initial layer scale of every block; None = 1 / num_layers (as Vocos)."""
    sampling_rate: int = 22050
    """Output sample rate."""
    hop: int = 256
    """Output samples per mel frame (the iSTFT hop)."""
    n_fft: int = 1024
    """FFT size and Hann window of the output iSTFT."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "vocos": {},
        "vocos-tiny": {"dim": 192, "intermediate_dim": 576, "num_layers": 6, "mpd_channels": (8, 16, 32, 32, 32),
                       "mrd_channels": 8},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("in_channels", "dim", "intermediate_dim", "num_layers", "sampling_rate", "hop", "n_fft"):
            if getattr(self, field) < 1:
                raise ValueError(f"VocosConfig: field '{field}' is {getattr(self, field)}, must be >= 1")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"VocosConfig: field 'kernel_size' {self.kernel_size} must be odd")
        if self.n_fft % 2 or self.n_fft < self.hop or (self.n_fft - self.hop) % 2:
            raise ValueError(f"VocosConfig: field 'n_fft' {self.n_fft} must be even, at least 'hop' {self.hop}, and "
                             f"n_fft - hop even (the iSTFT crops (n_fft - hop) / 2 samples of each edge)")


def istft_same(spec: Tensor, n_fft: int, hop: int, window: Tensor) -> Tensor:
    """Complex STFT (B, n_fft // 2 + 1, T) -> waveform (B, T · hop): windowed overlap-add of the inverse FFTs,
    divided by the summed squared window, with (n_fft - hop) / 2 samples cropped at each edge (Vocos's ``ISTFT``
    with ``padding="same"``; ``torch.istft`` only centres, which gives (T - 1) · hop)."""
    B, _, T = spec.shape
    pad = (n_fft - hop) // 2
    frames = torch.fft.irfft(spec, n_fft, dim=1, norm="backward") * window[None, :, None]  # (B, n_fft, T)
    size = (T - 1) * hop + n_fft
    y = F.fold(frames, output_size=(1, size), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0, pad:size - pad]
    env = F.fold(window.square()[None, :, None].expand(1, n_fft, T), output_size=(1, size), kernel_size=(1, n_fft),
                 stride=(1, hop))[0, 0, 0, pad:size - pad]
    return y / env.clamp(min=1e-11)


class ConvNeXtBlock(nn.Module):
    """Depthwise conv -> LayerNorm -> Linear -> GELU -> Linear -> layer scale, added to the input; on (B, dim, T)."""

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.transpose(1, 2)


class VocosGenerator(nn.Module):
    """Mel (B, in_channels, T) -> waveform (B, T · hop); a stage-7 mel vocoder read by ``checkpoints.load_mel_vocoder``."""

    def __init__(self, config: VocosConfig) -> None:
        super().__init__()
        c = self.config = config
        self.hop, self.sample_rate, self.n_fft = c.hop, c.sampling_rate, c.n_fft
        self.embed = nn.Conv1d(c.in_channels, c.dim, c.kernel_size, padding=c.kernel_size // 2)
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)
        scale = c.layer_scale_init if c.layer_scale_init is not None else 1.0 / c.num_layers
        self.blocks = nn.ModuleList(ConvNeXtBlock(c.dim, c.intermediate_dim, c.kernel_size, scale)
                                    for _ in range(c.num_layers))
        self.final_norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.head = nn.Linear(c.dim, c.n_fft + 2)
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def _check(self, mel: Tensor) -> None:
        if mel.dim() != 3 or mel.shape[1] != self.config.in_channels:
            raise ValueError(f"VocosGenerator: mel must be (B, {self.config.in_channels}, T), got shape {tuple(mel.shape)}")

    def decode(self, mel: Tensor) -> Tensor:
        """Mel (B, in_channels, T) -> waveform (B, T · hop)."""
        x = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        x = self.head(self.final_norm(x.transpose(1, 2))).transpose(1, 2)  # (B, n_fft + 2, T)
        bins = self.n_fft // 2 + 1
        with torch.autocast(device_type=mel.device.type, enabled=False):
            x = x.float()
            magnitude = torch.exp(x[:, :bins]).clamp(max=1e2)
            phase = x[:, bins:]
            wav = istft_same(torch.polar(magnitude, phase), self.n_fft, self.hop, self.window)
        return wav.clamp(-self.config.audio_limit, self.config.audio_limit)

    def forward(self, mel: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, None]:
        """(waveform (B, T · hop), None): the training forward; no F0 and nothing random (``generator`` is unused)."""
        self._check(mel)
        return self.decode(mel), None

    @torch.inference_mode()
    def inference(self, mel: Tensor, cache_source: Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(waveform (B, T · hop), an empty excitation (B, 1, 0)): HiFT's streaming contract; there is no
        excitation to carry between chunks, so ``cache_source`` is ignored."""
        self._check(mel)
        return self.decode(mel), mel.new_zeros(mel.shape[0], 1, 0)

    def remove_weight_norm(self) -> "VocosGenerator":
        """Nothing to fold (no weight norm); HiFT's inference contract."""
        return self


# ------------------------------------------------------------------------------------------------ the two mel vocoders

MEL_VOCODERS = ("hift", "vocos")
"""Generators of a "mel_vocoder" export, recorded in its config.json field ``generator`` (absent = "hift")."""


def mel_vocoder_classes(generator: str, source: str = "config.json") -> tuple[type, type]:
    """(config class, generator class) of a mel-vocoder family, one error naming ``source`` for an unknown one."""
    if generator == "hift":
        return HiFTConfig, HiFTGenerator
    if generator == "vocos":
        return VocosConfig, VocosGenerator
    raise ValueError(f"{source}: field 'generator' is {generator!r}, expected one of {list(MEL_VOCODERS)}")


def mel_vocoder_family(preset: str) -> str:
    """The family ("hift" or "vocos") of a mel-vocoder preset name; one error listing both families' presets."""
    for family in MEL_VOCODERS:
        if preset in mel_vocoder_classes(family)[0].presets:
            return family
    known = sorted([*HiFTConfig.presets, *VocosConfig.presets])
    raise ValueError(f"model.config: unknown mel-vocoder preset {preset!r}; known: {known}")


# --------------------------------------------------------------------------------------------------- the unit vocoder


class UnitVocos(UnitInput):
    """Units (B, F) -> waveform (B, F·hop): the unit embedding repeated to ``istft_hop`` frames (5 per 12.5 Hz unit
    at 16 kHz / 256), then ``VocosGenerator``'s ConvNeXt blocks and iSTFT head. A stage-7 unit vocoder
    (``VocoderConfig.generator`` "vocos") with ``UnitVocoder``'s contract: ``forward``, ``stream``,
    ``receptive_units``, ``remove_weight_norm``."""

    def __init__(self, num_units: int, config: VocoderConfig) -> None:
        super().__init__(num_units, config)
        c = config
        self.frames_per_unit = c.hop // c.istft_hop
        self.vocos = VocosGenerator(VocosConfig(
            in_channels=self.in_dim, dim=c.vocos_dim, intermediate_dim=c.vocos_intermediate_dim,
            num_layers=c.vocos_layers, sampling_rate=c.sample_rate, hop=c.istft_hop, n_fft=c.istft_n_fft,
            audio_limit=1.0))

    @property
    def receptive_units(self) -> int:
        """Units each side of an output sample that can change it: the input and depthwise convolutions' reach in
        frames, plus the iSTFT window's, in units, rounded up, plus one."""
        v = self.vocos.config
        frames = (v.kernel_size // 2) * (v.num_layers + 1) + math.ceil(v.n_fft / (2 * v.hop))
        return math.ceil(frames / self.frames_per_unit) + 1

    def synthesise(self, x: Tensor) -> Tensor:
        return self.vocos.decode(x.repeat_interleave(self.frames_per_unit, dim=-1))


def unit_vocoder_class(config: VocoderConfig) -> type[UnitInput]:
    """The unit vocoder of ``config.generator``: ``UnitVocoder`` (HiFi-GAN) or ``UnitVocos``."""
    return UnitVocos if config.generator == "vocos" else UnitVocoder
