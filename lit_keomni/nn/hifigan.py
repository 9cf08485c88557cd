"""Unit HiFi-GAN (Kong et al. 2020; Polyak et al. 2021 "speech resynthesis"): discrete speech units -> waveform.

Notable features:
- ``UnitVocoder``: unit embedding (plus an optional speaker embedding) at the unit rate, then HiFi-GAN's generator:
  transposed-convolution upsampling whose rates multiply to the hop (``sample_rate / frame_rate``; 12.5 Hz units at
  16 kHz -> 1280 = 8·8·5·4), each followed by a multi-receptive-field fusion of residual blocks.
- ``UnitVocoder.stream``: chunked synthesis; every chunk is synthesised with enough unit context on both sides to cover
  the generator's receptive field and then cropped, so the concatenated chunks equal ``forward``.
- Multi-period (periods 2, 3, 5, 7, 11) and multi-scale (3 scales) discriminators, and HiFi-GAN's losses:
  least-squares adversarial, feature matching and the L1 distance of log-mel spectrograms (``VocoderMel``).
Presets: "v1" (HiFi-GAN V1 sizes) and "tiny" (CPU).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.configs import _Registered
from lit_keomni.nn.audio import mel_filters

LRELU_SLOPE = 0.1
MAX_UPSAMPLE_RATE = 16
"""Largest rate a single upsampling layer may take (HiFi-GAN's largest is 8; speech resynthesis uses 5)."""


def factor_hop(hop: int, stages: int) -> tuple[int, ...]:
    """Split ``hop`` into ``stages`` upsampling rates, as equal as possible, largest first (1280, 4 -> 8, 8, 5, 4).

    Prime factors, largest first, each go to the stage with the smallest product so far.
    """
    primes, n, p = [], hop, 2
    while p * p <= n:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    if n > 1:
        primes.append(n)
    rates = [1] * stages
    for q in sorted(primes, reverse=True):
        i = min(range(stages), key=lambda j: rates[j])
        rates[i] *= q
    rates = sorted(rates, reverse=True)
    if rates[0] > MAX_UPSAMPLE_RATE or rates[-1] < 2:
        raise ValueError(
            f"VocoderConfig: hop {hop} (sample_rate / frame_rate) does not factor into {stages} upsampling rates "
            f"between 2 and {MAX_UPSAMPLE_RATE} (prime factors {sorted(primes, reverse=True)}, best split {rates}); "
            f"change field 'num_upsamples' or 'frame_rate', or set 'upsample_rates' explicitly"
        )
    return tuple(rates)


UNIT_GENERATORS = ("hifigan", "vocos")
"""Generators of a unit vocoder (``VocoderConfig.generator``)."""


@dataclass
class VocoderConfig(_Registered):
    """Unit HiFi-GAN generator and discriminators (``nn/hifigan.py``)."""

    unit_dim: int = 128
    """Width of the unit embedding fed to the generator (speech resynthesis: 128)."""
    num_speakers: int = 0
    """Speakers of a speaker embedding added to the input; 0 = one model per speaker (KE-Omni §5.1)."""
    speaker_dim: int = 128
    """Width of the speaker embedding (used when ``num_speakers`` > 0)."""
    sample_rate: int = SAMPLE_RATE
    """Output sample rate; the unit source's audio rate."""
    frame_rate: float = 12.5
    """Units per second; ``hop = sample_rate / frame_rate`` output samples per unit."""
    num_upsamples: int = 4
    """Upsampling layers when ``upsample_rates`` is empty."""
    upsample_rates: tuple[int, ...] = ()
    """Rate of each upsampling layer; their product must be the hop. Empty = split the hop into ``num_upsamples``."""
    upsample_initial_channel: int = 512
    """Channels after the input convolution; halved by every upsampling layer (HiFi-GAN V1: 512)."""
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    """Kernel of each residual block of the multi-receptive-field fusion (V1: 3, 7, 11)."""
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    """Dilations of each residual block's convolutions (V1: 1, 3, 5 for all three)."""
    mpd_periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    """Periods of the multi-period discriminator."""
    mpd_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)
    """Channels of each period discriminator's five 2-D convolutions."""
    msd_channels: tuple[int, ...] = (128, 128, 256, 512, 1024, 1024, 1024)
    """Channels of each scale discriminator's seven 1-D convolutions."""
    msd_scales: int = 3
    """Scales of the multi-scale discriminator (raw audio, then average-pooled ×2, ×4)."""
    generator: str = "hifigan"
    """The generator behind the unit embedding: "hifigan" (upsampling convolutions, the fields above) or "vocos"
    (``nn.vocos.UnitVocos``: ConvNeXt blocks at ``istft_hop`` frames and an iSTFT head, the fields below)."""
    vocos_dim: int = 512
    """"vocos": width of the ConvNeXt blocks (the published Vocos: 512)."""
    vocos_intermediate_dim: int = 1536
    """"vocos": hidden size of every block's pointwise MLP (1,536)."""
    vocos_layers: int = 8
    """"vocos": ConvNeXt blocks (8)."""
    istft_hop: int = 256
    """"vocos": output samples per STFT frame; must divide the unit hop (1280 / 256 = 5 frames per unit)."""
    istft_n_fft: int = 1024
    """"vocos": FFT size and Hann window of the output iSTFT."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "v1": {},
        "tiny": {"unit_dim": 64, "upsample_initial_channel": 128, "resblock_kernel_sizes": (3,),
                 "resblock_dilation_sizes": ((1, 3, 5),), "mpd_channels": (4, 8, 16, 16, 16),
                 "msd_channels": (4, 8, 16, 16, 16, 16, 16)},
        # the same unit embedding and discriminators as "tiny", a Vocos generator (nn.vocos.UnitVocos)
        "vocos-tiny": {"unit_dim": 64, "generator": "vocos", "vocos_dim": 192, "vocos_intermediate_dim": 576,
                       "vocos_layers": 6, "mpd_channels": (4, 8, 16, 16, 16), "msd_channels": (4, 8, 16, 16, 16, 16, 16)},
        # the published Vocos generator behind V1's unit embedding and discriminators
        "vocos": {"generator": "vocos"},
    }

    def __post_init__(self) -> None:
        for name in ("upsample_rates", "resblock_kernel_sizes", "mpd_periods", "mpd_channels", "msd_channels"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        self.resblock_dilation_sizes = tuple(tuple(int(d) for d in ds) for ds in self.resblock_dilation_sizes)
        hop = self.sample_rate / self.frame_rate
        if hop != int(hop) or hop < 1:
            raise ValueError(f"VocoderConfig: field 'frame_rate' {self.frame_rate} Hz does not divide field "
                             f"'sample_rate' {self.sample_rate} into a whole number of samples per unit ({hop:g})")
        if not self.upsample_rates:
            self.upsample_rates = factor_hop(int(hop), self.num_upsamples)
        elif math.prod(self.upsample_rates) != int(hop):
            raise ValueError(f"VocoderConfig: field 'upsample_rates' {list(self.upsample_rates)} multiply to "
                             f"{math.prod(self.upsample_rates)}, but the hop sample_rate / frame_rate is {int(hop)}")
        self.num_upsamples = len(self.upsample_rates)
        if self.upsample_initial_channel % 2 ** self.num_upsamples:
            raise ValueError(f"VocoderConfig: field 'upsample_initial_channel' {self.upsample_initial_channel} must be "
                             f"divisible by 2**{self.num_upsamples} (halved by every upsampling layer)")
        if self.generator not in UNIT_GENERATORS:
            raise ValueError(f"VocoderConfig: field 'generator' is {self.generator!r}, expected one of "
                             f"{list(UNIT_GENERATORS)}")
        if self.generator == "vocos" and (self.hop % self.istft_hop or self.istft_n_fft < self.istft_hop
                                          or (self.istft_n_fft - self.istft_hop) % 2):
            raise ValueError(f"VocoderConfig: field 'istft_hop' {self.istft_hop} must divide the unit hop {self.hop}, "
                             f"and field 'istft_n_fft' {self.istft_n_fft} be at least it with an even difference")
        if len(self.resblock_dilation_sizes) != len(self.resblock_kernel_sizes):
            raise ValueError("VocoderConfig: fields 'resblock_kernel_sizes' and 'resblock_dilation_sizes' differ in length")

    @property
    def hop(self) -> int:
        return int(self.sample_rate / self.frame_rate)


def _init(m: nn.Module) -> None:
    """HiFi-GAN's initialisation of the generator's convolutions: N(0, 0.01)."""
    if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
        m.weight.data.normal_(0.0, 0.01)


class ResBlock(nn.Module):
    """HiFi-GAN ResBlock1: per dilation, leaky ReLU -> dilated conv -> leaky ReLU -> conv, added to the input."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2))
                                    for d in dilations)
        self.convs2 = nn.ModuleList(weight_norm(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2))
                                    for _ in dilations)
        self.reach = sum((kernel - 1) // 2 * (d + 1) for d in dilations)
        """Samples each side that one output depends on."""

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class UnitInput(nn.Module, abc.ABC):
    """What every unit vocoder shares: the unit (and speaker) embedding at the unit rate, ``stream`` and the rates.
    A subclass builds its generator on ``in_dim`` input channels and defines ``synthesise`` and ``receptive_units``."""

    def __init__(self, num_units: int, config: VocoderConfig) -> None:
        super().__init__()
        c = config
        self.config, self.num_units = c, num_units
        self.hop, self.sample_rate, self.frame_rate = c.hop, c.sample_rate, c.frame_rate
        self.unit_embed = nn.Embedding(num_units, c.unit_dim)
        self.in_dim = c.unit_dim
        if c.num_speakers > 0:
            self.speaker_embed = nn.Embedding(c.num_speakers, c.speaker_dim)
            self.in_dim += c.speaker_dim

    @property
    @abc.abstractmethod
    def receptive_units(self) -> int:
        """Units each side of an output sample that can change it: the context ``stream`` needs for exact chunks."""

    @abc.abstractmethod
    def synthesise(self, x: Tensor) -> Tensor:
        """Embedded units (B, in_dim, F) -> waveform (B, F·hop)."""

    def forward(self, units: Tensor, speaker: Tensor | None = None) -> Tensor:
        """Waveform (B, F·hop) of ``units`` (B, F) long; ``speaker`` (B,) long with a speaker embedding."""
        if units.dim() != 2:
            raise ValueError(f"{type(self).__name__}: units must be (B, F), got shape {tuple(units.shape)}")
        x = self.unit_embed(units).transpose(1, 2)  # (B, unit_dim, F)
        if self.config.num_speakers > 0:
            if speaker is None:
                raise ValueError(f"{type(self).__name__}: this model has {self.config.num_speakers} speakers; pass "
                                 f"speaker ids")
            s = self.speaker_embed(speaker)[:, :, None].expand(-1, -1, x.shape[-1])
            x = torch.cat([x, s], dim=1)
        return self.synthesise(x)

    @torch.no_grad()
    def stream(self, units: Tensor, chunk: int = 25, context: int | None = None,
               speaker: Tensor | int | None = None) -> Iterator[Tensor]:
        """Synthesise ``units`` (F,) ``chunk`` units at a time, yielding each chunk's waveform (chunk·hop,).

        Each chunk is synthesised with ``context`` units on either side (default: ``receptive_units``, enough for the
        result to equal ``forward`` up to float rounding) and cropped to its own span.
        """
        name = type(self).__name__
        if units.dim() != 1:
            raise ValueError(f"{name}.stream: units must be (F,), got shape {tuple(units.shape)}")
        if chunk < 1:
            raise ValueError(f"{name}.stream: chunk must be >= 1 unit, got {chunk}")
        ctx = self.receptive_units if context is None else context
        spk = None if speaker is None else torch.as_tensor(speaker, device=units.device).reshape(1)
        n = units.shape[0]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            a, b = max(0, s - ctx), min(n, e + ctx)
            wav = self(units[None, a:b], spk)[0]
            yield wav[(s - a) * self.hop : (e - a) * self.hop]

    def remove_weight_norm(self) -> "UnitInput":
        """Fold every weight-norm parametrisation into a plain weight (faster inference; as HiFi-GAN does)."""
        for m in self.modules():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight")
        return self


class UnitVocoder(UnitInput):
    """Units (B, F) -> waveform (B, F·hop) in [-1, 1]; the handoff of stage 7 (``checkpoints.load_vocoder``)."""

    def __init__(self, num_units: int, config: VocoderConfig) -> None:
        super().__init__(num_units, config)
        c = config
        self.conv_pre = weight_norm(nn.Conv1d(self.in_dim, c.upsample_initial_channel, 7, padding=3))
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = c.upsample_initial_channel
        for r in c.upsample_rates:
            k = 2 * r
            pad = (k - r + 1) // 2  # output length exactly L·r: 2·pad - output_padding = k - r
            self.ups.append(weight_norm(nn.ConvTranspose1d(ch, ch // 2, k, r, padding=pad, output_padding=2 * pad - (k - r))))
            ch //= 2
            self.resblocks.append(nn.ModuleList(ResBlock(ch, k_, d) for k_, d in
                                                zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)))
        self.conv_post = weight_norm(nn.Conv1d(ch, 1, 7, padding=3))
        self.ups.apply(_init)
        self.resblocks.apply(_init)

    @property
    def receptive_units(self) -> int:
        """Units each side of an output sample that can change it: the context ``stream`` needs for exact chunks.

        Walks back from the output: conv_post, then per stage the residual blocks and the transposed convolution
        (whose inputs j/r ± (reach + kernel) / r feed output j), then conv_pre; rounded up at every step.
        """
        reach = 3  # conv_post, in output samples
        for up, r, blocks in reversed(list(zip(self.ups, self.config.upsample_rates, self.resblocks))):
            reach += max(b.reach for b in blocks)
            reach = math.ceil((reach + up.kernel_size[0]) / r) + 1
        return reach + 3  # conv_pre

    def synthesise(self, x: Tensor) -> Tensor:
        x = self.conv_pre(x)
        for up, blocks in zip(self.ups, self.resblocks):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            x = sum(b(x) for b in blocks) / len(blocks)
        x = self.conv_post(F.leaky_relu(x))  # HiFi-GAN: default slope (0.01) before the output layer
        return torch.tanh(x)[:, 0]


# ------------------------------------------------------------------------------------------------ discriminators


def _judge(convs: nn.ModuleList, conv_post: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """A sub-discriminator's convolutions with leaky ReLUs: (flattened scores, every layer's feature map)."""
    fmap = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        fmap.append(x)
    x = conv_post(x)
    fmap.append(x)
    return x.flatten(1), fmap


class PeriodDiscriminator(nn.Module):
    """Audio folded into (T / p, p) and judged by 2-D convolutions along time, one column per phase."""

    def __init__(self, period: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.period = period
        ins = (1, *channels[:-1])
        strides = (3,) * (len(channels) - 1) + (1,)
        self.convs = nn.ModuleList(weight_norm(nn.Conv2d(i, o, (5, 1), (s, 1), padding=(2, 0)))
                                   for i, o, s in zip(ins, channels, strides))
        self.conv_post = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        b, c, t = x.shape
        if t % self.period:
            n_pad = self.period - t % self.period
            x = F.pad(x, (0, n_pad), "reflect" if n_pad < t else "constant")
            t += n_pad
        x = x.view(b, c, t // self.period, self.period)
        return _judge(self.convs, self.conv_post, x)


class ScaleDiscriminator(nn.Module):
    """Grouped strided 1-D convolutions over (pooled) audio; the first scale uses spectral norm."""

    KERNELS = (15, 41, 41, 41, 41, 41, 5)
    STRIDES = (1, 2, 2, 4, 4, 1, 1)
    GROUPS = (1, 4, 16, 16, 16, 16, 1)

    def __init__(self, channels: tuple[int, ...], spectral: bool = False) -> None:
        super().__init__()
        norm = spectral_norm if spectral else weight_norm
        ins = (1, *channels[:-1])
        self.convs = nn.ModuleList(
            norm(nn.Conv1d(i, o, k, s, groups=math.gcd(g, i, o), padding=(k - 1) // 2))
            for i, o, k, s, g in zip(ins, channels, self.KERNELS, self.STRIDES, self.GROUPS)
        )
        self.conv_post = norm(nn.Conv1d(channels[-1], 1, 3, 1, padding=1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return _judge(self.convs, self.conv_post, x)


class _Ensemble(nn.Module):
    """Runs every sub-discriminator on real and generated audio (B, 1, S)."""

    discriminators: nn.ModuleList

    def inputs(self, x: Tensor) -> list[Tensor]:
        return [x] * len(self.discriminators)

    def forward(self, real: Tensor, fake: Tensor) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]], list[list[Tensor]]]:
        """(scores on real, scores on generated, feature maps on real, feature maps on generated), one per
        sub-discriminator."""
        out: tuple[list, list, list, list] = ([], [], [], [])
        for d, r, f in zip(self.discriminators, self.inputs(real), self.inputs(fake)):
            sr, mr = d(r)
            sf, mf = d(f)
            for lst, v in zip(out, (sr, sf, mr, mf)):
                lst.append(v)
        return out


class MultiPeriodDiscriminator(_Ensemble):
    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, config.mpd_channels) for p in config.mpd_periods)


class MultiScaleDiscriminator(_Ensemble):
    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(ScaleDiscriminator(config.msd_channels, spectral=i == 0)
                                            for i in range(config.msd_scales))
        self.pool = nn.AvgPool1d(4, 2, padding=2)

    def inputs(self, x: Tensor) -> list[Tensor]:
        xs = [x]
        for _ in range(len(self.discriminators) - 1):
            xs.append(self.pool(xs[-1]))
        return xs


# ------------------------------------------------------------------------------------------------ losses


def discriminator_loss(real: list[Tensor], fake: list[Tensor]) -> Tensor:
    """Least-squares GAN, discriminator side: real scores -> 1, generated -> 0, summed over sub-discriminators."""
    return sum(torch.mean((1 - r) ** 2) + torch.mean(f**2) for r, f in zip(real, fake))


def generator_loss(fake: list[Tensor]) -> Tensor:
    """Least-squares GAN, generator side: generated scores -> 1."""
    return sum(torch.mean((1 - f) ** 2) for f in fake)


def feature_loss(real_maps: list[list[Tensor]], fake_maps: list[list[Tensor]]) -> Tensor:
    """Feature matching: L1 between the discriminators' feature maps on real and generated audio (×2, as HiFi-GAN)."""
    return 2 * sum(torch.mean(torch.abs(r.detach() - f)) for rs, fs in zip(real_maps, fake_maps) for r, f in zip(rs, fs))


class VocoderMel(nn.Module):
    """HiFi-GAN's loss spectrogram: ln(max(mel-filtered STFT magnitude, 1e-5)), (B, S) -> (B, n_mels, S // hop).

    The Slaney filters are ``nn.audio.mel_filters``; unlike Whisper's ``LogMel`` there is no per-utterance floor, so
    the loss of one frame does not depend on the loudest frame of the clip.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, n_fft: int = 1024, hop_length: int = 256, n_mels: int = 80,
                 f_max: float = 8000.0) -> None:
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filters", torch.from_numpy(mel_filters(sample_rate, n_fft, n_mels, f_max=min(f_max, sample_rate / 2))),
                             persistent=False)

    def forward(self, wav: Tensor) -> Tensor:
        pad = (self.n_fft - self.hop_length) // 2
        with torch.autocast(device_type=wav.device.type, enabled=False):
            x = F.pad(wav.float()[:, None], (pad, pad), mode="reflect")[:, 0]
            spec = torch.stft(x, self.n_fft, self.hop_length, window=self.window, center=False, return_complex=True)
            mag = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
            return torch.log(torch.clamp(self.filters @ mag, min=1e-5))
