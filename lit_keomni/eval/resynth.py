"""``eval resynth``: how intelligible a speech decoder is, measured as the seeds measure it — held-out utterances
resynthesised from their ground-truth speech tokens, transcribed by a plain-ASR stage-1 export, their CER/WER next to
the same ASR's on the original audio (and UTMOS of both, with local UTMOS weights).

    python -m lit_keomni eval resynth --decoder checkpoints/stage7_flow/export --asr checkpoints/asr/export \\
        --data data/builtin --tokens data/tokens [--speaker agent] [--limit 40] [--utmos-ckpt FILE] [--save-audio]

``--decoder`` is any of the decoders the suite trains or imports:
- a "flow_decoder" export (``recipes/stage7_flow.yaml`` or ``import glm4voice-decoder``): tokens -> mel -> its mel
  vocoder (or ``--vocoder``), ``--ode-steps`` Euler steps;
- a "vocoder" export (``recipes/stage7.yaml``, the unit HiFi-GAN): tokens -> waveform;
- a "mel_vocoder" export (``recipes/stage7_hift.yaml``, HiFT) alone: copy synthesis from each utterance's own mel,
  the vocoder's ceiling (no tokens needed).
Tokens are read from ``--tokens`` (what ``tokenize`` or a stage-7 DataModule wrote for ``--data``); they must come
from the unit source the decoder was trained on (its fingerprint is checked). Writes ``OUT/resynth.json`` (per
utterance: reference, both transcripts, error rates) and ``OUT/resynth.md``; ``--save-audio`` (implied by
``--utmos-ckpt``) keeps the resynthesised wavs in ``OUT/resynth_audio/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from lit_keomni.audio import SAMPLE_RATE, resample
from lit_keomni.eval.report import write_report

DECODER_KINDS = ("flow_decoder", "vocoder", "mel_vocoder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoder", required=True,
                        help="a flow_decoder, vocoder (unit HiFi-GAN) or mel_vocoder (HiFT, copy synthesis) export")
    parser.add_argument("--asr", required=True, help="stage-1 export that transcribes (e.g. checkpoints/asr/export)")
    parser.add_argument("--data", default="data/builtin", help="prepared data folder (default: data/builtin)")
    parser.add_argument("--tokens", default="data/tokens",
                        help="speech tokens of --data from the decoder's unit source (default: data/tokens)")
    parser.add_argument("--split", default="val", help="prepared split (default: val)")
    parser.add_argument("--speaker", default=None, help="only this speaker's utterances (e.g. agent)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N utterances")
    parser.add_argument("--vocoder", default=None, help="mel vocoder export for a flow decoder (default: its own)")
    parser.add_argument("--ode-steps", type=int, default=10, help="flow ODE steps (default: 10, as GLM-4-Voice)")
    parser.add_argument("--utmos-ckpt", default=None, help="local UTMOS weights: UTMOS of original and resynthesis")
    parser.add_argument("--save-audio", action="store_true", help="keep the resynthesised wavs in OUT/resynth_audio")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flow noise and the vocoder's phases")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="reports", help="report folder (default: reports)")


def _decoder_kind(path: str | Path) -> str:
    from lit_keomni.checkpoints import export_kind

    kind = export_kind(path, expected=f"expected one of the decoder exports {DECODER_KINDS}")
    if kind not in DECODER_KINDS:
        raise ValueError(f"{Path(path) / 'config.json'}: field 'kind' is {kind!r}, expected one of {DECODER_KINDS}")
    return kind


def _prepared(data: str | Path, split: str) -> dict[str, dict[str, Any]]:
    from litdata import StreamingDataset

    from datamodules.streaming import chunks_dir

    src = chunks_dir(data, split)
    if not (src / "index.json").is_file():
        raise FileNotFoundError(f"{src}: no prepared chunks (run `python -m lit_keomni prepare --out {data}`)")
    ds = StreamingDataset(str(src))
    return {it["id"]: it for it in (ds[i] for i in range(len(ds)))}


def _tokens(tokens: str | Path, split: str, fingerprint: str | None, decoder: str | Path) -> dict[str, np.ndarray]:
    """Codes by utterance id from a tokens folder whose stamp names the decoder's unit source."""
    from litdata import StreamingDataset

    from datamodules.streaming import chunks_dir
    from lit_keomni.speech_tokens import STAMP

    stamp_path = Path(tokens) / STAMP
    if not stamp_path.is_file():
        raise FileNotFoundError(f"{stamp_path}: missing; tokenize --data with the decoder's unit source "
                                f"(`python -m lit_keomni tokenize`)")
    stamp = json.loads(stamp_path.read_text())
    if fingerprint and stamp.get("fingerprint") != fingerprint:
        raise ValueError(f"{stamp_path}: field 'fingerprint' is {stamp.get('fingerprint')!r}, but {decoder} was trained "
                         f"on the units of {fingerprint!r}: tokenize --data with that unit source")
    src = chunks_dir(tokens, split)
    if not (src / "index.json").is_file():
        raise FileNotFoundError(f"{src}: no tokens of split {split!r}")
    ds = StreamingDataset(str(src))
    return {it["id"]: np.asarray(it["codes"]) for it in (ds[i] for i in range(len(ds)))}


class Synthesiser:
    """One decoder export behind ``__call__(audio, codes) -> waveform`` (float32 numpy at ``rate``): ``codes`` (the
    utterance's tokens) drive a flow decoder or unit vocoder, ``audio`` (the original at ``rate``) a mel vocoder."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from lit_keomni.checkpoints import load_mel_vocoder, load_vocoder
        from lit_keomni.token2wav import load_token2wav

        self.kind = _decoder_kind(args.decoder)
        self.seed = args.seed
        self.fingerprint: str | None = None
        if self.kind == "flow_decoder":
            self.t2w = load_token2wav(args.decoder, args.vocoder, args.device, n_timesteps=args.ode_steps, seed=args.seed)
            self.rate, self.fingerprint = self.t2w.sample_rate, self.t2w.meta.get("units_fingerprint")
        elif self.kind == "vocoder":
            self.model, meta = load_vocoder(args.decoder)
            if self.model.config.num_speakers > 0:
                raise ValueError(f"{args.decoder}: a multi-speaker vocoder ({self.model.config.num_speakers} speakers); "
                                 f"eval resynth speaks with single-speaker vocoders")
            self.model.to(args.device)
            self.rate, self.fingerprint = int(meta["sample_rate"]), meta.get("units_fingerprint")
        else:
            from lit_keomni.nn.hift import MelFrontEnd

            self.model, meta = load_mel_vocoder(args.decoder)
            self.model.to(args.device)
            self.mel = MelFrontEnd.of(self.model.config, meta.get("mel", {}).get("f_max")).to(args.device)
            self.rate = int(meta["sample_rate"])
        self.device = torch.device(args.device)

    @property
    def needs_tokens(self) -> bool:
        return self.kind != "mel_vocoder"

    def __call__(self, audio: np.ndarray, codes: np.ndarray | None) -> np.ndarray:
        import torch

        with torch.no_grad():
            if self.kind == "flow_decoder":
                return self.t2w.offline(torch.as_tensor(codes, dtype=torch.long)).float().cpu().numpy()
            if self.kind == "vocoder":
                units = torch.as_tensor(codes, dtype=torch.long, device=self.device)[None]
                return self.model(units)[0].float().cpu().numpy()
            wav = torch.from_numpy(audio).to(self.device)[None]
            g = torch.Generator(device=self.device).manual_seed(self.seed)
            return self.model.inference(self.mel(wav), generator=g)[0][0].float().cpu().numpy()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Resynthesise, transcribe both sides, score, write the report; returns {"summary", "scores", "json", "markdown"}."""
    import soundfile as sf
    import torch

    from lit_keomni.eval.asr import Transcriber, error_rate, language_family, summary_rows

    synth = Synthesiser(args)
    prepared = _prepared(args.data, args.split)
    codes = _tokens(args.tokens, args.split, synth.fingerprint, args.decoder) if synth.needs_tokens else {}
    ids = [i for i, it in prepared.items() if it.get("text") and (args.speaker is None or it.get("speaker") == args.speaker)]
    if synth.needs_tokens:
        missing = [i for i in ids if i not in codes]
        if missing:
            raise ValueError(f"{args.tokens}: no tokens for {len(missing)} utterance(s) of {args.data} split "
                             f"{args.split!r} (first: {missing[0]!r}); tokenize --data again")
    ids = ids[: args.limit]
    if not ids:
        raise ValueError(f"eval resynth: no transcribed utterances in {args.data} split {args.split!r}"
                         + (f" of speaker {args.speaker!r}" if args.speaker else ""))
    audio_dir = Path(args.out) / "resynth_audio"
    if args.save_audio or args.utmos_ckpt:
        audio_dir.mkdir(parents=True, exist_ok=True)
    items, originals, resynths, synth_s, audio_s = [], [], [], 0.0, 0.0
    for uid in ids:
        it = prepared[uid]
        audio = it["audio"].astype(np.float32) / 32768.0
        at_rate = resample(audio, int(it["sample_rate"]), synth.rate)
        start = time.perf_counter()
        wav = synth(at_rate, codes.get(uid))
        synth_s += time.perf_counter() - start
        audio_s += len(wav) / synth.rate
        item = {"id": uid, "language": language_family(it["language"]), "reference": it["text"]}
        if args.save_audio or args.utmos_ckpt:
            item["audio"] = str(audio_dir / f"{uid}.wav")
            item["original_audio"] = str(audio_dir / f"{uid}.orig.wav")
            sf.write(item["audio"], wav, synth.rate, subtype="FLOAT")  # read back exactly as transcribed
            sf.write(item["original_audio"], at_rate, synth.rate, subtype="FLOAT")
        items.append(item)
        originals.append(torch.from_numpy(resample(audio, int(it["sample_rate"]), SAMPLE_RATE)))
        resynths.append(torch.from_numpy(resample(wav, synth.rate, SAMPLE_RATE)))
    transcriber = Transcriber(args.asr, args.device)
    hyps = {"original": transcriber(originals)[0], "resynthesis": transcriber(resynths)[0]}
    refs, langs = [it["reference"] for it in items], [it["language"] for it in items]
    scores, rows = {}, []
    for system, texts in hyps.items():
        scores[system] = error_rate(refs, texts, langs)
        rows += summary_rows(system, scores[system])
        for it, text in zip(items, texts):
            it[f"{system}_transcript"] = text
    if args.utmos_ckpt:
        from lit_keomni.eval.utmos import load_utmos, score_files

        scorer = load_utmos(args.utmos_ckpt, args.device)
        for system, key in (("original", "original_audio"), ("resynthesis", "audio")):
            values = score_files(scorer, [Path(it[key]) for it in items], args.device)
            scores[system]["utmos"] = float(np.mean(values))
            for row in rows:
                if row["system"] == system and row["language"] == "all":
                    row["UTMOS"] = scores[system]["utmos"]
    rtf = synth_s / max(audio_s, 1e-9)
    settings = {"decoder": str(args.decoder), "kind": synth.kind, "asr": str(args.asr), "data": str(args.data),
                "tokens": str(args.tokens) if synth.needs_tokens else None, "split": args.split,
                "speaker": args.speaker, "utterances": len(items), "ode_steps": args.ode_steps,
                "real_time_factor": rtf, "threads": torch.get_num_threads(), "scores": scores}
    notes = (f"The same ASR ({args.asr}) transcribes the original and the resynthesised audio of {len(items)} held-out "
             f"utterances; resynthesis by a {synth.kind} export"
             + (f" from its tokens ({args.tokens})" if synth.needs_tokens else " from each utterance's own mel")
             + f", real-time factor {rtf:.3f} on {torch.get_num_threads()} thread(s). Error rates in %, text "
               "normalised as `eval asr` does.")
    columns = ["system", "language", "utterances", "CER %", "WER %"] + (["UTMOS"] if args.utmos_ckpt else [])
    json_path, md_path = write_report(args.out, "resynth", rows, settings=settings, items=items, columns=columns,
                                      title="Resynthesis intelligibility", notes=notes)
    print(f"resynth: {json_path}\n{md_path.read_text()}")
    return {"summary": rows, "scores": scores, "json": str(json_path), "markdown": str(md_path)}
