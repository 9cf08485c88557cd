"""HiFT (Li et al. 2023, "HiFTNet"; CosyVoice's ``HiFTGenerator``): 80-bin log-mel -> waveform, GLM-4-Voice's vocoder.

Notable features:
- ``F0Predictor``: five weight-normed convolutions with ELU and a linear layer give |F0| in Hz per mel frame.
- ``SineGen`` / ``SourceModule``: the neural source-filter excitation. F0 is repeated to the sample rate; the
  fundamental and ``nb_harmonics`` overtones are summed phases (random initial phase except the fundamental), zeroed
  where F0 <= ``nsf_voiced_threshold``, plus Gaussian noise (σ ``nsf_sigma`` voiced, ``nsf_alpha / 3`` unvoiced),
  then merged by a linear layer and tanh. The random draws take a ``torch.Generator`` (or explicit tensors), so that a
  run can be repeated exactly.
- ``HiFTGenerator``: HiFi-GAN's transposed-convolution upsampling (8 × 8) with Snake-activated residual blocks; at
  each stage the STFT of the excitation (n_fft 16, hop 4), strided down to that stage's rate, is added; the output
  layer predicts an STFT (log-magnitude, phase) that ``torch.istft`` turns into ``hop`` = 8 · 8 · 4 = 256 samples per
  mel frame, clamped to ±``audio_limit``. ``inference(mel, cache_source)`` is the streaming contract of GLM-4-Voice's
  ``flow_inference.py``: the first samples of the excitation are replaced by the previous chunk's last ones.
- ``MelFrontEnd``: the mel it reads (CosyVoice / Matcha-TTS ``mel_spectrogram``: n_fft 1024, Hann window 1024, hop 256,
  80 Slaney mel bins from 0 to 8 kHz, ln(max(·, 1e-5)), reflect padding of (n_fft - hop) / 2, no centring).
- Training pieces (CosyVoice ``hifigan.py``): a multi-resolution spectrogram discriminator (next to HiFi-GAN's
  multi-period one in ``nn.hifigan``), the truncated pointwise relativistic loss ``tpr_loss`` and ``f0_track``, an
  autocorrelation F0 for the predictor's L1 target (CosyVoice uses WORLD's harvest).
- The released weights: ``from_released`` reads the ``hift`` section of glm-4-voice-decoder's ``config.yaml`` (as a
  plain dict), ``load_released_hift`` reads ``hift.pt`` (``weight_g`` / ``weight_v`` weight norm, as
  ``torch.nn.utils.weight_norm`` saves it, or the parametrised names) and ``hift_state_to_released`` writes that form.
Presets: "glm-4-voice-decoder" (the released sizes; its config.yaml ``hift`` section equals CosyVoice-300M's) and
"tiny" (CPU).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from lit_keomni.configs import _Registered
from lit_keomni.nn.hifigan import VocoderMel, _Ensemble, _judge


@dataclass
class MelVocoderFields:
    """Fields every mel vocoder (HiFT here, ``nn.vocos.VocosConfig``) shares: its output clamp, the mel it reads and
    the discriminators the stage-7 mel-vocoder stage trains it against."""

    audio_limit: float = 0.99
    """Output clamp."""
    mel_n_fft: int = 1024
    """FFT size and Hann window of the input mel (``MelFrontEnd``); its hop is ``hop``."""
    mel_f_max: float = 8000.0
    """Highest frequency of the input mel's filters (the lowest is 0 Hz)."""
    mpd_periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    """Periods of the multi-period discriminator (training only)."""
    mpd_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)
    """Channels of each period discriminator's five 2-D convolutions (training only)."""
    mrd_resolutions: tuple[tuple[int, int, int], ...] = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))
    """(n_fft, hop, window) of each spectrogram discriminator (CosyVoice's ``MultiResSpecDiscriminator``)."""
    mrd_channels: int = 32
    """Channels of the spectrogram discriminators' 2-D convolutions (training only)."""

    def __post_init__(self) -> None:
        self.mpd_periods = tuple(int(v) for v in self.mpd_periods)
        self.mpd_channels = tuple(int(v) for v in self.mpd_channels)
        self.mrd_resolutions = tuple(tuple(int(d) for d in r) for r in self.mrd_resolutions)


@dataclass
class HiFTConfig(MelVocoderFields, _Registered):
    """HiFT generator (``nn/hift.py``) and the discriminators it is trained against."""

    in_channels: int = 80
    """Mel bins of the input."""
    base_channels: int = 512
    """Channels after the input convolution; halved by every upsampling layer."""
    nb_harmonics: int = 8
    """Overtones above F0 in the sine excitation."""
    sampling_rate: int = 22050
    """Output sample rate."""
    nsf_alpha: float = 0.1
    """Amplitude of the sine excitation (unvoiced noise σ is a third of it)."""
    nsf_sigma: float = 0.003
    """σ of the noise added to voiced excitation."""
    nsf_voiced_threshold: float = 10.0
    """F0 (Hz) above which a sample is voiced."""
    upsample_rates: tuple[int, ...] = (8, 8)
    """Rate of each transposed-convolution upsampling; times ``istft_hop`` gives samples per mel frame."""
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    """Kernel of each upsampling layer."""
    istft_n_fft: int = 16
    """FFT size of the excitation STFT and of the output iSTFT."""
    istft_hop: int = 4
    """Hop of the excitation STFT and of the output iSTFT."""
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    """Kernel of each residual block after every upsampling layer (their outputs are averaged)."""
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    """Dilations of each residual block's convolutions."""
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    """Kernel of the residual block on the excitation at each upsampling stage."""
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    """Dilations of those residual blocks."""
    lrelu_slope: float = 0.1
    """Leaky-ReLU slope before every upsampling layer."""
    f0_channels: int = 512
    """Channels of the F0 predictor's convolutions."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "glm-4-voice-decoder": {},
        "tiny": {"base_channels": 64, "f0_channels": 64, "resblock_kernel_sizes": (3, 7),
                 "resblock_dilation_sizes": ((1, 3, 5), (1, 3, 5)), "mpd_channels": (8, 16, 32, 32, 32),
                 "mrd_channels": 8},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes", "source_resblock_kernel_sizes"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("resblock_dilation_sizes", "source_resblock_dilation_sizes"):
            setattr(self, name, tuple(tuple(int(d) for d in ds) for ds in getattr(self, name)))
        if len(self.upsample_kernel_sizes) != len(self.upsample_rates):
            raise ValueError("HiFTConfig: fields 'upsample_rates' and 'upsample_kernel_sizes' differ in length")
        if len(self.resblock_dilation_sizes) != len(self.resblock_kernel_sizes):
            raise ValueError("HiFTConfig: fields 'resblock_kernel_sizes' and 'resblock_dilation_sizes' differ in length")
        if len(self.source_resblock_kernel_sizes) != len(self.upsample_rates) or \
                len(self.source_resblock_dilation_sizes) != len(self.upsample_rates):
            raise ValueError(f"HiFTConfig: fields 'source_resblock_kernel_sizes' and 'source_resblock_dilation_sizes' "
                             f"need one entry per upsampling layer ({len(self.upsample_rates)})")
        if self.base_channels % 2 ** len(self.upsample_rates):
            raise ValueError(f"HiFTConfig: field 'base_channels' {self.base_channels} must be divisible by "
                             f"2**{len(self.upsample_rates)} (halved by every upsampling layer)")
        if any((k - r) % 2 for k, r in zip(self.upsample_kernel_sizes, self.upsample_rates)):
            raise ValueError("HiFTConfig: every 'upsample_kernel_sizes' - 'upsample_rates' must be even (the output "
                             "is then exactly rate times longer)")
        if self.istft_n_fft % 2 or self.istft_n_fft < 2 * self.istft_hop:
            raise ValueError(f"HiFTConfig: field 'istft_n_fft' {self.istft_n_fft} must be even and at least twice "
                             f"'istft_hop' {self.istft_hop}")

    @property
    def hop(self) -> int:
        """Output samples per mel frame."""
        return math.prod(self.upsample_rates) * self.istft_hop


# ------------------------------------------------------------------------------------------------ blocks


class Snake(nn.Module):
    """x + sin²(αx) / α with a learned α per channel (Ziyin et al. 2020), on (B, C, T)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class SnakeResBlock(nn.Module):
    """HiFT's residual block: per dilation, Snake -> dilated conv -> Snake -> conv, added to the input."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d,
                                                          padding=d * (kernel - 1) // 2)) for d in dilations)
        self.convs2 = nn.ModuleList(weight_norm(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2))
                                    for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x))))
        return x


class F0Predictor(nn.Module):
    """Mel (B, in_channels, T) -> F0 in Hz (B, T): five 3-wide convolutions with ELU, a linear layer, |·|."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [weight_norm(nn.Conv1d(in_channels if i == 0 else channels, channels, 3, padding=1)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: Tensor) -> Tensor:
        return self.classifier(self.condnet(mel).transpose(1, 2))[..., 0].abs()


class SineGen(nn.Module):
    """F0 (B, 1, L) in Hz at the sample rate -> (harmonic excitation (B, harmonics + 1, L), voiced mask (B, 1, L))."""

    def __init__(self, sample_rate: int, harmonics: int, sine_amp: float, noise_std: float, voiced_threshold: float) -> None:
        super().__init__()
        self.sample_rate, self.harmonics = sample_rate, harmonics
        self.sine_amp, self.noise_std, self.voiced_threshold = sine_amp, noise_std, voiced_threshold

    @torch.no_grad()
    def forward(self, f0: Tensor, generator: torch.Generator | None = None, phase: Tensor | None = None,
                noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``phase`` (B, harmonics + 1, 1) in [-π, π) and ``noise`` (B, harmonics + 1, L) standard normal default to
        draws from ``generator`` (torch's global one when None), phase first; the fundamental's phase is set to 0."""
        b, n, length = f0.shape[0], self.harmonics + 1, f0.shape[-1]
        mult = torch.arange(1, n + 1, device=f0.device, dtype=f0.dtype)[None, :, None]
        cycles = torch.cumsum(f0 * mult / self.sample_rate, dim=-1) % 1
        theta = 2 * math.pi * cycles
        device = generator.device if generator is not None else f0.device
        if phase is None:
            phase = -math.pi + torch.rand((b, n, 1), generator=generator, device=device) * (2 * math.pi)
        phase = phase.to(f0.device, f0.dtype).clone()
        phase[:, 0] = 0
        sine = self.sine_amp * torch.sin(theta + phase)
        uv = (f0 > self.voiced_threshold).to(f0.dtype)
        if noise is None:
            noise = torch.randn((b, n, length), generator=generator, device=device, dtype=f0.dtype)
        noise = (uv * self.noise_std + (1 - uv) * self.sine_amp / 3) * noise.to(f0.device)
        return sine * uv + noise, uv


class SourceModule(nn.Module):
    """F0 (B, 1, L) -> excitation (B, 1, L): ``SineGen``'s harmonics merged by a linear layer and tanh."""

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        c = config
        self.sine_gen = SineGen(c.sampling_rate, c.nb_harmonics, c.nsf_alpha, c.nsf_sigma, c.nsf_voiced_threshold)
        self.l_linear = nn.Linear(c.nb_harmonics + 1, 1)

    def forward(self, f0: Tensor, generator: torch.Generator | None = None, phase: Tensor | None = None,
                noise: Tensor | None = None) -> Tensor:
        sines, _ = self.sine_gen(f0, generator, phase, noise)
        return torch.tanh(self.l_linear(sines.transpose(1, 2))).transpose(1, 2)


class HiFTGenerator(nn.Module):
    """Mel (B, in_channels, T) -> waveform (B, T·hop); the handoff of stage 7 (HiFT), read by
    ``checkpoints.load_mel_vocoder``. Submodule names follow the released ``hift.pt``."""

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.hop, self.sample_rate, self.n_fft, self.istft_hop = c.hop, c.sampling_rate, c.istft_n_fft, c.istft_hop
        self.f0_predictor = F0Predictor(c.in_channels, c.f0_channels)
        self.m_source = SourceModule(c)
        self.conv_pre = weight_norm(nn.Conv1d(c.in_channels, c.base_channels, 7, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(c.base_channels // 2**i, c.base_channels // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)))
        # the excitation's STFT frames (hop istft_hop) are strided down to each stage's rate
        spec = c.istft_n_fft + 2
        strides = [math.prod(c.upsample_rates[i + 1:]) for i in range(len(c.upsample_rates))]
        self.source_downs = nn.ModuleList(
            nn.Conv1d(spec, c.base_channels // 2 ** (i + 1), 1) if u == 1 else
            nn.Conv1d(spec, c.base_channels // 2 ** (i + 1), 2 * u, u, padding=u // 2) for i, u in enumerate(strides))
        self.source_resblocks = nn.ModuleList(
            SnakeResBlock(c.base_channels // 2 ** (i + 1), k, d)
            for i, (k, d) in enumerate(zip(c.source_resblock_kernel_sizes, c.source_resblock_dilation_sizes)))
        self.resblocks = nn.ModuleList(
            SnakeResBlock(c.base_channels // 2 ** (i + 1), k, d)
            for i in range(len(c.upsample_rates)) for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
        self.conv_post = weight_norm(nn.Conv1d(c.base_channels // 2 ** len(c.upsample_rates), spec, 7, padding=3))
        self.register_buffer("window", torch.hann_window(c.istft_n_fft), persistent=False)

    def f0_to_source(self, f0: Tensor, generator: torch.Generator | None = None, phase: Tensor | None = None,
                     noise: Tensor | None = None) -> Tensor:
        """F0 per mel frame (B, T) -> excitation (B, 1, T·hop); random parts as ``SineGen``."""
        return self.m_source(f0[:, None].repeat_interleave(self.hop, dim=-1), generator, phase, noise)

    def decode(self, mel: Tensor, source: Tensor) -> Tensor:
        """Mel (B, in_channels, T) and excitation (B, 1, T·hop) -> waveform (B, T·hop)."""
        with torch.autocast(device_type=mel.device.type, enabled=False):
            spec = torch.stft(source[:, 0].float(), self.n_fft, self.istft_hop, window=self.window, return_complex=True)
        s = torch.cat([spec.real, spec.imag], dim=1).to(mel.dtype)  # (B, n_fft + 2, T·hop / istft_hop + 1)
        c = self.config
        k = len(c.resblock_kernel_sizes)
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # one frame more, to match the STFT's T·hop / istft_hop + 1
            x = x + self.source_resblocks[i](self.source_downs[i](s))
            x = sum(self.resblocks[i * k + j](x) for j in range(k)) / k
        x = self.conv_post(F.leaky_relu(x))
        bins = self.n_fft // 2 + 1
        with torch.autocast(device_type=mel.device.type, enabled=False):
            x = x.float()
            magnitude = torch.exp(x[:, :bins]).clamp(max=1e2)
            phase = torch.sin(x[:, bins:])  # as released: the phase passes through a sine
            wav = torch.istft(torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase)), self.n_fft,
                              self.istft_hop, window=self.window)
        return wav.clamp(-c.audio_limit, c.audio_limit)

    def forward(self, mel: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(waveform (B, T·hop), predicted F0 (B, T)) of ``mel`` (B, in_channels, T): the training forward."""
        if mel.dim() != 3 or mel.shape[1] != self.config.in_channels:
            raise ValueError(f"HiFTGenerator: mel must be (B, {self.config.in_channels}, T), got shape {tuple(mel.shape)}")
        f0 = self.f0_predictor(mel)
        return self.decode(mel, self.f0_to_source(f0, generator)), f0

    @torch.inference_mode()
    def inference(self, mel: Tensor, cache_source: Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(waveform (B, T·hop), excitation (B, 1, T·hop)) of ``mel``; the excitation's first samples are replaced by
        ``cache_source`` (B, 1, n), the previous chunk's last ``n`` excitation samples, so chunks join without a glitch
        (GLM-4-Voice streams with 1 mel frame of overlap and n = hop)."""
        if mel.dim() != 3 or mel.shape[1] != self.config.in_channels:
            raise ValueError(f"HiFTGenerator: mel must be (B, {self.config.in_channels}, T), got shape {tuple(mel.shape)}")
        source = self.f0_to_source(self.f0_predictor(mel), generator)
        if cache_source is not None and cache_source.shape[-1] > 0:
            n = cache_source.shape[-1]
            if cache_source.dim() != 3 or n > source.shape[-1]:
                raise ValueError(f"HiFTGenerator.inference: cache_source must be (B, 1, n) with n <= {source.shape[-1]} "
                                 f"samples, got shape {tuple(cache_source.shape)}")
            source[:, :, :n] = cache_source
        return self.decode(mel, source), source

    def remove_weight_norm(self) -> "HiFTGenerator":
        """Fold every weight-norm parametrisation into a plain weight (inference)."""
        for m in self.modules():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight")
        return self


class MelFrontEnd(VocoderMel):
    """The mel HiFT reads and is trained on (CosyVoice / Matcha-TTS ``mel_spectrogram``): (B, S) -> (B, n_mels, S // hop).

    n_fft 1024 with a 1024 Hann window, hop 256, 80 Slaney mel bins over 0 Hz-``f_max``, magnitude
    sqrt(re² + im² + 1e-9), ln(max(·, 1e-5)); the waveform is reflect-padded by (n_fft - hop) / 2 on both sides and
    not centred, so S samples give S // hop frames, aligned with the generator's hop.
    """

    def __init__(self, sample_rate: int = 22050, n_fft: int = 1024, hop_length: int = 256, n_mels: int = 80,
                 f_max: float = 8000.0) -> None:
        super().__init__(sample_rate, n_fft, hop_length, n_mels, f_max)
        self.sample_rate, self.n_mels, self.f_max = sample_rate, n_mels, min(f_max, sample_rate / 2)

    @classmethod
    def of(cls, config: HiFTConfig, f_max: float | None = None) -> "MelFrontEnd":
        """The input mel of ``config``; ``f_max`` overrides its upper band edge (None = ``config.mel_f_max``)."""
        return cls(config.sampling_rate, config.mel_n_fft, config.hop, config.in_channels,
                   config.mel_f_max if f_max is None else f_max)

    def settings(self) -> dict[str, Any]:
        """What an export records of the mel, so that a stage producing mels can check it matches."""
        return {"sample_rate": self.sample_rate, "n_fft": self.n_fft, "win_length": self.n_fft,
                "hop_length": self.hop_length, "n_mels": self.n_mels, "f_min": 0.0, "f_max": self.f_max,
                "log": "ln(max(mel, 1e-5))", "center": False}


# ------------------------------------------------------------------------------------------------ training pieces


class SpecDiscriminator(nn.Module):
    """STFT magnitude (B, 1, frames, bins) judged by 2-D convolutions, strided along frequency."""

    def __init__(self, n_fft: int, hop: int, win: int, channels: int) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(win), persistent=False)
        ins = (1, channels, channels, channels, channels)
        kernels, strides = ((3, 9),) * 4 + ((3, 3),), ((1, 1),) + ((1, 2),) * 3 + ((1, 1),)
        self.convs = nn.ModuleList(weight_norm(nn.Conv2d(i, channels, k, s, padding=(k[0] // 2, k[1] // 2)))
                                   for i, k, s in zip(ins, kernels, strides))
        self.conv_post = weight_norm(nn.Conv2d(channels, 1, 3, 1, padding=1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.stft(x[:, 0].float(), self.n_fft, self.hop, self.window.shape[0], self.window, return_complex=True)
            mag = spec.abs().transpose(1, 2)[:, None]
        return _judge(self.convs, self.conv_post, mag)


class MultiResolutionSpecDiscriminator(_Ensemble):
    """Spectrogram discriminators at ``config.mrd_resolutions`` (CosyVoice's ``MultiResSpecDiscriminator``)."""

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(SpecDiscriminator(n, h, w, config.mrd_channels)
                                            for n, h, w in config.mrd_resolutions)


def tpr_loss(real: list[Tensor], fake: list[Tensor], tau: float = 0.04) -> Tensor:
    """Truncated pointwise relativistic loss (Li et al. 2022, as CosyVoice): per sub-discriminator, the squared
    deviations of (real - fake) scores from their median, over the points where real does not beat fake by the
    median, averaged and capped at ``tau``. The discriminator calls it with (real, fake), the generator swapped."""
    loss = 0.0
    for r, f in zip(real, fake):
        d = r - f
        m = torch.median(d)
        mask = r < f + m
        below = ((d - m) ** 2)[mask]
        rel = below.mean() if below.numel() else d.new_zeros(())
        loss = loss + tau - F.relu(tau - rel)
    return loss


def f0_track(wav: Tensor, sample_rate: int = 22050, hop: int = 256, n_fft: int = 1024, f_min: float = 60.0,
             f_max: float = 500.0, threshold: float = 0.5) -> Tensor:
    """F0 in Hz (B, S // hop) of ``wav`` (B, S) by normalised autocorrelation, 0 where unvoiced.

    Frames are placed as ``MelFrontEnd``'s (reflect padding of (n_fft - hop) / 2, windows of n_fft); per frame the
    shortest lag between sample_rate / f_max and sample_rate / f_min whose window-corrected autocorrelation peak is
    within 10 % of the highest, refined by a parabola, gives F0 when that correlation reaches ``threshold`` (and the frame is not silent).
    """
    pad = (n_fft - hop) // 2
    with torch.autocast(device_type=wav.device.type, enabled=False):
        x = F.pad(wav.float()[:, None], (pad, pad), mode="reflect")[:, 0]
        frames = x.unfold(-1, n_fft, hop)  # (B, S // hop, n_fft)
        frames = frames - frames.mean(-1, keepdim=True)
        spec = torch.fft.rfft(frames * torch.hann_window(n_fft, device=x.device), n=2 * n_fft)
        ac = torch.fft.irfft(spec.abs().pow(2), n=2 * n_fft)[..., :n_fft]
        window_ac = torch.fft.irfft(torch.fft.rfft(torch.hann_window(n_fft, device=x.device), n=2 * n_fft).abs().pow(2),
                                    n=2 * n_fft)[:n_fft]
        energy = ac[..., :1]
        r = ac / window_ac.clamp(min=1e-8) * window_ac[0] / energy.clamp(min=1e-12)  # window-corrected, 1 at lag 0
        lo, hi = int(sample_rate / f_max), min(int(math.ceil(sample_rate / f_min)), n_fft // 2)
        seg = r[..., lo : hi + 1]
        # the shortest lag whose peak is within 10 % of the highest: a periodic frame correlates as well at 2, 3, ...
        # periods, and the highest of those peaks would give F0 / 2 as often as F0
        peaks = F.pad((seg[..., 1:-1] >= seg[..., :-2]) & (seg[..., 1:-1] >= seg[..., 2:]), (1, 1))
        near = peaks & (seg >= 0.9 * seg.amax(-1, keepdim=True))
        best = torch.where(near.any(-1, keepdim=True), near.float().argmax(-1, keepdim=True), seg.argmax(-1, keepdim=True))
        peak = seg.gather(-1, best)[..., 0]
        left = seg.gather(-1, (best - 1).clamp(min=0))[..., 0]
        right = seg.gather(-1, (best + 1).clamp(max=seg.shape[-1] - 1))[..., 0]
        denom = left - 2 * peak + right
        shift = torch.where(denom.abs() > 1e-9, 0.5 * (left - right) / denom, torch.zeros_like(denom)).clamp(-0.5, 0.5)
        lag = lo + best[..., 0].float() + shift
        voiced = (peak >= threshold) & (energy[..., 0] > 1e-6 * n_fft)
        return torch.where(voiced, sample_rate / lag, torch.zeros_like(lag))


# ------------------------------------------------------------------------------------------------ released weights

_RELEASED_KEYS = {
    "in_channels", "base_channels", "nb_harmonics", "sampling_rate", "nsf_alpha", "nsf_sigma", "nsf_voiced_threshold",
    "upsample_rates", "upsample_kernel_sizes", "istft_params", "resblock_kernel_sizes", "resblock_dilation_sizes",
    "source_resblock_kernel_sizes", "source_resblock_dilation_sizes", "lrelu_slope", "audio_limit", "f0_predictor",
}


def _class_name(value: Any) -> str:
    return str(value).rsplit(".", 1)[-1].removeprefix("!new:")


def from_released(section: dict[str, Any], source: str = "config.yaml") -> HiFTConfig:
    """``HiFTConfig`` of the ``hift`` section of a released CosyVoice / glm-4-voice-decoder ``config.yaml``, given as a
    plain dict (keys as in the yaml, ``_class`` naming the class, ``f0_predictor`` a dict with its own ``_class``);
    options this module does not implement are one error naming ``source`` and the field."""
    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{source}: field 'hift.{field}' {why}")

    if not isinstance(section, dict):
        raise ValueError(f"{source}: the 'hift' section must be a mapping, got {type(section).__name__}")
    cls = _class_name(section.get("_class", "HiFTGenerator"))
    if cls != "HiFTGenerator":
        raise bad("_class", f"is {section.get('_class')!r}; only HiFTGenerator is implemented (not the causal "
                            f"CosyVoice 3 generator)")
    unknown = sorted(set(section) - _RELEASED_KEYS - {"_class"})
    if unknown:
        raise bad(unknown[0], f"is not a HiFTGenerator option this module implements (unknown keys {unknown})")
    values: dict[str, Any] = {k: section[k] for k in _RELEASED_KEYS - {"istft_params", "f0_predictor"} if k in section}
    istft = section.get("istft_params", {"n_fft": 16, "hop_len": 4})
    if not isinstance(istft, dict) or set(istft) - {"n_fft", "hop_len"}:
        raise bad("istft_params", f"must be a mapping with n_fft and hop_len, got {istft!r}")
    values["istft_n_fft"], values["istft_hop"] = istft.get("n_fft", 16), istft.get("hop_len", 4)
    f0 = section.get("f0_predictor")
    if not isinstance(f0, dict):
        raise bad("f0_predictor", f"must be a mapping (ConvRNNF0Predictor's arguments with '_class'), got {f0!r}")
    if _class_name(f0.get("_class", "ConvRNNF0Predictor")) != "ConvRNNF0Predictor":
        raise bad("f0_predictor._class", f"is {f0.get('_class')!r}; only ConvRNNF0Predictor is implemented")
    unknown = sorted(set(f0) - {"_class", "num_class", "in_channels", "cond_channels"})
    if unknown:
        raise bad(f"f0_predictor.{unknown[0]}", "is not a ConvRNNF0Predictor option this module implements")
    if f0.get("num_class", 1) != 1:
        raise bad("f0_predictor.num_class", f"is {f0['num_class']}; only 1 (one F0 track) is implemented")
    if f0.get("in_channels", values.get("in_channels", 80)) != values.get("in_channels", 80):
        raise bad("f0_predictor.in_channels", f"is {f0['in_channels']}, but 'hift.in_channels' is "
                                              f"{values.get('in_channels', 80)}")
    values["f0_channels"] = f0.get("cond_channels", 512)
    for k, v in values.items():
        if isinstance(v, str):  # an unresolved `!ref <sample_rate>`
            raise bad(k, f"is the string {v!r}; resolve references to plain values first")
    try:
        return HiFTConfig(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: the 'hift' section gives an invalid HiFT: {e}") from None


_WN_RELEASED = re.compile(r"^(.*)\.weight_([gv])$")


def _parametrised(state: dict[str, Tensor]) -> set[str]:
    """Module paths of ``state`` whose weight is weight-normed (``<m>.parametrizations.weight.original0``)."""
    return {k.removesuffix(".parametrizations.weight.original0") for k in state if k.endswith(".parametrizations.weight.original0")}


def _norm_except_dim0(w: Tensor) -> Tensor:
    return w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))


def load_released_hift(path: str | Path, config: HiFTConfig) -> HiFTGenerator:
    """``HiFTGenerator`` of ``config`` with the weights of a released ``hift.pt`` (a plain state dict; weight norm as
    ``weight_g`` / ``weight_v``, as ``parametrizations.weight.original0/1``, or folded into ``weight``), in eval
    mode. Missing, unexpected or misshaped keys are one error naming the file and the keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: released HiFT weights (hift.pt) not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with objects
        raise ValueError(f"{path}: cannot read as a state dict ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (what HiFTGenerator.state_dict() saves)")
    model = HiFTGenerator(config)
    own = model.state_dict()
    wn = _parametrised(own)
    state: dict[str, Tensor] = {}
    for k, v in raw.items():
        m = _WN_RELEASED.match(k)
        if m and m.group(1) in wn:
            state[f"{m.group(1)}.parametrizations.weight.original{0 if m.group(2) == 'g' else 1}"] = v
        elif k.endswith(".weight") and k.removesuffix(".weight") in wn:  # weight norm removed before saving
            state[f"{k.removesuffix('.weight')}.parametrizations.weight.original0"] = _norm_except_dim0(v)
            state[f"{k.removesuffix('.weight')}.parametrizations.weight.original1"] = v
        else:
            state[k] = v
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in file, {tuple(v.shape)} in model" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = ([f"missing keys {_released_names(missing)[:8]}"] if missing else []) + \
               ([f"unexpected keys {unexpected[:8]}"] if unexpected else []) + \
               (["shape mismatch " + "; ".join(shapes[:8])] if shapes else [])
    if problems:
        raise ValueError(f"{path}: weights do not fit HiFTGenerator({config.base_channels} base channels, "
                         f"{config.nb_harmonics} harmonics): " + " | ".join(problems))
    model.load_state_dict(state)
    return model.eval()


def _released_names(keys: list[str]) -> list[str]:
    out = []
    for k in keys:
        for suffix, tail in ((".parametrizations.weight.original0", ".weight_g"), (".parametrizations.weight.original1", ".weight_v")):
            if k.endswith(suffix):
                k = k.removesuffix(suffix) + tail
        out.append(k)
    return out


def hift_state_to_released(model: HiFTGenerator) -> dict[str, Tensor]:
    """The state dict in the released ``hift.pt`` form: weight norm as ``<m>.weight_g`` / ``<m>.weight_v`` (a model
    whose weight norm was removed is written with g = per-output-channel norm, v = the weight)."""
    own = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    for k, v in own.items():
        if k.endswith(".parametrizations.weight.original0"):
            out[k.removesuffix(".parametrizations.weight.original0") + ".weight_g"] = v
        elif k.endswith(".parametrizations.weight.original1"):
            out[k.removesuffix(".parametrizations.weight.original1") + ".weight_v"] = v
        else:
            out[k] = v
    normed = _parametrised(HiFTGenerator(model.config).state_dict()) if not _parametrised(own) else set()
    for m in normed:
        if f"{m}.weight" in out:
            w = out.pop(f"{m}.weight")
            out[f"{m}.weight_g"], out[f"{m}.weight_v"] = _norm_except_dim0(w), w
    return out
