"""``python -m lit_keomni chat``: arguments, one pipeline built from its exports, every input answered, the wavs (and
a JSON of text, timings and the ASR check) written."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lit_keomni.chat.asr_check import AsrCheck
from lit_keomni.chat.glm import GLM_BLOCK, GlmChat
from lit_keomni.chat.inputs import input_files, read_input
from lit_keomni.chat.keomni import KeOmniChat
from lit_keomni.nn.audio import save_wav
from lit_keomni.text.templates import DIALOGUE_MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="question audio: a wav file or a folder of wavs (any rate or channels)")
    p.add_argument("--pipeline", choices=("keomni", "glm"), default="keomni")
    p.add_argument("--model", required=True, help="stage-4 export: keomni_lm (keomni) or speech_lm SFT (glm)")
    p.add_argument("--duration", help="stage-5 duration predictor export (keomni)")
    p.add_argument("--unit-generator", help="stage-6 unit generator export (keomni)")
    p.add_argument("--vocoder", default=None,
                   help="stage-7 unit vocoder export (with --decoder: optionally a mel_vocoder export in place of "
                        "the decoder's own)")
    p.add_argument("--decoder", default=None,
                   help="glm: GLM-4-Voice's flow decoder speaks instead of the unit vocoder: a flow_decoder export "
                        "(recipes/stage7_flow.yaml, `import glm4voice-decoder`) or the released decoder folder")
    p.add_argument("--ode-steps", type=int, default=10, help="glm --decoder: flow-matching ODE steps")
    p.add_argument("--template", choices=DIALOGUE_MODES, default=None,
                   help="glm: dialogue template (default: the one the model was trained with)")
    p.add_argument("--speech-export", default=None, help="glm: stage-1 export (default: the one the model records)")
    p.add_argument("--out", default="chat_out", help="folder for one answer wav per input")
    p.add_argument("--json", default=None, help="write text, timings and ASR check per input to this file")
    p.add_argument("--max-new-tokens", type=int, default=128, help="text tokens of an answer")
    p.add_argument("--max-speech-seconds", type=float, default=10.0, help="glm: speech of an answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--text-chunk", type=int, default=8, help="keomni: text tokens per speech-decoder call")
    p.add_argument("--block", type=int, default=GLM_BLOCK, help="glm: speech tokens per vocoder block")
    p.add_argument("--lookahead", type=int, default=2,
                   help="units after a block before it is vocoded (>= the vocoder's receptive field: exact audio)")
    p.add_argument("--no-asr", action="store_true", help="skip reading the answer back with the stage-1 ASR model")
    p.add_argument("--asr-export", default=None, help="stage-1 export of the ASR check (default: the model's)")
    p.add_argument("--warmup", action="store_true", help="answer the first input once, untimed, before the others")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is often fastest for one request on a busy machine")


def build(args: argparse.Namespace) -> KeOmniChat | GlmChat:
    if args.decoder is not None and args.pipeline != "glm":
        raise ValueError("--decoder is GLM-4-Voice's speech decoder: use it with --pipeline glm")
    if args.decoder is None and args.vocoder is None:
        raise ValueError("chat needs --vocoder (or, with --pipeline glm, --decoder)")
    if args.pipeline == "keomni":
        missing = [f"--{n}" for n in ("duration", "unit-generator") if not getattr(args, n.replace("-", "_"))]
        if missing:
            raise ValueError(f"chat --pipeline keomni needs {' and '.join(missing)}")
        return KeOmniChat.load(args.model, args.duration, args.unit_generator, args.vocoder, device=args.device,
                               text_chunk=args.text_chunk, lookahead=args.lookahead)
    return GlmChat.load(args.model, args.vocoder, template=args.template, speech_export=args.speech_export,
                        device=args.device, decoder=args.decoder, ode_steps=args.ode_steps, block=args.block,
                        lookahead=args.lookahead)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Answer every input, write the wavs (and the JSON); returns what the JSON holds."""
    files = input_files(args.input)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = build(args)
    wavs = [read_input(f, pipe.max_samples) for f in files]
    asr_export = args.asr_export or pipe.stage1
    asr = (None if args.no_asr or not asr_export or not Path(asr_export).is_dir()
           else AsrCheck(asr_export, args.device, pipe.units_fingerprint))
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    kw: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              generator=generator)
    if isinstance(pipe, GlmChat):
        kw["max_speech_seconds"] = args.max_speech_seconds
    if args.warmup:
        pipe(wavs[0], **kw)
    out = Path(args.out)
    results = []
    for f, wav in zip(files, wavs):
        try:
            r = pipe(wav, **kw)
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from None
        target = out / f"{f.stem}.wav"
        save_wav(target, r.wav, r.sample_rate)
        row = {"input": str(f), "output": str(target), **r.summary()}
        if asr is not None:
            row.update(asr.score(r))
        results.append(row)
        first = "none" if r.first_audio is None else f"{1000 * r.first_audio:.0f} ms"
        rtf = "n/a" if r.rtf is None else f"{r.rtf:.3f}"
        parts = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in row["times_s"].items())
        print(f"{f}: {r.text!r}\n  -> {target} ({r.audio_seconds:.2f} s, {len(r.units)} units); first audio "
                 f"{first}, RTF {rtf}; {parts}")
        if asr is not None:
            line = f"  ASR check ({asr.export}): audio {row['asr_text']!r}, CER {_percent(row['cer'])}"
            if "units_cer" in row:
                line += (f"; its units, read without the vocoder: {row['units_asr_text']!r}, "
                         f"CER {_percent(row['units_cer'])}")
            print(line)
    report = {"pipeline": args.pipeline, "exports": pipe.paths, "device": args.device,
              "threads": torch.get_num_threads(), "template": getattr(pipe, "template", None),
              "text_chunk": getattr(pipe, "text_chunk", None),
              "block": getattr(pipe, "block", None), "lookahead": args.lookahead, "temperature": args.temperature,
              "asr_export": str(asr.export) if asr else None, "results": results}
    if args.json:
        from lit_keomni.atomic import write_json

        write_json(args.json, report)
    return report


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def main(argv: Sequence[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m lit_keomni chat",
                                description="Speech in, streamed speech out (KE-Omni or GLM-4-Voice pipeline), timed.")
    add_arguments(p)
    return run(p.parse_args(list(argv)))
