"""Speech-tokenizer encode speed on CPU, beside a same-size Hugging Face Whisper encoder, in one process.

    python benchmarks/tokenizer.py [--seconds 8 --batch 8 --repeats 5 --threads N --preset tiny]

Builds our stage-1 model (``SpeechTokenizerConfig`` preset, random init, random VQ codebook) and a
``transformers.WhisperModel`` with the same d_model, heads, ffn, mel bins, encoder layers and positions (SDPA attention),
then times a batch of ``--batch`` synthetic speech-like clips of ``--seconds`` s at 16 kHz. Figures are × real time =
real audio seconds (batch × seconds, padding not counted) / median wall seconds over ``--repeats`` runs after warm-up.

Rows (HF Whisper only accepts exactly 2 × max_source_positions mel frames, i.e. 30 s, so its mel is always padded):
  tokenize, as used      ours: LogMel + encode_tokens (layers below the VQ) on the clip's own frames;
                         HF:   the same LogMel, padded to 30 s, + the full HF encoder (what one would otherwise run).
  tokenize, 30 s input   the same, but ours also gets the 30 s padded mel.
  full encoder, as used  ours: model.encoder (all layers, pooling, VQ, causal conv, block-causal masks) from the mel;
                         HF:   full encoder from the 30 s padded mel (mel computed outside the timing for both).
  full encoder, 30 s     equal work: both from the same 30 s padded mel.
A breakdown of our tokenize path (LogMel, encode_tokens) follows the table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from torch import Tensor

from common import machine_line
from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.configs import SpeechTokenizerConfig
from lit_keomni.nn.audio import LogMel
from lit_keomni.nn.whisper import SpeechTokenizerModel


def speech_like(batch: int, seconds: float, seed: int = 0) -> Tensor:
    """(B, S) harmonics of a wandering 100-250 Hz pitch under a syllable-rate (~4 Hz) envelope, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 100 + 150 * torch.rand(batch, 1, generator=g) + 20 * torch.sin(2 * math.pi * 0.5 * t)
    phase = 2 * math.pi * torch.cumsum(f0.expand(batch, -1), dim=1) / SAMPLE_RATE
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 11))
    envelope = torch.sin(2 * math.pi * (3 + 2 * torch.rand(batch, 1, generator=g)) * t).clamp_min(0)
    return 0.1 * envelope * voiced + 0.005 * torch.randn(batch, t.numel(), generator=g)


def pad_mel(mel: Tensor, frames: int) -> Tensor:
    """Pad (B, n_mels, T) to ``frames`` with each clip's quietest value (what silence becomes after LogMel's floor)."""
    fill = mel.amin(dim=(1, 2), keepdim=True).expand(-1, mel.shape[1], frames - mel.shape[2])
    return torch.cat([mel, fill], dim=2)


def bench(fns: list[Callable[[], object]], repeats: int, warmup: int = 2) -> list[float]:
    """Median wall seconds of each ``fn()`` over ``repeats`` rounds after ``warmup`` rounds.

    Rounds run every function once, in turn, so a load change on a shared machine hits all figures alike.
    """
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--preset", default="tiny")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    cfg = SpeechTokenizerConfig.from_name(a.preset, vocab_size=1000)
    if not 0 < a.seconds <= cfg.max_source_positions / 50:
        p.error(f"--seconds must be in (0, {cfg.max_source_positions / 50:g}]")
    ours = SpeechTokenizerModel(cfg).eval()
    ours.encoder.quantizer.init_codebook(torch.randn(cfg.codebook_size, cfg.d_model))
    hf_cfg = transformers.WhisperConfig(
        vocab_size=cfg.vocab_size, num_mel_bins=cfg.n_mels, d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers, encoder_attention_heads=cfg.n_head, encoder_ffn_dim=cfg.ffn_dim,
        decoder_layers=cfg.decoder_layers, decoder_attention_heads=cfg.n_head, decoder_ffn_dim=cfg.ffn_dim,
        max_source_positions=cfg.max_source_positions, max_target_positions=cfg.max_target_positions,
        **{f"{k}_token_id": cfg.vocab_size - 1 for k in ("pad", "bos", "eos", "decoder_start")},
        attn_implementation="sdpa",
    )
    hf = transformers.WhisperModel(hf_cfg).eval().get_encoder()
    logmel = LogMel(n_mels=cfg.n_mels)

    wav = speech_like(a.batch, a.seconds)
    lengths = torch.full((a.batch,), wav.shape[1], dtype=torch.long)
    full_frames = 2 * cfg.max_source_positions
    audio_s = a.batch * a.seconds

    with torch.inference_mode():
        mel, mel_len = logmel(wav, lengths)
        mel30 = pad_mel(mel, full_frames)
        n_ours, n_hf = (sum(x.numel() for x in m.parameters()) for m in (ours.encoder, hf))

        def tok(pad: bool) -> Callable[[], object]:
            def run() -> object:
                m, n = logmel(wav, lengths)
                return ours.encode_tokens(pad_mel(m, full_frames) if pad else m, n)
            return run

        def hf_tok() -> object:
            m, _ = logmel(wav, lengths)
            return hf(input_features=pad_mel(m, full_frames)).last_hidden_state

        rows = [
            ("tokenize, as used", tok(False), hf_tok),
            ("tokenize, 30 s input", tok(True), hf_tok),
            ("full encoder, as used", lambda: ours.encoder(mel, mel_len), lambda: hf(input_features=mel30)),
            ("full encoder, 30 s input", lambda: ours.encoder(mel30, mel_len), lambda: hf(input_features=mel30)),
        ]
        extra = [lambda: logmel(wav, lengths), lambda: ours.encode_tokens(mel, mel_len),
                 lambda: ours.encode_tokens(mel30, mel_len)]
        t = bench([f for _, f_ours, f_hf in rows for f in (f_ours, f_hf)] + extra, a.repeats)
        results = [(name, t[2 * i], t[2 * i + 1]) for i, (name, _, _) in enumerate(rows)]
        t_mel, t_enc, t_enc30 = t[-3:]

    print(machine_line(torch.device("cpu")))
    print(f"config {a.preset!r}: d_model={cfg.d_model} heads={cfg.n_head} ffn={cfg.ffn_dim} mels={cfg.n_mels} "
          f"layers={cfg.encoder_layers} (VQ after {cfg.vq_position}, pool {cfg.pool}, block "
          f"{cfg.block_seconds} s, causal conv {cfg.causal_conv}); encoder params ours {n_ours / 1e6:.2f} M, "
          f"HF {n_hf / 1e6:.2f} M (incl. its position table)")
    print(f"audio: {a.batch} clips × {a.seconds:g} s at {SAMPLE_RATE} Hz = {audio_s:g} s; median of {a.repeats} runs; "
          f"× real time = {audio_s:g} s / wall s (padding not counted)\n")
    print(f"{'comparison':<26}{'ours ms':>10}{'ours ×RT':>11}{'HF ms':>10}{'HF ×RT':>10}{'ours/HF':>9}")
    for name, t_o, t_h in results:
        print(f"{name:<26}{t_o * 1e3:>10.1f}{audio_s / t_o:>11.1f}{t_h * 1e3:>10.1f}{audio_s / t_h:>10.1f}"
              f"{t_h / t_o:>8.2f}×")
    print(f"\nours, tokenize breakdown: LogMel {t_mel * 1e3:.1f} ms ({audio_s / t_mel:.0f}× RT); encode_tokens "
          f"{t_enc * 1e3:.1f} ms on {mel.shape[-1]} frames, {t_enc30 * 1e3:.1f} ms on {full_frames} frames")


if __name__ == "__main__":
    main()
