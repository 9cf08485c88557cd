"""Unit vocoder speed: real-time factor of ``lit_keomni.nn.hifigan.UnitVocoder`` whole-utterance and streaming.

    python benchmarks/vocoder.py [--configs tiny v1 --seconds 10 --chunk 25 --repeats 3 --threads N --device cpu|cuda]

Random weights (speed does not depend on them), weight norm folded in as ``checkpoints.load_vocoder`` does, 12.5 Hz
units at 16 kHz (hop 1280). Real-time factor (RTF) = synthesis wall seconds / audio seconds (median over
``--repeats`` after one warm-up); below 1 is faster than real time. References, side by side with a ratio:
- whole utterance (``forward``): real time itself, RTF 1.0 (ratio = how many times faster than real time);
- streaming (``stream``, ``--chunk`` units per chunk with the receptive-field context on both sides): the
  whole-utterance synthesis of the same units (ratio = the cost of streaming), plus the latency of the first chunk.
The streamed audio is checked against the whole utterance (max abs difference printed).
"""

from __future__ import annotations

import argparse

import torch

from common import machine_line, timed
from lit_keomni.nn.hifigan import UnitVocoder, VocoderConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "v1"], help="VocoderConfig presets")
    p.add_argument("--seconds", type=float, default=10.0, help="audio length of the utterance")
    p.add_argument("--chunk", type=int, default=25, help="units per streaming chunk (25 = 2 s)")
    p.add_argument("--num-units", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(machine_line(device))
    print(f"{a.seconds:g} s utterance, 12.5 Hz units -> 16 kHz; streaming chunks of {a.chunk} units; median of {a.repeats}")
    header = (f"{'config':<7} {'params':>7} {'mode':<10} {'ours RTF':>9} {'reference':<22} {'ref RTF':>8} "
              f"{'ratio':>7}  notes")
    print(header)
    print("-" * len(header))
    for name in a.configs:
        torch.manual_seed(0)
        vocoder = UnitVocoder(a.num_units, VocoderConfig.from_name(name)).remove_weight_norm().eval().to(device)
        n_units = round(a.seconds * vocoder.frame_rate)
        units = torch.randint(0, a.num_units, (n_units,), device=device)
        audio_s = n_units * vocoder.hop / vocoder.sample_rate
        params = f"{sum(p.numel() for p in vocoder.parameters()) / 1e6:.1f}M"
        with torch.inference_mode():
            full = timed(lambda: vocoder(units[None]), a.repeats, device) / audio_s
            stream = timed(lambda: list(vocoder.stream(units, chunk=a.chunk)), a.repeats, device) / audio_s
            first = timed(lambda: next(vocoder.stream(units, chunk=a.chunk)), a.repeats, device)
            diff = (torch.cat(list(vocoder.stream(units, chunk=a.chunk))) - vocoder(units[None])[0]).abs().max().item()
        print(f"{name:<7} {params:>7} {'whole':<10} {full:>9.4f} {'real time':<22} {1.0:>8.4f} {1.0 / full:>6.1f}x  "
              f"faster than real time")
        print(f"{name:<7} {params:>7} {'streaming':<10} {stream:>9.4f} {'whole utterance':<22} {full:>8.4f} "
              f"{stream / full:>6.2f}x  cost of streaming; first chunk {first * 1000:.0f} ms; context "
              f"{vocoder.receptive_units} units; max |stream - whole| {diff:.1e}")


if __name__ == "__main__":
    main()
