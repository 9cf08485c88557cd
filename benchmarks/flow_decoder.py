"""GLM-4-Voice decoder speed: real-time factor of ``token2wav.Token2Wav`` (flow matching + HiFT or Vocos) beside the
stage-7 unit vocoders (HiFi-GAN, Vocos), on CPU (or CUDA).

    python benchmarks/flow_decoder.py [--configs tiny glm-4-voice-decoder --seconds 10 --steps 10 5 --repeats 3 --threads N]

Random weights (speed does not depend on them), weight norm folded in as the loaders do, 12.5 Hz speech tokens.
Real-time factor (RTF) = synthesis wall seconds / audio seconds (median over ``--repeats`` after one warm-up); below 1
is faster than real time. Rows, each with the load average beside it (the machine may be shared):
- the flow decoder with ``--steps`` ODE steps (Euler, classifier-free guidance 0.7: two estimator passes per step),
  each mel vocoder (HiFT, Vocos) alone, and the whole decoder offline (with either) and streamed (HiFT; blocks 25,
  50, 100, ... as web_demo);
- the reference beside them: the stage-7 unit HiFi-GAN of the same preset family ("tiny", or "v1" beside the
  released decoder's sizes) on the same number of 12.5 Hz units, whole utterance, and the unit Vocos of that family
  ("vocos-tiny", "vocos"); the ratio is RTF / unit HiFi-GAN RTF (how much dearer than KE-Omni's unit vocoder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for lit_keomni
from common import load_line, machine_line, timed  # noqa: E402
from lit_keomni.nn.flow import FlowConfig, FlowDecoder  # noqa: E402
from lit_keomni.nn.hifigan import UnitVocoder, VocoderConfig  # noqa: E402
from lit_keomni.nn.hift import HiFTConfig, HiFTGenerator  # noqa: E402
from lit_keomni.nn.vocos import UnitVocos, VocosConfig, VocosGenerator  # noqa: E402
from lit_keomni.token2wav import BLOCKS, Token2Wav  # noqa: E402

UNIT_VOCODER = {"tiny": "tiny", "glm-4-voice-decoder": "v1"}
"""The unit HiFi-GAN preset benchmarked beside each decoder preset."""
UNIT_VOCOS = {"tiny": "vocos-tiny", "glm-4-voice-decoder": "vocos"}
"""The unit Vocos preset (``VocoderConfig``) beside each decoder preset."""
VOCOS = {"tiny": "vocos-tiny", "glm-4-voice-decoder": "vocos"}
"""The Vocos mel vocoder preset (``VocosConfig``) beside each decoder preset's HiFT."""


def streamed(t2w: Token2Wav, tokens: list[int]) -> list[torch.Tensor]:
    """Every audio chunk of ``tokens`` decoded in the web demo's blocks (25, 50, 100, 150, 200)."""
    stream = t2w.streamer(BLOCKS)
    return stream.push(tokens) + stream.flush()


def params(*modules: torch.nn.Module) -> str:
    return f"{sum(p.numel() for m in modules for p in m.parameters()) / 1e6:.1f}M"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "glm-4-voice-decoder"], help="FlowConfig / HiFTConfig presets")
    p.add_argument("--seconds", type=float, default=10.0, help="audio length of the utterance")
    p.add_argument("--steps", nargs="+", type=int, default=[10, 5], help="ODE steps of the flow")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(machine_line(device))
    print(f"{a.seconds:g} s utterance, 12.5 Hz tokens -> 22,050 Hz (decoder) / 16 kHz (unit vocoder); median of "
          f"{a.repeats}")
    header = f"{'config':<20} {'params':>7} {'what':<28} {'RTF':>8} {'unit HiFi-GAN':>14} {'ratio':>8}  load"
    print(header)
    print("-" * len(header))
    for name in a.configs:
        torch.manual_seed(0)
        flow = FlowDecoder(FlowConfig.from_name(name)).eval().to(device)
        hift = HiFTGenerator(HiFTConfig.from_name(name)).remove_weight_norm().eval().to(device)
        unit = UnitVocoder(flow.config.vocab_size, VocoderConfig.from_name(UNIT_VOCODER[name])).remove_weight_norm()
        unit = unit.eval().to(device)
        n = round(a.seconds * flow.config.frame_rate)
        tokens = torch.randint(0, flow.config.vocab_size, (n,)).tolist()
        with torch.inference_mode():
            unit_s = n * unit.hop / unit.sample_rate
            unit_rtf = timed(lambda: unit(torch.tensor([tokens], device=device)), a.repeats, device) / unit_s
            print(f"{name:<20} {params(unit):>7} {'unit HiFi-GAN (' + UNIT_VOCODER[name] + ')':<28} {unit_rtf:>8.4f} "
                  f"{unit_rtf:>14.4f} {1.0:>7.2f}x  {load_line()}")
            units = torch.tensor([tokens], device=device)
            uvocos = UnitVocos(flow.config.vocab_size, VocoderConfig.from_name(UNIT_VOCOS[name])).eval().to(device)
            rtf = timed(lambda: uvocos(units), a.repeats, device) / unit_s
            print(f"{name:<20} {params(uvocos):>7} {'unit Vocos (' + UNIT_VOCOS[name] + ')':<28} {rtf:>8.4f} "
                  f"{unit_rtf:>14.4f} {rtf / unit_rtf:>7.2f}x  {load_line()}")
            vocos = VocosGenerator(VocosConfig.from_name(VOCOS[name])).eval().to(device)
            for steps in a.steps:
                t2w = Token2Wav(flow, hift, n_timesteps=steps)
                t2w_vocos = Token2Wav(flow, vocos, n_timesteps=steps)
                audio_s = t2w.frames(n) * t2w.hop / t2w.sample_rate
                mel = t2w.mel(tokens)
                rows = [(f"flow, {steps} ODE steps", lambda: t2w.mel(tokens), params(flow)),
                        ("HiFT vocoder", lambda: t2w.vocode(mel), params(hift)),
                        ("Vocos vocoder", lambda: t2w_vocos.vocode(mel), params(vocos)),
                        (f"decoder offline ({steps} steps)", lambda: t2w.offline(tokens), params(flow, hift)),
                        (f"  with Vocos ({steps} steps)", lambda: t2w_vocos.offline(tokens), params(flow, vocos)),
                        (f"decoder streamed ({steps} steps)", lambda: streamed(t2w, tokens), params(flow, hift))]
                if steps != a.steps[0]:
                    rows = [r for r in rows if not r[0].endswith(" vocoder")]
                for what, fn, size in rows:
                    rtf = timed(fn, a.repeats, device) / audio_s
                    print(f"{name:<20} {size:>7} {what:<28} {rtf:>8.4f} {unit_rtf:>14.4f} {rtf / unit_rtf:>7.1f}x  "
                          f"{load_line()}")


if __name__ == "__main__":
    main()
