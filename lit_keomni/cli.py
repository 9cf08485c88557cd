"""The command line: LightningCLI for ``fit``/``validate``/``test`` and a few data commands, each a thin call.

    python -m lit_keomni fit --config recipes/stage1.yaml
    python -m lit_keomni prepare [--source PATH [--format kespeechchat|lhotse|kaldi|hf|folder|text]] --out data/builtin
    python -m lit_keomni tokenize --export checkpoints/stage1/export --data data/builtin --out data/tokens
    python -m lit_keomni units fit --hubert DIR --layer 9 --k 4000 --data data/builtin --out checkpoints/units
    python -m lit_keomni units apply --units checkpoints/units --data data/builtin --out data/units
    python -m lit_keomni align --whisper DIR --data JSON_OR_FOLDER --out DIR
    python -m lit_keomni chat --pipeline keomni|glm --model DIR --vocoder DIR [...] question.wav --out chat_out
    python -m lit_keomni chat --pipeline glm --model DIR --decoder checkpoints/stage7_flow/export question.wav
    python -m lit_keomni import glm4voice-decoder glm-4-voice-decoder/ --out checkpoints/glm4voice_decoder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI

from lit_keomni.checkpoints import AtomicCheckpointIO, CheckpointLoadError
from lit_keomni.guards import NonFiniteError

STAGES = {
    "stage1": "speech tokenizer (Whisper encoder + 12.5 Hz VQ, ASR-supervised)  lit_keomni.stages.tokenizer.SpeechTokenizer",
    "stage2": "text-to-token model (text -> speech tokens)                     lit_keomni.stages.text_to_token.TextToToken",
    "stage3": "speech-text pre-training (30 % text, interleaved, speech, ASR, TTS) lit_keomni.stages.pretrain.Pretrain",
    "stage4": "spoken-dialogue SFT: GLM-4-Voice templates (discrete) or KE-Omni encoder+adapter (continuous)  lit_keomni.stages.sft.SFT",
    "stage5": "speech decoder: duration predictor (LLM hidden states -> frames per token)  lit_keomni.stages.duration.DurationStage",
    "stage6": "speech decoder: unit generator (upsampled hidden states -> units, one agent voice)  lit_keomni.stages.unit_generator.UnitGeneratorStage",
    "stage7": "unit HiFi-GAN vocoder (units -> waveform, one per agent speaker)  lit_keomni.stages.vocoder.Vocoder",
    "stage7_hift": "HiFT mel vocoder (80-bin mel -> 22,050 Hz waveform, GLM-4-Voice decoder)  lit_keomni.stages.mel_vocoder.MelVocoder",
    "stage7_flow": "flow-matching decoder (speech tokens -> 22,050 Hz mel, GLM-4-Voice decoder)  lit_keomni.stages.flow_decoder.SpeechFlowDecoder",
}
TRAINER_COMMANDS = ("fit", "validate", "test")


def _recipes() -> list[str]:
    root = Path(__file__).resolve().parent.parent / "recipes"
    return sorted(str(p.relative_to(root.parent)) for p in root.rglob("*.yaml")) if root.is_dir() else []


def usage() -> str:
    lines = [
        "usage: python -m lit_keomni COMMAND [options]   (COMMAND --help for its options)",
        "",
        "training (LightningCLI):",
        "  fit --config RECIPE        train a stage; writes checkpoints/stageN/{last.ckpt,export/} and TensorBoard logs",
        "  validate --config RECIPE   run validation (add --ckpt_path checkpoints/stageN/last.ckpt)",
        "  test --config RECIPE       run the test loop",
        "data:",
        "  prepare                    build the built-in corpus (or --source your corpus, --format ...) into litdata chunks",
        "  tokenize                   encode prepared audio into speech tokens with a stage-1 export",
        "  interleave                 synthesise interleaved speech-text data from text with a stage-2 export",
        "  units fit|apply            HuBERT k-means speech units (fit a units export; write unit ids like tokenize)",
        "  align                      add Whisper word timestamps (the words field) to Ke-SpeechChat dialogues",
        "evaluation:",
        "  eval TASK                  asr, storycloze, spoken-qa, utmos, judge (eval --help lists them)",
        "inference:",
        "  chat INPUT                 speech in, streamed speech out (--pipeline keomni|glm), timed; chat --help",
        "released models:",
        "  import glm4voice-tokenizer DIR   GLM-4-Voice's speech tokenizer as a stage-1 export",
        "  import glm4voice-decoder DIR     GLM-4-Voice's speech decoder (flow + HiFT) as a flow_decoder export",
        "  import lm DIR              a released LM folder (+ --speech-export) as an LM export (chat, eval)",
        "  release EXPORT --out DIR   an export in the released layout it came from (LM: or --format)",
        "",
        "stages:",
        *(f"  {name}  {text}" for name, text in STAGES.items()),
        "",
        "recipes:",
        *(f"  {r}" for r in _recipes()),
    ]
    return "\n".join(lines)


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training bar counts optimizer steps of ``max_steps`` ("Step 120/800 · epoch 6") when
    a run is bounded by steps (Lightning's own reads "Epoch 6/-2" there, as max_epochs is -1)."""

    def _steps_mode(self) -> bool:
        return self.trainer.max_steps > 0

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._steps_mode():
            return super()._get_train_description(current_epoch)
        return f"Step {self.trainer.global_step}/{self.trainer.max_steps} · epoch {current_epoch}"

    def _show_steps(self) -> None:
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is None or not self._steps_mode():
            return
        self.progress.update(self.train_progress_bar_id, total=self.trainer.max_steps,
                             completed=self.trainer.global_step,
                             description=self._get_train_description(self.trainer.current_epoch))
        self.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_steps()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_steps()


class FitSummary(L.Callback):
    """Remembers the step of the last validation, for the figures ``fit_summary`` prints at the end of ``fit``."""

    def __init__(self) -> None:
        self.val_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_step = trainer.global_step


def fit_summary(trainer: L.Trainer, model: L.LightningModule) -> str:
    """What a finished ``fit`` gives the user: steps, the last validation figures (CER/WER, losses), the export and
    the last checkpoint."""
    lines = [f"fit finished: step {trainer.global_step}" + (f"/{trainer.max_steps}" if trainer.max_steps > 0 else "")]
    val = {k: float(v) for k, v in sorted(trainer.callback_metrics.items())
           if k.startswith("val") and getattr(v, "numel", lambda: 1)() == 1}
    summary = next((c for c in trainer.callbacks if isinstance(c, FitSummary)), None)
    if val:
        at = f" (at step {summary.val_step})" if summary is not None and summary.val_step is not None else ""
        width = max(len(k) for k in val)
        lines.append(f"final validation{at}:")
        lines += [f"  {k:<{width}}  {v:.4g}" for k, v in val.items()]
    else:
        lines.append("final validation: none ran (set trainer.val_check_interval / limit_val_batches)")
    from lit_keomni.checkpoints import Export

    export = next((c for c in trainer.callbacks if isinstance(c, Export)), None)
    target = export and (export.dirpath or model.hparams.get("export_dir"))
    if target and Path(target).exists():
        lines.append(f"export: {target}")
    ckpt = next((c for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")), None)
    if ckpt is not None:
        lines.append(f"last checkpoint: {ckpt.last_model_path}")
    return "\n".join(lines)


class KeOmniCLI(LightningCLI):
    """LightningCLI with our defaults: any stage module/datamodule by ``class_path``, atomic checkpoint files."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        # Denormal floats (the tails of padded, near-silent frames) run at a fraction of the speed of normal ones on
        # CPUs: flushed to zero, a padded stage-1 batch trains up to 10x faster (benchmarks/stage1_step.py).
        torch.set_flush_denormal(True)
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=1234,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml"},
            args=args,
            run=run,
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyper-parameters of an explicit --ckpt_path file before any trainer exists: a
        # truncated file must fail here with the same one-line error as AtomicCheckpointIO.load_checkpoint.
        try:
            super()._parse_ckpt_path()
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:
            raise CheckpointLoadError.unreadable(self.config[self.config.subcommand].get("ckpt_path"), e) from e

    def instantiate_trainer(self, **kwargs):  # type: ignore[override]
        # Checkpoint files are always written atomically (temp file + rename), whatever the recipe says.
        plugins = list(kwargs.pop("plugins", None) or [])
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(AtomicCheckpointIO())
        trainer = super().instantiate_trainer(plugins=plugins, **kwargs)
        # Recipes name Lightning's RichProgressBar; ours counts steps of max_steps (same settings).
        for i, cb in enumerate(trainer.callbacks):
            if type(cb) is RichProgressBar:
                trainer.callbacks[i] = StepProgressBar(refresh_rate=cb.refresh_rate, leave=cb._leave, theme=cb.theme,
                                                       console_kwargs=cb._console_kwargs)
        trainer.callbacks.append(FitSummary())
        return trainer

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer, self.model))


def prepare_command(argv: list[str]) -> None:
    from datamodules.sources import FORMATS, SourceOptions
    from datamodules.streaming import ORDERS, prepare

    p = argparse.ArgumentParser(prog="python -m lit_keomni prepare",
                                description="Validate a corpus (or build the built-in one) and write the litdata chunks every stage reads.")
    p.add_argument("--source", default=None,
                   help="your corpus: Ke-SpeechChat JSON, a lhotse CutSet or recordings+supervisions, a Kaldi data "
                        "folder, a Hugging Face dataset (save_to_disk folder or parquet), a folder of audio (+ .txt/.lab "
                        "transcripts), or text (.txt/.jsonl/.parquet) (default: built-in corpus)")
    p.add_argument("--format", choices=FORMATS, default=None, help="layout of --source (default: detected)")
    p.add_argument("--out", default="data/builtin", help="output folder: chunks/{train,val}, tokenizer.json, prepared.json "
                                                         "(text: text/)")
    p.add_argument("--language", default="en", help="language of items that do not name their own")
    p.add_argument("--audio-column", default="audio", help="hf: column of the audio (bytes or paths)")
    p.add_argument("--text-column", default="text", help="hf and parquet text: column of the transcript / document")
    p.add_argument("--language-column", default=None, help="hf: column of each row's language")
    p.add_argument("--num-dialogues", type=int, default=1200, help="size of the built-in corpus")
    p.add_argument("--seed", type=int, default=1234, help="seed of the built-in corpus")
    p.add_argument("--sample-rate", type=int, default=None,
                   help="rate audio is decoded to, once, here (default: 22050 for dialogues, 16000 for ASR/speech)")
    p.add_argument("--max-duration", type=float, default=30.0, help="longest accepted clip in seconds")
    p.add_argument("--val-fraction", type=float, default=0.06, help="fraction of dialogues/recordings held out for validation")
    p.add_argument("--tokenizer-vocab", type=int, default=600,
                   help="BPE vocabulary trained on the transcripts (small: every Chinese character plus a few hundred "
                        "English pieces, which a tiny ASR model learns from little data)")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--order", choices=ORDERS, default="bucketed",
                   help="order of the training chunks: bucketed (similar lengths, mixed content per batch), duration "
                        "(similar lengths and content) or shuffled (mixed batches, much padding)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip invalid items, writing each with its reason to OUT/rejected.jsonl, instead of stopping")
    a = p.parse_args(argv)
    options = SourceOptions(language=a.language, audio_column=a.audio_column, text_column=a.text_column,
                            language_column=a.language_column)
    stamp = prepare(a.out, a.source, format=a.format, options=options, num_dialogues=a.num_dialogues, seed=a.seed,
                    sample_rate=a.sample_rate, max_duration=a.max_duration, val_fraction=a.val_fraction,
                    skip_invalid=a.skip_invalid, tokenizer_vocab=a.tokenizer_vocab, workers=a.workers,
                    order=a.order)
    if stamp["format"] == "text":
        print(f"prepared {stamp['documents']} text documents in {stamp['text_source']}")
        return
    skipped = f"; skipped items: {stamp['rejected_report']}" if stamp["rejected_report"] else ""
    print(f"prepared {stamp['utterances']} {stamp['format']} utterances ({stamp['hours']} h, "
          f"{stamp['sample_rate']} Hz) in {a.out}{skipped}")


def tokenize_command(argv: list[str]) -> None:
    from lit_keomni.speech_tokens import tokenize

    p = argparse.ArgumentParser(prog="python -m lit_keomni tokenize",
                                description="Encode prepared utterances into speech tokens with a stage-1 export.")
    p.add_argument("--export", required=True, help="stage-1 export folder (checkpoints/stage1/export)")
    p.add_argument("--data", default="data/builtin", help="prepared data folder (from `prepare`)")
    p.add_argument("--out", required=True, help="output folder: chunks/{train,val} with codes, tokens.json")
    p.add_argument("--batch-size", type=int, default=32, help="utterances encoded per batch")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    a = p.parse_args(argv)
    stamp = tokenize(a.export, a.data, a.out, batch_size=a.batch_size, workers=a.workers, device=a.device)
    print(f"wrote speech tokens ({stamp['frame_rate_hz']} Hz, {stamp['codebook_size']} codes) for {stamp['splits']} to {a.out}")


def interleave_command(argv: list[str]) -> None:
    from lit_keomni.interleave import interleave

    p = argparse.ArgumentParser(prog="python -m lit_keomni interleave",
                                description="Synthesise interleaved speech-text data from a text corpus with a stage-2 export (span corruption).")
    p.add_argument("--export", required=True, help="stage-2 export folder (checkpoints/stage2/export)")
    p.add_argument("--source", default="data/builtin/text",
                   help="text corpus: a .txt (one document per line), a .jsonl with a 'text' field, a folder of those, "
                        "or litdata chunks with a 'text' field (local or cloud URL)")
    p.add_argument("--out", required=True, help="output folder: chunks/, shards/, stats.json")
    p.add_argument("--ratio", type=float, default=0.3, help="span corruption ratio η (share of text tokens turned into speech)")
    p.add_argument("--mean-span", type=float, default=10.0, help="Poisson λ of span lengths in text tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="spans generated per batch")
    p.add_argument("--shard-size", type=int, default=1000, help="documents per resumable shard")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents")
    a = p.parse_args(argv)
    interleave(a.export, a.source, a.out, ratio=a.ratio, mean_span=a.mean_span, seed=a.seed, batch_size=a.batch_size,
               shard_size=a.shard_size, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, device=a.device,
               limit=a.limit)


def eval_command(argv: list[str]) -> None:
    from lit_keomni.eval.cli import eval_command as run

    run(argv)


def units_command(argv: list[str]) -> None:
    from lit_keomni import units

    p = argparse.ArgumentParser(prog="python -m lit_keomni units",
                                description="HuBERT k-means speech units (KE-Omni §4.3): fit the k-means model, then "
                                            "write every prepared utterance's unit ids in the data/tokens layout.")
    sub = p.add_subparsers(dest="step", required=True)
    fit = sub.add_parser("fit", help="fit k-means on HuBERT features of the prepared training split")
    fit.add_argument("--hubert", required=True, help="local Hugging Face HuBERT folder (config.json + weights)")
    fit.add_argument("--layer", type=int, required=True,
                     help="hidden-state index (0 = transformer input, N = output of layer N)")
    fit.add_argument("--k", type=int, default=4000, help="number of units (clusters); the paper uses 4000")
    fit.add_argument("--data", default="data/builtin", help="prepared data folder (from `prepare`)")
    fit.add_argument("--out", default="checkpoints/units", help="units export folder")
    fit.add_argument("--max-frames", type=int, default=1_000_000,
                     help="uniform random sample of HuBERT frames k-means is fitted on (0 = all)")
    fit.add_argument("--max-utterances", type=int, default=0,
                     help="features from a random subset of this many training utterances (0 = all)")
    fit.add_argument("--init", choices=("k-means++", "random"), default="k-means++")
    fit.add_argument("--max-iter", type=int, default=100, help="most Lloyd iterations")
    fit.add_argument("--tol", type=float, default=1e-4, help="stop when centroids move less than tol x feature variance")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--batch-size", type=int, default=16, help="utterances per HuBERT batch")
    fit.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    app = sub.add_parser("apply", help="write unit ids of every prepared utterance (OUT/chunks/{train,val}, tokens.json)")
    app.add_argument("--units", default="checkpoints/units", help="units export folder (from `units fit`)")
    app.add_argument("--hubert", default=None, help="HuBERT folder the units were fitted on (default: the one recorded)")
    app.add_argument("--data", default="data/builtin", help="prepared data folder (from `prepare`)")
    app.add_argument("--out", default="data/units", help="output folder, read by stages 5-7 as tokens_dir")
    app.add_argument("--batch-size", type=int, default=16, help="utterances per job")
    app.add_argument("--workers", type=int, default=1, help="worker processes")
    app.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    a = p.parse_args(argv)
    if a.step == "fit":
        meta = units.fit_units(a.hubert, a.data, a.out, layer=a.layer, k=a.k, max_frames=a.max_frames or None,
                               max_utterances=a.max_utterances or None, init=a.init, max_iter=a.max_iter, tol=a.tol,
                               seed=a.seed, batch_size=a.batch_size, device=a.device)
        fit = meta["fit"]
        print(f"wrote {a.out}: {meta['config']['num_units']} units of HuBERT layer {a.layer} "
              f"({meta['config']['frame_rate']} Hz) from {fit['frames_fitted']} of {fit['frames_seen']} frames; "
              f"inertia {fit['inertia']}, {fit['used']}/{fit['num_units']} units used, perplexity {fit['perplexity']}, "
              f"{fit['iterations']} iterations{'' if fit['converged'] else ' (not converged)'}")
    else:
        stamp = units.apply_units(a.units, a.data, a.out, hubert=a.hubert, batch_size=a.batch_size,
                                  workers=a.workers, device=a.device)
        print(f"wrote HuBERT units ({stamp['frame_rate_hz']} Hz, {stamp['codebook_size']} units) for {stamp['splits']} "
              f"to {a.out}")


def align_command(argv: list[str]) -> None:
    from lit_keomni.align import align

    p = argparse.ArgumentParser(prog="python -m lit_keomni align",
                                description="Word timestamps from a local Whisper folder (forced alignment of each turn's "
                                            "text) for turns without a words field; writes Ke-SpeechChat JSON copies.")
    p.add_argument("--whisper", required=True, help="local Hugging Face Whisper folder (model, processor, generation_config)")
    p.add_argument("--data", required=True, help="Ke-SpeechChat dialogues: a folder of JSON, a .json or a .jsonl file")
    p.add_argument("--out", required=True, help="output folder: one DIALOGUE_ID.json per dialogue (audio paths rewritten)")
    p.add_argument("--batch-size", type=int, default=8, help="turns per Whisper batch")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    a = p.parse_args(argv)
    summary = align(a.whisper, a.data, a.out, batch_size=a.batch_size, device=a.device)
    print(f"aligned {summary['aligned_turns']} turns ({summary['kept_turns']} kept their words) of "
          f"{summary['dialogues']} dialogues into {a.out}")


def release_command(argv: list[str]) -> None:
    from lit_keomni.layouts import LM_FORMATS
    from lit_keomni.release import DECODER_FORMAT, release

    p = argparse.ArgumentParser(prog="python -m lit_keomni release",
                                description="Write an LM export (stage 2, 3 or discrete stage 4) in a released layout "
                                            "(weights, config.json, vocabulary files, the source folder's remote code), "
                                            "for transformers, vLLM, SGLang or the reference code; a stage-1 export "
                                            "as the glm-4-voice-tokenizer layout; a flow_decoder export as the "
                                            "glm-4-voice-decoder layout (config.yaml, flow.pt, hift.pt).")
    p.add_argument("export", help="export folder, e.g. checkpoints/stage4/export or checkpoints/stage7_flow/export")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    p.add_argument("--format", choices=LM_FORMATS + (DECODER_FORMAT,), default=None,
                   help="layout to write (default: the one the export's weights came from)")
    a = p.parse_args(argv)
    out = release(a.export, a.out, a.format)
    print(f"wrote {out}")


def import_command(argv: list[str]) -> None:
    from lit_keomni.release import IMPORT_STAGES, import_lm, import_speech_tokenizer
    from lit_keomni.text.templates import DIALOGUE_MODES

    p = argparse.ArgumentParser(prog="python -m lit_keomni import",
                                description="Turn a released model folder (local; nothing is downloaded) into one of "
                                            "our exports, which every later stage, chat and eval take.")
    sub = p.add_subparsers(dest="what", required=True)
    lm = sub.add_parser("lm", help="a released LM folder (Llama, Qwen2, Glm, Glm4, ChatGLM) + a stage-1 export -> an "
                                   "LM export with the folder's own vocabulary")
    lm.add_argument("folder", help="released LM folder: config.json, *.safetensors, tokenizer.json or tokenizer.model")
    lm.add_argument("--speech-export", required=True, help="stage-1 export whose codes the LM's audio tokens are")
    lm.add_argument("--out", required=True, help="export folder to write (replaced atomically)")
    lm.add_argument("--stage", choices=IMPORT_STAGES, default="sft",
                    help="the stage the export stands for (sft: chat and spoken-qa use its template)")
    lm.add_argument("--template", choices=DIALOGUE_MODES, default="streaming",
                    help="dialogue template of the released model (glm-4-voice-9b: streaming)")
    st = sub.add_parser("glm4voice-tokenizer", help="GLM-4-Voice's released speech tokenizer folder -> a stage-1 "
                                                    "export (tokenize, chat --pipeline glm, stage 1 init_from)")
    st.add_argument("folder", help="released folder: config.json, model.safetensors, preprocessor_config.json")
    st.add_argument("--out", required=True, help="export folder to write (replaced atomically)")
    st.add_argument("--tokenizer", default=None,
                    help="tokenizer.json of the ASR decoder when the folder has none (whisper-large-v3's)")
    dec = sub.add_parser("glm4voice-decoder", help="GLM-4-Voice's released speech decoder folder -> a flow_decoder "
                                                   "export with its HiFT as a mel_vocoder export inside (chat --decoder)")
    dec.add_argument("folder", help="released folder: config.yaml, flow.pt, hift.pt")
    dec.add_argument("--out", required=True, help="export folder to write (replaced atomically)")
    dec.add_argument("--speech-export", default=None,
                     help="the imported glm-4-voice-tokenizer export whose tokens it decodes (recorded, so that chat "
                          "checks the LM writes them)")
    a = p.parse_args(argv)
    if a.what == "lm":
        out = import_lm(a.folder, a.speech_export, a.out, stage=a.stage, template=a.template)
    elif a.what == "glm4voice-decoder":
        from lit_keomni.token2wav import import_glm4voice_decoder

        out = import_glm4voice_decoder(a.folder, a.out, a.speech_export)
    else:
        out = import_speech_tokenizer(a.folder, a.out, tokenizer=a.tokenizer)
    print(f"wrote {out}")


def chat_command(argv: list[str]) -> None:
    from lit_keomni.chat import main as chat

    chat(argv)


COMMANDS = {"prepare": prepare_command, "tokenize": tokenize_command, "interleave": interleave_command,
            "eval": eval_command, "units": units_command, "align": align_command,
            "chat": chat_command, "import": import_command, "release": release_command}


def main(argv: list[str] | None = None) -> None:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        try:
            COMMANDS[command](rest)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        return
    if command not in TRAINER_COMMANDS:
        sys.exit(f"error: unknown command {command!r}\n\n{usage()}")
    try:
        KeOmniCLI(args=None if from_shell else argv)
    except (CheckpointLoadError, NonFiniteError, FileNotFoundError) as e:
        # a missing export/tokenizer/checkpoint or a NaN stop: the message names the file or the step and sample
        # ids, the trainer's traceback adds nothing
        sys.exit(f"error: {e}")
